"""Stacked training against separate runs: the same parameters, validation estimates, selections
and run directories up to float rounding; exact resume after SIGKILL; checkpoints shared with the
single-run trainer; a per-run Adam that is torch's Adam."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_safety import Killed
from test_train import SRC, tiny_config, tiny_dataset

from airvae.checkpoints import load_checkpoint
from airvae.cli import main
from airvae.config import Architecture, Regularizer
from airvae.files import read_json, read_metrics
from airvae.runs import LAST
from airvae.stacked import Member, StackedAdam, group_key, train_group
from airvae.sweep import select_strengths
from airvae.train import train

BASE = tiny_config(architecture=Architecture("d16", "d16", 3), k=3, m=2, iterations=40, val_k=5)
# Groups as a sweep forms them: strengths and seeds mixed, DVAE with a plain run, WNI, partial denoising.
GROUPS = {
    "plain+dvae": [BASE.replace(seed=0), BASE.replace(seed=1), BASE.replace(seed=0, regularizer=Regularizer(sigma=0.3)),
                   BASE.replace(seed=1, regularizer=Regularizer(sigma=0.5))],
    "wni": [BASE.replace(seed=0, regularizer=Regularizer(max_norm=2.0)),
            BASE.replace(seed=1, regularizer=Regularizer(max_norm=0.5))],
    "dvae-0.5": [BASE.replace(seed=0, regularizer=Regularizer(sigma=0.3, alpha=0.5)),
                 BASE.replace(seed=2, regularizer=Regularizer(sigma=0.6, alpha=0.5))],
}


def close(a: dict, b: dict, rtol=1e-5) -> None:
    assert set(a) == set(b)
    for name in a:
        scale = a[name].abs().max().clamp_min(1e-6)
        assert float((a[name] - b[name]).abs().max() / scale) < rtol, name


@pytest.mark.parametrize("name", list(GROUPS))
def test_a_stacked_group_equals_its_runs_trained_separately(name, tmp_path):
    cfgs, dataset = GROUPS[name], tiny_dataset()
    assert len({group_key(c) for c in cfgs}) == 1
    alone = [train(c, tmp_path / f"alone{i}", progress=False, dataset=dataset) for i, c in enumerate(cfgs)]
    stacked = train_group([Member(c, tmp_path / f"stacked{i}") for i, c in enumerate(cfgs)], dataset, progress=False)
    results = []
    for i, cfg in enumerate(cfgs):
        a, s = tmp_path / f"alone{i}", tmp_path / f"stacked{i}"
        assert alone[i].status == stacked[i].status == "completed" and stacked[i].steps == cfg.iterations
        close(load_checkpoint(a / LAST)["model"], load_checkpoint(s / LAST)["model"])
        ma, ms = read_metrics(a / "metrics.jsonl"), read_metrics(s / "metrics.jsonl")
        assert [m["step"] for m in ma] == [m["step"] for m in ms] == [20, 40]
        for key in ("val_log_likelihood", "train_loss", "lr"):
            np.testing.assert_allclose([m[key] for m in ma], [m[key] for m in ms], rtol=1e-6)
        assert sorted(p.name for p in a.rglob("*")) == sorted(p.name for p in s.rglob("*"))  # the same files
        results += [{"job": {"dataset": "tiny", "family": name, "k": 3, "m": 2, "strength": i, "seed": 0},
                     "status": "ok", "summary": read_json(d / "summary.json")} for d in (a, s)]
    # the same strength wins whichever trainer produced the runs
    by_trainer = [select_strengths(results[t::2]) for t in (0, 1)]
    assert by_trainer[0] == by_trainer[1]


def test_checkpoints_are_shared_with_the_single_run_trainer(tmp_path):
    """A run trained alone to step 20 resumes in a group (waiting there while the others catch
    up), and a group's checkpoint resumes alone; both end where separate training ends."""
    cfgs, dataset = GROUPS["plain+dvae"], tiny_dataset()
    reference = tmp_path / "reference"
    train(cfgs[0], reference, progress=False, dataset=dataset)
    # run 0 is half trained alone (killed at step 20: same checkpoint as an uninterrupted run's)
    _kill_at(cfgs[0], tmp_path / "r0", dataset, 20)
    members = [Member(c, tmp_path / f"r{i}") for i, c in enumerate(cfgs)]
    results = train_group(members, dataset, progress=False)
    assert [r.status for r in results] == ["completed"] * 4
    close(load_checkpoint(reference / LAST)["model"], load_checkpoint(tmp_path / "r0" / LAST)["model"])
    assert [m["step"] for m in read_metrics(tmp_path / "r0" / "metrics.jsonl")] == [20, 40]
    # and back: the group's run 1, resumed alone after losing its last 20 steps, ends where it was
    other = tmp_path / "alone1"
    _kill_at(cfgs[1], other, dataset, 20, group=True)
    train(cfgs[1], other, resume=True, progress=False, dataset=dataset)
    close(load_checkpoint(tmp_path / "r1" / LAST)["model"], load_checkpoint(other / LAST)["model"])


def _kill_at(cfg, run_dir, dataset, step, group=False):
    """Train until ``step``'s checkpoint is written, then stop as a kill would."""
    import airvae.driver as train_module  # where RunLog saves

    real = train_module.save_checkpoint

    def dies_after(path, state):
        real(path, state)
        if Path(path).name == "last.pt" and state["state"]["step"] == step:
            raise Killed

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Killed):
        patch.setattr(train_module, "save_checkpoint", dies_after)
        if group:
            train_group([Member(cfg, run_dir)], dataset, progress=False)
        else:
            train(cfg, run_dir, progress=False, dataset=dataset)
    assert load_checkpoint(run_dir / LAST)["state"]["step"] == step


_GROUP = textwrap.dedent("""
    import sys
    sys.path.insert(0, {src!r}); sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from pathlib import Path
    from test_stacked import GROUPS, tiny_dataset
    from airvae.stacked import Member, train_group
    cfgs = [c.replace(iterations=3000, checkpoint_every=7, val_every=500) for c in GROUPS["plain+dvae"]]
    train_group([Member(c, Path({root!r}) / f"r{{i}}") for i, c in enumerate(cfgs)], tiny_dataset(), progress=False)
""")


def test_a_group_killed_with_sigkill_and_rerun_ends_exactly_as_an_uninterrupted_one(tmp_path):
    script = lambda root: _GROUP.format(src=SRC, tests=str(Path(__file__).parent), root=str(root))  # noqa: E731
    subprocess.run([sys.executable, "-c", script(tmp_path / "reference")], check=True, timeout=600)
    killed = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", script(killed)])
    deadline = time.time() + 300
    while not all((killed / f"r{i}" / LAST).exists() for i in range(4)):
        assert child.poll() is None and time.time() < deadline, "the group ended before it could be killed"
        time.sleep(0.01)
    time.sleep(0.5)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    steps = [load_checkpoint(killed / f"r{i}" / LAST)["state"]["step"] for i in range(4)]
    assert 0 < min(steps) and max(steps) < 3000, "the kill must land mid-run"
    subprocess.run([sys.executable, "-c", script(killed)], check=True, timeout=600)
    for i in range(4):
        a = load_checkpoint(tmp_path / "reference" / f"r{i}" / LAST)
        b = load_checkpoint(killed / f"r{i}" / LAST)
        assert a["state"]["step"] == b["state"]["step"] == 3000
        for name, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][name]), (i, name)
        def metrics(d, i=i):
            return [m["val_log_likelihood"] for m in read_metrics(d / f"r{i}" / "metrics.jsonl")]
        assert metrics(tmp_path / "reference") == metrics(killed)


def test_stacked_adam_is_torch_adam_per_run_and_leaves_the_runs_sitting_out_untouched():
    torch.manual_seed(0)
    shapes = [(3, 4, 5), (3, 5)]
    stacked = [torch.randn(s, requires_grad=True) for s in shapes]
    alone = [[torch.nn.Parameter(t[r].detach().clone()) for t in stacked] for r in range(3)]
    optimizers = [torch.optim.Adam(params, lr=0.1, fused=True) for params in alone]
    adam = StackedAdam(stacked)
    # run 1 sits out a step, then catches up alone, as after resuming from an older checkpoint
    plan = [([True, True, True], 0.1), ([True, False, True], 0.05), ([False, True, False], 0.05),
            ([True, True, True], 0.02)]
    for active, lr in plan:
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(stacked, grads, strict=True):
            p.grad = g.clone()
        before = [p.detach().clone() for p in stacked]
        adam.step(lr, active)
        for r in range(3):
            if not active[r]:
                assert all(torch.equal(p.detach()[r], b[r]) for p, b in zip(stacked, before, strict=True))
                continue
            for p, g in zip(alone[r], grads, strict=True):
                p.grad = g[r].clone()
            optimizers[r].param_groups[0]["lr"] = lr
            optimizers[r].step()
            for p, q in zip(stacked, alone[r], strict=True):
                assert torch.equal(p.detach()[r], q.detach())  # torch's own kernel: the same bits
    assert adam.steps == [3, 3, 3]
    with pytest.raises(ValueError, match="one step"):
        adam.steps = [1, 2, 2]
        adam.step(0.1, [True, True, True])


def test_a_stacked_reproduction_reports_what_a_local_one_reports(tmp_path, data_dir):
    base = ["reproduce", "table1", "--dataset", "caltech", "--budget", "smoke", "--seeds", "1", "--grid", "2.5,5",
            "--data-dir", data_dir, "--no-progress", "--device", "cpu"]
    assert main(base + ["--out", str(tmp_path / "local"), "--executor", "local"]) == 0
    assert main(base + ["--out", str(tmp_path / "stacked"), "--executor", "stacked"]) == 0
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.name != ".lock")  # noqa: E731
    assert files(tmp_path / "local") == files(tmp_path / "stacked")
    number = re.compile(r"-?\d+\.\d+(e-?\d+)?")
    for name in ("table1.md", "table1.csv", "REPORT.md"):
        local, stacked = ((tmp_path / d / name).read_text() for d in ("local", "stacked"))
        # the same text (models, strengths selected, verdicts) around numbers equal up to rounding
        assert number.sub("#", local) == number.sub("#", stacked.replace(str(tmp_path / "stacked"),
                                                                          str(tmp_path / "local")))
        values = lambda text: [float(m.group()) for m in number.finditer(text)]  # noqa: E731
        np.testing.assert_allclose(values(local), values(stacked), rtol=1e-4, atol=0.011)
    log = [json.loads(line) for line in (tmp_path / "stacked" / "sweep.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in log) and sum(r["trained"] for r in log) == 7


def test_a_stacked_evaluation_equals_each_run_evaluated_alone(tmp_path, data_dir):
    """Every estimator with a stacked call (airvae.estimators.REGISTRY) gives each run of a group what
    its single-model call gives the run alone: the same values up to float rounding, under the same
    name and settings."""
    from airvae.data import load_dataset
    from airvae.estimators import REGISTRY
    from airvae.evaluation import EvaluationSettings, evaluate_run
    from airvae.stacked import STACKED_ESTIMATORS, evaluate_group
    from airvae.sweep import Job

    runs, caltech = [], load_dataset("caltech", data_dir=data_dir, progress=False)
    for family, strength in (("plain", 0.0), ("denoise-1.0", 5.0), ("denoise-0.5", 5.0)):
        job = Job(family, "caltech", 1, 1, strength, 0, "smoke", iterations=20)
        run = tmp_path / family
        train(job.run_config(caltech, data_dir, "cpu"), run, progress=False, dataset=caltech)
        runs.append(run)
    assert STACKED_ESTIMATORS == tuple(name for name, e in REGISTRY.items() if e.stacked is not None)
    assert set(STACKED_ESTIMATORS) == {"bound", "iwae", "iwsvi", "gap"}
    settings = EvaluationSettings(estimators=STACKED_ESTIMATORS, max_examples=12, k_iwae=20, svi_k=20, svi_l=4,
                                  svi_steps=5, device="cpu")
    stacked = evaluate_group(runs, settings)
    for run, together in zip(runs, stacked, strict=True):
        alone = evaluate_run(run, settings, recompute=True, progress=False)
        assert together.keys() == alone.keys() and together["identity"] == alone["identity"]
        assert list(together["estimates"]) == list(alone["estimates"]) == list(STACKED_ESTIMATORS)
        for name in STACKED_ESTIMATORS:
            ours, theirs = together["estimates"][name], alone["estimates"][name]
            assert (ours["name"], ours["settings"], ours["dims"]) == (theirs["name"], theirs["settings"], theirs["dims"])
            np.testing.assert_allclose(ours["values"], theirs["values"], rtol=1e-5, atol=1e-4)


def test_a_group_killed_between_two_of_its_runs_checkpoints_catches_up_bit_for_bit(tmp_path):
    """Runs 0-1 saved step 20, runs 2-3 still hold step 10: on rerun 2-3 catch up while 0-1 sit out,
    and every run ends exactly where an uninterrupted group ends."""
    import airvae.driver as train_module  # where RunLog saves

    cfgs, dataset = GROUPS["plain+dvae"], tiny_dataset()
    train_group([Member(c, tmp_path / f"reference{i}") for i, c in enumerate(cfgs)], dataset, progress=False)

    real, saved = train_module.save_checkpoint, []

    def dies(path, state):
        if Path(path).name == "last.pt" and state["state"]["step"] == 20 and len(saved) == 2:
            raise Killed
        real(path, state)
        if Path(path).name == "last.pt" and state["state"]["step"] == 20:
            saved.append(path)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Killed):
        patch.setattr(train_module, "save_checkpoint", dies)
        train_group([Member(c, tmp_path / f"r{i}") for i, c in enumerate(cfgs)], dataset, progress=False)
    assert [load_checkpoint(tmp_path / f"r{i}" / LAST)["state"]["step"] for i in range(4)] == [20, 20, 10, 10]
    train_group([Member(c, tmp_path / f"r{i}") for i, c in enumerate(cfgs)], dataset, progress=False)
    for i in range(4):
        a, b = (load_checkpoint(tmp_path / f"{name}{i}" / LAST) for name in ("reference", "r"))
        for name, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][name]), (i, name)
        assert [m["step"] for m in read_metrics(tmp_path / f"r{i}" / "metrics.jsonl")] == [20, 40]


def alone_and_stacked(cfgs, dataset, tmp_path, rtol):
    """Train ``cfgs`` one by one and as a group; their last parameters agree to ``rtol``."""
    for i, cfg in enumerate(cfgs):
        train(cfg, tmp_path / f"alone{i}", progress=False, dataset=dataset)
    train_group([Member(c, tmp_path / f"stacked{i}") for i, c in enumerate(cfgs)], dataset, progress=False)
    for i in range(len(cfgs)):
        close(load_checkpoint(tmp_path / f"alone{i}" / LAST)["model"],
              load_checkpoint(tmp_path / f"stacked{i}" / LAST)["model"], rtol=rtol)


def _digits_configs(iterations, runs):
    """Configs of the bundled digits' conv preset (8x8 grey levels), one per (seed, regularizer)."""
    from airvae.config import resolve_run_config
    from airvae.data import load_dataset

    digits = load_dataset("digits", progress=False)
    return digits, [resolve_run_config("digits", x_dim=digits.dim, image_shape=digits.image_shape,
                                       levels=digits.levels, budget="smoke", device="cpu", iterations=iterations,
                                       val_every=10, seed=seed, regularizer=regularizer)
                    for seed, regularizer in runs]


def test_conv_models_with_a_discretized_likelihood_stack_too(tmp_path):
    digits, cfgs = _digits_configs(20, [(0, Regularizer()), (1, Regularizer(sigma=0.1))])
    assert cfgs[0].likelihood.kind == "discretized-logistic" and cfgs[0].architecture.encoder.startswith("c")
    # batched convolutions round differently from single ones: a looser tolerance
    alone_and_stacked(cfgs, digits, tmp_path, rtol=5e-4)


def test_conv_wni_runs_with_different_caps_keep_their_own_cap_in_a_group(tmp_path):
    digits, cfgs = _digits_configs(10, [(0, Regularizer(max_norm=h)) for h in (0.05, 100.0)])
    assert len({group_key(c) for c in cfgs}) == 1
    alone_and_stacked(cfgs, digits, tmp_path, rtol=5e-4)


def test_groups_are_split_to_fit_the_devices_memory(monkeypatch):
    import airvae.resources as resources

    monkeypatch.setattr(resources, "available_memory", lambda device: 10 * resources.GiB)
    need = lambda n: resources.MemoryEstimate("training", {"runs": n * 3 * resources.GiB})  # noqa: E731
    assert resources.largest_group(need, torch.device("cpu"), 10) == 2  # 6 GiB <= 80% of 10 < 9 GiB
    assert resources.largest_group(need, torch.device("cpu"), 1) == 1
    monkeypatch.setattr(resources, "available_memory", lambda device: None)
    assert resources.largest_group(need, torch.device("cpu"), 7) == 7


def test_a_group_refuses_before_touching_any_member_when_one_cannot_be_used(tmp_path):
    cfgs, dataset = GROUPS["plain+dvae"][:2], tiny_dataset()
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(Exception, match="not an airvae run"):
        train_group([Member(cfgs[0], tmp_path / "r0"), Member(cfgs[1], foreign)], dataset, progress=False)
    assert not (tmp_path / "r0").exists() and [p.name for p in foreign.iterdir()] == ["cat.jpg"]


def test_a_diverging_run_stops_in_its_group_with_a_true_message_and_the_others_finish(tmp_path):
    cfgs, dataset = GROUPS["plain+dvae"][:2], tiny_dataset()
    noisy = Regularizer(sigma=1.0)
    object.__setattr__(noisy, "sigma", 1e30)  # beyond the bound a config accepts: run 1's encoder sees infinities
    cfgs = [cfgs[0], cfgs[1].replace(regularizer=noisy)]
    results = train_group([Member(c, tmp_path / f"r{i}") for i, c in enumerate(cfgs)], dataset, progress=False)
    assert [r.status for r in results] == ["completed", "diverged"]
    summary = read_json(tmp_path / "r1" / "summary.json")
    assert summary["status"] == "diverged" and "holds step" in summary["message"] and "--lr" in summary["message"]
    assert not (tmp_path / "r1" / LAST).exists() or torch.isfinite(
        torch.cat([t.flatten() for t in load_checkpoint(tmp_path / "r1" / LAST)["model"].values()])).all()


# ----------------------------------------------------------------------------------------------
# Partial denoising with alpha != 0.5: eq. 16's weights are not symmetric, so a swap of the noisy
# and clean terms shows (at alpha = 0.5 it cannot).

PARTIAL = [BASE.replace(seed=0, iterations=20, regularizer=Regularizer(sigma=0.3, alpha=0.25)),
           BASE.replace(seed=1, iterations=20, regularizer=Regularizer(sigma=0.6, alpha=0.75))]


def test_a_partial_denoising_objective_in_a_group_is_air_objective_with_the_same_draws():
    """Per run, the stacked objective equals ``air_objective`` (alpha * noisy + (1 - alpha) * clean)
    of the run's own model fed the same generator, and differs from the swapped weighting."""
    from airvae.driver import training_generator
    from airvae.model import air_objective, denoising_parts, model_from_config
    from airvae.stacked import StackedModel, stacked_objectives
    from airvae.stacked.training import _GroupDraws

    cfgs, device = PARTIAL, torch.device("cpu")
    assert len({group_key(c) for c in cfgs}) == 1
    x = torch.as_tensor(tiny_dataset().train[:BASE.batch_size]).float()
    models = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        models.append(model_from_config(cfg))
    group = StackedModel(models, device)
    denoising = [denoising_parts(model, c.regularizer.alpha)[1] for model, c in zip(models, cfgs, strict=True)]
    draws = _GroupDraws(denoising, [training_generator(c.seed, device) for c in cfgs], x.shape[1:], cfgs[0], device)
    xs = x.expand(len(cfgs), *x.shape).contiguous()
    x_seen, eps, eps_clean = draws.next(xs, [True] * len(cfgs))
    alpha = torch.tensor([c.regularizer.alpha for c in cfgs])
    with torch.no_grad():
        stacked = stacked_objectives(group, xs, x_seen, eps, eps_clean, alpha)
        for r, (cfg, model) in enumerate(zip(cfgs, models, strict=True)):
            a = cfg.regularizer.alpha
            alone = air_objective(model, x, cfg.k, cfg.m, a, generator=training_generator(cfg.seed, device))
            torch.testing.assert_close(
                stacked[r], alone, rtol=1e-5, atol=1e-4,
                msg=lambda m, r=r, a=a: f"run {r} (alpha={a}): stacked objective is not eq. 16's "
                                        f"alpha * noisy + (1 - alpha) * clean\n{m}")
            # the two terms, separately, with the same draws: the weighting is alpha on the noisy one
            g = training_generator(cfg.seed, device)
            noisy = air_objective(model, x, cfg.k, cfg.m, 1.0, generator=g)
            clean = air_objective(model, x, cfg.k, cfg.m, 0.0, generator=g)
            assert not torch.allclose(noisy, clean, atol=1e-3), "the noisy and clean bounds must differ here"
            torch.testing.assert_close(stacked[r], a * noisy + (1 - a) * clean, rtol=1e-5, atol=1e-4)
            swapped = (1 - a) * noisy + a * clean
            assert not torch.allclose(stacked[r], swapped, rtol=1e-5, atol=1e-4), \
                f"run {r}: the stacked objective weights the clean bound by alpha={a} (eq. 16's weights swapped)"


def test_a_partial_denoising_group_with_alpha_not_one_half_equals_its_runs_trained_separately(tmp_path):
    alone_and_stacked(PARTIAL, tiny_dataset(), tmp_path, rtol=1e-5)
