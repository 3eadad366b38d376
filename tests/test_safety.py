"""What airvae guarantees about files it reads and writes: nothing executed, nothing clobbered,
nothing lost, and an exit status that tells the truth. Each test reproduces a defect found by
probing the command line as a hostile or unlucky user would."""

import errno
import json
import os
import shutil
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

from airvae import files, locks, runs
from airvae.checkpoints import load_checkpoint
from airvae.cli import main
from airvae.runs import BEST, BEST_NEXT, LAST

SRC = str(Path(__file__).resolve().parents[1] / "src")


def write_npz(path: Path, d: int = 16, seed: int = 0, rows=(200, 40, 40)) -> Path:
    rng = np.random.default_rng(seed)
    p = rng.random(d) * 0.7
    np.savez(path, **{split: (rng.random((n, d)) < p).astype(np.uint8) for split, n in zip(("train", "valid", "test"), rows, strict=True)})
    return path


def train_args(data: Path, run: Path, *extra) -> list[str]:
    return ["train", "--dataset", str(data), "--budget", "smoke", "--iterations", "20", "--val-every", "10",
            "--encoder", "d8", "--decoder", "d8", "--z-dim", "2", "--run-dir", str(run), "--no-progress",
            "--device", "cpu", *extra]


@pytest.fixture
def trained(tmp_path):
    data = write_npz(tmp_path / "tiny.npz")
    run = tmp_path / "run"
    assert main(train_args(data, run)) == 0
    return data, run


class Killed(BaseException):
    """Stands for the death of the process at that point."""


def killed_run(tmp_path, monkeypatch, at_step: int = 20, *extra: str):
    """A 40-step run whose process died right before writing last.pt at ``at_step`` (validations
    every 10 steps): best.pt and the metrics line of that step are written, last.pt is older.
    ``extra``: more flags of ``airvae train``."""
    import airvae.driver as train_module  # where RunLog and validation live

    data, run = write_npz(tmp_path / "tiny.npz"), tmp_path / "run"
    real = train_module.save_checkpoint

    def dies(path, state):
        if Path(path).name == "last.pt" and state["state"]["step"] == at_step:
            raise Killed
        real(path, state)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "save_checkpoint", dies)
        with pytest.raises(Killed):
            main(train_args(data, run, "--iterations", "40", *extra))
    return data, run


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("airvae: error:"), err
    return err


# ----------------------------------------------------------------------------------------------
# 1. Checkpoints never run code


class Payload:
    """Unpickling this runs ``code``: what a hostile checkpoint would carry."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


@pytest.mark.parametrize("which, command", [(BEST, "evaluate"), (LAST, "resume")])
def test_a_checkpoint_carrying_a_pickle_payload_is_refused_and_never_runs(trained, tmp_path, capsys, which, command):
    data, run = trained
    witness = tmp_path / "payload-ran"
    state = torch.load(run / which, weights_only=True)
    state["extra"] = Payload(f"open({str(witness)!r}, 'w').write('pwned')")
    torch.save(state, run / which)
    capsys.readouterr()
    args = (["evaluate", str(run), "--max-examples", "4", "--svi-steps", "2", "--svi-k", "4", "--no-progress"]
            if command == "evaluate" else train_args(data, run, "--resume"))
    assert main(args) == 2
    err = one_error_line(capsys)
    assert which.split("/")[-1] in err and "refuses" in err
    assert not witness.exists(), "the checkpoint's code ran"


# ----------------------------------------------------------------------------------------------
# 2. --overwrite deletes only provable airvae runs


@pytest.mark.parametrize("config", ["{}", "valid"])
def test_overwrite_never_deletes_a_folder_airvae_did_not_write(trained, tmp_path, capsys, config):
    data, run = trained
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    (thesis / "config.json").write_text("{}" if config == "{}" else (run / "config.json").read_text())
    before = sorted(p.name for p in thesis.iterdir())
    capsys.readouterr()
    assert main(train_args(data, thesis, "--overwrite")) == 2
    assert "thesis" in one_error_line(capsys)
    assert sorted(p.name for p in thesis.iterdir()) == before  # not even a lock file was added
    assert (thesis / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_a_run_holding_foreign_files_and_links(trained, tmp_path, capsys):
    data, run = trained
    (run / "notes.txt").write_text("mine")
    assert main(train_args(data, run, "--overwrite")) == 2
    assert "notes.txt" in one_error_line(capsys) and (run / "notes.txt").exists()
    (run / "notes.txt").unlink()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    (run / "evaluations").mkdir(exist_ok=True)
    (run / "evaluations" / "link.json").symlink_to(outside / "precious")
    assert main(train_args(data, run, "--overwrite")) == 2
    assert "link.json" in one_error_line(capsys)
    (run / "evaluations" / "link.json").unlink()
    link = tmp_path / "link-to-run"
    link.symlink_to(run)
    assert main(train_args(data, link, "--overwrite")) == 2
    assert "symbolic link" in one_error_line(capsys)
    assert main(train_args(data, run, "--overwrite")) == 0  # a genuine run is still overwritten
    assert (outside / "precious").read_text() == "keep"


def test_overwrite_deletes_the_saved_parts_of_an_interrupted_evaluation(trained, capsys):
    """``evaluations/<split>-<hash>.partial`` is airvae's own file (an evaluation killed partway):
    --overwrite clears it like the run's other files instead of calling it foreign."""
    data, run = trained
    (run / "evaluations").mkdir(exist_ok=True)
    (run / "evaluations" / "test-0123456789.partial").write_bytes(b"parts")
    assert main(train_args(data, run, "--overwrite")) == 0, capsys.readouterr().err
    assert not (run / "evaluations" / "test-0123456789.partial").exists()


def test_run_dir_that_is_a_file_or_a_foreign_folder_is_refused(trained, tmp_path, capsys):
    data, _ = trained
    assert main(train_args(data, data)) == 2  # the .npz file itself
    assert "is a file" in one_error_line(capsys)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    assert main(train_args(data, foreign)) == 2
    assert "not an airvae run" in one_error_line(capsys)
    assert [p.name for p in foreign.iterdir()] == ["cat.jpg"]


def test_a_foreign_folder_is_refused_without_being_walked(tmp_path):
    """airvae looks for links only where it writes (the run's entries and its folders): a folder it
    does not own is refused for what it holds at the top, not searched through. ``--run-dir /``
    once walked the whole disk and died on a process's folder vanishing under /proc."""
    album = tmp_path / "album"
    (album / "2019" / "june").mkdir(parents=True)
    (album / "2019" / "june" / "beach.jpg").symlink_to(tmp_path)
    with pytest.raises(runs.RunError, match=r"not an airvae run \(it holds 2019\)"):
        runs.run_dir_state(album)
    with pytest.raises(runs.RunError, match="is not empty and is not an airvae run"):
        runs.run_dir_state(Path("/"))


# ----------------------------------------------------------------------------------------------
# 3. One writer per run directory

_HOLD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {src!r})
    from airvae.locks import RunLock
    lock = RunLock({path!r}).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def holder():
    """Start a process holding the lock of a directory; returns a function path -> process."""
    children = []

    def hold(path: Path):
        child = subprocess.Popen([sys.executable, "-c", _HOLD.format(src=SRC, path=str(path))],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "locked"
        children.append(child)
        return child

    yield hold
    for child in children:
        child.kill()
        child.wait()


def test_a_second_writer_is_refused_at_once_naming_the_holder(trained, holder, capsys):
    data, run = trained
    child = holder(run)
    capsys.readouterr()
    started = time.perf_counter()
    for extra in (["--resume"], ["--overwrite"]):
        assert main(train_args(data, run, *extra)) == 2
        err = one_error_line(capsys)
        assert f"PID {child.pid}" in err
    assert time.perf_counter() - started < 30  # refused at once, not after training
    metrics = (run / "metrics.jsonl").read_text()
    child.kill()
    child.wait()  # the kernel releases the lock of a dead holder
    assert (run / "metrics.jsonl").read_text() == metrics
    assert main(train_args(data, run, "--resume")) == 0


def test_two_reproductions_cannot_share_an_output_folder(tmp_path, holder, capsys):
    data = write_npz(tmp_path / "tiny.npz")
    out = tmp_path / "out"
    child = holder(out)
    capsys.readouterr()
    assert main(["reproduce", "table1", "--dataset", str(data), "--budget", "smoke", "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 2
    assert f"PID {child.pid}" in one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_a_sweep_skips_a_locked_run_and_reports_it(tmp_path, holder):
    from airvae.sweep import Job, Task, execute

    data = write_npz(tmp_path / "tiny.npz")
    task = Task(Job("plain", str(data), budget="smoke", iterations=5), str(tmp_path / "sweep"), device="cpu")
    child = holder(task.run_dir)
    result = execute(task)
    assert result["status"] == "locked" and f"PID {child.pid}" in result["error"]
    assert not (task.run_dir / "config.json").exists()


# ----------------------------------------------------------------------------------------------
# 4. I/O faults: one line naming the file, and a true status


class _FullDisk:
    """Writes of more than ``limit`` bytes fail with ENOSPC (used where no tmpfs can be mounted)."""

    def __init__(self, real, limit):
        self.real, self.limit = real, limit

    def __call__(self, fd, mode="r", *args, **kwargs):
        f = self.real(fd, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        limit, write = self.limit, f.write

        def guarded(data):
            if len(data) > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write(data)

        f.write = guarded
        return f


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A folder on a 1 MiB file system: a real tmpfs when we may mount one (root), else writes
    of more than 64 KiB fail as a full disk would."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode == 0
    if not mounted:
        monkeypatch.setattr(os, "fdopen", _FullDisk(os.fdopen, 64 * 1024))
    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_gives_one_line_naming_the_file_and_a_true_status(tmp_path, small_disk, capsys):
    data = write_npz(tmp_path / "tiny.npz")
    run = small_disk / "run"
    # d300-d300: the model with Adam's moments is ~3 MB, more than the disk holds
    args = ["train", "--dataset", str(data), "--budget", "smoke", "--run-dir", str(run), "--no-progress",
            "--device", "cpu"]
    assert main(args) == 2
    err = one_error_line(capsys)
    assert "last.pt" in err or "best.pt" in err
    assert "free some disk space" in err
    summary = run / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] == "failed"
    assert not [p for p in run.rglob(".*.pt.*")], "a partial checkpoint was left behind"


def test_damaged_files_give_one_line_naming_the_file(trained, capsys):
    data, run = trained
    eval_args = ["evaluate", str(run), "--max-examples", "4", "--svi-steps", "2", "--svi-k", "4", "--no-progress"]
    good_best, good_last = (run / BEST).read_bytes(), (run / LAST).read_bytes()
    capsys.readouterr()
    for which, garbage in ((BEST, good_best[: len(good_best) // 2]), (BEST, os.urandom(4000)),
                           (LAST, good_last[:100]), (LAST, b"")):
        (run / which).write_bytes(garbage)
        args = eval_args if which == BEST else train_args(data, run, "--resume")
        assert main(args) == 2, which
        err = one_error_line(capsys)
        assert which.split("/")[-1] in err and "corrupt" in err
        (run / BEST).write_bytes(good_best)
        (run / LAST).write_bytes(good_last)
    (run / "config.json").write_text('{"dataset": "tiny.npz", "archi')
    assert main(eval_args) == 2
    assert "config.json" in one_error_line(capsys)
    (run / "config.json").write_text("[" * 100_000)  # nested past Python's recursion limit
    assert main(eval_args) == 2
    assert "config.json" in one_error_line(capsys)
    (run / "metrics.jsonl").write_text("[" * 100_000 + "\n" + '{"step": 1}\n')
    with pytest.raises(files.RunError, match="line 1 is damaged"):
        files.read_metrics(run / "metrics.jsonl")


def test_torn_metrics_and_summary_are_recovered_on_resume(tmp_path, monkeypatch):
    data, run = killed_run(tmp_path, monkeypatch)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20]
    metrics.write_text(lines[0] + "\n" + lines[1][:15])  # the kill tore the last append
    (run / "summary.json").write_text('{"status": "runn')
    assert main(train_args(data, run, "--resume", "--iterations", "40")) == 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [10, 20, 30, 40]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    metrics.write_text(lines[0][:10] + "\n" + lines[1] + "\n")  # damage in the middle: not a torn append
    with pytest.raises(files.RunError, match="metrics.jsonl, line 1"):
        files.read_metrics(metrics)


def test_temporary_files_of_a_killed_write_are_removed_on_the_next_start(trained):
    data, run = trained
    leftovers = [run / "checkpoints" / ".last.pt.airvae-tmp-k1ll3d0x", run / ".summary.json.airvae-tmp-abcd_123"]
    for path in leftovers:
        path.write_bytes(b"x" * 1000)
    # names a user may pick, even shaped like a temporary file: not airvae's, never deleted
    keep = [run / "checkpoints" / ".last.pt.notours", run / ".config.json.abcdefgh"]
    for path in keep:
        path.write_bytes(b"y")
    assert main(train_args(data, run, "--resume")) == 0
    assert not any(p.exists() for p in leftovers)
    assert all(p.read_bytes() == b"y" for p in keep)


# ----------------------------------------------------------------------------------------------
# 6. Resume checks what it resumes


def test_resuming_on_changed_data_is_refused_unless_allowed(trained, capsys):
    data, run = trained
    write_npz(data, seed=1)  # other data, same shape and name
    capsys.readouterr()
    args = ["train", "--resume", "--run-dir", str(run), "--no-progress", "--device", "cpu"]
    assert main(args) == 2
    err = one_error_line(capsys)
    assert "data changed" in err and "--allow-data-change" in err
    assert main(args + ["--allow-data-change"]) == 0


def test_a_kill_between_the_first_best_and_last_checkpoint_logs_nothing_twice(tmp_path, monkeypatch):
    data, run = killed_run(tmp_path, monkeypatch, at_step=10)
    assert (run / BEST_NEXT).exists() and not (run / BEST).exists() and not (run / LAST).exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert main(train_args(data, run, "--resume", "--iterations", "40")) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40]
    assert (run / BEST).exists() and not (run / BEST_NEXT).exists()


def test_a_kill_after_a_new_best_never_costs_the_previous_best(tmp_path, monkeypatch):
    """Killed after staging step 20's best but before last.pt: if the resumed run then validates
    worse (another device, changed data), step 10's best.pt is still there and still the best."""
    import airvae.driver as train_module  # where RunLog and validation live

    data, run = killed_run(tmp_path, monkeypatch, at_step=20)
    assert load_checkpoint(run / BEST)["step"] == 10 and load_checkpoint(run / BEST_NEXT)["step"] == 20
    real = train_module.iwae_log_likelihood
    monkeypatch.setattr(train_module, "iwae_log_likelihood",
                        lambda *a, **k: SimpleNamespace(mean=real(*a, **k).mean - 1000.0))
    assert main(train_args(data, run, "--resume", "--iterations", "40")) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_step"] == 10 and load_checkpoint(run / BEST)["step"] == 10
    assert not (run / BEST_NEXT).exists()
    assert main(["evaluate", str(run), "--max-examples", "4", "--svi-steps", "2", "--svi-k", "4",
                 "--no-progress"]) == 0


def test_resuming_a_finished_run_keeps_its_training_time(trained):
    data, run = trained
    seconds = json.loads((run / "summary.json").read_text())["seconds"]
    assert main(train_args(data, run, "--resume")) == 0
    assert json.loads((run / "summary.json").read_text())["seconds"] == pytest.approx(seconds, abs=0.05)


def test_an_unplanned_stop_leaves_a_true_status(tmp_path, monkeypatch):
    import airvae.driver as train_module  # where validation is called

    data, run = write_npz(tmp_path / "tiny.npz"), tmp_path / "run"

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(train_module, "iwae_log_likelihood", out_of_memory)
    assert main(train_args(data, run)) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "OutOfMemoryError" in summary["message"]


def test_a_lock_file_that_is_a_link_is_never_written_through(trained, tmp_path, capsys):
    data, run = trained
    victim = tmp_path / "thesis.tex"
    victim.write_text("years of work")
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(victim)
    assert main(train_args(data, run, "--resume")) == 2
    assert "link" in one_error_line(capsys)
    with pytest.raises(files.RunError, match="link"):
        locks.check_unlocked(run)
    assert victim.read_text() == "years of work"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_where_airvae_writes_is_refused_at_once_not_waited_on(trained, capsys):
    """A pipe at the lock file or at metrics.jsonl blocks an ordinary open until someone reads it:
    airvae refuses it in one line instead of hanging (the alarm fails the test if it hangs)."""
    data, run = trained
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("airvae waited on a named pipe"))
    signal.alarm(30)
    try:
        (run / ".lock").unlink()
        os.mkfifo(run / ".lock")
        with pytest.raises(files.RunError, match="not a regular file"):
            locks.check_unlocked(run)
        assert main(train_args(data, run, "--resume")) == 2
        assert "not a regular file" in one_error_line(capsys)
        (run / ".lock").unlink()
        with pytest.raises(files.RunError, match="not a regular file"):
            files.append_line(_fifo(run / "metrics.jsonl"), "{}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _fifo(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


# ----------------------------------------------------------------------------------------------
# 7. The exit status tells the truth


def test_reproduce_exits_non_zero_naming_the_runs_that_failed(tmp_path, monkeypatch, capsys):
    import airvae.sweep as train_module  # a sweep's tasks call train() from there

    data = write_npz(tmp_path / "tiny.npz")
    real = train_module.train

    def fails_for_wni(cfg, run_dir, **kwargs):
        if "wni" in str(run_dir):
            raise RuntimeError("simulated failure")
        return real(cfg, run_dir, **kwargs)

    monkeypatch.setattr(train_module, "train", fails_for_wni)
    code = main(["reproduce", "table1", "--dataset", str(data), "--budget", "smoke", "--grid", "5",
                 "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu", "--executor", "local"])
    assert code == 1
    err = capsys.readouterr().err
    assert "1 run(s) did not finish" in err and "wni-5/seed0: failed: RuntimeError: simulated failure" in err


def test_reproduce_refuses_an_impossible_sweep_before_writing_anything(tmp_path, capsys):
    data = write_npz(tmp_path / "three.npz", rows=(3, 3, 3))  # batch 100 cannot be drawn from 3 rows
    out = tmp_path / "out"
    assert main(["reproduce", "table1", "--dataset", str(data), "--budget", "smoke", "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 2
    assert "batch_size" in one_error_line(capsys) and not out.exists()
    good = write_npz(tmp_path / "tiny.npz")
    assert main(["reproduce", "table1", "--dataset", str(good), "--out", str(out), "--device", "cuda:7"]) == 2
    assert "device" in one_error_line(capsys) and not out.exists()


def test_a_finished_run_reports_its_status_from_the_checkpoint_when_the_summary_is_lost(trained):
    data, run = trained
    (run / "summary.json").unlink()
    before = (run / LAST).stat().st_mtime_ns
    assert main(train_args(data, run, "--resume")) == 0
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert (run / LAST).stat().st_mtime_ns == before


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path, holder):
    child = holder(tmp_path)
    with pytest.raises(files.RunLocked, match=f"PID {child.pid}"):
        locks.check_unlocked(tmp_path)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with locks.RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


# ----------------------------------------------------------------------------------------------
# 4. Values that used to be accepted silently, or refused cryptically, or crash


@pytest.mark.parametrize("flags, named", [
    (["--z-dim", "0"], "--z-dim"), (["--encoder", ""], "encoder"), (["--decoder", " "], "decoder"),
    (["--ten-over-h", "1e-320"], "--ten-over-h"), (["--seed", "1e23"], "seed"), (["--seed", "-1"], "seed"),
    (["--k", "1e13"], "--k"), (["--m", "100000000000"], "--m"), (["--m", "1e7"], "memory"),
    (["--z-dim", "1e12"], "memory"), (["--val-k", "1e15"], "--val-k"), (["--encoder", "d100000000-d100000000"], "memory"),
    (["--device", "cpu:abc"], "device"), (["--device", "cuda:-1"], "device"), (["--device", "mps"], "device"),
    (["--batch-size", "1000"], "--batch-size"), (["--sigma-sqrt-d", "inf"], "--sigma-sqrt-d"),
])
def test_values_once_accepted_silently_or_crashing_are_refused(tmp_path, capsys, flags, named):
    data = write_npz(tmp_path / "tiny.npz")
    run = tmp_path / "run"
    assert main(train_args(data, run, *flags)) == 2
    assert named in one_error_line(capsys)
    assert not run.exists()


@pytest.mark.parametrize("arrays, named", [
    ({"train": np.zeros((10, 0)), "valid": np.zeros((5, 0)), "test": np.zeros((5, 0))}, "0 values"),
    ({"train": np.zeros((10, 4)), "valid": np.zeros((5, 4)), "test": np.zeros((0, 4))}, "'test' is empty"),
    ({"train": np.zeros((10, 4)), "valid": np.zeros((0, 4)), "test": np.zeros((5, 4))}, "'valid' is empty"),
    (b"\x93NUMPY random bytes" * 50, "not an .npz archive"),
])
def test_unusable_user_data_is_refused_with_what_is_wrong(tmp_path, capsys, arrays, named):
    data = tmp_path / "data.npz"
    if isinstance(arrays, bytes):
        data.write_bytes(arrays)
    else:
        np.savez(data, **arrays)
    run = tmp_path / "run"
    assert main(train_args(data, run, "--sigma-sqrt-d", "5", "--batch-size", "2")) == 2
    err = one_error_line(capsys)
    assert named in err and "allow_pickle" not in err
    assert not run.exists()


@pytest.mark.parametrize("config", ["{}", '{"dataset": 7}', "[1, 2]", '{"dataset": "x.npz", "architecture": '
                                    '{"encoder": "d8", "decoder": "d8", "z_dim": "64"}}', "not json"])
def test_a_damaged_or_foreign_config_is_named_not_a_traceback(trained, capsys, config):
    _, run = trained
    (run / "config.json").write_text(config)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--no-progress"]) == 2
    assert "config.json" in one_error_line(capsys)


def test_reproduce_into_a_file_or_with_negative_gpus_is_refused(tmp_path, capsys):
    data = write_npz(tmp_path / "tiny.npz")
    base = ["reproduce", "table1", "--dataset", str(data), "--budget", "smoke", "--no-progress", "--device", "cpu"]
    assert main(base + ["--out", str(data)]) == 2
    assert "is a file" in one_error_line(capsys)
    assert main(base + ["--out", str(tmp_path / "o"), "--executor", "ray", "--gpus-per-task", "-1"]) == 2
    assert "--gpus-per-task" in one_error_line(capsys) and not (tmp_path / "o").exists()
    assert main(["evaluate", str(tmp_path), "--k", "1e13"]) == 2  # not a run: named before anything else
    assert "not an airvae run" in one_error_line(capsys)


def test_evaluate_refuses_settings_that_cannot_fit_before_any_work(trained, capsys):
    _, run = trained
    capsys.readouterr()
    for flags in (["--svi-l", "1e7"], ["--estimators", "ais", "--ais-chains", "1e6"]):  # within the bounds
        assert main(["evaluate", str(run), "--no-progress", *flags]) == 2
        assert "memory" in one_error_line(capsys)
    assert not (run / "evaluations").exists()


def test_resuming_from_the_stored_configuration_refuses_settings_it_would_ignore(trained, capsys):
    _, run = trained
    capsys.readouterr()
    assert main(["train", "--resume", "--run-dir", str(run), "--iterations", "400", "--k", "5", "--no-progress"]) == 2
    err = one_error_line(capsys)
    assert "--iterations" in err and "--k" in err
    assert main(["train", "--resume", "--run-dir", str(run), "--no-progress", "--device", "cpu"]) == 0


# ----------------------------------------------------------------------------------------------
# 8. The marker and link checks, each on its own (no other check may stand in for it)


def _snapshot(folder: Path) -> dict:
    """Every entry under ``folder``: relative path -> bytes (files) or link target (links)."""
    return {str(p.relative_to(folder)): (f"-> {os.readlink(p)}" if p.is_symlink() else
                                         None if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


def test_overwrite_refuses_a_run_without_its_marker_even_when_all_else_is_airvae_s(trained, capsys):
    """Only airvae's own files and a valid config.json, but no airvae-run.json: the marker check
    alone must refuse (no foreign file here for another check to catch)."""
    data, run = trained
    (run / runs.MARKER).unlink()
    assert runs.load_config(run) and runs.run_dir_state(run) == "run"  # valid config, nothing foreign
    before = _snapshot(run)
    assert runs.MARKER not in before and "config.json" in before and "metrics.jsonl" in before
    capsys.readouterr()
    assert main(train_args(data, run, "--overwrite")) == 2, "--overwrite cleared a folder without the marker"
    err = one_error_line(capsys)
    assert runs.MARKER in err and "marker" in err, err
    assert _snapshot(run) == before, "the refused folder was changed"


@pytest.mark.parametrize("inside", ["metrics.jsonl", "checkpoints/best.pt"])
def test_resume_refuses_a_run_holding_a_link_before_any_work(tmp_path, monkeypatch, capsys, inside):
    """A half-trained run where one of airvae's files is a symbolic link to a file outside: resume
    refuses at once (status 2, one line naming the link), writing nothing, the target untouched."""
    _, run = killed_run(tmp_path, monkeypatch)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / Path(inside).name
    shutil.move(run / inside, target)
    (run / inside).symlink_to(target)
    kept, before = target.read_bytes(), _snapshot(run)
    capsys.readouterr()
    assert main(["train", "--resume", "--run-dir", str(run), "--no-progress", "--device", "cpu"]) == 2, \
        f"resumed into a run whose {inside} is a symbolic link"
    err = one_error_line(capsys)
    assert inside in err and "link" in err, err
    assert target.read_bytes() == kept, "the link's target was written through"
    assert _snapshot(run) == before, "the refused run was changed"
