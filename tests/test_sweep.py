"""Sweeps: selection on validation only, failure isolation, idempotence, kill-and-rerun."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from airvae.sweep import Job, LocalExecutor, Task, execute, run_tasks, select_strengths


def result(strength, val, test, seed=0, family="wni"):
    job = Job(family, "caltech", 1, 1, strength, seed)
    return {"job": asdict(job), "status": "ok", "summary": {"best_val_log_likelihood": val},
            "evaluation": {"estimates": {"iwsvi": {"mean": test}}}}


def test_selection_uses_validation_only_and_averages_seeds():
    # Test numbers favour 7.5 everywhere; validation (averaged over seeds) favours 5.0.
    results = [result(2.5, -100.0, -99.0), result(5.0, -98.0, -101.0), result(7.5, -99.0, -90.0),
               result(5.0, -101.5, -101.0, seed=1), result(2.5, -101.0, -99.0, seed=1),
               result(7.5, -99.6, -90.0, seed=1)]
    assert select_strengths(results)[("caltech", "wni", 1, 1)] == 7.5  # mean val: 7.5 -99.3 > 5.0 -99.75
    results[3]["summary"]["best_val_log_likelihood"] = -98.5
    assert select_strengths(results)[("caltech", "wni", 1, 1)] == 5.0
    # Changing test numbers can never change the choice.
    for r in results:
        r["evaluation"]["estimates"]["iwsvi"]["mean"] = -50.0 if r["job"]["strength"] == 2.5 else -500.0
    assert select_strengths(results)[("caltech", "wni", 1, 1)] == 5.0


def test_selection_does_not_depend_on_the_order_runs_finish_in():
    """Runs of a sweep finish in any order; the sweep (choosing which runs to evaluate) and the report
    (choosing which to show) must pick the same strength. A tie (a cap that never binds trains the
    same model) goes to the weaker strength, and seeds' means are summed exactly: 0.1 + 0.2 + 0.3
    and 0.3 + 0.2 + 0.1 differ in floating point."""
    import itertools

    tied = [result(2.5, -100.0, 0), result(5.0, -100.0, 0), result(7.5, -100.0, 0)]
    assert {select_strengths(list(order))[("caltech", "wni", 1, 1)] for order in itertools.permutations(tied)} == {2.5}
    vals = {2.5: (0.1, 0.2, 0.3), 5.0: (0.3, 0.2, 0.1)}  # equal means, unequal float sums in one order
    runs = [result(s, v, 0, seed=i) for s, values in vals.items() for i, v in enumerate(values)]
    assert {select_strengths(order)[("caltech", "wni", 1, 1)] for order in (runs, runs[::-1])} == {2.5}


def test_failed_runs_never_win_selection():
    ok, failed = result(2.5, -100.0, 0), result(5.0, -1.0, 0)
    failed["status"] = "failed"
    assert select_strengths([ok, failed])[("caltech", "wni", 1, 1)] == 2.5


def test_job_validation():
    with pytest.raises(ValueError, match="family"):
        Job("dropout", "mnist")
    with pytest.raises(ValueError, match="strength"):
        Job("wni", "mnist", strength=0.0)
    with pytest.raises(ValueError, match="strength"):
        Job("plain", "mnist", strength=5.0)


def tiny_npz(path: Path, d=16, seed=0) -> str:
    rng = np.random.default_rng(seed)
    p = rng.random(d) * 0.7
    np.savez(path, **{split: (rng.random((n, d)) < p).astype(np.uint8)
                      for split, n in (("train", 400), ("valid", 80), ("test", 80))})
    return str(path)


def test_a_failing_run_is_recorded_and_the_others_finish(tmp_path):
    data = tiny_npz(tmp_path / "tiny.npz")
    good = Task(Job("plain", data, budget="smoke"), str(tmp_path / "sweep"), device="cpu")
    bad = Task(Job("plain", str(tmp_path / "missing.npz"), budget="smoke"), str(tmp_path / "sweep"), device="cpu")
    results = run_tasks([bad, good], LocalExecutor(1), tmp_path / "sweep" / "log.jsonl", progress=False)
    assert [r["status"] for r in results] == ["failed", "ok"]
    assert "missing.npz" in results[0]["error"]
    assert (bad.run_dir / "error.json").exists() and not (good.run_dir / "error.json").exists()
    again = execute(good)
    assert again["status"] == "ok" and again["trained"] is False  # idempotent: finished work is skipped


_SWEEP = """
import sys
import torch
torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to a busy machine
sys.path.insert(0, {src!r})
from airvae.sweep import Job, LocalExecutor, Task, run_tasks
jobs = [Job(f, {data!r}, 1, 1, s, seed, "smoke", iterations=150) for seed in range(2)
        for f, s in [("plain", 0.0), ("wni", 2.5), ("wni", 7.5), ("denoise-1.0", 5.0), ("denoise-0.5", 5.0)]]
tasks = [Task(j, {root!r}, device="cpu") for j in jobs]
run_tasks(tasks, LocalExecutor(1), __import__("pathlib").Path({root!r}) / "log.jsonl", progress=False)
"""


def test_killing_a_sweep_midway_and_rerunning_loses_nothing_and_repeats_nothing(tmp_path):
    data, root = tiny_npz(tmp_path / "tiny.npz"), tmp_path / "sweep"
    script = _SWEEP.format(src=str(Path(__file__).resolve().parents[1] / "src"), data=data, root=str(root))
    child = subprocess.Popen([sys.executable, "-c", script])
    log = root / "log.jsonl"
    deadline = time.time() + 180
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert child.poll() is None and time.time() < deadline, "sweep ended before it could be killed"
        time.sleep(0.01)
    time.sleep(0.3)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    first = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(first) < 10, "the kill must land mid-sweep"
    done_before = {r["run_dir"] for r in first}
    subprocess.run([sys.executable, "-c", script], check=True)
    second = [json.loads(line) for line in log.read_text().splitlines()][len(first):]
    assert len(second) == 10 and all(r["status"] == "ok" for r in second)
    for r in second:
        if r["run_dir"] in done_before:
            assert r["trained"] is False, f"{r['run_dir']} was trained twice"
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 150
        steps = [json.loads(line)["step"] for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps[-1] == 150  # no step logged twice, none lost


_LONG_SWEEP = """
import os
import sys
os.environ["AIRVAE_COMPILE"] = "0"  # a long run would compile first (auto): not what is under test here
sys.path.insert(0, {src!r})
from airvae.sweep import Job, LocalExecutor, Task, run_tasks
jobs = [Job("plain", {data!r}, 1, 1, 0.0, seed, "smoke", iterations=10_000_000) for seed in range(2)]
tasks = [Task(j, {root!r}, device="cpu") for j in jobs]
run_tasks(tasks, LocalExecutor(2), __import__("pathlib").Path({root!r}) / "log.jsonl", progress=False)
"""


def _stat(pid) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, ...]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(_stat(entry.name)[1]) == pid:
                kids.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            pass
    return kids


def _alive(pid: int) -> bool:
    try:  # a zombie (exited, not yet reaped by its new parent) counts as stopped
        return _stat(pid)[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_worker_processes_checkpoint_and_stop_when_the_sweep_is_killed(tmp_path):
    data, root = tiny_npz(tmp_path / "tiny.npz"), tmp_path / "sweep"
    script = _LONG_SWEEP.format(src=str(Path(__file__).resolve().parents[1] / "src"), data=data, root=str(root))
    parent = subprocess.Popen([sys.executable, "-c", script])
    workers = []
    try:
        deadline = time.time() + 120
        while len(list(root.glob("**/summary.json"))) < 2:  # both runs are training
            assert parent.poll() is None and time.time() < deadline, "the sweep did not start both runs"
            time.sleep(0.05)
        time.sleep(1.0)  # inside their training loops
        workers = _children(parent.pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 60
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.1)
        assert workers and not any(map(_alive, workers)), "workers outlived the sweep"
        for summary in root.glob("**/summary.json"):
            assert json.loads(summary.read_text())["status"] == "interrupted"  # checkpointed, resumable
            assert (summary.parent / "checkpoints" / "last.pt").exists()
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
