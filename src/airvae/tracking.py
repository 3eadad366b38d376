"""Optional tracking sinks (``--log tensorboard,mlflow,wandb``): TensorBoard, MLflow and Weights &
Biases get what ``metrics.jsonl`` gets at every validation, the resolved config as hyperparameters
(machine-independent ones only), and each evaluation of the run.

    RUN/tracking.json      the sinks a run writes to (kept on resume), the MLflow store, W&B project
                           and folder, and their run ids
    RUN/tensorboard/       TensorBoard event files (``tensorboard --logdir runs``)
    MLflow                 the store of $MLFLOW_TRACKING_URI, else the SQLite store ./mlflow.db, MLflow's
                           own default, which its tools read there without settings (resolved once,
                           when the sinks are chosen); experiment $MLFLOW_EXPERIMENT_NAME, else "airvae"
    W&B                    project $WANDB_PROJECT, else "airvae"; files in $WANDB_DIR/wandb/, else
                           ./wandb/; offline unless $WANDB_MODE says otherwise (``wandb sync`` uploads)

``metrics.jsonl`` stays the source of truth. Each time a run starts or resumes, its sinks are
rebuilt from it (and from the evaluations of its current best checkpoint): the TensorBoard event
files are rewritten and the MLflow and W&B runs are replaced by replayed ones. A resumed run's sinks thus
hold exactly the steps up to its checkpoint, none twice, and a sink added on resume gets the
whole history. A sink that fails (a server down, a full disk) is dropped with one warning: the
run goes on, and the next start rebuilds the sink.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError
from .files import RunError, RunLocked, read_json, read_metrics, write_json
from .locks import check_unlocked
from .runs import EVENT_FILE, METRICS, TENSORBOARD, TRACKING, load_config

SINKS = ("tensorboard", "mlflow", "wandb")
TRACKING_FORMAT = 1
_PACKAGES = {"tensorboard": ("tensorboard", "airvae[tensorboard]"), "mlflow": ("mlflow", "airvae[mlflow]"),
             "wandb": ("wandb", "airvae[wandb]")}
# MLflow run status per airvae run status
_MLFLOW_STATUS = {"completed": "FINISHED", "early-stopped": "FINISHED", "interrupted": "KILLED"}
_FILE_STORE_SWITCH = "MLFLOW_ALLOW_FILE_STORE"
# MLflow's database stores (mlflow.store.db.db_types) need SQLAlchemy and Alembic, which mlflow-skinny
# leaves out: airvae[mlflow] installs them
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_DATABASE_PACKAGES = ("sqlalchemy", "alembic")
# Tries at a SQLite store's first use: workers of a sweep starting together race to create its tables
# (measured: the losers fail with "duplicate column" or an Alembic error, the winner finishes in seconds)
_SQLITE_TRIES = 5
_WANDB_MODES = ("offline", "online", "disabled")
# wandb.init's wait for its service (and, online, the server): offline starts in about a second, and
# online without a network fails after this instead of hanging the run
_WANDB_INIT_TIMEOUT = 60.0
# Config fields that say where and on what this machine ran, not what was trained: never logged
_MACHINE_FIELDS = ("data_dir", "device")


@dataclass(frozen=True)
class TrackingSettings:
    """Which sinks a run writes to besides ``metrics.jsonl``, and where MLflow's and W&B's are.

    Attributes:
        sinks: any of ``"tensorboard"``, ``"mlflow"`` and ``"wandb"`` (their packages must be installed:
            ``pip install 'airvae[tensorboard]'``, ``'airvae[mlflow]'``, ``'airvae[wandb]'``).
        mlflow_uri: the MLflow store. None is resolved when the settings are made:
            ``$MLFLOW_TRACKING_URI``, else the SQLite store ``./mlflow.db`` as an absolute URI (so a run
            resumed from another folder, or a sweep worker, writes to the same store).
        mlflow_experiment: the MLflow experiment (default ``$MLFLOW_EXPERIMENT_NAME``, else
            ``"airvae"``).

    The W&B fields are resolved likewise: ``$WANDB_PROJECT`` else ``airvae``, ``$WANDB_DIR`` else the
    current folder (absolute), ``$WANDB_MODE`` else ``offline``.
    """

    sinks: tuple[str, ...] = ()
    mlflow_uri: str | None = None
    mlflow_experiment: str | None = None
    wandb_project: str | None = None
    wandb_dir: str | None = None
    wandb_mode: str | None = None

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
            self._default("mlflow_uri", os.environ.get("MLFLOW_TRACKING_URI") or _default_mlflow_uri())
            self._default("mlflow_experiment", os.environ.get("MLFLOW_EXPERIMENT_NAME") or "airvae")
            assert self.mlflow_uri is not None  # resolved just above
            _check_database_packages(self.mlflow_uri)
        if "wandb" in self.sinks:
            self._default("wandb_project", os.environ.get("WANDB_PROJECT") or "airvae")
            self._default("wandb_dir", str(Path(os.environ.get("WANDB_DIR") or Path.cwd()).resolve()))
            assert self.wandb_dir is not None  # resolved just above
            if (Path(self.wandb_dir) / "wandb").is_symlink():  # W&B writes (and airvae deletes) in there
                raise ConfigError(f"{Path(self.wandb_dir) / 'wandb'} is a symbolic link; airvae never writes through "
                                  "links: set WANDB_DIR to the folder it leads to")
            # offline by default: no account, no network, nothing that can hang; `wandb sync` uploads later
            self._default("wandb_mode", os.environ.get("WANDB_MODE") or "offline")
            if self.wandb_mode not in _WANDB_MODES:
                raise ConfigError(f"invalid WANDB_MODE = {self.wandb_mode!r}: allowed {', '.join(_WANDB_MODES)}")

    def _default(self, name: str, value: str) -> None:
        if getattr(self, name) is None:
            object.__setattr__(self, name, value)

    @classmethod
    def parse(cls, text: str) -> TrackingSettings:
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


def _default_mlflow_uri() -> str:
    """``./mlflow.db`` as an absolute SQLite URI: MLflow's own default store (MLflow >= 3.7), so
    ``mlflow runs list`` or ``MlflowClient()`` in this folder read it with no settings."""
    store = Path.cwd() / "mlflow.db"
    if store.is_symlink():  # SQLite would write through it
        raise ConfigError(f"{store} is a symbolic link; airvae never writes through links: set "
                          f"MLFLOW_TRACKING_URI=sqlite:///{store.resolve().as_posix()} to use the store it leads to")
    return "sqlite:///" + store.resolve().as_posix()


def _check_database_packages(uri: str) -> None:
    """Refuse, in one line, a database store that mlflow-skinny alone cannot open."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    missing = [module for module in _DATABASE_PACKAGES if not _installed(module)]
    if scheme in _DATABASE_SCHEMES and missing:
        raise ConfigError(f"invalid log = mlflow: the MLflow store {uri} is a database, and the "
                          f"{' and '.join(missing)} package{'s are' if len(missing) > 1 else ' is'} not installed; "
                          "pip install 'airvae[mlflow]'")


def choose_sinks(run_dir: Path, settings: TrackingSettings) -> None:
    """Record the sinks of a run (``RUN/tracking.json``); its next start rebuilds them from
    ``metrics.jsonl``. Keeps the MLflow run id while the store stays the same. A damaged
    tracking file is replaced: choosing the sinks again is its repair."""
    try:
        stored = read_tracking(run_dir)
    except RunError:
        stored = {}
    mlflow = {"mlflow_uri": settings.mlflow_uri, "mlflow_experiment": settings.mlflow_experiment}
    wandb = {"wandb_project": settings.wandb_project, "wandb_dir": settings.wandb_dir,
             "wandb_mode": settings.wandb_mode}
    write_json(Path(run_dir) / TRACKING, {
        "format": TRACKING_FORMAT, "sinks": list(settings.sinks), **mlflow, **wandb,
        "mlflow_run_id": stored.get("mlflow_run_id") if _same(stored, mlflow) else None,
        "wandb_run_id": stored.get("wandb_run_id") if _same(stored, wandb) else None})


def _same(stored: dict, place: dict) -> bool:
    return all(stored.get(key) == value for key, value in place.items())


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


def _params(config: dict) -> dict:
    """The hyperparameters of a run (``_flat``) that do not depend on the machine: no data folder
    nor device, and a user's .npz by its file name, so runs of the same settings compare equal
    wherever they ran."""
    kept = {key: value for key, value in config.items() if key not in _MACHINE_FIELDS}
    if isinstance(kept.get("dataset"), str) and kept["dataset"].endswith(".npz"):
        kept["dataset"] = Path(kept["dataset"]).name
    return _flat(kept)


def evaluation_key(name: str, result: dict, estimator: str) -> str:
    """Where an evaluation's estimate is logged: the split, the estimator and the effort that sets its
    value, e.g. ``test/iwsvi/k5000-l8-T3000`` or ``test/bound/k1``, with ``-n500`` when it covers 500
    examples of a larger split and ``-seed1`` for another seed. ``name``: the evaluation file's stem
    (``test-88245f0258``), the label of an estimator this function does not know."""
    s = result.get("settings") or {}
    svi = f"k{s.get('svi_k')}-l{s.get('svi_l')}-T{s.get('svi_steps')}"
    ais = f"T{s.get('ais_intermediate')}-c{s.get('ais_chains')}"
    simulated = f"{ais}-sim{s.get('bdmc_examples')}"
    effort = {"bound": f"k{result.get('bound_k')}", "iwae": f"k{s.get('k_iwae')}", "iwsvi": svi,
              "gap": svi + (f"-boundk{s['bound_k']}" if s.get("bound_k") else ""), "ais": ais,
              "bdmc_lower": simulated, "bdmc_upper": simulated, "bdmc_iwsvi": f"{svi}-sim{s.get('bdmc_examples')}"}
    label = effort.get(estimator, name)
    n, n_split = result.get("n"), result.get("n_split")
    if isinstance(n, int) and isinstance(n_split, int) and n < n_split:
        label += f"-n{n}"
    if s.get("seed"):
        label += f"-seed{s['seed']}"
    return f"{result.get('split', 'test')}/{estimator}/{label}"


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

    def params(self, params: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        file_writer = self.writer.file_writer
        assert file_writer is not None  # made by SummaryWriter's __init__
        for summary in hparams(params, {"val_log_likelihood": 0.0, "train_loss": 0.0}):
            file_writer.add_summary(summary)

    def notes(self, notes: dict, step: int) -> None:
        for tag, note in notes.items():
            self.writer.add_text(tag, json.dumps(note, sort_keys=True), step)
        self.writer.flush()

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
            assert run_id is not None  # a run is added to only when it has one (_open_sink)
            self.run_id = run_id
            return
        found = self._experiment(experiment)
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

    def _experiment(self, experiment: str):
        """The store's first use, tried again a few times for SQLite (``_SQLITE_TRIES``)."""
        for attempt in range(_SQLITE_TRIES):
            try:
                return self.client.get_experiment_by_name(experiment)
            except Exception:  # noqa: BLE001 - raised again unless another process may be creating the tables
                if not self.uri.startswith("sqlite:") or attempt == _SQLITE_TRIES - 1:
                    raise
                time.sleep(1 + attempt)

    def params(self, params: dict) -> None:
        from mlflow.entities import Param

        batch = [Param(key, str(value)) for key, value in params.items()]
        with _file_store_allowed(self.uri):
            for start in range(0, len(batch), 100):  # MLflow takes at most 100 parameters per call
                self.client.log_batch(self.run_id, params=batch[start:start + 100])

    def notes(self, notes: dict, step: int) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(key, json.dumps(note, sort_keys=True)) for key, note in notes.items()]
        with _file_store_allowed(self.uri):
            self.client.log_batch(self.run_id, tags=tags)

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


class _Wandb:
    """The Weights & Biases sink. A W&B run's history only grows, so each start makes a new W&B run,
    replayed from metrics.jsonl, and forgets the one it replaces (its local files; online, the run on
    the server too). Scalars are logged against ``step`` (the training step), not W&B's own counter."""

    def __init__(self, run_dir: Path, stored: dict, name: str):
        import wandb

        self.mode = stored["wandb_mode"]
        settings = wandb.Settings(init_timeout=_WANDB_INIT_TIMEOUT, silent=True, console="off", x_disable_stats=True)
        # reinit "create_new": a stacked sweep trains several runs, each with its own W&B run, in one process
        self.run = wandb.init(project=stored["wandb_project"], dir=stored["wandb_dir"], mode=self.mode, name=name,
                              notes=f"airvae run {run_dir.resolve()}", reinit="create_new", settings=settings)
        self.run_id = self.run.id
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        replaced = stored.get("wandb_run_id")
        if replaced and replaced != self.run_id:
            self._forget(Path(stored["wandb_dir"]), replaced)

    def _forget(self, folder: Path, run_id: str) -> None:
        """Delete the W&B run ``run_id`` that this one replaces: its folders under ``folder/wandb/``
        (only those W&B names after it, never through a link) and, online, the run on the server."""
        pattern = re.compile(rf"(offline-)?run-\d{{8}}_\d{{6}}-{re.escape(run_id)}")
        if (folder / "wandb").is_dir() and not (folder / "wandb").is_symlink():
            for entry in (folder / "wandb").iterdir():
                if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
        if self.mode == "online":
            import wandb

            with contextlib.suppress(Exception):  # deleted by hand, or the server unreachable: nothing to replace
                wandb.Api(timeout=10).run(f"{self.run.entity}/{self.run.project}/{run_id}").delete()

    def params(self, params: dict) -> None:
        self.run.config.update(params, allow_val_change=True)

    def scalars(self, step: int, values: dict, walltime: float) -> None:
        self.run.log({"step": step, **values})  # W&B stamps its own wall time

    def notes(self, notes: dict, step: int) -> None:
        self.run.summary.update(notes)

    def close(self, status: str | None) -> None:
        self.run.finish(exit_code=0 if status in (None, "completed", "early-stopped") else 1)


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
    def start(cls, run_dir: Path, cfg, records: list[dict], evaluations=lambda: (),
              only: tuple[str, ...] | None = None) -> Tracker:
        """Rebuild the chosen sinks of a run (those of ``only``, if given) from its ``records``
        (``metrics.jsonl``) and its current evaluations (``evaluations()``: ``(path, record)`` pairs,
        asked for only when a sink needs them); the run then logs to them."""
        run_dir = Path(run_dir)
        stored = read_tracking(run_dir)
        chosen = [name for name in stored.get("sinks", []) if only is None or name in only]
        tracker = cls(_open_sinks(run_dir, {**stored, "sinks": chosen}, replace=True))
        ids = {f"{name}_run_id": sink.run_id for name, sink in tracker.sinks.items() if hasattr(sink, "run_id")}
        if any(stored.get(key) != run_id for key, run_id in ids.items()):
            write_json(run_dir / TRACKING, {**stored, **ids})
        if not tracker.sinks:
            return tracker
        tracker._each("params", _params(cfg.to_json()))
        now, last = time.time(), (records[-1].get("seconds", 0.0) if records else 0.0)
        for record in records:  # wall times as if the run had trained without stopping, ending now
            tracker.validation(record, now - (last - record.get("seconds", last)))
        step = records[-1]["step"] if records else 0
        values, notes = {}, {}
        for path, result in evaluations():  # one value per name: two evaluations may share an estimate
            more_values, more_notes = _evaluation_entries(path.stem, result)
            values.update(more_values)
            notes.update(more_notes)
        if values:
            tracker._each("scalars", step, values, now)
            tracker._each("notes", notes, step)
        return tracker

    def validation(self, record: dict, walltime: float | None = None) -> None:
        """One metrics.jsonl record: every number in it but the step, at its step."""
        values = {key: value for key, value in record.items() if key != "step" and isinstance(value, (int, float))}
        self._each("scalars", record["step"], values, time.time() if walltime is None else walltime)

    def evaluation(self, name: str, result: dict, step: int, walltime: float | None = None) -> None:
        """An evaluation ([`evaluate_run`][airvae.evaluation.evaluate_run]) under ``evaluation_key``'s
        readable names (``test/iwsvi/k5000-l8-T3000``): the mean in nats (ln p(x) or a bound for the
        estimators, Delta_inf for ``gap``), at ``step`` (the run's last logged step); beside each, as
        ``settings/KEY`` (a tag, text or summary entry), the estimator's settings, the examples and
        ``file``, the evaluation's file in ``RUN/evaluations/`` (``NAME.json``)."""
        values, notes = _evaluation_entries(name, result)
        self._each("scalars", step, values, time.time() if walltime is None else walltime)
        self._each("notes", notes, step)

    def close(self, status: str | None = None) -> None:
        """Close the sinks; ``status`` is the run's (``completed``, ``interrupted``, ...), which MLflow records."""
        self._each("close", status)
        self.sinks.clear()


def _evaluation_entries(name: str, result: dict) -> tuple[dict, dict]:
    """What [`Tracker.evaluation`][airvae.tracking.Tracker.evaluation] logs of an evaluation: ``{key: mean}`` and ``{settings/key: note}``."""
    values, notes = {}, {}
    for estimator, estimate in result.get("estimates", {}).items():
        key = evaluation_key(name, result, estimator)
        values[key] = estimate["mean"]
        notes[f"settings/{key}"] = {"file": f"{name}.json", "n": result.get("n"), "n_split": result.get("n_split"),
                                    "settings": estimate.get("settings", {})}
    return values, notes


def _open_sinks(run_dir: Path, stored: dict, replace: bool) -> dict:
    sinks = {}
    for name in stored.get("sinks", []):
        try:
            sink = _open_sink(name, run_dir, stored, replace)
        except Exception as error:  # noqa: BLE001 - not installed any more, store unreachable
            _warn(name, error)
            continue
        if sink is not None:
            sinks[name] = sink
    return sinks


def _open_sink(name: str, run_dir: Path, stored: dict, replace: bool):
    """Sink ``name`` of a run: made anew (``replace``) or, to add to, as it is; None where there is
    nothing to add to (no MLflow run yet) or a sink is only ever rebuilt (W&B)."""
    if name == "tensorboard":
        return _TensorBoard(run_dir, replace)
    if name == "mlflow":
        if not (replace or stored.get("mlflow_run_id")):
            return None
        return _Mlflow(run_dir, stored["mlflow_uri"], stored["mlflow_experiment"], stored.get("mlflow_run_id"),
                       replace, _run_name(run_dir))
    return _Wandb(run_dir, stored, _run_name(run_dir)) if replace else None


def _run_name(run_dir: Path) -> str:
    """The last four parts of the run's path: ``runs/caltech/VAE-seed0``, ``caltech/k1-m1/plain/seed0``."""
    return "/".join(run_dir.resolve().parts[-4:])


def log_evaluation(run_dir: Path, path: Path, result: dict, evaluations=lambda: ()) -> None:
    """Send a new evaluation to the sinks of a tracked run (none: nothing happens). TensorBoard and
    MLflow get it added; W&B's run is rebuilt with all of the run's current evaluations
    (``evaluations()``, as for [`Tracker.start`][airvae.tracking.Tracker.start]), since a W&B run takes no step twice."""
    try:
        stored = read_tracking(run_dir)
    except Exception as error:  # noqa: BLE001 - the evaluation itself is stored either way
        _warn("tracking", error)
        return
    if [name for name in stored.get("sinks", []) if name != "wandb"]:
        records = read_metrics(Path(run_dir) / METRICS)
        tracker = Tracker(_open_sinks(Path(run_dir), stored, replace=False))
        tracker.evaluation(Path(path).stem, result, records[-1]["step"] if records else 0)
        tracker.close()
    if "wandb" in stored.get("sinks", []):
        _rebuild_wandb(Path(run_dir), evaluations)


def _rebuild_wandb(run_dir: Path, evaluations) -> None:
    """The W&B sink of a run rebuilt from its files, unless the run is being trained: then its W&B run
    is the trainer's, and the run's next start brings the evaluation."""
    try:
        check_unlocked(run_dir)
        Tracker.start(run_dir, load_config(run_dir), read_metrics(run_dir / METRICS), evaluations,
                      only=("wandb",)).close()
    except RunLocked:
        return
    except Exception as error:  # noqa: BLE001 - the evaluation itself is stored either way
        _warn("wandb", error)


def _warn(sink: str, error: Exception) -> None:
    first = " ".join(str(error).split())[:300] or type(error).__name__
    print(f"airvae: warning: the {sink} sink failed ({type(error).__name__}: {first}); it is dropped for this "
          "process, metrics.jsonl is complete, and the next start of the run rebuilds the sink", file=sys.stderr)
