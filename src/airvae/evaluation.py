"""Run-level evaluation: the estimators of [`airvae.estimators`][] applied to a trained run.

* [`EvaluationSettings`][airvae.evaluation.EvaluationSettings] -- what to estimate and how hard (appendix C's
  values by default: IWAE-5000, IW-SVI with k = 5000, l = 8, T = 3000);
* [`evaluate_model`][airvae.evaluation.evaluate_model] -- library call on any model
  ([`airvae.model.LatentVariableModel`][]) and data;
* [`evaluate_run`][airvae.evaluation.evaluate_run] -- loads ``RUN/checkpoints/best.pt`` (in a bundle's run, its
  ``best.safetensors``), evaluates a split and caches the result as
  ``RUN/evaluations/<split>-<hash>.json`` ([`stored_evaluation`][airvae.evaluation.stored_evaluation] reads it
  back), and sends it to the run's tracking sinks, if any ([`airvae.tracking`][]);
* [`format_table`][airvae.evaluation.format_table] -- the paper's sign convention: -ln p(x), Delta_inf, -L_k (Table 1).

Appendix C's Figure 3 (IW-SVI against IWAE-k) is [`airvae.iwsvi_study`][].
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .compiling import LONG_EVALUATION_LATENTS, compile_for
from .config import MAX_SAMPLES, MAX_SEED, FitConfig, RunConfig, check_device_name, check_int, is_int, is_real, require
from .data import Dataset, DatasetError, dataset_digest, evenly_spaced, load_dataset
from .estimators import (
    DEFAULT_AIS_CHUNK_EXAMPLES,
    DEFAULT_CHUNK_SAMPLES,
    DEFAULT_SVI_CHUNK_EXAMPLES,
    DEFAULT_SVI_LR,
    DEFAULT_SVI_LR_DECAY,
    REGISTRY,
    Estimate,
    resolve_device,
)
from .files import RunError, check_writable, write_json
from .likelihoods import bits_per_dim
from .resources import check_fits, evaluation_memory
from .runs import EVALUATIONS, best_checkpoint_digest, load_config, load_trained_model_with_digest, read_marker
from .tracking import log_evaluation

if TYPE_CHECKING:
    from .model import LatentVariableModel

MAX_STEPS = 10**6  # IW-SVI steps, AIS distributions and chains, simulated examples, repeats
ESTIMATORS = tuple(REGISTRY)  # the names an evaluation may choose, in canonical order
SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 2  # 2: max_examples spreads the examples over the split (1 took the first ones)
# Fields that change how the work is done, not what is estimated: left out of the cache key.
# (Chunking does not change results; a CUDA run draws from CUDA generators, a different but
# equally valid stream, so a result computed on one device is reused on another.)
_EXECUTION_FIELDS = ("device", "chunk_samples", "svi_chunk_examples", "ais_chunk_examples", "part_examples")
# evaluate_run's parts on a CPU: a few minutes of appendix C's IW-SVI on one core for Caltech's model, and per
# example no slower than IW-SVI's chunks of 1000 there (`benchmarks/bench.py --sections iw-svi --svi-examples N`
# for N = 256 and 1000, steps/s times N); on a GPU a part is one IW-SVI chunk, so its batches stay as large.
DEFAULT_PART_EXAMPLES = 256


def _is_pos_float(value: object) -> bool:
    return is_real(value) and math.isfinite(value) and value > 0


@dataclass
class EvaluationSettings:
    """What [`evaluate_run`][airvae.evaluation.evaluate_run] (or
    [`evaluate_model`][airvae.evaluation.evaluate_model]) estimates, on which split, with how much
    effort; the defaults are appendix C's (IWAE-5000; IW-SVI with k = 5000, l = 8, T = 3000).
    Every field is checked when the settings are made (a ``ConfigError`` names the field).

    Attributes:
        estimators: any of ``bound`` (the training bound L_k with the encoder, k = the run's k unless
            ``bound_k``), ``iwae`` (IWAE-``k_iwae`` with the encoder, eq. 40), ``iwsvi`` (eq. 41-42),
            ``ais``, ``gap`` (Delta_inf = ln p(x) [IW-SVI] - L_k; needs bound and iwsvi, and is always
            added when both are present since it costs nothing), ``bdmc`` (the sandwich lower <= ln p(x)
            <= upper on ``bdmc_examples`` examples simulated from the model, with the ``ais_*``
            settings; together with ``iwsvi``, IW-SVI is also run on those examples, so its slack there
            is known). A comma-separated string is accepted.
        split: ``train``, ``valid`` or ``test``.
        max_examples: only this many examples, spread evenly over the split (quick runs); None: all.
        bound_k: the bound's k; None: the run's training k.
        bound_repeats: L_k averaged over this many draws per example (cheap; a less noisy gap).
        k_iwae: IWAE's importance samples.
        svi_k: IW-SVI's scoring samples k.
        svi_l: IW-SVI's optimized bound's samples l.
        svi_steps: IW-SVI's Adam steps T (0 scores the encoder's q).
        svi_lr: IW-SVI's Adam step size.
        svi_lr_decay: IW-SVI's final learning rate as a fraction of ``svi_lr`` (1: constant).
        ais_intermediate: AIS's annealing steps.
        ais_chains: AIS's estimating chains per example.
        ais_leapfrog: leapfrog steps per HMC transition.
        ais_step_size: the starting leapfrog step size.
        ais_schedule: ``sigmoid`` or ``linear``.
        ais_tuning_chains: chains that only adapt the step size (0: fixed step size).
        bdmc_examples: examples simulated for ``bdmc``.
        seed: the seed of every estimator's per-example streams.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        chunk_samples: latents decoded at once (no effect on the result).
        svi_chunk_examples: examples IW-SVI optimizes at once (no effect on the result).
        ais_chunk_examples: examples AIS anneals at once (no effect on the result).
        part_examples: [`evaluate_run`][airvae.evaluation.evaluate_run] saves its progress after every
            this many examples, and an interrupted evaluation resumes after the last part saved (no
            effect on the result: every example draws from its own random streams). None: 256 on a
            CPU, ``svi_chunk_examples`` on a GPU.
    """

    estimators: tuple[str, ...] = ("bound", "iwsvi", "gap")
    split: str = "test"
    max_examples: int | None = None  # only N examples, spread evenly over the split (quick runs)
    bound_k: int | None = None  # None: the run's training k
    bound_repeats: int = 10  # L_k averaged over this many draws per example (cheap; less noisy gap)
    k_iwae: int = 5000
    svi_k: int = 5000
    svi_l: int = 8
    svi_steps: int = 3000
    svi_lr: float = DEFAULT_SVI_LR
    svi_lr_decay: float = DEFAULT_SVI_LR_DECAY
    ais_intermediate: int = 500
    ais_chains: int = 16
    ais_leapfrog: int = 10
    ais_step_size: float = 0.1
    ais_schedule: str = "sigmoid"
    ais_tuning_chains: int = 4
    bdmc_examples: int = 100
    seed: int = 0
    device: str = "auto"
    chunk_samples: int = DEFAULT_CHUNK_SAMPLES
    svi_chunk_examples: int = DEFAULT_SVI_CHUNK_EXAMPLES
    ais_chunk_examples: int = DEFAULT_AIS_CHUNK_EXAMPLES
    part_examples: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.estimators, str):
            self.estimators = parse_estimators(self.estimators)
        require(isinstance(self.estimators, (tuple, list)) and len(self.estimators) > 0
               and all(e in ESTIMATORS for e in self.estimators),
               "estimators", self.estimators, f"a non-empty subset of {', '.join(ESTIMATORS)}")
        chosen = set(self.estimators)
        for name, estimator in REGISTRY.items():  # one computed from others: only with them, and free with them
            needs = set(estimator.needs)
            require(name not in chosen or needs <= chosen, "estimators", self.estimators,
                    f"{name!r} only together with {' and '.join(map(repr, estimator.needs))} ({estimator.meaning})")
            if needs and needs <= chosen:
                chosen.add(name)
        self.estimators = tuple(e for e in ESTIMATORS if e in chosen)
        require(self.split in SPLITS, "split", self.split, " | ".join(SPLITS))
        require(self.max_examples is None or (is_int(self.max_examples) and self.max_examples >= 1),
               "max_examples", self.max_examples, "an integer >= 1, or None for the whole split")
        require(self.bound_k is None or (is_int(self.bound_k) and self.bound_k >= 1), "bound_k", self.bound_k,
               "an integer >= 1, or None for the run's training k")
        # Upper bounds far beyond the paper's (k = 100000 in Figure 3, T = 3000, 500 AIS distributions):
        # a typo like 1e30 is refused instead of running for ever (config.MAX_SAMPLES).
        for name in ("k_iwae", "svi_k", "svi_l", "chunk_samples"):
            check_int(name, getattr(self, name), 1, MAX_SAMPLES)
        for name in ("bound_repeats", "ais_intermediate", "ais_chains", "bdmc_examples", "svi_chunk_examples",
                     "ais_chunk_examples"):
            check_int(name, getattr(self, name), 1, MAX_STEPS)
        if self.part_examples is not None:
            check_int("part_examples", self.part_examples, 1, MAX_STEPS)
        check_int("ais_leapfrog", self.ais_leapfrog, 1, 10**4)
        require(is_int(self.svi_steps) and 0 <= self.svi_steps <= MAX_STEPS, "svi_steps", self.svi_steps,
               f"an integer >= 0 (0 scores the encoder's q) and <= {MAX_STEPS}")
        require(is_int(self.ais_tuning_chains) and self.ais_tuning_chains >= 0, "ais_tuning_chains",
               self.ais_tuning_chains, "an integer >= 0 (0: fixed step size)")
        check_int("seed", self.seed, 0, MAX_SEED)
        require(_is_pos_float(self.svi_lr), "svi_lr", self.svi_lr, "a finite number > 0")
        require(_is_pos_float(self.svi_lr_decay) and self.svi_lr_decay <= 1, "svi_lr_decay", self.svi_lr_decay,
               "(0, 1] (the final learning rate as a fraction of svi_lr; 1: constant)")
        require(_is_pos_float(self.ais_step_size), "ais_step_size", self.ais_step_size, "a finite number > 0")
        require(self.ais_schedule in ("sigmoid", "linear"), "ais_schedule", self.ais_schedule, "sigmoid | linear")
        check_device_name(self.device)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict."""
        d = asdict(self)
        d["estimators"] = list(self.estimators)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvaluationSettings:
        """Settings from [`to_dict`][airvae.evaluation.EvaluationSettings.to_dict]'s output (an evaluation
        record's ``settings``); unknown keys are refused.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown evaluation settings {', '.join(unknown)}: allowed {', '.join(sorted(known))}")
        return cls(**{**d, "estimators": tuple(d.get("estimators", cls.estimators))})

    def identity(self) -> dict[str, Any]:
        """The settings that determine the result (the cache key). ``bdmc_examples`` counts only
        when ``bdmc`` is chosen."""
        return {"format": FORMAT_VERSION,
                **{k: v for k, v in self.to_dict().items()
                   if k not in _EXECUTION_FIELDS and (k != "bdmc_examples" or "bdmc" in self.estimators)}}

    def short_hash(self) -> str:
        """The first 10 hex digits of the sha256 of [`identity`][airvae.evaluation.EvaluationSettings.identity]:
        the cache file's name.
        """
        text = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------
# Model level


def _latents_decoded(settings: EvaluationSettings, n: int, bound_k: int | None) -> int:
    """Roughly how many latents the decoder will see: the size of an evaluation."""
    return sum(REGISTRY[name].cost(settings, n, bound_k) for name in settings.estimators)


def evaluate_model(model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any], settings: EvaluationSettings,
                   bound_k: int | None = None,
                   progress: bool = False) -> dict[str, Estimate]:
    """Every estimator of ``settings`` on the examples ``x``: the library call for any model and data.

    Runs on the model's device, in canonical order (each estimator's single-model call,
    [`REGISTRY`][airvae.estimators.registry.REGISTRY]); ``settings.max_examples`` examples of ``x``,
    spread evenly ([`evenly_spaced`][airvae.data.evenly_spaced]), else all of them.

    Args:
        model (LatentVariableModel): any model following the protocol.
        x (torch.Tensor | numpy.ndarray): the examples, ``[n, ...]``.
        settings: the estimators and their effort (``split``, ``device`` and the cache are the run
            level's business and are not used here).
        bound_k: the training k, for ``bound`` unless ``settings.bound_k`` is set.
        progress: show progress bars.

    Returns:
        ``{name: Estimate}``, with ``gap`` = iwsvi - bound per example when both are present and
        ``bdmc_lower``, ``bdmc_upper`` (and ``bdmc_iwsvi``) for ``bdmc``.
    """
    x = torch.as_tensor(x)
    if settings.max_examples is not None and settings.max_examples < len(x):  # else all of x: no copy
        x = x[torch.as_tensor(evenly_spaced(len(x), settings.max_examples))]
    compile_for(_latents_decoded(settings, x.shape[0], bound_k) >= LONG_EVALUATION_LATENTS)  # auto mode
    return _estimate(model, x, settings, settings.estimators, bound_k, progress)


def _estimate(model: LatentVariableModel, x: torch.Tensor, settings: EvaluationSettings, names: Sequence[str],
              bound_k: int | None, progress: bool, first_index: int = 0,
              done: Mapping[str, Estimate] | None = None) -> dict[str, Estimate]:
    """The estimators ``names`` on ``x``, in order, each given those computed so far (after ``done``)."""
    estimates = dict(done or {})
    for name in names:
        estimates.update(REGISTRY[name].single(model, x, settings, bound_k=bound_k, progress=progress,
                                               done=estimates, first_index=first_index))
    return estimates


# ----------------------------------------------------------------------------------------------
# Run level


def parse_estimators(text: str) -> tuple[str, ...]:
    """``"iwsvi, ais"`` -> ``("iwsvi", "ais")`` (checked where they are used)."""
    return tuple(e.strip() for e in text.split(",") if e.strip())


def evaluation_path(run_dir: str | os.PathLike[str], settings: EvaluationSettings) -> Path:
    """Where the evaluation of ``settings`` on a run is cached:
    ``RUN/evaluations/<split>-<short hash of the settings>.json``.
    """
    return Path(run_dir) / EVALUATIONS / f"{settings.split}-{settings.short_hash()}.json"


def stored_evaluation(run_dir: str | os.PathLike[str], settings: EvaluationSettings) -> dict[str, Any] | None:
    """The cached result of ``settings`` on this run, or None if absent, unreadable or stale
    (computed with other settings or from another checkpoint).

    A run folder without weights (a results folder committed or shared without them) keeps its
    evaluations: there is no checkpoint for them to be stale against.

    Args:
        run_dir: the run directory.
        settings: the settings the result must have been computed with (execution fields such as
            ``device`` and chunk sizes do not count).

    Returns:
        The evaluation record, as [`evaluate_run`][airvae.evaluation.evaluate_run] returns it, or None.
    """
    stored = _read_record(evaluation_path(run_dir, settings))
    if stored is None or stored.get("identity") != settings.identity():
        return None
    return stored if _of_checkpoint(stored, best_checkpoint_digest(run_dir)) else None


def current_evaluations(run_dir: str | os.PathLike[str]) -> list[tuple[Path, dict[str, Any]]]:
    """Every evaluation in ``RUN/evaluations/`` that
    [`stored_evaluation`][airvae.evaluation.stored_evaluation] returns for its own
    settings, with its file, by file name (each file read once, the checkpoint hashed once)."""
    paths = sorted((Path(run_dir) / EVALUATIONS).glob("*.json"))
    digest = best_checkpoint_digest(run_dir) if paths else None
    found = []
    for path in paths:
        stored = _read_record(path)
        if stored is None:  # unreadable
            continue
        try:
            settings = EvaluationSettings.from_dict(stored["settings"])
        except (ValueError, KeyError, TypeError):  # unreadable, or not an evaluation record
            continue
        if (evaluation_path(run_dir, settings) == path and stored.get("identity") == settings.identity()
                and _of_checkpoint(stored, digest)):
            found.append((path, stored))
    return found


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


def _of_checkpoint(stored: dict[str, Any], digest: str | None) -> bool:
    """Whether a record was computed from the checkpoint whose sha256 is ``digest`` (None: the run
    has no weights, so nothing makes the record stale)."""
    return digest is None or stored.get("checkpoint_sha256") == digest


def evaluate_run(run_dir: str | os.PathLike[str], settings: EvaluationSettings, *, recompute: bool = False,
                 progress: bool = True, allow_data_change: bool = False,
                 model: LatentVariableModel | None = None) -> dict[str, Any]:
    """Evaluate the best checkpoint of a training run on ``settings.split`` and cache the result in
    ``RUN/evaluations/<split>-<hash of settings>.json``; a cached result with the same settings,
    checkpoint and data is returned without computing.

    The device, the memory the settings need and that the result can be written are checked before
    any work. A new result is also sent to the run's tracking sinks, if any ([`airvae.tracking`][]).
    The work is saved every ``settings.part_examples`` examples ([`partial_path`][airvae.evaluation.partial_path]),
    so an interrupted evaluation resumes after its last saved part.

    Args:
        run_dir: the run directory (a run inside an extracted bundle works too).
        settings: what to estimate and how hard.
        recompute: compute even when a cached result (or saved parts of one) exists.
        progress: show progress bars.
        allow_data_change: score data that changed since the run was trained (its marker records the
            digest), recording the new digest; refused otherwise.
        model (LatentVariableModel | None): for a run of a researcher's own model
            ([`airvae.fit.fit`][]), an untrained instance to load its weights into
            ([`airvae.runs.load_trained_model`][]); None for airvae's own models.

    Returns:
        The evaluation record: dataset, split, ``n`` (examples evaluated) of ``n_split``, the
        settings, the checkpoint's and the data's sha256, and ``estimates`` (name -> the
        [`Estimate.to_dict`][airvae.estimators.Estimate.to_dict] summary with per-example values).

    Raises:
        RunError: the run cannot be used as asked: not an airvae run, no best checkpoint yet, a
            corrupt file, changed data without ``allow_data_change``, or a model of your own without
            ``model``.
    """

    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    dataset: Dataset | None
    try:
        dataset = load_dataset(cfg.dataset, cfg.data_dir, progress=progress)
    except DatasetError:
        dataset = None  # a cached result can still be shown; computing one names the problem below
    data_digest = check_run_data(run_dir, cfg, dataset, allow_data_change) if dataset is not None else None
    if not recompute:
        stored = stored_evaluation(run_dir, settings)
        if stored is not None and (data_digest is None or stored.get("data_sha256") in (None, data_digest)):
            return stored
    if dataset is None:
        dataset = load_dataset(cfg.dataset, cfg.data_dir, progress=progress)  # raises, naming what is missing
    started = time.perf_counter()
    device = resolve_device(settings.device)
    check_writable(run_dir / EVALUATIONS, run_dir)
    cfg, model, digest, dataset, x, n_split = load_best_examples(run_dir, settings.split, settings.max_examples, device,
                                                         progress, settings, dataset, model)
    progress_file = partial_path(run_dir, settings)
    saved = _Progress(progress_file, run_dir, {"identity": settings.identity(), "checkpoint_sha256": digest,
                                               "data_sha256": data_digest, "n": x.shape[0]}, resume=not recompute)
    estimates = _evaluate_in_parts(model, x, settings, cfg.k, progress, saved)
    result = store_evaluation(run_dir, settings, cfg, dataset, estimates, n=x.shape[0], n_split=n_split,
                              device=device, digest=digest, data_digest=data_digest,
                              seconds=saved.earlier_seconds + time.perf_counter() - started)
    progress_file.unlink(missing_ok=True)  # (a link there is removed, never followed)
    return result


def partial_path(run_dir: str | os.PathLike[str], settings: EvaluationSettings) -> Path:
    """Where [`evaluate_run`][airvae.evaluation.evaluate_run] keeps the parts of an unfinished evaluation:
    beside its record, ``RUN/evaluations/<split>-<hash>.partial`` (removed once the record is written)."""
    return evaluation_path(run_dir, settings).with_suffix(".partial")


class _Progress:
    """The saved parts of one run's evaluation: read back when they were computed from the same
    settings, checkpoint and data (``key``), else started afresh; saved atomically after each part."""

    def __init__(self, path: Path, root: Path, key: dict[str, Any], resume: bool) -> None:
        self.path, self.root, self.key = path, root, key
        stored = _read_record(path) if resume else None
        parts = stored.get("parts") if stored is not None and stored.get("key") == key else None
        self.parts: list[dict[str, Any]] = parts if isinstance(parts, list) else []
        try:  # anything unreadable or inconsistent in them: start afresh
            self.done = [{name: Estimate.from_dict(d) for name, d in part["estimates"].items()} for part in self.parts]
            bounds = [(int(part["start"]), int(part["stop"])) for part in self.parts]
            if bounds and (bounds[0][0] != 0 or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:], strict=False))
                           or any(est.values.numel() != stop - start for (start, stop), estimates
                                  in zip(bounds, self.done, strict=True) for est in estimates.values())
                           or len({tuple(estimates) for estimates in self.done}) != 1):
                raise ValueError("parts that do not follow one another")
            self.stop = bounds[-1][1] if bounds else 0
            self.earlier_seconds = math.fsum(float(part["seconds"]) for part in self.parts)
        except (KeyError, TypeError, ValueError, AttributeError):
            self.parts, self.done, self.stop, self.earlier_seconds = [], [], 0, 0.0

    def add(self, start: int, stop: int, estimates: dict[str, Estimate], seconds: float) -> None:
        self.parts.append({"start": start, "stop": stop, "seconds": seconds,
                           "estimates": {name: est.to_dict() for name, est in estimates.items()}})
        self.done.append(estimates)
        self.stop = stop
        write_json(self.path, {"key": self.key, "parts": self.parts}, self.root)


def _evaluate_in_parts(model: LatentVariableModel, x: torch.Tensor, settings: EvaluationSettings,
                       bound_k: int | None, progress: bool, saved: _Progress) -> dict[str, Estimate]:
    """[`evaluate_model`][airvae.evaluation.evaluate_model]'s estimates, computed ``settings.part_examples``
    examples at a time from where ``saved`` stopped and saved after each part. The per-example
    estimators' parts are joined ([`Estimate.concat`][airvae.estimators.Estimate.concat]); the others
    (``bdmc``, on data of its own) run once, at the end."""
    n = x.shape[0]
    compile_for(_latents_decoded(settings, n, bound_k) >= LONG_EVALUATION_LATENTS)  # auto mode, on the whole
    per_example = [name for name in settings.estimators if REGISTRY[name].per_example]
    size = settings.part_examples or (settings.svi_chunk_examples if x.device.type == "cuda" else DEFAULT_PART_EXAMPLES)
    if per_example:
        with tqdm(total=n, initial=saved.stop, desc="evaluation", unit="ex", leave=False,
                  disable=not progress or n <= size) as bar:
            for start in range(saved.stop, n, size):
                stop = min(start + size, n)
                began = time.perf_counter()
                part = _estimate(model, x[start:stop], settings, per_example, bound_k, progress, first_index=start)
                saved.add(start, stop, part, time.perf_counter() - began)
                bar.update(stop - start)
    joined = {name: Estimate.concat([part[name] for part in saved.done]) for name in saved.done[0]} if per_example else {}
    rest = [name for name in settings.estimators if not REGISTRY[name].per_example]
    return _estimate(model, x, settings, rest, bound_k, progress, done=joined)


def check_run_data(run_dir: Path, cfg: RunConfig | FitConfig, dataset: Dataset, allow_data_change: bool = False) -> str:
    """The digest of ``dataset`` ([`airvae.data.dataset_digest`][]), after checking that it is the
    data the run was trained on (its marker's record) unless ``allow_data_change``, and that its
    examples fit the run's model."""

    if dataset.dim != cfg.x_dim:
        raise RunError(f"cannot use {run_dir}: dataset {cfg.dataset!r} now has {dataset.dim} values per example, "
                       f"the run's model takes {cfg.x_dim}; use the data it was trained on")
    digest = dataset_digest(dataset)
    recorded = (read_marker(run_dir) or {}).get("data_sha256")
    if recorded is not None and recorded != digest and not allow_data_change:
        raise RunError(f"cannot evaluate {run_dir}: its data changed since the run was trained (sha256 "
                       f"{recorded[:12]}... then, {digest[:12]}... now); evaluate on the original data, or pass "
                       "--allow-data-change to score the model on the new data")
    return digest


def store_evaluation(run_dir: Path, settings: EvaluationSettings, cfg: RunConfig | FitConfig, dataset: Dataset,
                     estimates: dict[str, Estimate], *, n: int, n_split: int, device: torch.device, digest: str,
                     seconds: float, data_digest: str | None = None) -> dict[str, Any]:
    """Write (and return) a run's evaluation record, keyed by the settings and by ``digest``, the
    sha256 of the checkpoint bytes that were evaluated (even if best.pt changed meanwhile)."""
    result = {
        "format": FORMAT_VERSION,
        "run_dir": str(run_dir),
        "dataset": cfg.dataset,
        "deviation": getattr(dataset, "deviation", None),
        "split": settings.split,
        "n": int(n),
        "n_split": int(n_split),
        "bound_k": settings.bound_k or cfg.k,
        "device": str(device),
        "settings": settings.to_dict(),
        "identity": settings.identity(),
        "checkpoint_sha256": digest,
        "data_sha256": data_digest,
        "estimates": {name: est.to_dict() for name, est in estimates.items()},
        "seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = evaluation_path(run_dir, settings)
    replaced = _read_record(path)
    write_json(path, result, run_dir)
    # --recompute of the same settings and weights: the sinks hold it already
    if replaced is None or replaced.get("identity") != result["identity"] or not _of_checkpoint(replaced, digest):
        # to the run's TensorBoard/MLflow/W&B sinks, if it has any (W&B is rebuilt with all current evaluations)
        log_evaluation(run_dir, path, result, lambda: current_evaluations(run_dir))
    return result


def load_best_examples(run_dir: str | os.PathLike[str], split: str, max_examples: int | None, device: torch.device,
               progress: bool, settings: EvaluationSettings | None = None, dataset: Dataset | None = None,
               model: LatentVariableModel | None = None,
               ) -> tuple[RunConfig | FitConfig, LatentVariableModel, str, Dataset, torch.Tensor, int]:
    """The run's best checkpoint and ``max_examples`` examples of ``split`` (evenly spread) on ``device``:
    (config, model, checkpoint sha256, dataset, x, size of the whole split), for
    [`evaluate_run`][airvae.evaluation.evaluate_run] and [`airvae.iwsvi_study.run_study`][]. With
    ``settings``, the memory they need is checked before the model is loaded."""

    cfg = load_config(run_dir)
    if dataset is None:
        dataset = load_dataset(cfg.dataset, getattr(cfg, "data_dir", None), progress=progress)
    x = dataset.split(split)
    n_split = len(x)
    x = x[evenly_spaced(n_split, max_examples)]
    if settings is not None and isinstance(cfg, RunConfig):  # a model of the user's own: sizes unknown
        check_fits(evaluation_memory(cfg, settings, len(x)), device,
                   "lower --k, --svi-k, --svi-l, --ais-chains, --chunk-samples or --max-examples")
    cfg, model, digest = load_trained_model_with_digest(run_dir, which="best", device=device, model=model)
    return cfg, model, digest, dataset, torch.as_tensor(x).to(device=device, dtype=torch.float32), n_split


# ----------------------------------------------------------------------------------------------
# Printing


def _as_summary(est: Estimate | dict[str, Any]) -> dict[str, Any]:
    return est.to_dict(per_example=False) if isinstance(est, Estimate) else est


def _label(name: str, est: dict[str, Any]) -> tuple[str, float]:
    """Row label and sign: the paper reports positive nats (-ln p(x), Delta_inf, -L_k)."""
    s = est.get("settings", {})
    if name == "iwsvi":
        return f"-ln p(x)  IW-SVI (k={s.get('k')}, l={s.get('l')}, T={s.get('steps')})", -1.0
    if name == "ais":
        return f"-ln p(x)  AIS (T={s.get('num_intermediate')}, {s.get('chains')} chains)", -1.0
    if name == "iwae":
        return f"-L_{s.get('k')}(x)  IWAE-{s.get('k')} (encoder q)", -1.0
    if name == "bound":
        return f"-L_{s.get('k')}(x)  amortized bound", -1.0
    if name == "gap":
        return "Δinf = ln p(x) - L_k(x)", 1.0
    if name in ("bdmc_lower", "bdmc_upper"):
        side, method = ("≤", "forward") if name == "bdmc_lower" else ("≥", "reverse")
        return f"-ln p(x) {side} BDMC {method} AIS (T={s.get('num_intermediate')}, simulated data)", -1.0
    if name == "bdmc_iwsvi":
        return f"-ln p(x)  IW-SVI (k={s.get('k')}, T={s.get('steps')}) on the BDMC simulated data", -1.0
    return name, 1.0


def format_table(result: Mapping[str, Any]) -> str:
    """A text table, estimator | mean | ± stderr | bits/dim | n | seconds, in the paper's sign
    convention; bits/dim is the mean over (data dimensions x ln 2), exact for discrete likelihoods.

    ``result``: what [`evaluate_run`][airvae.evaluation.evaluate_run] returns, or
    [`evaluate_model`][airvae.evaluation.evaluate_model]'s ``{name: Estimate}``.
    """
    estimates = result.get("estimates", result)
    rows = []
    for name in [e for e in ESTIMATORS if e in estimates] + [e for e in estimates if e not in ESTIMATORS]:
        est = _as_summary(estimates[name])
        label, sign = _label(name, est)
        se, dims = est.get("stderr", float("nan")), est.get("dims")
        bits = "" if not dims else f"{bits_per_dim(-sign * est['mean'], dims):.4f}"
        rows.append((label, f"{sign * est['mean']:.2f}", "" if se is None or math.isnan(se) else f"± {se:.2f}",
                     bits, str(est.get("n", "")), f"{est.get('seconds', 0.0):.1f}"))
    header = ("estimator", "mean (nats)", "± stderr", "bits/dim", "n", "seconds")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    title = []
    if "dataset" in result:
        title.append(f"{result['dataset']} / {result.get('split')} ({result.get('n')} of {result.get('n_split')} "
                     f"examples), training k = {result.get('bound_k')}")
    if result.get("deviation"):
        title.append(f"data deviation: {result['deviation']}")
    out = title + [line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
    return "\n".join(out)
