"""The run directory: where a training run keeps its config, metrics, checkpoints and summary,
and the rules that keep it safe.

    RUN/airvae-run.json        marker written at creation: proves the folder is an airvae run, and
                               records the digest of the data it trains on
    RUN/.lock                  held (flock) by the one process writing the run, for its whole life
    RUN/config.json            resolved RunConfig
    RUN/metrics.jsonl          one JSON object per validation
    RUN/checkpoints/last.pt    model, optimizer, step, RNG state (for exact resume)
    RUN/checkpoints/best.pt    model at the best validation estimate (early stopping)
    RUN/checkpoints/best.safetensors
                               the same weights as safetensors, in place of best.pt, in a run
                               extracted from a bundle (airvae.bundle)
    RUN/summary.json           status and final numbers, rewritten as the run progresses
    RUN/evaluations/*.json     cached evaluations (airvae.evaluation)
    RUN/plots/                 figures of `airvae plot` (airvae.plots)
    RUN/tracking.json          the run's tracking sinks (--log; airvae.tracking)
    RUN/tensorboard/           TensorBoard event files (--log tensorboard)

Safety rules, each enforced here:

* Checkpoints are loaded with ``torch.load(weights_only=True)`` ([`airvae.checkpoints`][]): tensors
  and plain containers only, so a checkpoint received from someone else can never run code.
* One writer per run: [`RunLock`][airvae.locks.RunLock] takes an exclusive ``flock`` on ``RUN/.lock``; a second
  writer is refused at once with the holder's PID, and the kernel releases the lock when the holder
  dies (even by SIGKILL).
* airvae deletes only what it provably wrote ([`clear_run_dir`][airvae.runs.clear_run_dir]): the marker must
  be there, the config must be valid, every entry must be one airvae writes, and links are never followed.
* Every file error names the file and the fix ([`RunError`][airvae.files.RunError]).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ._version import __version__
from .checkpoints import file_digest, read_best_weights, read_checkpoint
from .config import CUSTOM, ConfigError, FitConfig, RunConfig
from .files import TEMPORARY, RunError, read_json, write_json
from .locks import LOCK
from .model import model_from_config

if TYPE_CHECKING:
    from .model import LatentVariableModel

Config = TypeVar("Config", RunConfig, FitConfig)  # a run's configuration: airvae's model, or a researcher's

CONFIG, METRICS, SUMMARY, MARKER = "config.json", "metrics.jsonl", "summary.json", "airvae-run.json"
CHECKPOINTS, EVALUATIONS, ERROR = "checkpoints", "evaluations", "error.json"
TRACKING, TENSORBOARD = "tracking.json", "tensorboard"
LAST, BEST = f"{CHECKPOINTS}/last.pt", f"{CHECKPOINTS}/best.pt"
BEST_NEXT = f"{CHECKPOINTS}/best.next.pt"  # a new best, promoted to best.pt once last.pt is written
FINISHED = ("completed", "early-stopped")  # the summary statuses of a run that is over
BEST_WEIGHTS = f"{CHECKPOINTS}/best.safetensors"
MARKER_FORMAT = 1
EVENT_FILE = re.compile(r"events\.out\.tfevents\..+")  # the files of TensorBoard's SummaryWriter

# What airvae writes into a run directory, by entry: anything else makes the folder foreign, and
# airvae refuses to delete it.
_RUN_FILES = re.compile("|".join(re.escape(n) for n in (MARKER, LOCK, CONFIG, METRICS, SUMMARY, ERROR, TRACKING)))
RUN_FOLDERS = {CHECKPOINTS: re.compile(r"(last|best|best\.next)\.pt|best\.safetensors"),
                EVALUATIONS: re.compile(r"[\w.-]+\.(json|partial)"), "plots": re.compile(r"[\w.-]+\.(png|json)"),
                TENSORBOARD: EVENT_FILE}


_MARKER_FILE = re.compile(re.escape(MARKER))


def _temporary(name: str, targets: re.Pattern[str] = _RUN_FILES) -> bool:
    """Is ``name`` a leftover of [`airvae.files.atomic_write_bytes`][] writing one of ``targets``
    (a kill during the write)?"""
    match = TEMPORARY.fullmatch(name)
    return match is not None and targets.fullmatch(match["target"]) is not None


# ----------------------------------------------------------------------------------------------
# The best weights


def best_weights_safetensors(run_dir: Path) -> bytes:
    """The weights of ``RUN/checkpoints/best.pt`` (read weights-only) as a safetensors file: tensors
    and a header of strings, a format that cannot carry code. The header keeps the checkpoint's
    step, validation estimate and the sha256 of best.pt, which stays the checkpoint's identity
    ([`best_checkpoint_digest`][airvae.runs.best_checkpoint_digest]), so evaluations cached for
    best.pt hold for these weights. What a bundle ships in place of best.pt.

    Returns:
        The file's bytes.
    """
    from safetensors.torch import save

    state, digest = read_checkpoint(Path(run_dir) / BEST)
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state["model"].items()}
    metadata = {"format": "airvae-best-1", "checkpoint_sha256": digest, "step": str(state.get("step")),
                "val_log_likelihood": repr(state.get("val_log_likelihood"))}
    return save(tensors, metadata=metadata)


def best_checkpoint_digest(run_dir: str | os.PathLike[str]) -> str | None:
    """The identity of a run's best checkpoint: the sha256 of ``best.pt``, or, in a run that holds
    ``best.safetensors`` instead (from a bundle), that of the best.pt it was written from; None
    when the run has neither."""
    run_dir = Path(run_dir)
    if (run_dir / BEST).exists():
        return file_digest(run_dir / BEST)
    if not (run_dir / BEST_WEIGHTS).exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(run_dir / BEST_WEIGHTS), framework="pt") as weights:
            return (weights.metadata() or {}).get("checkpoint_sha256")
    except Exception:  # noqa: BLE001 - damaged: no cached result can match; loading it names the damage
        return None


# ----------------------------------------------------------------------------------------------
# Configs and models


def load_config(run_dir: str | os.PathLike[str]) -> RunConfig | FitConfig:
    """The configuration of a run: a [`RunConfig`][airvae.config.RunConfig] for airvae's own models, a
    [`FitConfig`][airvae.config.FitConfig] for a researcher's own model ([`airvae.fit.fit`][]).

    Raises:
        RunError: ``run_dir`` is not an airvae run, or its ``config.json`` is invalid.
    """
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is not an airvae run directory: "
                       f"{'it is a file' if run_dir.exists() else 'it does not exist'}")
    if not path.exists():
        raise RunError(f"{run_dir} is not an airvae run directory: {CONFIG} is missing "
                       "(create one with `airvae train --run-dir ...`)")
    data = read_json(path)
    if not isinstance(data, dict):
        raise RunError(f"{path} holds {type(data).__name__}, not a run configuration; restore it from a copy")
    try:
        return FitConfig.from_json(data) if data.get("kind") == CUSTOM else RunConfig.from_json(data)
    except ConfigError as error:
        raise RunError(f"{path}: {error}; restore the file from a copy") from error


def load_trained_model(run_dir: str | os.PathLike[str], which: str = "best", device: torch.device | str | None = None,
                       model: LatentVariableModel | None = None) -> tuple[RunConfig | FitConfig, LatentVariableModel]:
    """The trained model of a run, in eval mode. [`airvae.load`][airvae.bundle.load] does the same for
    bundles too.

    The best weights come from ``best.pt``, or from ``best.safetensors`` in a run extracted from a
    bundle.

    Args:
        run_dir: the run directory.
        which: ``"best"`` (the best validation estimate: early stopping's model) or ``"last"`` (the
            last checkpoint).
        device: where the model is loaded (default: the CPU).
        model: for a run of a researcher's own model ([`airvae.fit.fit`][]), an untrained instance to
            load the weights into (airvae does not build it); None for airvae's own models.

    Returns:
        (tuple[RunConfig | FitConfig, LatentVariableModel]): ``(config, model)``.

    Raises:
        RunError: not a run, no such checkpoint yet, weights that do not fit the model, or a model of
            your own without ``model`` (or airvae's with one).
    """
    cfg, model, _ = load_trained_model_with_digest(run_dir, which, device, model)
    return cfg, model


def build_model(cfg: RunConfig | FitConfig, model: LatentVariableModel | None, run_dir: Path) -> LatentVariableModel:
    """The untrained model of a run: built from its configuration, or for a run of a researcher's own
    model the one the caller passes (refused, saying how, when there is none).
    """
    if isinstance(cfg, FitConfig):
        if model is None:
            raise RunError(f"{run_dir} trained a model of your own ({cfg.model}); airvae does not build it: pass an "
                           "untrained instance (model=... in Python, --model package.module:function on the command "
                           "line, a function that returns one)")
        return model
    if model is not None:
        raise RunError(f"{run_dir} trained airvae's {cfg.model_name}: it builds that model from its config.json, "
                       "so do not pass one")
    return model_from_config(cfg)


def load_trained_model_with_digest(run_dir: str | os.PathLike[str], which: str = "best",
                                   device: torch.device | str | None = None, model: LatentVariableModel | None = None,
                                   ) -> tuple[RunConfig | FitConfig, LatentVariableModel, str]:
    """[`load_trained_model`][airvae.runs.load_trained_model], with the sha256 of the checkpoint file the
    weights came from (the identity evaluations are cached against).

    Returns:
        (tuple[RunConfig | FitConfig, LatentVariableModel, str]): ``(config, model, sha256)``.
    """
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    cfg = load_config(run_dir)
    device = device or "cpu"
    path = Path(run_dir) / (BEST if which == "best" else LAST)
    if which == "best" and not path.exists() and (Path(run_dir) / BEST_WEIGHTS).exists():
        path = Path(run_dir) / BEST_WEIGHTS
        weights, header = read_best_weights(path, device)
        state, digest = {"model": weights}, header.get("checkpoint_sha256") or file_digest(path)
    else:
        state, digest = read_checkpoint(path, device)
    model = build_model(cfg, model, Path(run_dir)).to(device)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, TypeError) as error:
        raise RunError(f"checkpoint {path} does not match the model of {Path(run_dir) / CONFIG} "
                       f"({str(error).splitlines()[0]}); was it copied from another run?") from error
    return cfg, model.eval(), digest


# ----------------------------------------------------------------------------------------------
# Creating, checking and clearing run directories


def write_marker(run_dir: Path, data_digest: str | None) -> None:

    write_json(run_dir / MARKER, {"airvae_run": MARKER_FORMAT, "airvae_version": __version__,
                                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "data_sha256": data_digest})


def read_marker(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / MARKER
    if not path.exists():
        return None
    marker = read_json(path)
    if not isinstance(marker, dict) or marker.get("airvae_run") != MARKER_FORMAT:
        raise RunError(f"{path} is not an airvae run marker; restore it from a copy")
    return marker


def _foreign_entries(run_dir: Path) -> list[str]:
    """Entries of ``run_dir`` that airvae does not write (links count as foreign)."""
    foreign = []
    for entry in run_dir.iterdir():
        name = entry.name
        if entry.is_symlink():
            foreign.append(f"{name} (a link)")
        elif _RUN_FILES.fullmatch(name) or _temporary(name):
            if not entry.is_file():
                foreign.append(name)
        elif name in RUN_FOLDERS and entry.is_dir():
            pattern = RUN_FOLDERS[name]
            for inner in entry.iterdir():
                if inner.is_symlink() or not inner.is_file() or not (pattern.fullmatch(inner.name)
                                                                      or _temporary(inner.name, pattern)):
                    foreign.append(f"{name}/{inner.name}")
        else:
            foreign.append(name)
    return sorted(foreign)


def _links_where_airvae_writes(run_dir: Path) -> list[str]:
    """Links among ``run_dir``'s entries and inside its folders, the only places airvae writes. It
    looks no deeper: a folder airvae does not own (``--run-dir /``) is refused, not walked."""
    links = []
    for entry in run_dir.iterdir():
        if entry.is_symlink():
            links.append(entry.name)
        elif entry.name in RUN_FOLDERS and entry.is_dir():
            links += [f"{entry.name}/{inner.name}" for inner in entry.iterdir() if inner.is_symlink()]
    return sorted(links)


def _without_links(run_dir: Path, state: str) -> str:
    """``state``, for a folder airvae would write into, once it holds no link where airvae writes."""
    links = _links_where_airvae_writes(run_dir)
    if links:  # airvae writes its files in place (metrics.jsonl is appended to): never through a link
        raise RunError(f"{run_dir} holds symbolic links ({', '.join(links[:3])}); airvae never writes "
                       "through links: replace them with the files, or choose another --run-dir")
    return state


def run_dir_state(run_dir: Path) -> str:
    """``"new"`` (absent, empty, or only airvae's traces of an unfinished creation), ``"run"``
    (holds an airvae run), or raises RunError for a path airvae must not write into."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink():
        raise RunError(f"run directory {run_dir} is a symbolic link; airvae never writes through links: "
                       "pass the real path")
    if not run_dir.exists():
        return "new"
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} is a file, not a directory; choose another --run-dir")
    if (run_dir / CONFIG).exists():
        if read_marker(run_dir) is None:  # no marker: only a valid airvae config makes it a run (airvae < 0.2)
            try:
                load_config(run_dir)
            except RunError as error:
                raise RunError(f"{run_dir} is not an airvae run ({error}); airvae will not write into it: "
                               "choose another --run-dir") from None
        return _without_links(run_dir, "run")
    names = {entry.name for entry in run_dir.iterdir()}
    if all(n == LOCK or _temporary(n, _MARKER_FILE) for n in names):
        return _without_links(run_dir, "new")  # empty, or a creation killed while it wrote its marker
    if MARKER in names and all(n in (LOCK, MARKER, ERROR) or _temporary(n) for n in names):
        # marked as airvae's: a creation that stopped before writing the config, or a recorded failure
        return _without_links(run_dir, "new")
    foreign = _foreign_entries(run_dir) if MARKER in names else sorted(names - {LOCK})  # unmarked: not airvae's
    if not foreign:
        raise RunError(f"{run_dir} holds an airvae run without its {CONFIG}; restore that file, or delete the "
                       "folder to start again")
    shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    raise RunError(f"{run_dir} is not empty and is not an airvae run (it holds {shown}); "
                   "airvae will not write into it: choose another --run-dir")


def check_run_dir_use(run_dir: Path, *, resume: bool, overwrite: bool) -> str:
    """Refuse a use of ``run_dir`` that cannot succeed (a file, a link, a foreign folder, an
    existing run without --resume/--overwrite, an --overwrite airvae may not perform) before
    anything is written, even a lock file. Returns [`run_dir_state`][airvae.runs.run_dir_state]."""
    state = run_dir_state(run_dir)
    if state == "run":
        if overwrite:
            check_clearable(run_dir)
        elif not resume:
            raise RunError(f"run directory {run_dir} already holds a run; pass --resume to continue it "
                           "or --overwrite to discard it and start again")
    return state


def open_run_dir(cfg: Config, run_dir: Path, data_digest: str, *, resume: bool, overwrite: bool,
                 allow_data_change: bool = False) -> Config:
    """Create the run directory, or check that resuming it is consistent; the caller holds its
    lock. ``data_digest``: ``airvae.data.dataset_digest`` of the data it trains on. Returns the
    config to train with (the stored one when resuming)."""
    if check_run_dir_use(run_dir, resume=resume, overwrite=overwrite) == "run":
        if overwrite:
            clear_run_dir(run_dir)
        else:
            stored = load_config(run_dir)
            changed = {key: (old, new) for key, old, new in _diff(stored.to_json(), cfg.to_json())
                       if key not in ("device", "data_dir")}
            if changed:
                details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
                raise RunError(f"cannot resume {run_dir} with a different configuration ({details}); "
                               "resume with the stored settings or use --overwrite to start again")
            marker = read_marker(run_dir)
            recorded = marker.get("data_sha256") if marker else None
            if recorded is not None and recorded != data_digest and not allow_data_change:
                raise RunError(f"cannot resume {run_dir}: its data changed since the run was created (sha256 "
                               f"{recorded[:12]}... then, {data_digest[:12]}... now); resume on the original data, "
                               "or pass --allow-data-change to continue on the new data")
            if marker is None or recorded != data_digest:  # a run from before markers, or an allowed change
                write_marker(run_dir, data_digest)
            clean_temporaries(run_dir)
            assert isinstance(stored, type(cfg))  # the same kind of config: their "kind" would differ above
            return stored.replace(device=cfg.device, data_dir=cfg.data_dir)
    write_marker(run_dir, data_digest)  # first: only a marked folder is cleaned
    clean_temporaries(run_dir)
    write_json(run_dir / CONFIG, cfg.to_json())
    return cfg


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            yield from _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            yield f"{prefix}{key}", va, vb


def check_clearable(run_dir: Path) -> None:
    """Raise RunError unless ``run_dir`` is provably an airvae run that may be deleted: not a link,
    marker present, a valid config, and nothing in it that airvae did not write."""
    run_dir = Path(run_dir)
    if run_dir_state(run_dir) != "run":
        return
    if read_marker(run_dir) is None:
        raise RunError(f"--overwrite refused: {run_dir} has no {MARKER} marker, so airvae cannot prove it wrote "
                       "this folder (runs from airvae < 0.2 have none: resume it once to add one); delete it "
                       "yourself if it is yours")
    try:
        load_config(run_dir)
    except RunError as error:
        raise RunError(f"--overwrite refused: {error}") from error
    foreign = _foreign_entries(run_dir)
    if foreign:
        raise RunError(f"--overwrite refused: {run_dir} holds files airvae did not write ({', '.join(foreign[:5])}"
                       f"{', ...' if len(foreign) > 5 else ''}); move them away or delete the folder yourself")


def clear_run_dir(run_dir: Path) -> None:
    """Delete an airvae run's files (after [`check_clearable`][airvae.runs.check_clearable]), keeping the lock file the
    caller holds. Links are unlinked, never followed."""
    check_clearable(run_dir)
    for entry in Path(run_dir).iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def clean_temporaries(run_dir: Path) -> list[Path]:
    """Remove leftovers of writes interrupted by a kill (``.last.pt.airvae-tmp-*`` and the like) from
    a folder airvae's marker proves is a run; only call while holding the run's lock, when no write
    can be in flight."""
    removed: list[Path] = []
    if read_marker(run_dir) is None:
        return removed
    for folder, targets in ((Path(run_dir), _RUN_FILES), (Path(run_dir) / CHECKPOINTS, RUN_FOLDERS[CHECKPOINTS])):
        if folder.is_dir() and not folder.is_symlink():
            for entry in folder.iterdir():
                if _temporary(entry.name, targets) and entry.is_file() and not entry.is_symlink():
                    entry.unlink()
                    removed.append(entry)
    return removed
