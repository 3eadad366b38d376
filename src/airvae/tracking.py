"""Optional tracking sinks (``--log tensorboard,mlflow``): TensorBoard and MLflow get what
``metrics.jsonl`` gets at every validation, the resolved config as hyperparameters, and each
evaluation of the run.

    RUN/tracking.json      the sinks a run writes to (kept on resume), the MLflow store and run id
    RUN/tensorboard/       TensorBoard event files (tensorboard --logdir runs)
    MLflow                 the store of $MLFLOW_TRACKING_URI, else the local file store ./mlruns
                           (resolved once, when the sinks are chosen); experiment
                           $MLFLOW_EXPERIMENT_NAME, else "airvae"

``metrics.jsonl`` stays the source of truth. Each time a run starts or resumes, its sinks are
rebuilt from it (and from the evaluations of its current best checkpoint): the TensorBoard event
files are rewritten and the MLflow run is replaced by a replayed one. A resumed run's sinks thus
hold exactly the steps up to its checkpoint, none twice, and a sink added on resume gets the
whole history. A sink that fails (a server down, a full disk) is dropped with one warning: the
run goes on, and the next start rebuilds the sink.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError
from .runs import EVENT_FILE, METRICS, TENSORBOARD, TRACKING, RunError, read_json, read_metrics, write_json

SINKS = ("tensorboard", "mlflow")
TRACKING_FORMAT = 1
_PACKAGES = {"tensorboard": ("tensorboard", "airvae[tensorboard]"), "mlflow": ("mlflow", "airvae[mlflow]")}
# MLflow run status per airvae run status
_MLFLOW_STATUS = {"completed": "FINISHED", "early-stopped": "FINISHED", "interrupted": "KILLED"}
_FILE_STORE_SWITCH = "MLFLOW_ALLOW_FILE_STORE"


@dataclass(frozen=True)
class TrackingSettings:
    """Which sinks a run writes to besides ``metrics.jsonl``, and where MLflow's are.

    Attributes:
        sinks: any of ``"tensorboard"`` and ``"mlflow"`` (their packages must be installed:
            ``pip install 'airvae[tensorboard]'``, ``'airvae[mlflow]'``).
        mlflow_uri: the MLflow store. None is resolved when the settings are made:
            ``$MLFLOW_TRACKING_URI``, else the local file store ``./mlruns`` as an absolute URI (so a
            run resumed from another folder, or a sweep worker, writes to the same store).
        mlflow_experiment: the MLflow experiment (default ``$MLFLOW_EXPERIMENT_NAME``, else
            ``"airvae"``).
    """

    sinks: tuple[str, ...] = ()
    mlflow_uri: str | None = None
    mlflow_experiment: str | None = None

    def __post_init__(self):
        sinks = self.sinks
        if isinstance(sinks, str) or not set(sinks) <= set(SINKS) or len(set(sinks)) < len(sinks):
            raise _invalid(sinks)
        object.__setattr__(self, "sinks", tuple(sinks))
        for sink in self.sinks:
            module, extra = _PACKAGES[sink]
            if not _installed(module):
                raise ConfigError(f"invalid log = {sink}: the {module} package is not installed; "
                                  f"pip install '{extra}'")
        if "mlflow" in self.sinks:
            if self.mlflow_uri is None:
                uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path.cwd() / "mlruns").resolve().as_uri()
                object.__setattr__(self, "mlflow_uri", uri)
            if self.mlflow_experiment is None:
                object.__setattr__(self, "mlflow_experiment", os.environ.get("MLFLOW_EXPERIMENT_NAME") or "airvae")

    @classmethod
    def parse(cls, text: str) -> "TrackingSettings":
        """``--log``: comma-separated sink names, or ``none``."""
        names = [name.strip().lower() for name in text.split(",")]
        if names == ["none"]:
            names = []
        elif not all(name in SINKS for name in names) or len(set(names)) != len(names):  # no empty item, no repeat
            raise _invalid(text)
        return cls(tuple(names))


def _invalid(log) -> ConfigError:
    return ConfigError(f"invalid log = {log!r}: allowed a comma-separated subset of {', '.join(SINKS)} (each "
                       "once), or none")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def choose_sinks(run_dir: Path, settings: TrackingSettings) -> None:
    """Record the sinks of a run (``RUN/tracking.json``); its next start rebuilds them from
    ``metrics.jsonl``. Keeps the MLflow run id while the store stays the same. A damaged
    tracking file is replaced: choosing the sinks again is its repair."""
    try:
        stored = read_tracking(run_dir)
    except RunError:
        stored = {}
    same_store = stored.get("mlflow_uri") == settings.mlflow_uri and \
        stored.get("mlflow_experiment") == settings.mlflow_experiment
    write_json(Path(run_dir) / TRACKING, {
        "format": TRACKING_FORMAT, "sinks": list(settings.sinks), "mlflow_uri": settings.mlflow_uri,
        "mlflow_experiment": settings.mlflow_experiment,
        "mlflow_run_id": stored.get("mlflow_run_id") if same_store else None})


def read_tracking(run_dir: Path) -> dict:
    """``RUN/tracking.json``, or ``{}`` for a run without sinks."""
    path = Path(run_dir) / TRACKING
    if not path.exists():
        return {}
    stored = read_json(path)
    if not isinstance(stored, dict) or stored.get("format") != TRACKING_FORMAT or \
            not isinstance(stored.get("sinks"), list) or not set(stored["sinks"]) <= set(SINKS):
        raise RunError(f"{path} is not an airvae tracking file; delete it (the run then logs to metrics.jsonl only) "
                       "or choose the sinks again with --log")
    return stored


# ----------------------------------------------------------------------------------------------
# Sinks


def _flat(config: dict, prefix: str = "") -> dict:
    """``{"architecture.encoder": "d300-d300", ...}``: hyperparameters as the sinks take them."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, replace: bool):
        from torch.utils.tensorboard import SummaryWriter

        folder = run_dir / TENSORBOARD
        if folder.is_symlink():
            raise RunError(f"{folder} is a link, and airvae never writes through links; delete the link (the next "
                           "start of the run rebuilds the sink in a folder of its own)")
        if replace and folder.is_dir():
            for entry in folder.iterdir():  # only files SummaryWriter wrote; links never followed
                if EVENT_FILE.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
                    entry.unlink()
        self.writer = SummaryWriter(log_dir=str(folder))

    def params(self, config: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(_flat(config), {"val_log_likelihood": 0.0, "train_loss": 0.0}):
            self.writer.file_writer.add_summary(summary)

    def scalars(self, step: int, values: dict, walltime: float) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step, walltime=walltime)
        self.writer.flush()

    def close(self, status: str | None) -> None:
        self.writer.close()


@contextlib.contextmanager
def _file_store_allowed(uri: str):
    """MLflow 3 keeps its file store (``file:`` URIs) in maintenance mode, behind
    ``MLFLOW_ALLOW_FILE_STORE``; it works offline and needs no database packages. The switch is
    turned on only around airvae's own MLflow calls, unless the user set it (either way)."""
    if not uri.startswith("file:") or _FILE_STORE_SWITCH in os.environ:
        yield
        return
    os.environ[_FILE_STORE_SWITCH] = "true"
    try:
        yield
    finally:
        os.environ.pop(_FILE_STORE_SWITCH, None)


class _Mlflow:
    """The MLflow sink; every call runs inside ``_file_store_allowed``."""

    def __init__(self, run_dir: Path, uri: str, experiment: str, run_id: str | None, replace: bool, name: str):
        self.uri = uri
        with _file_store_allowed(uri):
            self._open(run_dir, experiment, run_id, replace, name)

    def _open(self, run_dir: Path, experiment: str, run_id: str | None, replace: bool, name: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        if not replace:
            self.run_id = run_id
            return
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            try:
                self.client.create_experiment(experiment)
            except Exception:  # noqa: BLE001 - another worker of a sweep created it meanwhile
                if self.client.get_experiment_by_name(experiment) is None:
                    raise
            found = self.client.get_experiment_by_name(experiment)
        if run_id is not None:
            try:
                self.client.delete_run(run_id)  # MLflow metrics are append-only: the run is replaced
            except Exception:  # noqa: BLE001 - deleted by hand, or from another store: nothing to replace
                pass
        self.run_id = self.client.create_run(found.experiment_id, run_name=name,
                                             tags={"airvae.run_dir": str(run_dir.resolve())}).info.run_id

    def params(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)) for key, value in _flat(config).items()]
        with _file_store_allowed(self.uri):
            for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                self.client.log_batch(self.run_id, params=params[start:start + 100])

    def scalars(self, step: int, values: dict, walltime: float) -> None:
        from mlflow.entities import Metric

        stamp = int(walltime * 1000)
        with _file_store_allowed(self.uri):
            self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), stamp, step)
                                                        for key, value in values.items()])

    def close(self, status: str | None) -> None:
        if status is not None:
            with _file_store_allowed(self.uri):
                self.client.set_terminated(self.run_id, _MLFLOW_STATUS.get(status, "FAILED"))


class Tracker:
    """The live sinks of a run, fed by its [`RunLog`][airvae.driver.RunLog]; with none, every method does
    nothing. A failing sink is dropped with one warning on stderr (``metrics.jsonl`` has everything;
    the next start rebuilds it).
    """

    def __init__(self, sinks: dict | None = None):
        self.sinks = dict(sinks or {})

    def _each(self, method: str, *args) -> None:
        for name, sink in list(self.sinks.items()):
            try:
                getattr(sink, method)(*args)
            except Exception as error:  # noqa: BLE001 - tracking must never stop a run
                del self.sinks[name]
                _warn(name, error)

    @classmethod
    def start(cls, run_dir: Path, cfg, records: list[dict], evaluations=lambda: ()) -> "Tracker":
        """Rebuild the chosen sinks of a run from its ``records`` (``metrics.jsonl``) and its current
        evaluations (``evaluations()``: ``(path, record)`` pairs, asked for only when a sink needs
        them); the run then logs to them."""
        run_dir = Path(run_dir)
        stored = read_tracking(run_dir)
        tracker = cls(_open_sinks(run_dir, stored, replace=True))
        if "mlflow" in tracker.sinks and tracker.sinks["mlflow"].run_id != stored.get("mlflow_run_id"):
            write_json(run_dir / TRACKING, {**stored, "mlflow_run_id": tracker.sinks["mlflow"].run_id})
        if not tracker.sinks:
            return tracker
        tracker._each("params", cfg.to_json())
        now, last = time.time(), (records[-1].get("seconds", 0.0) if records else 0.0)
        for record in records:  # wall times as if the run had trained without stopping, ending now
            tracker.validation(record, now - (last - record.get("seconds", last)))
        step = records[-1]["step"] if records else 0
        for path, result in evaluations():
            tracker.evaluation(path.stem, result, step, now)
        return tracker

    def validation(self, record: dict, walltime: float | None = None) -> None:
        """One metrics.jsonl record: every number in it but the step, at its step."""
        values = {key: value for key, value in record.items() if key != "step" and isinstance(value, (int, float))}
        self._each("scalars", record["step"], values, time.time() if walltime is None else walltime)

    def evaluation(self, name: str, result: dict, step: int, walltime: float | None = None) -> None:
        """An evaluation ([`airvae.evaluation.evaluate_run`][]) as ``evaluation/NAME/ESTIMATOR``: the
        mean in nats (ln p(x) or a bound for the estimators, Delta_inf for ``gap``), at ``step`` (the
        run's last logged step); NAME is its file's stem in ``RUN/evaluations/``, e.g.
        ``test-88245f0258``, so evaluations with other settings never share a tag."""
        values = {f"evaluation/{name}/{estimator}": estimate["mean"]
                  for estimator, estimate in result.get("estimates", {}).items()}
        self._each("scalars", step, values, time.time() if walltime is None else walltime)

    def close(self, status: str | None = None) -> None:
        """Close the sinks; ``status`` is the run's (``completed``, ``interrupted``, ...), which MLflow records."""
        self._each("close", status)
        self.sinks.clear()


def _open_sinks(run_dir: Path, stored: dict, replace: bool) -> dict:
    sinks = {}
    for name in stored.get("sinks", []):
        try:
            if name == "tensorboard":
                sinks[name] = _TensorBoard(run_dir, replace)
            elif replace or stored.get("mlflow_run_id"):
                sinks[name] = _Mlflow(run_dir, stored["mlflow_uri"], stored["mlflow_experiment"],
                                      stored.get("mlflow_run_id"), replace, _run_name(run_dir))
        except Exception as error:  # noqa: BLE001 - not installed any more, store unreachable
            _warn(name, error)
    return sinks


def _run_name(run_dir: Path) -> str:
    """The last four parts of the run's path: ``runs/caltech/VAE-seed0``, ``caltech/k1-m1/plain/seed0``."""
    return "/".join(run_dir.resolve().parts[-4:])


def log_evaluation(run_dir: Path, path: Path, result: dict) -> None:
    """Send a new evaluation to the sinks of a tracked run (none: nothing happens).

    Args:
        run_dir: the run directory.
        path: the evaluation's file in ``RUN/evaluations/`` (its stem names it in the sinks).
        result: the evaluation record.
    """
    try:
        stored = read_tracking(run_dir)
    except Exception as error:  # noqa: BLE001 - the evaluation itself is stored either way
        _warn("tracking", error)
        return
    if stored.get("sinks"):
        records = read_metrics(Path(run_dir) / METRICS)
        tracker = Tracker(_open_sinks(Path(run_dir), stored, replace=False))
        tracker.evaluation(Path(path).stem, result, records[-1]["step"] if records else 0)
        tracker.close()


def _warn(sink: str, error: Exception) -> None:
    first = " ".join(str(error).split())[:300] or type(error).__name__
    print(f"airvae: warning: the {sink} sink failed ({type(error).__name__}: {first}); it is dropped for this "
          "process, metrics.jsonl is complete, and the next start of the run rebuilds the sink", file=sys.stderr)
