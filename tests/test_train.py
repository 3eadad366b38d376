"""Training loop: eq. 43 schedule, minibatches, exact resume after SIGKILL, divergence, run-dir safety."""

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from airvae.checkpoints import load_checkpoint
from airvae.config import Architecture, ConfigError, RunConfig
from airvae.driver import MinibatchSchedule
from airvae.files import RunError, read_json
from airvae.runs import LAST, load_trained_model
from airvae.train import TrainingDiverged, train

SRC = str(Path(__file__).resolve().parents[1] / "src")


def tiny_dataset(n=300, d=20, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.random(d) * 0.6
    make = lambda rows: (rng.random((rows, d)) < probs).astype(np.uint8)  # noqa: E731
    return SimpleNamespace(train=make(n), valid=make(60), test=make(60), dim=d, deviation=None)


def tiny_config(**changes):
    base = RunConfig(dataset="tiny", architecture=Architecture("d16", "d16", 2), x_dim=20, k=2, iterations=60,
                     batch_size=10, lr=3e-3, val_every=20, val_k=4, val_examples=30, checkpoint_every=10,
                     device="cpu")
    return base.replace(**changes)


def test_learning_rate_follows_eq_43():
    cfg = tiny_config(iterations=1001, lr=1e-3)
    assert cfg.lr_at(0) == pytest.approx(1e-3)
    assert cfg.lr_at(500) == pytest.approx(1e-3 * 0.1 ** 0.5)
    assert cfg.lr_at(1000) == pytest.approx(1e-4)


def test_minibatches_cover_each_epoch_once_and_depend_only_on_seed_and_step():
    a, b = MinibatchSchedule(103, 10, seed=4), MinibatchSchedule(103, 10, seed=4)
    epoch = torch.cat([a.indices(t) for t in range(10)])
    assert sorted(epoch.tolist()) == sorted(set(epoch.tolist())) and len(epoch) == 100
    assert torch.equal(b.indices(13), a.indices(13))  # b never saw steps 0..12
    assert not torch.equal(a.indices(0), a.indices(10))  # a new permutation each epoch


def test_training_improves_validation_and_writes_the_run(tmp_path):
    result = train(tiny_config(iterations=200, val_every=50), tmp_path / "run", progress=False,
                   dataset=tiny_dataset())
    assert result.status == "completed" and result.steps == 200
    metrics = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [eval(line.replace("NaN", "float('nan')"))["val_log_likelihood"] for line in metrics]
    assert len(vals) == 4 and vals[-1] > vals[0]
    assert read_json(tmp_path / "run" / "summary.json")["status"] == "completed"
    cfg, model = load_trained_model(tmp_path / "run")
    assert cfg == tiny_config(iterations=200, val_every=50) and not model.training


def test_existing_run_is_never_overwritten_silently(tmp_path):
    train(tiny_config(iterations=10), tmp_path / "run", progress=False, dataset=tiny_dataset())
    with pytest.raises(RunError, match="--resume.*--overwrite"):
        train(tiny_config(iterations=10), tmp_path / "run", progress=False, dataset=tiny_dataset())
    with pytest.raises(RunError, match="k: 2 -> 3"):
        train(tiny_config(iterations=10, k=3), tmp_path / "run", resume=True, progress=False, dataset=tiny_dataset())
    result = train(tiny_config(iterations=10, k=3), tmp_path / "run", overwrite=True, progress=False,
                   dataset=tiny_dataset())
    assert result.status == "completed"


def test_non_finite_loss_stops_with_a_message_and_a_usable_checkpoint(tmp_path, monkeypatch):
    import airvae.driver as train_module  # the engine that calls the objective

    real = train_module.air_objective
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] > 25 else value

    monkeypatch.setattr(train_module, "air_objective", failing)
    with pytest.raises(TrainingDiverged, match="before step 30.*step 20"):
        train(tiny_config(), tmp_path / "run", progress=False, dataset=tiny_dataset())
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["status"] == "diverged"
    checkpoint = load_checkpoint(tmp_path / "run" / LAST)
    assert checkpoint["state"]["step"] == 20
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {src!r}); sys.path.insert(0, {tests!r})
    from test_train import tiny_config, tiny_dataset
    from airvae.train import train
    train(tiny_config(iterations=3000, checkpoint_every=7, val_every=500), {run!r}, progress=False,
          dataset=tiny_dataset())
""")


def test_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = tiny_config(iterations=3000, checkpoint_every=7, val_every=500)
    reference = train(cfg, tmp_path / "reference", progress=False, dataset=tiny_dataset())
    run = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(src=SRC, tests=str(Path(__file__).parent),
                                                                  run=str(run))])
    deadline = time.time() + 120
    while not (run / LAST).exists():
        assert child.poll() is None, "child exited before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.005)
    time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    killed_at = load_checkpoint(run / LAST)["state"]["step"]
    assert 0 < killed_at < cfg.iterations, "the kill must land mid-run for this test to mean anything"
    resumed = train(cfg, run, resume=True, progress=False, dataset=tiny_dataset())
    assert resumed.steps == reference.steps == cfg.iterations
    assert resumed.best_val_log_likelihood == reference.best_val_log_likelihood
    a, b = load_checkpoint(tmp_path / "reference" / LAST), load_checkpoint(run / LAST)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    metrics = lambda p: (p / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    assert [m.split('"seconds"')[0] for m in metrics(run)] == [m.split('"seconds"')[0] for m in metrics(tmp_path / "reference")]


def test_resuming_a_finished_run_does_nothing(tmp_path):
    cfg = tiny_config(iterations=20)
    train(cfg, tmp_path / "run", progress=False, dataset=tiny_dataset())
    before = (tmp_path / "run" / LAST).stat().st_mtime_ns
    assert train(cfg, tmp_path / "run", resume=True, progress=False, dataset=tiny_dataset()).status == "completed"
    assert (tmp_path / "run" / LAST).stat().st_mtime_ns == before


@pytest.mark.parametrize("changes, field", [({"k": 0}, "k"), ({"m": 0}, "m"), ({"iterations": 0}, "iterations"),
                                            ({"lr": -1.0}, "lr"), ({"device": "tpu"}, "device")])
def test_run_config_validation_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"invalid {field}"):
        tiny_config(**changes)


def test_config_round_trips_through_json_with_infinite_h():
    cfg = tiny_config()
    import json

    assert RunConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert math.isinf(RunConfig.from_json(cfg.to_json()).regularizer.max_norm)
