"""Tracking sinks (`--log tensorboard,mlflow,wandb`): each holds exactly what metrics.jsonl holds, the
config as hyperparameters and the run's evaluations, read back with TensorBoard's, MLflow's and W&B's
own readers (or files); a killed and resumed run logs no step twice in any."""

import importlib.util
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_safety import killed_run, one_error_line, train_args, write_npz

from airvae.cli import main

pytest.importorskip("tensorboard", reason="pip install 'airvae[tensorboard]' (in the dev extra)")
pytest.importorskip("mlflow", reason="pip install 'airvae[mlflow]' (in the dev extra)")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader  # noqa: E402
from tensorboard.compat.proto import event_pb2  # noqa: E402

SCALARS = ("train_loss", "val_log_likelihood", "lr", "seconds")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return store


def tensorboard_events(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's event files, raw (TensorBoard's purging not applied): tag -> [(step, value)]."""
    scalars: dict = {}
    for path in sorted((run / "tensorboard").iterdir()):
        for raw in RawEventFileLoader(str(path)).Load():
            event = event_pb2.Event.FromString(raw)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def tensorboard_hparams(run: Path) -> bytes:
    return b"".join(value.metadata.plugin_data.content for path in (run / "tensorboard").iterdir()
                    for raw in RawEventFileLoader(str(path)).Load()
                    for value in event_pb2.Event.FromString(raw).summary.value
                    if value.metadata.plugin_data.plugin_name == "hparams")


def mlflow_run(run: Path):
    tracking = json.loads((run / "tracking.json").read_text())
    client = MlflowClient(tracking["mlflow_uri"])
    return client, client.get_run(tracking["mlflow_run_id"])


def mlflow_history(run: Path) -> dict[str, list[tuple[int, float]]]:
    client, found = mlflow_run(run)
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(found.info.run_id, key),
                                                     key=lambda m: (m.step, m.timestamp))]
            for key in found.data.metrics}


def expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {key: [(r["step"], r[key]) for r in records] for key in SCALARS}


def same(logged: dict, truth: dict, rel: float) -> None:
    for key, points in truth.items():
        assert [step for step, _ in logged[key]] == [step for step, _ in points], key  # every step, once
        assert [value for _, value in logged[key]] == pytest.approx([value for _, value in points], rel=rel), key


def test_both_sinks_hold_what_metrics_jsonl_holds_the_config_and_the_evaluation(tmp_path, mlflow_store, capsys):
    data, run = write_npz(tmp_path / "tiny.npz"), tmp_path / "run"
    assert main(train_args(data, run, "--iterations", "30", "--log", "tensorboard,mlflow")) == 0
    truth = expected(run)
    assert [step for step, _ in truth["lr"]] == [10, 20, 30]
    same(tensorboard_events(run), truth, rel=1e-6)  # TensorBoard stores float32
    same(mlflow_history(run), truth, rel=0)  # MLflow stores the float64 itself
    config = json.loads((run / "config.json").read_text())
    _, found = mlflow_run(run)
    assert found.data.params["architecture.encoder"] == "d8" and found.data.params["seed"] == "0"
    assert found.data.params["regularizer.max_norm"] == str(config["regularizer"]["max_norm"])
    assert found.info.status == "FINISHED" and str(mlflow_store) in found.info.artifact_uri
    hparams = tensorboard_hparams(run)
    assert b"architecture.encoder" in hparams and b"d8" in hparams

    assert main(["evaluate", str(run), "--estimators", "bound,iwsvi", "--max-examples", "4", "--svi-k", "4",
                 "--svi-steps", "2", "--no-progress", "--device", "cpu"]) == 0
    evaluation = next((run / "evaluations").glob("test-*.json"))
    estimates = json.loads(evaluation.read_text())["estimates"]
    # readable names: split/estimator/effort (the run's smoke budget gives l=2; 4 of 40 test examples)
    keys = {"bound": "test/bound/k1-n4", "iwsvi": "test/iwsvi/k4-l2-T2-n4", "gap": "test/gap/k4-l2-T2-n4"}
    for logged, rel in ((tensorboard_events(run), 1e-6), (mlflow_history(run), 0)):
        for name, key in keys.items():
            assert logged[key] == [(30, pytest.approx(estimates[name]["mean"], rel=rel))]  # at the run's last step
    _, found = mlflow_run(run)
    noted = json.loads(found.data.tags["settings/test/iwsvi/k4-l2-T2-n4"])
    assert noted["file"] == evaluation.name and noted["settings"]["k"] == 4
    assert (noted["n"], noted["n_split"]) == (4, 40)
    assert main(["evaluate", str(run), "--estimators", "bound,iwsvi", "--max-examples", "4", "--svi-k", "4",
                 "--svi-steps", "2", "--no-progress", "--device", "cpu", "--recompute"]) == 0
    for logged in (tensorboard_events(run), mlflow_history(run)):  # the same evaluation of the same weights
        assert len(logged["test/bound/k1-n4"]) == 1
    assert "warning" not in capsys.readouterr().err


def test_mlflow_by_default_writes_a_store_mlflows_own_tools_read_with_no_settings_and_no_machine_paths(
        tmp_path, monkeypatch, capsys):
    """The default store is ./mlflow.db, MLflow's own default: MlflowClient() and `mlflow runs list` in
    that folder read it without MLFLOW_TRACKING_URI or MLFLOW_ALLOW_FILE_STORE."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    data, run = write_npz(tmp_path / "tiny.npz"), tmp_path / "run"
    assert main(train_args(data, run, "--log", "mlflow", "--data-dir", str(tmp_path))) == 0
    assert main(["evaluate", str(run), "--estimators", "bound,iwsvi", "--max-examples", "4", "--svi-k", "4",
                 "--svi-steps", "2", "--no-progress", "--device", "cpu"]) == 0
    assert (tmp_path / "mlflow.db").is_file() and not (tmp_path / "mlruns").exists()
    assert "warning" not in capsys.readouterr().err

    client = MlflowClient()  # MLflow's default store, found with no settings
    [found] = client.search_runs([client.get_experiment_by_name("airvae").experiment_id])
    assert found.info.run_id == json.loads((run / "tracking.json").read_text())["mlflow_run_id"]
    history = {key: [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, key)]
               for key in found.data.metrics}
    same(history, expected(run), rel=0)
    assert [step for step, _ in history["test/iwsvi/k4-l2-T2-n4"]] == [20]
    params = found.data.params
    assert params["dataset"] == "tiny.npz" and params["architecture.encoder"] == "d8"  # the file, not its path
    assert not {"data_dir", "device"} & set(params) and str(tmp_path) not in " ".join(params.values())
    listed = subprocess.run([sys.executable, "-m", "mlflow", "runs", "list", "--experiment-id",
                             found.info.experiment_id], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
    assert listed.returncode == 0 and found.info.run_id in listed.stdout, listed.stderr[-2000:]


def test_the_file_store_switch_does_not_leak_into_the_callers_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    data, run = write_npz(tmp_path / "tiny.npz"), tmp_path / "run"
    assert main(train_args(data, run, "--log", "mlflow")) == 0
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ and "warning" not in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's own reader
    same(mlflow_history(run), expected(run), rel=0)


def test_a_killed_and_resumed_run_logs_no_step_twice_in_either_sink(tmp_path, monkeypatch, mlflow_store):
    data, run = killed_run(tmp_path, monkeypatch, 20, "--log", "tensorboard,mlflow")
    # The dead process logged step 20 (validation) but its last.pt holds step 10.
    assert [step for step, _ in tensorboard_events(run)["lr"]] == [10, 20]
    first_run_id = json.loads((run / "tracking.json").read_text())["mlflow_run_id"]
    assert main(train_args(data, run, "--resume", "--iterations", "40")) == 0  # the sinks are kept
    truth = expected(run)
    assert [step for step, _ in truth["lr"]] == [10, 20, 30, 40]
    same(tensorboard_events(run), truth, rel=1e-6)
    same(mlflow_history(run), truth, rel=0)
    client, found = mlflow_run(run)
    assert found.info.run_id != first_run_id and client.get_run(first_run_id).info.lifecycle_stage == "deleted"


def test_a_sink_chosen_on_resume_gets_the_whole_history_and_overwrite_clears_the_sinks_files(
        tmp_path, monkeypatch, mlflow_store):
    data, run = killed_run(tmp_path, monkeypatch, 20, "--log", "tensorboard")
    assert json.loads((run / "tracking.json").read_text())["sinks"] == ["tensorboard"]
    # Not part of the config: changing the sinks on resume is no configuration change.
    assert main(train_args(data, run, "--resume", "--iterations", "40", "--log", "mlflow")) == 0
    assert json.loads((run / "tracking.json").read_text())["sinks"] == ["mlflow"]
    same(mlflow_history(run), expected(run), rel=0)  # step 10 too, logged before MLflow was chosen
    assert main(train_args(data, run, "--overwrite", "--iterations", "20", "--log", "none")) == 0
    assert json.loads((run / "tracking.json").read_text())["sinks"] == []
    assert not (run / "tensorboard").exists()  # airvae wrote it, so --overwrite recognized and removed it


def test_a_failing_sink_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///proc/airvae-cannot-write-here")
    data, run = write_npz(tmp_path / "tiny.npz"), tmp_path / "run"
    assert main(train_args(data, run, "--iterations", "20", "--log", "mlflow,tensorboard")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "mlflow sink failed" in warnings[0]
    assert [step for step, _ in tensorboard_events(run)["lr"]] == [10, 20]


@pytest.mark.parametrize("value, missing, named", [
    ("comet", "", "invalid --log = 'comet'"), ("", "", "invalid --log"),
    ("mlflow", "mlflow", "pip install 'airvae[mlflow]'"), ("wandb", "wandb", "pip install 'airvae[wandb]'"),
    ("mlflow", "sqlalchemy", "the sqlalchemy package is not installed; pip install 'airvae[mlflow]'")])
def test_a_bad_or_uninstalled_sink_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, value,
                                                                          missing, named):
    import airvae.tracking

    monkeypatch.chdir(tmp_path)  # the default MLflow store, a database: ./mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(airvae.tracking, "_installed", lambda module: module != missing)
    data, run = write_npz(tmp_path / "tiny.npz"), tmp_path / "run"
    assert main(train_args(data, run, "--log", value)) == 2
    assert named in one_error_line(capsys) and not run.exists()


def test_log_repairs_a_damaged_tracking_file(tmp_path, monkeypatch, capsys):
    data, run = killed_run(tmp_path, monkeypatch, 20, "--log", "tensorboard")
    (run / "tracking.json").write_text("[]")
    assert main(train_args(data, run, "--resume", "--iterations", "40")) == 2
    assert "choose the sinks again with --log" in one_error_line(capsys)
    assert main(train_args(data, run, "--resume", "--iterations", "40", "--log", "tensorboard")) == 0
    assert json.loads((run / "tracking.json").read_text())["sinks"] == ["tensorboard"]
    same(tensorboard_events(run), expected(run), rel=1e-6)


def test_tensorboard_never_writes_through_a_link(tmp_path, monkeypatch, capsys):
    data, run = killed_run(tmp_path, monkeypatch, 20, "--log", "tensorboard")
    elsewhere = tmp_path / "elsewhere"
    (run / "tensorboard").rename(elsewhere)
    (run / "tensorboard").symlink_to(elsewhere)
    before = {path.name: path.read_bytes() for path in elsewhere.iterdir()}
    capsys.readouterr()
    # a run folder holding a link is refused before anything starts (airvae.runs.run_dir_state)
    assert main(train_args(data, run, "--resume", "--iterations", "40")) == 2
    assert "holds symbolic links (tensorboard)" in one_error_line(capsys)
    # and the sink itself, should a link appear later, is dropped with one warning
    from airvae.tracking import _open_sinks, read_tracking

    assert _open_sinks(run, read_tracking(run), replace=True) == {}
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "tensorboard sink failed" in warnings[0] and "link" in warnings[0]
    assert {path.name: path.read_bytes() for path in elsewhere.iterdir()} == before


def test_a_run_without_weights_logs_its_stored_evaluations_as_airvae_evaluate_reads_them(tmp_path, capsys):
    from airvae.evaluation import EvaluationSettings, current_evaluations, stored_evaluation
    from airvae.files import read_metrics
    from airvae.runs import load_config
    from airvae.tracking import Tracker

    data, run = write_npz(tmp_path / "tiny.npz"), tmp_path / "run"
    assert main(train_args(data, run, "--log", "tensorboard")) == 0
    settings = EvaluationSettings(estimators=("bound",), max_examples=4, device="cpu")
    assert main(["evaluate", str(run), "--estimators", "bound", "--max-examples", "4", "--no-progress",
                 "--device", "cpu", "--budget", "paper"]) == 0  # EvaluationSettings' defaults: the paper's
    for path in (run / "checkpoints").iterdir():  # a results folder shared without its weights
        path.unlink()
    assert stored_evaluation(run, settings) is not None  # still current for airvae evaluate and report
    Tracker.start(run, load_config(run), read_metrics(run / "metrics.jsonl"), lambda: current_evaluations(run)).close()
    assert len(tensorboard_events(run)["test/bound/k1-n4"]) == 1  # the sink agrees


# ----------------------------------------------------------------------------------------------
# Weights & Biases, offline: read back from the files W&B writes (its local run folders)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B as a user without an account gets it: no WANDB_* settings, files under ./wandb/."""
    pytest.importorskip("wandb", reason="pip install 'airvae[wandb]' (in the dev extra)")
    for name in [name for name in os.environ if name.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "wandb"


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-ID.wandb``): LevelDB's log format, 32 KiB blocks of chunks
    with a 7-byte header (crc, length, type), after W&B's own 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending, records = path.read_bytes(), 7, b"", []
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(folder: Path, run: Path) -> tuple[dict, dict, dict]:
    """The W&B run that ``run``'s tracking.json names: its history by key ({key: [(step, value)]}), its
    config and its summary, from the only local folder W&B keeps for it."""
    run_id = json.loads((run / "tracking.json").read_text())["wandb_run_id"]
    [path] = folder.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = wandb_records(path)
    for _ in range(120):  # W&B's service writes the file after run.finish() returns: wait for the exit record
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            break
        time.sleep(0.25)
        records = wandb_records(path)
    history, config, summary = {}, {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                if not key.startswith("_") and key != "step":
                    history.setdefault(key, []).append((row["step"], value))
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "summary":
            summary.update({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                            for item in record.summary.update})
    return history, config, summary


def test_wandb_offline_holds_what_metrics_jsonl_holds_the_config_and_each_evaluation_once(tmp_path, wandb_offline,
                                                                                          capsys):
    data, run = write_npz(tmp_path / "tiny.npz"), tmp_path / "run"
    assert main(train_args(data, run, "--iterations", "30", "--log", "wandb")) == 0
    stored = json.loads((run / "tracking.json").read_text())
    assert (stored["wandb_mode"], stored["wandb_project"], stored["wandb_dir"]) == ("offline", "airvae", str(tmp_path))
    history, config, _ = wandb_run(wandb_offline, run)
    same(history, expected(run), rel=0)
    assert config["architecture.encoder"] == "d8" and config["dataset"] == "tiny.npz"
    assert not {"data_dir", "device"} & set(config)
    first = stored["wandb_run_id"]

    for budget in ("smoke", "quick"):  # two evaluations: the W&B run is rebuilt with both, no step twice
        assert main(["evaluate", str(run), "--estimators", "bound,iwsvi", "--max-examples", "4", "--svi-k", "4",
                     "--svi-steps", "2", "--no-progress", "--device", "cpu", "--budget", budget]) == 0
    history, _, summary = wandb_run(wandb_offline, run)
    same(history, expected(run), rel=0)
    means = {path.stem: json.loads(path.read_text())["estimates"] for path in (run / "evaluations").glob("*.json")}
    assert sorted(key for key in history if key.startswith("test/")) == [
        "test/bound/k1-n4", "test/gap/k4-l2-T2-n4", "test/gap/k4-l8-T2-n4", "test/iwsvi/k4-l2-T2-n4",
        "test/iwsvi/k4-l8-T2-n4"]
    [bound] = {m["bound"]["mean"] for m in means.values()}  # the same bound in both: logged once
    assert history["test/bound/k1-n4"] == [(30, pytest.approx(bound, rel=1e-12))]
    by_l = {m["iwsvi"]["settings"]["l"]: m["iwsvi"]["mean"] for m in means.values()}  # smoke: l=2, quick: l=8
    assert history["test/iwsvi/k4-l8-T2-n4"] == [(30, pytest.approx(by_l[8], rel=1e-12))]
    assert summary["settings/test/iwsvi/k4-l8-T2-n4"]["settings"]["l"] == 8
    replaced = list(wandb_offline.glob(f"*-{first}"))
    assert replaced == [] and len(list(wandb_offline.glob("offline-run-*"))) == 1  # the replaced runs forgotten
    assert "warning" not in capsys.readouterr().err


def test_wandb_a_killed_and_resumed_run_logs_no_step_twice(tmp_path, monkeypatch, wandb_offline):
    data, run = killed_run(tmp_path, monkeypatch, 20, "--log", "wandb")
    history, _, _ = wandb_run(wandb_offline, run)
    assert [step for step, _ in history["lr"]] == [10, 20]  # the dead process logged step 20; last.pt holds 10
    assert main(train_args(data, run, "--resume", "--iterations", "40")) == 0
    history, _, _ = wandb_run(wandb_offline, run)
    truth = expected(run)
    assert [step for step, _ in truth["lr"]] == [10, 20, 30, 40]
    same(history, truth, rel=0)
    assert len(list(wandb_offline.glob("offline-run-*"))) == 1


def test_wandb_mode_is_the_users_when_set_and_a_bad_one_is_refused(wandb_offline, monkeypatch):
    from airvae.config import ConfigError
    from airvae.tracking import TrackingSettings

    assert TrackingSettings.parse("wandb").wandb_mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    settings = TrackingSettings.parse("wandb")
    assert (settings.wandb_mode, settings.wandb_project) == ("online", "mine")
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="invalid WANDB_MODE = 'sometimes'"):
        TrackingSettings.parse("wandb")


def test_a_default_store_or_wandb_folder_that_is_a_link_is_refused_naming_the_setting_to_use(
        tmp_path, monkeypatch):
    """./mlflow.db and ./wandb are where MLflow's SQLite and W&B write (and airvae deletes a replaced
    W&B run): a link there is refused before anything is written, and the message says how to
    point the sink at the link's target on purpose."""
    pytest.importorskip("mlflow", reason="pip install 'airvae[mlflow]' (in the dev extra)")
    from airvae.config import ConfigError
    from airvae.tracking import TrackingSettings

    for name in [name for name in os.environ if name.startswith(("WANDB_", "MLFLOW_"))]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "mlflow.db").symlink_to(elsewhere / "store.db")
    with pytest.raises(ConfigError, match=r"mlflow.db is a symbolic link.*MLFLOW_TRACKING_URI=sqlite:///"):
        TrackingSettings.parse("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere / 'store.db'}")
    assert TrackingSettings.parse("mlflow").mlflow_uri.endswith("elsewhere/store.db")  # chosen on purpose
    if importlib.util.find_spec("wandb") is not None:
        (tmp_path / "wandb").symlink_to(elsewhere, target_is_directory=True)
        with pytest.raises(ConfigError, match="wandb is a symbolic link.*WANDB_DIR"):
            TrackingSettings.parse("wandb")
    assert not list(elsewhere.iterdir())
