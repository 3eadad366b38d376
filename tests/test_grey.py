"""Beyond the paper's binary MLPs: conv architecture specs, likelihood settings in runs, grey-level
and real-valued data through the command line, BDMC from ``airvae evaluate``, and the paired
differences of the ``grey-conv`` question."""

import json
import math

import numpy as np
import pytest
import torch
from test_safety import one_error_line

from airvae.cli import main
from airvae.config import ConfigError, LikelihoodConfig, RunConfig, resolve_run_config
from airvae.data import load_dataset
from airvae.likelihoods import DiscretizedLogistic
from airvae.model import model_from_config
from airvae.networks import Conv, ConvDecoder, ConvEncoder, conv_map_shapes, parse_spec
from airvae.questions import grey_conv
from airvae.report import bdmc_section
from airvae.reproduce import extra_evaluation
from airvae.resources import model_bytes
from airvae.runs import load_trained_model
from airvae.sweep import Job

SMALL = ["--budget", "smoke", "--iterations", "4", "--val-every", "2", "--val-k", "4", "--batch-size", "20",
         "--z-dim", "3", "--no-progress", "--device", "cpu"]


# ----------------------------------------------------------------------------------------------
# Conv specs


def test_conv_specs_parse_in_data_flow_order_and_refuse_bad_orders():
    assert parse_spec("c32k4s2-c64k4s2-d256") == ((Conv(32, 4, 2), Conv(64, 4, 2)), (256,))
    assert parse_spec("d256-c64k4s2-c32k4s2", "decoder") == ((Conv(64, 4, 2), Conv(32, 4, 2)), (256,))
    assert parse_spec("d300-d300") == ((), (300, 300)) and parse_spec("none", "decoder") == ((), ())
    with pytest.raises(ValueError, match="an encoder lists its convolution layers before its dense"):
        parse_spec("d256-c32k4s2")
    with pytest.raises(ValueError, match="a decoder lists its dense layers before its convolution"):
        parse_spec("c32k4s2-d256", "decoder")
    for bad in ("c32k4", "c0k4s2", "c32k4s0", "c32-d3", "k4s2"):
        with pytest.raises(ValueError, match="neither 'd<units>'"):
            parse_spec(bad)
    with pytest.raises(ValueError, match="would shrink the 1x1 map to 0x0"):
        conv_map_shapes((1, 8, 8), (Conv(4, 4, 2),) * 4)  # 8 -> 4 -> 2 -> 1 -> 0


@pytest.mark.parametrize("height, width", [(1, 1), (5, 7), (8, 8), (12, 9)])
def test_conv_decoders_restore_the_exact_image_size_of_their_mirror(height, width):
    """For every kernel 1-5 and stride 1-3, a transposed convolution undoes the size change of its
    mirror exactly (output = (size + 2p - k) // s + 1 going in, the same size coming out)."""
    for kernel in range(1, 6):
        for stride in range(1, 4):
            for depth in (1, 2):
                convs = (Conv(2, kernel, stride),) * depth
                try:
                    shapes = conv_map_shapes((1, height, width), convs)
                except ValueError:
                    continue
                spec = "-".join([f"c2k{kernel}s{stride}"] * depth)
                encoder, decoder = ConvEncoder((1, height, width), 3, spec), ConvDecoder(3, (1, height, width), spec, 2)
                assert encoder.convs(torch.zeros(1, 1, height, width)).shape[1:] == shapes[-1]
                assert decoder(torch.zeros(4, 3)).shape == (4, 2, height, width), (spec, height, width)


def test_flattened_conv_decoder_keeps_the_likelihood_layout():
    """The conv decoder's flat output scores flat data exactly as its image output scores images:
    parameter p of dimension d sits at p * D + d in both."""
    torch.manual_seed(0)
    likelihood = DiscretizedLogistic(num_bins=17, components=2)
    decoder = ConvDecoder(3, (2, 5, 4), "d8-c6k3s2", likelihood.params_per_dim)
    z, x = torch.randn(7, 3), torch.randint(0, 17, (7, 2, 5, 4)) / 16
    images = decoder(z)
    decoder.flatten = True
    flat = decoder(z)
    torch.testing.assert_close(flat, images.flatten(1))
    torch.testing.assert_close(likelihood.log_prob(x.flatten(1), flat), likelihood.log_prob(x, images))


def test_conv_memory_estimate_counts_the_parameters():
    for encoder, decoder, likelihood in [
            ("c8k3s2-c16k3s2", "c16k3s2-c8k3s2", LikelihoodConfig("discretized-logistic", num_bins=17)),
            ("c4k5s1-d20", "d20-c4k5s1", LikelihoodConfig("gaussian", std_mode="decoder")),
            ("d30", "d30", LikelihoodConfig())]:
        cfg = resolve_run_config("digits", x_dim=64, image_shape=(1, 8, 8), likelihood=likelihood, encoder=encoder,
                                 decoder=decoder, z_dim=5)
        model = model_from_config(cfg)
        encoder_count = sum(p.numel() for p in model.encoder.parameters())
        count = sum(p.numel() for p in model.parameters())
        estimated = (model_bytes(cfg, optimizer=False) - 4 * encoder_count) / 4  # less WNI's computed weights
        assert abs(estimated - count) <= 0.01 * count, (encoder, estimated, count)


# ----------------------------------------------------------------------------------------------
# Configuration


def test_configs_from_before_likelihoods_load_as_bernoulli_and_new_ones_round_trip(tmp_path):
    old = {"dataset": "mnist", "architecture": {"encoder": "d300-d300", "decoder": "d300-d300", "z_dim": 64},
           "x_dim": 784, "regularizer": {"sigma": 0.0, "alpha": 1.0, "max_norm": "inf"}}
    cfg = RunConfig.from_json(old)
    assert cfg.likelihood == LikelihoodConfig("bernoulli") and cfg.image_shape is None
    new = resolve_run_config("digits", x_dim=64, image_shape=(1, 8, 8), levels=17)
    assert new.architecture.convolutional and new.likelihood == LikelihoodConfig("discretized-logistic", num_bins=17)
    assert RunConfig.from_json(json.loads(json.dumps(new.to_json()))) == new


def test_data_that_does_not_fit_the_likelihood_or_the_architecture_is_refused():
    digits = load_dataset("digits")
    grey = resolve_run_config("digits", x_dim=64, image_shape=(1, 8, 8), levels=17)
    grey.check_dataset(digits)
    with pytest.raises(ConfigError, match="it scores binary data, and 'digits' is on a grid of 17 levels; use "
                                          "--likelihood discretized-logistic --num-bins 17"):
        grey.replace(likelihood=LikelihoodConfig()).check_dataset(digits)
    with pytest.raises(ConfigError, match="invalid num_bins = 256: .* use --num-bins 17"):
        grey.replace(likelihood=LikelihoodConfig("discretized-logistic")).check_dataset(digits)
    with pytest.raises(ConfigError, match="convolution layers need image data"):
        resolve_run_config("flat.npz", x_dim=64, architecture="digits")
    with pytest.raises(ConfigError, match="invalid num_bins = 17: allowed only with the discretized-logistic"):
        LikelihoodConfig("gaussian", num_bins=17)
    with pytest.raises(ConfigError, match="invalid decoder = 'c8k4s2-c8k4s2-c8k4s2-c8k4s2' for 8x8 images"):
        grey.replace(architecture=grey.architecture.__class__("d10", "c8k4s2-c8k4s2-c8k4s2-c8k4s2"))


# ----------------------------------------------------------------------------------------------
# Every likelihood through the command line


def test_each_likelihood_trains_and_evaluates_through_the_cli(tmp_path, capsys):
    rng = np.random.default_rng(0)
    binary = tmp_path / "binary.npz"
    np.savez(binary, **{s: (rng.random((n, 12)) < 0.3).astype(np.uint8) for s, n in (("train", 40), ("valid", 8),
                                                                                      ("test", 8))})
    real = tmp_path / "real.npz"
    np.savez(real, **{s: rng.normal(size=(n, 1, 4, 4)) for s, n in (("train", 40), ("valid", 8), ("test", 8))})
    cases = [  # dataset, flags, the likelihood the run gets
        (binary, ["--encoder", "d8", "--decoder", "d8"], LikelihoodConfig()),
        (real, ["--encoder", "c4k3s2-d8", "--decoder", "d8-c4k3s2", "--std-mode", "per-dimension",
                "--gaussian-std", "0.5"], LikelihoodConfig("gaussian", std=0.5, std_mode="per-dimension")),
        (real, ["--likelihood", "gaussian", "--std-mode", "decoder", "--encoder", "d8", "--decoder", "d8"],
         LikelihoodConfig("gaussian", std_mode="decoder")),
        ("digits", ["--encoder", "c4k3s2-c4k3s2", "--decoder", "c4k3s2-c4k3s2", "--components", "2", "--H", "2",
                    "--sigma", "0.1"], LikelihoodConfig("discretized-logistic", num_bins=17, components=2)),
    ]
    for i, (dataset, flags, likelihood) in enumerate(cases):
        run = tmp_path / f"run{i}"
        assert main(["train", "--dataset", str(dataset), "--run-dir", str(run), *SMALL, *flags]) == 0
        cfg, model = load_trained_model(run)  # the checkpoint loads into the model the config describes
        assert cfg.likelihood == likelihood
        if likelihood.std_mode == "per-dimension" and likelihood.kind == "gaussian":
            saved = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]["likelihood.log_std"]
            assert saved.shape == (16,) and torch.equal(model.likelihood.log_std.detach(), saved)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run3"), "--estimators", "bdmc", "--bdmc-examples", "3",
                 "--max-examples", "5", "--svi-k", "8", "--svi-steps", "3", "--ais-intermediate", "5",
                 "--ais-chains", "2", "--no-progress", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "BDMC forward AIS" in table and "BDMC reverse AIS" in table
    stored = json.loads(next((tmp_path / "run3" / "evaluations").glob("test-*.json")).read_text())
    assert stored["settings"]["bdmc_examples"] == 3 and stored["estimates"]["bdmc_lower"]["n"] == 3
    assert stored["estimates"]["bdmc_upper"]["dims"] == 64  # bits/dim of digits: per pixel


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "digits", "--likelihood", "bernoulli"], "it scores binary data, and 'digits' is on a grid of 17"),
    (["--dataset", "digits", "--num-bins", "256"], "invalid --num-bins = 256"),
    (["--dataset", "digits", "--encoder", "c99999k3s1-c99999k3s1"], "training needs about"),
    (["--dataset", "digits", "--encoder", "c4k4s2-c4k4s2-c4k4s2-c4k4s2"], "would shrink the 1x1 map to 0x0"),
    (["--dataset", "digits", "--gaussian-std", "0.2"], "invalid --gaussian-std = 0.2: allowed only with the gaussian"),
])
def test_likelihood_and_conv_mistakes_are_one_line_refusals(flags, message, tmp_path, capsys):
    assert main(["train", *flags, "--run-dir", str(tmp_path / "run"), "--budget", "smoke", "--no-progress",
                 "--device", "cpu"]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# The grey-conv question: paired differences


def test_grey_conv_report_pairs_runs_by_seed(tmp_path):
    """Per seed, the baseline's bits/dim minus the regularized run's, from stored -ln p(x) in nats."""
    def row(family, strength, seed, bits):
        nats = -bits * 64 * math.log(2)
        estimates = {"iwsvi": {"mean": nats, "dims": 64, "settings": {"k": 500, "l": 8, "steps": 200}},
                     "bound": {"mean": nats - 1.0, "dims": 64}, "gap": {"mean": 1.0, "dims": 64}}
        return {"job": Job(family, "digits", 1, 1, strength, seed, "quick", architecture="digits"),
                "summary": {"status": "completed", "best_val_log_likelihood": -bits},
                "evaluation": {"estimates": estimates}}

    rows = []
    for seed, shift in enumerate((0.0, 0.1, -0.1)):
        rows += [row("plain", 0.0, seed, 1.0 + shift), row("wni", 2.5, seed, 0.9 + shift),
                 row("wni", 5.0, seed, 2.0), row("denoise-1.0", 2.5, seed, 1.0 + shift - 0.01 * seed)]
    lines = grey_conv({"datasets": ["digits"], "target": "grey-conv", "budget": "quick"}, rows, tmp_path)[1]
    wni = next(line for line in lines if line.startswith("- WNI-VAE vs VAE"))
    assert "+0.1000 ± 0.0000" in wni and "**improves**" in wni
    dvae = next(line for line in lines if line.startswith("- DVAE (alpha=1.0) vs VAE"))
    assert "per seed +0.0000, +0.0100, +0.0200" in dvae and "**no detectable difference" in dvae
    assert any("10/H = 2.5 (H = 4) (selected)" in line for line in lines)  # selected on validation, not 5
    assert (tmp_path / "grey-conv.png").exists()


def test_reproduce_estimators_become_a_second_evaluation_and_bdmc_a_report_section():
    extra = extra_evaluation("table1", "quick", ("ais", "bdmc"))
    assert extra["estimators"] == ("ais", "bdmc") and extra["max_examples"] == 500  # the table's test examples
    assert (extra["ais_intermediate"], extra["ais_chains"], extra["bdmc_examples"]) == (200, 4, 50)
    assert extra_evaluation("table1", "quick", ()) is None
    with pytest.raises(ValueError, match="figure3 has no test evaluation"):
        extra_evaluation("figure3", "quick", ("ais",))
    with pytest.raises(ConfigError, match="invalid estimators"):
        extra_evaluation("table1", "quick", ("nope",))
    estimates = {"bdmc_lower": {"mean": -81.0, "n": 50}, "bdmc_upper": {"mean": -80.5, "n": 50},
                 "bdmc_iwsvi": {"mean": -80.75, "n": 50}}
    row = {"job": Job("plain", "digits", architecture="digits"), "evaluation": {"estimates": estimates}}
    lines = bdmc_section([row, {"job": Job("plain", "digits", seed=1), "evaluation": None}])
    assert lines[-1] == "| `digits/k1-m1/plain/seed0` | 80.50 | 81.00 | 0.50 | 80.75 (slack ≤ 0.25) | 50 |"


def test_real_values_beyond_float32_are_refused_before_anything_is_written(tmp_path, capsys):
    data = tmp_path / "huge.npz"
    rng = np.random.default_rng(0)
    splits = {s: rng.random((n, 4)) for s, n in (("train", 20), ("valid", 5), ("test", 5))}
    splits["train"][0, 0] = 1e39  # finite as float64, inf as float32
    np.savez(data, **splits)
    assert main(["train", "--dataset", str(data), "--budget", "smoke", "--run-dir", str(tmp_path / "run"),
                 "--no-progress", "--batch-size", "5"]) == 2
    assert "float32" in capsys.readouterr().err and not (tmp_path / "run").exists()
