"""The command line end to end: smoke runs on each dataset, every model family, and clear errors."""

import json
import os
import re

import pytest

from airvae.cli import main


@pytest.mark.parametrize("dataset", ["mnist", "omniglot", "caltech"])
def test_smoke_training_run_on_each_dataset(dataset, data_dir, tmp_path, capsys):
    run = tmp_path / dataset
    assert main(["train", "--dataset", dataset, "--budget", "smoke", "--data-dir", data_dir,
                 "--run-dir", str(run), "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40
    assert (summary["data_deviation"] is not None) == (dataset == "omniglot")
    config = json.loads((run / "config.json").read_text())
    assert config["architecture"]["encoder"] == {"mnist": "d300-d300", "omniglot": "d200-d200", "caltech": "d500"}[dataset]
    assert "| VAE |" in capsys.readouterr().out


@pytest.mark.parametrize("flags, name", [
    (["--sigma-sqrt-d", "5", "--alpha", "0.5"], "DVAE (alpha=0.5)"),
    (["--sigma-sqrt-d", "5", "--alpha", "1"], "DVAE (alpha=1)"),
    (["--ten-over-h", "5"], "WNI-VAE"),
    (["--k", "8"], "IWAE-8"),
    (["--k", "8", "--sigma", "0.2"], "DIWAE-8 (alpha=1)"),
    (["--k", "8", "--H", "2"], "WNI-IWAE-8"),
])
def test_every_model_family_trains(flags, name, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "caltech", "--budget", "smoke", "--iterations", "10", "--data-dir", data_dir,
                 "--run-dir", str(run), "--no-progress", *flags]) == 0
    assert json.loads((run / "summary.json").read_text())["model"] == name


def test_compile_flag_turns_compilation_on_for_this_process_and_its_workers(data_dir, tmp_path, monkeypatch):
    import airvae.compiling as model

    calls = []
    monkeypatch.setattr(model, "set_compile", lambda enabled=True: calls.append(enabled))
    monkeypatch.setenv(model.COMPILE_ENV, "")  # restored after the test, whatever the CLI sets
    # the stub compiles nothing: only the wiring is under test (test_compile.py checks the kernels)
    assert main(["train", "--dataset", "caltech", "--budget", "smoke", "--iterations", "2", "--data-dir", data_dir,
                 "--run-dir", str(tmp_path / "run"), "--no-progress", "--compile"]) == 0
    assert calls == [True]
    assert os.environ[model.COMPILE_ENV] == "1"  # spawned sweep workers read it


@pytest.mark.parametrize("flags, message", [
    (["--sigma", "-1"], "sigma"), (["--alpha", "1.5"], "alpha"), (["--k", "0"], "k"), (["--H", "0"], "H"),
    (["--m", "0"], "m"), (["--ten-over-h", "-2"], "10/H|ten-over-h"),
])
def test_invalid_values_are_rejected_before_any_work(flags, message, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "caltech", "--budget", "smoke", "--data-dir", data_dir,
                 "--run-dir", str(run), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("airvae: error: invalid") and "allowed" in err
    import re

    assert re.search(message, err) and "Traceback" not in err
    assert not run.exists()


def test_unknown_dataset_is_rejected(tmp_path, capsys):
    assert main(["train", "--dataset", "cifar", "--run-dir", str(tmp_path / "r")]) == 2
    assert "mnist, omniglot, caltech" in capsys.readouterr().err


def test_an_existing_run_needs_resume_or_overwrite(data_dir, tmp_path, capsys):
    args = ["train", "--dataset", "caltech", "--budget", "smoke", "--iterations", "5", "--data-dir", data_dir,
            "--run-dir", str(tmp_path / "r"), "--no-progress"]
    assert main(args) == 0
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert main(args + ["--overwrite"]) == 0


def test_evaluate_prints_the_table_stores_json_and_reuses_it(data_dir, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", "--dataset", "caltech", "--budget", "smoke", "--iterations", "5", "--data-dir", data_dir,
                 "--run-dir", str(run), "--no-progress"]) == 0
    args = ["evaluate", str(run), "--max-examples", "6", "--svi-steps", "3", "--svi-k", "20", "--no-progress"]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "IW-SVI (k=20, l=2, T=3)" in out and "Δinf" in out  # l: the smoke budget's, the run's own
    stored = list((run / "evaluations").glob("test-*.json"))
    assert len(stored) == 1
    result = json.loads(stored[0].read_text())
    gap = result["estimates"]["gap"]["values"]
    svi, bound = result["estimates"]["iwsvi"]["values"], result["estimates"]["bound"]["values"]
    assert all(abs(g - (s - b)) < 1e-9 for g, s, b in zip(gap, svi, bound, strict=True)) and len(gap) == 6
    mtime = stored[0].stat().st_mtime_ns
    assert main(args) == 0 and stored[0].stat().st_mtime_ns == mtime  # reused, not recomputed
    assert main(args + ["--recompute"]) == 0 and stored[0].stat().st_mtime_ns != mtime
    assert main(["evaluate", str(tmp_path / "none")]) == 2
    assert "not an airvae run directory" in capsys.readouterr().err


def test_evaluate_allows_exactly_the_estimator_registrys_names(tmp_path, capsys):
    """--estimators: the help lists the registry's estimators in its order, and any other name is
    refused with them listed (the names come from one place, airvae.estimators.REGISTRY)."""
    from airvae.config import Architecture, RunConfig
    from airvae.estimators import REGISTRY

    assert main(["evaluate", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"comma-separated subset of (.*?) \(default", help_text).group(1).split(", ") == list(REGISTRY)
    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig(dataset="tiny", architecture=Architecture("d16", "d16", 2), x_dim=12, k=2)
    (run / "config.json").write_text(json.dumps(cfg.to_json()))
    assert main(["evaluate", str(run), "--estimators", "bound,elbo", "--no-progress"]) == 2
    assert f"a non-empty subset of {', '.join(REGISTRY)}" in capsys.readouterr().err
    assert not (run / "evaluations").exists()


def test_ctrl_c_saves_a_checkpoint_and_resume_needs_only_the_run_dir(data_dir, tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "r"
    child = subprocess.Popen([sys.executable, "-m", "airvae.cli", "train", "--dataset", "caltech", "--budget",
                              "smoke", "--iterations", "5000", "--checkpoint-every", "10", "--val-every", "1000",
                              "--data-dir", data_dir, "--run-dir", str(run), "--no-progress"],
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.pt").exists():
        assert child.poll() is None and time.time() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=60) == 130
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["steps"] < 5000
    assert "--resume" in summary["message"]
    assert main(["train", "--resume", "--run-dir", str(run), "--no-progress"]) == 0  # the stored config is used
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert main(["train", "--run-dir", str(run)]) == 2
    assert "missing --dataset" in capsys.readouterr().err


def test_evaluate_budget_sets_the_estimators_effort_explicit_flags_win_and_the_runs_budget_is_the_default(
        tmp_path, monkeypatch, capsys):
    """`--budget smoke|quick|paper` takes targets.EVALUATION_BUDGETS (and AIS_BUDGETS with ais or bdmc);
    without it, the budget the run was trained at; a run of a budget airvae does not know: paper."""
    from test_safety import train_args, write_npz

    import airvae.evaluation
    from airvae.targets import AIS_BUDGETS, EVALUATION_BUDGETS

    run = tmp_path / "run"
    assert main(train_args(write_npz(tmp_path / "tiny.npz"), run)) == 0  # --budget smoke
    used = []
    monkeypatch.setattr(airvae.evaluation, "evaluate_run", lambda run_dir, settings, **kw: used.append(settings) or {})

    def effort(*flags) -> dict:
        assert main(["evaluate", str(run), "--no-progress", *flags]) == 0
        settings = used.pop()
        return {key: getattr(settings, key) for key in ("k_iwae", "svi_k", "svi_l", "svi_steps", "max_examples",
                                                        "ais_intermediate", "ais_chains", "bdmc_examples")}

    defaults = airvae.evaluation.EvaluationSettings()
    ais_defaults = {key: getattr(defaults, key) for key in ("ais_intermediate", "ais_chains", "bdmc_examples")}
    assert effort() == {**EVALUATION_BUDGETS["smoke"], **ais_defaults}  # the run's own budget
    assert effort("--budget", "quick") == {**EVALUATION_BUDGETS["quick"], **ais_defaults}
    assert effort("--budget", "paper", "--k", "100", "--max-examples", "7") == {
        **EVALUATION_BUDGETS["paper"], **ais_defaults, "k_iwae": 100, "max_examples": 7}
    assert effort("--estimators", "bound,iwsvi,ais", "--budget", "quick", "--ais-chains", "3") == {
        **EVALUATION_BUDGETS["quick"], **ais_defaults, **AIS_BUDGETS["quick"], "ais_chains": 3}
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "budget": "custom"}))
    assert effort() == {**EVALUATION_BUDGETS["paper"], **ais_defaults}  # custom: the paper's effort
    assert main(["evaluate", str(run), "--budget", "huge"]) == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    assert main(["evaluate", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--budget {paper,quick,smoke}" in help_text and "Default: the budget the run was trained at" in help_text
    assert "(default 5000)" not in help_text  # the defaults come from the budget now
