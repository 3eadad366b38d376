"""Tracking sinks (`--log tensorboard,mlflow`): each holds exactly what metrics.jsonl holds, the
config as hyperparameters and the run's evaluations, read back with TensorBoard's and MLflow's own
readers; a killed and resumed run logs no step twice in either."""

import json
import os
from pathlib import Path

import pytest

from airvae.cli import main
from test_safety import killed_run, one_error_line, train_args, write_npz

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
    for logged, rel in ((tensorboard_events(run), 1e-6), (mlflow_history(run), 0)):
        for name in ("bound", "iwsvi", "gap"):
            mean = pytest.approx(estimates[name]["mean"], rel=rel)
            assert logged[f"evaluation/{evaluation.stem}/{name}"] == [(30, mean)]  # at the run's last step
    assert main(["evaluate", str(run), "--estimators", "bound,iwsvi", "--max-examples", "4", "--svi-k", "4",
                 "--svi-steps", "2", "--no-progress", "--device", "cpu", "--recompute"]) == 0
    for logged in (tensorboard_events(run), mlflow_history(run)):  # the same evaluation of the same weights
        assert len(logged[f"evaluation/{evaluation.stem}/bound"]) == 1
    assert "warning" not in capsys.readouterr().err


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


@pytest.mark.parametrize("value, named", [("wandb", "invalid --log = 'wandb'"), ("", "invalid --log"),
                                          ("mlflow", "pip install 'airvae[mlflow]'")])
def test_a_bad_or_uninstalled_sink_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, value, named):
    import airvae.tracking

    monkeypatch.setattr(airvae.tracking, "_installed", lambda module: module != "mlflow")
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
    from airvae.evaluation import EvaluationSettings, stored_evaluation
    from airvae.runs import load_config, read_metrics
    from airvae.tracking import Tracker

    data, run = write_npz(tmp_path / "tiny.npz"), tmp_path / "run"
    assert main(train_args(data, run, "--log", "tensorboard")) == 0
    settings = EvaluationSettings(estimators=("bound",), max_examples=4, device="cpu")
    assert main(["evaluate", str(run), "--estimators", "bound", "--max-examples", "4", "--no-progress",
                 "--device", "cpu"]) == 0
    for path in (run / "checkpoints").iterdir():  # a results folder shared without its weights
        path.unlink()
    assert stored_evaluation(run, settings) is not None  # still current for airvae evaluate and report
    Tracker.start(run, load_config(run), read_metrics(run / "metrics.jsonl")).close()
    assert len(tensorboard_events(run)[f"evaluation/test-{settings.short_hash()}/bound"]) == 1  # the sink agrees
