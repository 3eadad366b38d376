"""`airvae plot`: every figure of a run, and the numbers behind them against what training logged."""

import json

import numpy as np
import pytest
import torch

from airvae.cli import main
from airvae.config import Regularizer, resolve_run_config
from airvae.plots import FIGURES, plot_run
from airvae.runs import load_trained_model
from airvae.train import train


def _npz(path, dim, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.random(dim) * 0.5
    make = lambda n: (rng.random((n, dim)) < probs).astype(np.uint8)  # noqa: E731
    np.savez(path, train=make(200), valid=make(50), test=make(40))
    return str(path)


def _train(tmp_path, dim, regularizer, track_test_examples=0):
    data = _npz(tmp_path / f"data{dim}.npz", dim)
    cfg = resolve_run_config(data, x_dim=dim, budget="smoke", encoder="d32", decoder="d32", z_dim=4,
                             regularizer=regularizer, track_test_examples=track_test_examples or None,
                             iterations=30, val_every=10, batch_size=20, device="cpu")
    run = tmp_path / f"run{dim}"
    train(cfg, run, progress=False)
    return run


@pytest.fixture(scope="module")
def wni_dvae_run(tmp_path_factory):
    # Both regularizers and a tracked test bound: every figure and every curve applies. Plotted once.
    run = _train(tmp_path_factory.mktemp("plots"), 784, Regularizer(sigma=0.3, max_norm=2.0), track_test_examples=16)
    plots = plot_run(run, device="cpu")
    assert plots.skipped == {}
    return run


def test_plot_writes_every_figure_of_a_denoising_wni_run(wni_dvae_run):
    for name in FIGURES:
        png = wni_dvae_run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_curves_drawn_are_the_logged_metrics(wni_dvae_run):
    logged = [json.loads(line) for line in (wni_dvae_run / "metrics.jsonl").read_text().splitlines()]
    drawn = json.loads((wni_dvae_run / "plots" / "curves.json").read_text())  # read back from the figure's lines
    assert set(drawn) == {"train_loss", "val_log_likelihood", "lr", "test_bound"}
    assert len(logged) == 3
    for key, curve in drawn.items():
        assert curve["step"] == [r["step"] for r in logged]
        assert curve["value"] == [r[key] for r in logged]  # exactly, not approximately


def test_weight_norms_obey_eq_18_and_posterior_statistics_match_the_encoder(wni_dvae_run):
    norms = json.loads((wni_dvae_run / "plots" / "weight_norms.json").read_text())
    _, model = load_trained_model(wni_dvae_run)
    layers = dict(model.encoder.named_modules())
    assert set(norms) == {"encoder.trunk.0", "encoder.mean", "encoder.var"}
    for name, layer in norms.items():
        v, u = layers[name].v.detach(), layers[name].u.detach()
        # eq. 18 from the raw parameters: ||w_i|| = min(||v_i||, H sigmoid(u_i)) <= H
        expected = torch.minimum(v.norm(dim=1), 2.0 * torch.sigmoid(u))
        assert torch.allclose(torch.tensor(layer["norms"]), expected.float(), rtol=1e-5)
        assert layer["H"] == 2.0 and max(layer["norms"]) <= 2.0
    posterior = json.loads((wni_dvae_run / "plots" / "posterior.json").read_text())
    x = torch.as_tensor(np.load(wni_dvae_run.parent / "data784.npz")["test"], dtype=torch.float32)
    with torch.no_grad():
        mean, _ = model.encoder.encoder(x)  # the clean input: a denoising encoder's wrapped network
    activity = mean.double().var(dim=0)  # all 40 test examples are used (fewer than --examples)
    assert torch.allclose(torch.tensor(posterior["activity"], dtype=torch.float64), activity, rtol=1e-5)
    assert posterior["active_units"] == int((activity > 0.01).sum()) and posterior["z_dim"] == 4


def test_non_image_data_skips_the_image_figures_and_says_why(tmp_path, capsys):
    run = _train(tmp_path, 10, Regularizer())
    assert main(["plot", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"written {run / 'plots' / 'curves.png'}" in out
    assert "skipped samples: x_dim = 10 values are not an image" in out
    assert "skipped reconstructions: x_dim = 10" in out and "skipped weight_norms: not a WNI run" in out
    assert {p.stem for p in (run / "plots").glob("*.png")} == {"curves", "posterior"}


def test_plot_of_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "not an airvae run directory" in capsys.readouterr().err


def test_the_noisy_row_exists_only_for_a_denoising_encoder():
    from airvae.model import build_vae
    from airvae.plots import _reconstructions_figure

    x = (torch.rand(3, 784) < 0.3).float()
    with torch.no_grad():
        plain = _reconstructions_figure(build_vae(784, 4, "d8", "d8").eval(), x, 0, (1, 28, 28), False)
        noisy = _reconstructions_figure(build_vae(784, 4, "d8", "d8", sigma=0.3).eval(), x, 0, (1, 28, 28), False)
    assert len(plain.axes) == 2 and len(noisy.axes) == 4
    assert "what the denoising encoder sees" in noisy.axes[2].get_title()


def test_weight_norms_cover_the_convolutions_of_a_conv_wni_encoder(tmp_path):
    from airvae.model import build_vae
    from airvae.plots import _capped_layers, _weight_norms_figure

    model = build_vae(1 * 8 * 8, 3, "c4k3s2-d8", "d8-c4k3s2", max_norm=1.5, image_shape=(1, 8, 8))
    layers = {name: (norms, caps, h) for name, norms, caps, h in _capped_layers(model.encoder)}
    convs = [name for name, m in model.encoder.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and set(convs) < set(layers)  # the dense layers are there too
    for name in convs:
        norms, caps, h = layers[name]
        weight = dict(model.encoder.named_modules())[name].weight
        assert torch.equal(norms, weight.flatten(1).norm(dim=1)) and h == 1.5 and (norms <= caps * (1 + 1e-6)).all()
    _weight_norms_figure(_capped_layers(model.encoder), tmp_path / "weight_norms.json")
    assert set(json.loads((tmp_path / "weight_norms.json").read_text())) == set(layers)
