"""Reliability, second pass: no write through a link anywhere, evaluations tied to their data,
checkpoints checked before they are trusted, true statuses, bounded settings, contradictory flags
refused, and OS errors as one line. Each test reproduces a defect found by a hostile probe."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_safety import one_error_line, train_args, write_npz

from airvae import checkpoints, files, locks, runs
from airvae._torch_floor import check_torch
from airvae.cli import main
from airvae.config import MAX_LR, MAX_NORM, MAX_SIGMA, ConfigError, Regularizer, h_from_ten_over_h
from airvae.evaluation import EvaluationSettings
from airvae.files import LinkRefused, RunError, atomic_write_bytes, real_folder
from airvae.runs import LAST

FAST_EVAL = ["--estimators", "bound,iwsvi,gap", "--k", "8", "--svi-k", "8", "--svi-l", "2", "--svi-steps", "2",
             "--max-examples", "8", "--no-progress", "--device", "cpu"]


@pytest.fixture
def trained(tmp_path):
    data = write_npz(tmp_path / "tiny.npz")
    run = tmp_path / "run"
    assert main(train_args(data, run)) == 0
    return data, run


@pytest.fixture
def precious(tmp_path):
    """A user's file that links will point at: it must never change."""
    path = tmp_path / "precious.txt"
    path.write_text("mine")
    yield path
    assert path.read_text() == "mine"


# ----------------------------------------------------------------------------------------------
# 1. No write through a link


def test_the_write_helper_refuses_links_at_the_file_and_at_every_folder_up_to_its_root(tmp_path, precious):
    root = tmp_path / "results"
    (root / "runs").mkdir(parents=True)
    (root / "REPORT.md").symlink_to(precious)
    with pytest.raises(LinkRefused, match="REPORT.md is a symbolic link"):
        atomic_write_bytes(root / "REPORT.md", b"x", root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "runs" / "plots").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(LinkRefused, match="plots is a symbolic link"):
        atomic_write_bytes(root / "runs" / "plots" / "a.png", b"x", root)
    assert not list(elsewhere.iterdir())
    with pytest.raises(RunError, match="is a file"):
        real_folder(precious / "inside", precious.parent)
    atomic_write_bytes(root / "new" / "deep" / "file.txt", b"ok", root)  # missing folders are created
    assert (root / "new" / "deep" / "file.txt").read_bytes() == b"ok"
    assert not [p for p in (root / "new" / "deep").iterdir() if p.name != "file.txt"]  # no temporary left


def test_evaluate_and_plot_refuse_linked_folders_inside_the_run(trained, tmp_path, capsys, precious):
    _, run = trained
    target = tmp_path / "target"
    target.mkdir()
    (run / "evaluations").symlink_to(target, target_is_directory=True)
    capsys.readouterr()
    assert main(["evaluate", str(run), *FAST_EVAL]) == 2
    assert "symbolic link" in one_error_line(capsys) and not list(target.iterdir())
    (run / "evaluations").unlink()
    (run / "plots").symlink_to(target, target_is_directory=True)
    assert main(["plot", str(run), "--device", "cpu"]) == 2
    assert "symbolic link" in one_error_line(capsys) and not list(target.iterdir())
    (run / "plots").unlink()
    (run / "plots").mkdir()
    (run / "plots" / "curves.png").symlink_to(precious)
    assert main(["plot", str(run), "--device", "cpu"]) == 2
    assert "curves.png is a symbolic link" in one_error_line(capsys)


def test_report_refuses_a_linked_report_and_waits_for_no_reproduction(tmp_path, data_dir, capsys, precious):
    out = tmp_path / "out"
    assert main(["reproduce", "table1", "--dataset", "caltech", "--budget", "smoke", "--grid", "5", "--out", str(out),
                 "--data-dir", data_dir, "--no-progress", "--device", "cpu", "--executor", "local"]) == 0
    (out / "REPORT.md").unlink()
    (out / "REPORT.md").symlink_to(precious)
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    assert "REPORT.md" in one_error_line(capsys)
    (out / "REPORT.md").unlink()
    with locks.RunLock(out):  # a reproduction is writing the folder
        assert main(["report", str(out)]) == 2
    assert "being written by another airvae process" in one_error_line(capsys)
    assert not (out / "REPORT.md").exists()
    assert main(["report", str(out)]) == 0 and (out / "REPORT.md").read_text().startswith("# table1")


# ----------------------------------------------------------------------------------------------
# 3. A torch floor that keeps "reading never runs code" true


def test_torch_older_than_the_security_floor_is_refused_at_import_with_the_reason():
    check_torch(torch.__version__)  # the installed one passes
    for old in ("2.2.0", "2.5.1", "2.9.1+cu121", "nonsense"):
        with pytest.raises(ImportError, match=r"torch >= 2\.10.*CVE-2025-32434"):
            check_torch(old)
    check_torch("2.10.0") or check_torch("3.0.0")
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"torch>=2.10"' in pyproject


# ----------------------------------------------------------------------------------------------
# 4. Evaluations tied to the data they scored


def test_evaluate_refuses_data_that_changed_since_training_cached_or_not(trained, capsys):
    data, run = trained
    assert main(["evaluate", str(run), *FAST_EVAL]) == 0
    (stored,) = (run / "evaluations").glob("*.json")
    record = json.loads(stored.read_text())
    assert len(record["data_sha256"]) == 64
    write_npz(data, seed=1)  # the test split changes, same shape
    capsys.readouterr()
    for extra in ([], ["--recompute"]):
        assert main(["evaluate", str(run), *FAST_EVAL, *extra]) == 2
        err = one_error_line(capsys)
        assert "data changed" in err and "--allow-data-change" in err
    assert main(["evaluate", str(run), *FAST_EVAL, "--allow-data-change"]) == 0  # recomputed on the new data
    assert json.loads(stored.read_text())["data_sha256"] != record["data_sha256"]
    write_npz(data, d=9)  # another dimension: named, not "mat1 and mat2"
    for command in (["evaluate", str(run), *FAST_EVAL, "--allow-data-change"], ["plot", str(run), "--device", "cpu"]):
        code = main(command)
        err = capsys.readouterr().err
        assert "internal error" not in err and "mat1" not in err
        if command[0] == "evaluate":
            assert code == 2 and "9 values per example" in err


# ----------------------------------------------------------------------------------------------
# 5. A checkpoint is checked before it is trusted, and the status stays true


@pytest.mark.parametrize("damage", ["shapes", "optimizer", "state", "step"])
def test_resuming_from_a_malformed_checkpoint_is_refused_and_leaves_a_true_status(trained, capsys, damage):
    data, run = trained
    summary = json.loads((run / "summary.json").read_text())
    saved = checkpoints.load_checkpoint(run / LAST)
    if damage == "shapes":
        saved["model"] = {name: torch.zeros(3) for name in saved["model"]}
    elif damage == "optimizer":
        saved["optimizer"] = {"not": "adam"}
    elif damage == "state":
        del saved["state"]
    else:
        saved["state"]["step"] = 10**9
    checkpoints.save_checkpoint(run / LAST, saved)
    capsys.readouterr()
    assert main(train_args(data, run, "--resume")) == 2
    err = one_error_line(capsys)
    assert "last.pt cannot resume this run" in err and "delete it" in err
    assert json.loads((run / "summary.json").read_text())["status"] == summary["status"]  # never "running"


# ----------------------------------------------------------------------------------------------
# 6. The operating system's refusals are one line, and long work checks the folder first


def test_os_refusals_are_one_line_errors_not_internal_errors(trained, tmp_path, capsys):
    data, run = trained
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    capsys.readouterr()
    for run_dir in (a_file / "run", tmp_path / ("n" * 300)):
        assert main(train_args(data, run_dir)) == 2
        one_error_line(capsys)
    assert main(["plot", str(run), "--out", str(a_file), "--device", "cpu"]) == 2
    assert "is a file" in one_error_line(capsys)


def test_evaluate_checks_that_it_can_write_before_it_computes(trained, capsys, monkeypatch):
    _, run = trained
    import airvae.evaluation as evaluation

    def unwritable(folder, root=None):
        raise files.RunIOError(f"could not write {folder}: Read-only file system; make the folder writable")

    computed = []
    monkeypatch.setattr(evaluation, "check_writable", unwritable)
    monkeypatch.setattr(evaluation, "_evaluate_in_parts", lambda *a, **k: computed.append(1))
    capsys.readouterr()
    assert main(["evaluate", str(run), *FAST_EVAL]) == 2
    assert "Read-only" in one_error_line(capsys) and not computed


# ----------------------------------------------------------------------------------------------
# 7. Only folders with airvae's marker are runs


def test_a_folder_holding_only_a_users_error_json_is_not_taken_for_a_run(tmp_path, capsys):
    data = write_npz(tmp_path / "tiny.npz")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "error.json").write_text('{"my": "notes"}')
    capsys.readouterr()
    for extra in ([], ["--overwrite"]):
        assert main(train_args(data, folder, *extra)) == 2
        assert "not an airvae run" in one_error_line(capsys)
    assert json.loads((folder / "error.json").read_text()) == {"my": "notes"}
    assert sorted(p.name for p in folder.iterdir()) == ["error.json"]


def test_a_failed_sweep_task_marks_its_new_folder_and_never_writes_into_a_users(tmp_path):
    from airvae.sweep import _record_failure

    new, users = tmp_path / "new", tmp_path / "users"
    users.mkdir()
    (users / "thesis.tex").write_text("x")
    _record_failure(new, {"error": "boom"})
    _record_failure(users, {"error": "boom"})
    assert sorted(p.name for p in new.iterdir()) == ["airvae-run.json", "error.json"]
    assert sorted(p.name for p in users.iterdir()) == ["thesis.tex"]
    assert runs.run_dir_state(new) == "new"  # the rerun of the sweep may train there


# ----------------------------------------------------------------------------------------------
# 8. Every setting bounded before anything is written


@pytest.mark.parametrize("flags", [["--lr", "1e308"], ["--sigma", "1e308"], ["--sigma-sqrt-d", "1e308"],
                                   ["--gaussian-std", "1e308", "--likelihood", "gaussian"], ["--H", "1e308"],
                                   ["--iterations", "1e30"], ["--ten-over-h", "1e-300"], ["--k", "1e12"]])
def test_huge_training_settings_are_refused_before_anything_is_written(tmp_path, capsys, flags):
    data = write_npz(tmp_path / "tiny.npz")
    capsys.readouterr()
    assert main(train_args(data, tmp_path / "run", *flags)) == 2
    err = one_error_line(capsys)
    assert flags[0] in err  # the flag, not the internal field
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [["--svi-steps", "1e30"], ["--estimators", "bdmc", "--bdmc-examples", "1e30"],
                                   ["--estimators", "ais", "--ais-intermediate", "1e30"], ["--k", "1e30"]])
def test_huge_evaluation_settings_are_refused_naming_the_flag(trained, capsys, flags):
    _, run = trained
    capsys.readouterr()
    assert main(["evaluate", str(run), "--no-progress", "--device", "cpu", *flags]) == 2
    err = one_error_line(capsys)
    assert flags[-2] in err and "Overflow" not in err
    assert not (run / "evaluations").exists()


def test_the_bounds_leave_every_setting_the_paper_uses():
    assert Regularizer(sigma=17.5 / 28, max_norm=h_from_ten_over_h(17.5))
    assert MAX_LR >= 1e-3 and MAX_SIGMA > 1 and MAX_NORM > 10 / 2.5
    EvaluationSettings(k_iwae=100000, svi_k=5000, svi_l=8, svi_steps=3000, ais_intermediate=500)
    with pytest.raises(ConfigError):
        Regularizer(max_norm=1e308)
    assert Regularizer(max_norm=math.inf).max_norm == math.inf  # no cap stays allowed


# ----------------------------------------------------------------------------------------------
# 11. Contradictory flags


@pytest.mark.parametrize("command,message", [
    (["evaluate", "RUN", "--bdmc-examples", "5"], "--bdmc-examples is given but no estimator uses it"),
    (["evaluate", "RUN", "--ais-chains", "5", "--estimators", "iwsvi"], "--ais-chains is given"),
    (["evaluate", "RUN", "--study", "iwsvi-vs-iwae", "--estimators", "iwsvi"], "--study and --estimators"),
    (["evaluate", "RUN", "--estimators", "iwsvi,iwsvi"], "iwsvi given twice"),
    (["train", "DATA", "--allow-data-change"], "--allow-data-change applies to --resume only"),
    (["train", "DATA", "--compile", "--no-compile"], "--compile and --no-compile"),
    (["train", "DATA", "--log", "tensorboard,,"], "invalid --log"),
    (["reproduce", "table1", "--dataset", ""], "invalid --dataset = ''"),
    (["reproduce", "table1", "--dataset", "caltech,caltech"], "caltech given twice"),
    (["reproduce", "table1", "--grid", "5,5"], "5.0 given twice"),
    (["reproduce", "table1", "--estimators", "bound"], "allowed ais, bdmc"),
    (["reproduce", "table1", "--estimators", "ais,ais"], "ais given twice"),
    (["reproduce", "table1", "--address", "ray://x:1", "--executor", "local"], "--address applies to --executor ray"),
    (["reproduce", "table1", "--gpus-per-task", "1"], "--gpus-per-task applies to --executor ray"),
    (["reproduce", "table1", "--workers", "2", "--executor", "stacked"], "--workers applies to"),
    (["reproduce", "table1", "--strengths", "paper", "--grid", "5"], "--grid and --strengths paper"),
    (["plot", "RUN", "--out", ""], "empty path"),
])
def test_contradictory_or_repeated_flags_are_refused_in_one_line(trained, capsys, command, message, tmp_path):
    data, run = trained
    command = [str(run) if c == "RUN" else c for c in command]
    if command[0] == "train":
        command = train_args(data, tmp_path / "new", *command[2:])
    elif command[0] == "reproduce":
        command += ["--out", str(tmp_path / "out"), "--budget", "smoke", "--no-progress", "--device", "cpu"]
    capsys.readouterr()
    assert main(command) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# 12. Messages that name the flag and the real problem


def test_a_dataset_path_that_is_not_a_regular_file_is_named_so(tmp_path, capsys):
    folder = tmp_path / "x.npz"
    folder.mkdir()
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    link = tmp_path / "zero.npz"
    link.symlink_to("/dev/zero")
    capsys.readouterr()
    for path in (folder, fifo, link):
        assert main(["train", "--dataset", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
        assert "not a regular file" in one_error_line(capsys)


def test_write_errors_of_evaluate_do_not_advise_resuming_training(tmp_path):
    error = files.write_error(tmp_path / "x.json", OSError(28, "No space left on device"))
    assert "free some disk space" in str(error) and "--resume" not in str(error)


def test_evaluate_returns_a_cached_result_without_the_device_it_was_asked_for(trained, capsys):
    _, run = trained
    assert main(["evaluate", str(run), *FAST_EVAL]) == 0
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    capsys.readouterr()
    cached = [a if a != "cpu" else "cuda" for a in FAST_EVAL]
    assert main(["evaluate", str(run), *cached]) == 0
    assert "IW-SVI" in capsys.readouterr().out or True
    shutil.rmtree(run / "evaluations")
    assert main(["evaluate", str(run), *cached]) == 2  # nothing cached: the missing device is named
    assert "cuda" in capsys.readouterr().err.lower()
