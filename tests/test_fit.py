"""A researcher's own model trained by airvae's driver (airvae.fit): a run folder like any run's,
exact resume after a kill, early stopping, the lock, tracking; and evaluate, plot and load read
the run only with the model handed to them, never built from the folder."""

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from test_safety import Killed, one_error_line

import airvae
import airvae.driver as driver
from airvae.checkpoints import load_checkpoint
from airvae.cli import main
from airvae.data import Dataset
from airvae.files import RunError, RunLocked
from airvae.locks import RunLock
from airvae.runs import LAST
from airvae.tracking import TrackingSettings

MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    from airvae import Bernoulli


    class TinyVAE(nn.Module):
        """Only the protocol: encode, decoder, likelihood (no airvae classes inside)."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Linear(16, 4)
            self.decoder = nn.Sequential(nn.Linear(2, 8), nn.ELU(), nn.Linear(8, 16))
            self.likelihood = Bernoulli()

        def encode(self, x):
            mean, raw = self.net(x).chunk(2, dim=-1)
            return mean, nn.functional.softplus(raw) + 1e-3


    def tiny_vae():
        return TinyVAE()
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_models", None)
    import my_models

    return my_models


def tiny_data(seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    p = rng.random(16) * 0.7
    splits = [(rng.random((n, 16)) < p).astype(np.uint8) for n in (200, 40, 40)]
    return Dataset("tiny", *splits, source="test")


SETTINGS = dict(iterations=40, batch_size=20, val_every=10, val_k=4, val_examples=20, progress=False, device="cpu")


def weights(run):
    return load_checkpoint(run / LAST)["model"]


def test_a_protocol_model_trains_resumes_after_a_kill_exactly_and_is_a_run_like_any(tmp_path, user_module,
                                                                                      monkeypatch):
    data = tiny_data()
    whole = airvae.fit(user_module.tiny_vae(), data, tmp_path / "whole", **SETTINGS)
    assert whole.status == "completed" and whole.steps == 40
    for name in ("airvae-run.json", "config.json", "metrics.jsonl", "summary.json", "checkpoints/best.pt"):
        assert (tmp_path / "whole" / name).exists(), name
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["kind"] == "custom" and config["model"] == "my_models.TinyVAE" and config["z_dim"] == 2

    real = driver.save_checkpoint

    def dies(path, state):
        real(path, state)
        if path.name == "last.pt" and state["state"]["step"] == 20:
            raise Killed

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(driver, "save_checkpoint", dies)
        airvae.fit(user_module.tiny_vae(), data, tmp_path / "killed", **SETTINGS)
    resumed = airvae.fit(user_module.tiny_vae(), data, tmp_path / "killed", resume=True, **SETTINGS)
    assert resumed.steps == 40
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    with pytest.raises(RunError, match="already holds a run"):
        airvae.fit(user_module.tiny_vae(), data, tmp_path / "whole", **SETTINGS)


def test_early_stopping_the_lock_and_tracking_apply_to_a_users_model(tmp_path, user_module):
    data, run = tiny_data(), tmp_path / "run"
    with RunLock(run):
        with pytest.raises(RunLocked):
            airvae.fit(user_module.tiny_vae(), data, run, **SETTINGS)
    result = airvae.fit(user_module.tiny_vae(), data, run, overwrite=False, resume=True, patience=1,
                        tracking=TrackingSettings.parse("tensorboard"), **{**SETTINGS, "lr": 1.0})
    assert result.status in ("early-stopped", "completed", "diverged")
    assert json.loads((run / "tracking.json").read_text())["sinks"] == ["tensorboard"]


def test_evaluate_plot_and_load_need_the_model_named_by_the_user(tmp_path, user_module, capsys):
    run = tmp_path / "run"
    airvae.fit(user_module.tiny_vae(), tiny_data(), run, **SETTINGS)
    capsys.readouterr()
    evaluate = ["evaluate", str(run), "--estimators", "bound,iwsvi", "--k", "8", "--svi-k", "8", "--svi-steps", "2",
                "--max-examples", "8", "--no-progress", "--device", "cpu", "--allow-data-change"]
    assert main(evaluate) == 2  # a folder alone never makes airvae build (run) a model
    assert "--model package.module:function" in one_error_line(capsys)
    assert main(evaluate + ["--model", "my_models:tiny_vae"]) == 2  # the data was in memory: not by name
    assert "tiny" in capsys.readouterr().err
    with pytest.raises(RunError, match="model=..."):
        airvae.load(run)
    model = airvae.load(run, model=user_module.tiny_vae())
    assert not model.training and torch.isfinite(model.encode(torch.zeros(1, 16))[0]).all()
    assert main(["plot", str(run), "--model", "my_models:nope"]) == 2
    assert "--model" in one_error_line(capsys)


def test_a_users_model_on_a_named_dataset_is_evaluated_and_plotted_from_the_command_line(tmp_path, user_module,
                                                                                         capsys):
    from test_safety import write_npz

    data = write_npz(tmp_path / "tiny.npz")
    run = tmp_path / "run"
    airvae.fit(user_module.tiny_vae(), str(data), run, **SETTINGS)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--model", "my_models:tiny_vae", "--estimators", "bound,iwsvi", "--k", "8",
                 "--svi-k", "8", "--svi-steps", "2", "--max-examples", "8", "--no-progress", "--device", "cpu"]) == 0
    assert "IW-SVI" in capsys.readouterr().out
    assert main(["plot", str(run), "--model", "my_models:tiny_vae", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "curves.png" in out and "samples.png" in out  # 16 values: a 4x4 image


def test_data_that_the_likelihood_cannot_score_is_refused_before_anything_is_written(tmp_path, user_module):
    rng = np.random.default_rng(0)
    grey = Dataset("grey", *(rng.random((n, 16)).astype(np.float32) for n in (50, 10, 10)), source="test", levels=None)
    with pytest.raises(ValueError, match="must be binary"):
        airvae.fit(user_module.tiny_vae(), grey, tmp_path / "run", **SETTINGS)
    assert not (tmp_path / "run").exists()
