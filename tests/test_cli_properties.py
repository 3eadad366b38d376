"""Property tests over the command line: for every flag of train, evaluate, reproduce, report and bundle,
any value (huge, tiny, nan, inf, empty, wrong type, random text) either works or is refused with
exit status 2 and one line naming the flag, never a traceback, and a refused command leaves the
file system as it found it.

The expensive parts (the training loop, the estimators, the sweep's runs) are replaced by stubs:
what is under test is that every refusal happens before them and before anything is written."""

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import airvae.evaluation
import airvae.iwsvi_study
import airvae.reproduce
import airvae.sweep
import airvae.train
from airvae.cli import main
from airvae.train import TrainResult

NUMBERS = ["0", "1", "2", "3", "-1", "-0", "0.5", "1.5", "1e3", "1e9", "1e13", "1e23", "1e308", "1e-320",
           "123456789012345678901234567890", "-1e9", "nan", "-nan", "inf", "-inf", "", " ", "abc", "0x10",
           "1,2", "5,nan", "True", "None", "[]", "{}", "-", "--", "cpu", "cuda", "cuda:-1", "cuda:99",
           "cpu:abc", "mps", "d300-d300", "d0", "none", "d99999999", "z64", "tiny.npz", "missing.npz", "run",
           "figure4", "table1", "test", "mnist", "/", ".", "a\x00b", "\x00", "\n", "é", "💥", "digits", "gaussian",
           "discretized-logistic", "per-dimension", "c4k3s2", "c4k3s2-d8", "d8-c4k3s2", "c4k4s2-c4k4s2", "ais,bdmc",
           "bdmc", "gap"]
VALUES = st.one_of(st.sampled_from(NUMBERS), st.integers(-10**40, 10**40).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=12))

TRAIN_FLAGS = ["--dataset", "--budget", "--arch", "--encoder", "--decoder", "--z-dim", "--k", "--m", "--sigma",
               "--sigma-sqrt-d", "--alpha", "--H", "--ten-over-h", "--seed", "--iterations", "--batch-size", "--lr",
               "--val-every", "--val-k", "--val-examples", "--patience", "--checkpoint-every", "--run-dir",
               "--data-dir", "--device", "--log", "--likelihood", "--gaussian-std", "--std-mode", "--num-bins",
               "--components"]
EVALUATE_FLAGS = ["--study", "--estimators", "--split", "--max-examples", "--k", "--svi-k", "--svi-l", "--svi-steps",
                  "--svi-lr", "--ais-intermediate", "--ais-chains", "--bdmc-examples", "--chunk-samples", "--seed",
                  "--device", "RUN"]
REPRODUCE_FLAGS = ["TARGET", "--dataset", "--budget", "--seeds", "--grid", "--out", "--estimators", "--executor",
                   "--workers", "--address", "--gpus-per-task", "--data-dir", "--device", "--log"]
BUNDLE_FLAGS = ["RESULTS", "--out"]
# How each flag may be named in a message, besides its own spelling.
ALIASES = {"--H": ("H (max_norm)", "argument --H"), "--run-dir": ("run directory",), "RUN": ("run",),
           "TARGET": ("target",), "--dataset": ("dataset", "data"), "--data-dir": ("data directory",),
           "--k": ("k", "IWAE"), "RESULTS": ("results_dir", "manifest"), "--gaussian-std": ("gaussian std",)}


def named(flag: str, message: str, value: str) -> bool:
    names = {flag, flag.lstrip("-"), flag.lstrip("-").replace("-", "_"), *ALIASES.get(flag, ())}
    if flag.isupper():  # a positional argument is named by its value
        names |= {value, repr(value)} - {""}
    return any(name in message for name in names)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with a small dataset and one real trained run (for evaluate)."""
    root = tmp_path_factory.mktemp("cli-properties")
    rng = np.random.default_rng(0)
    np.savez(root / "tiny.npz", **{s: (rng.random((n, 16)) < 0.3).astype(np.uint8)
                                   for s, n in (("train", 200), ("valid", 40), ("test", 40))})
    assert main(["train", "--dataset", str(root / "tiny.npz"), "--budget", "smoke", "--iterations", "4",
                 "--encoder", "d8", "--decoder", "d8", "--z-dim", "2", "--run-dir", str(root / "trained"),
                 "--no-progress", "--device", "cpu"]) == 0
    return root


@pytest.fixture
def stubs(monkeypatch):
    """The work itself never runs here: only what happens before it is under test."""
    monkeypatch.setattr(airvae.train, "_train_locked",
                        lambda cfg, run_dir, *args: TrainResult(run_dir, "completed", 0, None, None, 0.0))
    monkeypatch.setattr(airvae.evaluation, "_evaluate_in_parts", lambda *args, **kwargs: {})
    monkeypatch.setattr(airvae.iwsvi_study, "iwsvi_vs_iwae_study", lambda *args, **kwargs: {})
    monkeypatch.setattr(airvae.iwsvi_study, "_write_figure3", lambda data, out_dir: None)

    def fake_run_tasks(tasks, executor, log_path=None, progress=True, desc="runs"):
        return [{"job": airvae.sweep.asdict(t.job), "name": t.job.name, "status": "ok", "trained": False,
                 "summary": {"best_val_log_likelihood": -1.0}} for t in tasks]

    monkeypatch.setattr(airvae.reproduce, "run_tasks", fake_run_tasks)

    class NoRay:  # a local Ray would take seconds to start; its arguments are checked before it
        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setattr(airvae.sweep, "RayExecutor", NoRay)


def check(argv: list[str], flag: str, root: Path, capsys, value: str = "") -> None:
    before = snapshot(root)
    cwd = os.getcwd()
    os.chdir(root)  # relative paths (run dirs, --out) land in the workspace
    try:
        code = main(argv)
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("airvae: error:"), (argv, err)
        # a positional value that looks like an option ("-", "--") is argparse's to explain
        assert named(flag, lines[0], value) or (flag.isupper() and value.startswith("-")), (flag, lines[0])
        assert snapshot(root) == before, f"{argv} was refused but changed the workspace"


_SETTINGS = settings(max_examples=150, deadline=None,  # derandomized by conftest's profile
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def train_argv(flag: str, value: str) -> list[str]:
    args = {"--dataset": "tiny.npz", "--budget": "smoke", "--encoder": "d8", "--decoder": "d8", "--z-dim": "2",
            "--run-dir": "runs/probe", "--device": "cpu", flag: value}
    return ["train", *[x for pair in args.items() for x in pair], "--no-progress", "--overwrite"]


def evaluate_argv(flag: str, value: str) -> list[str]:
    args = {"--max-examples": "4", "--device": "cpu"}
    if flag != "RUN":
        args[flag] = value
    return ["evaluate", value if flag == "RUN" else "trained", *[x for pair in args.items() for x in pair], "--no-progress"]


def reproduce_argv(flag: str, value: str) -> list[str]:
    args = {"--dataset": "tiny.npz", "--budget": "smoke", "--out": "results/probe", "--device": "cpu"}
    if flag != "TARGET":
        args[flag] = value
    return ["reproduce", value if flag == "TARGET" else "table1", *[x for pair in args.items() for x in pair],
            "--no-progress"]


def report_argv(flag: str, value: str) -> list[str]:
    return ["report", value]


def bundle_argv(flag: str, value: str) -> list[str]:
    return ["bundle", value] if flag == "RESULTS" else ["bundle", "trained", flag, value]


COMMANDS = [(train_argv, flag) for flag in TRAIN_FLAGS] + [(evaluate_argv, flag) for flag in EVALUATE_FLAGS] + \
           [(reproduce_argv, flag) for flag in REPRODUCE_FLAGS] + [(report_argv, "RESULTS")] + \
           [(bundle_argv, flag) for flag in BUNDLE_FLAGS]


@pytest.mark.parametrize("argv, flag", COMMANDS, ids=[f"{a.__name__[:-5]}{f}" for a, f in COMMANDS])
def test_every_flag_with_every_awkward_value(workspace, stubs, capsys, argv, flag):
    for value in NUMBERS:
        check(argv(flag, value), flag, workspace, capsys, value)


@_SETTINGS
@given(command=st.sampled_from(COMMANDS), value=VALUES)
def test_random_values_for_random_flags(workspace, stubs, capsys, command, value):
    argv, flag = command
    check(argv(flag, value), flag, workspace, capsys, value)
