"""Run-level evaluation: the estimators of :mod:`airvae.estimators` applied to a trained run.

* :class:`EvaluationSettings` -- what to estimate and how hard (appendix C's values by default:
  IWAE-5000, IW-SVI with k = 5000, l = 8, T = 3000);
* :func:`evaluate_model` -- library call on any model (:class:`airvae.model.LatentVariableModel`)
  and data;
* :func:`evaluate_run` -- loads ``RUN/checkpoints/best.pt`` (in a bundle's run, its
  ``best.safetensors``), evaluates a split and caches the result as
  ``RUN/evaluations/<split>-<hash>.json`` (:func:`stored_evaluation` reads it back), and sends it
  to the run's tracking sinks, if any (:mod:`airvae.tracking`);
* :func:`format_table` -- the paper's sign convention: -ln p(x), Delta_inf, -L_k (Table 1);
* :func:`iwsvi_vs_iwae_study` / :func:`run_study` -- appendix C's Figure 3 (IW-SVI vs IWAE-k).

``airvae.runs`` and ``airvae.data`` are imported inside the functions that need them, so this
module and the model-level functions work without them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .config import MAX_SAMPLES, MAX_SEED, RunConfig, check_device_name, check_int, is_int, is_real, require
from .data import evenly_spaced
from .runs import EVALUATIONS, RunError, best_checkpoint_digest, check_writable, save_figure, write_json
from .tracking import log_evaluation
from .estimators import (DEFAULT_AIS_CHUNK_EXAMPLES, DEFAULT_CHUNK_SAMPLES, DEFAULT_SVI_CHUNK_EXAMPLES,
                         DEFAULT_SVI_LR, DEFAULT_SVI_LR_DECAY, REGISTRY, Estimate, fit_iw_svi, frozen,
                         iw_svi_log_likelihood, iwae_given_q, iwae_log_likelihood, resolve_device)
from .likelihoods import bits_per_dim
from .model import LONG_EVALUATION_LATENTS, compile_for

MAX_STEPS = 10**6  # IW-SVI steps, AIS distributions and chains, simulated examples, repeats
ESTIMATORS = tuple(REGISTRY)  # the names an evaluation may choose, in canonical order
SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 2  # 2: max_examples spreads the examples over the split (1 took the first ones)
# Fields that change how the work is done, not what is estimated: left out of the cache key.
# (Chunking does not change results; a CUDA run draws from CUDA generators, a different but
# equally valid stream, so a result computed on one device is reused on another.)
_EXECUTION_FIELDS = ("device", "chunk_samples", "svi_chunk_examples", "ais_chunk_examples")


def _is_pos_float(value) -> bool:
    return is_real(value) and math.isfinite(value) and value > 0


@dataclass
class EvaluationSettings:
    """What :func:`evaluate_run` estimates, on which split, with how much effort.

    ``estimators``: any of ``bound`` (the training bound L_k with the encoder, k = the run's k
    unless ``bound_k``), ``iwae`` (IWAE-``k_iwae`` with the encoder, eq. 40), ``iwsvi`` (eq. 41-42),
    ``ais``, ``gap`` (Delta_inf = ln p(x) [IW-SVI] - L_k; needs bound and iwsvi, and is always
    added when both are present since it costs nothing), ``bdmc`` (the sandwich lower <= ln p(x)
    <= upper on ``bdmc_examples`` examples simulated from the model, with the ``ais_*`` settings;
    together with ``iwsvi``, IW-SVI is also run on those examples, so its slack there is known).
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

    def __post_init__(self):
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["estimators"] = list(self.estimators)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EvaluationSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown evaluation settings {', '.join(unknown)}: allowed {', '.join(sorted(known))}")
        return cls(**{**d, "estimators": tuple(d.get("estimators", cls.estimators))})

    def identity(self) -> dict:
        """The settings that determine the result (the cache key). ``bdmc_examples`` counts only
        when ``bdmc`` is chosen."""
        return {"format": FORMAT_VERSION,
                **{k: v for k, v in self.to_dict().items()
                   if k not in _EXECUTION_FIELDS and (k != "bdmc_examples" or "bdmc" in self.estimators)}}

    def short_hash(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------
# Model level


def _latents_decoded(settings: EvaluationSettings, n: int, bound_k: int | None) -> int:
    """Roughly how many latents the decoder will see: the size of an evaluation."""
    return sum(REGISTRY[name].cost(settings, n, bound_k) for name in settings.estimators)


def evaluate_model(model, x, settings: EvaluationSettings, bound_k: int | None = None,
                   progress: bool = False) -> dict[str, Estimate]:
    """Every estimator of ``settings`` on the examples ``x`` (``max_examples`` of them, spread
    evenly: :func:`airvae.data.evenly_spaced`), on the model's device, in canonical order (each
    estimator's single-model call, :data:`airvae.estimators.REGISTRY`). Returns ``{name: Estimate}``,
    with ``gap`` = iwsvi - bound per example when both are present and ``bdmc_lower``,
    ``bdmc_upper`` (and ``bdmc_iwsvi``) for ``bdmc``. ``bound_k`` (the training k) is needed for
    ``bound`` unless ``settings.bound_k`` is set."""
    x = torch.as_tensor(x)
    if settings.max_examples is not None and settings.max_examples < len(x):  # else all of x: no copy
        x = x[torch.as_tensor(evenly_spaced(len(x), settings.max_examples))]
    compile_for(_latents_decoded(settings, x.shape[0], bound_k) >= LONG_EVALUATION_LATENTS)  # auto mode
    estimates: dict[str, Estimate] = {}
    for name in settings.estimators:
        estimates.update(REGISTRY[name].single(model, x, settings, bound_k=bound_k, progress=progress,
                                               done=estimates))
    return estimates


# ----------------------------------------------------------------------------------------------
# Run level


def parse_estimators(text: str) -> tuple[str, ...]:
    """``"iwsvi, ais"`` -> ``("iwsvi", "ais")`` (checked where they are used)."""
    return tuple(e.strip() for e in text.split(",") if e.strip())


def evaluation_path(run_dir: str | os.PathLike, settings: EvaluationSettings) -> Path:
    return Path(run_dir) / EVALUATIONS / f"{settings.split}-{settings.short_hash()}.json"


def stored_evaluation(run_dir: str | os.PathLike, settings: EvaluationSettings) -> dict | None:
    """The cached result of ``settings`` on this run, or None if absent, unreadable or stale
    (computed with other settings or from another checkpoint). A run folder without weights (a
    results folder committed or shared without them) keeps its evaluations: there is no checkpoint
    for them to be stale against."""
    stored = _read_record(evaluation_path(run_dir, settings))
    if stored is None or stored.get("identity") != settings.identity():
        return None
    return stored if _of_checkpoint(stored, best_checkpoint_digest(run_dir)) else None


def current_evaluations(run_dir: str | os.PathLike) -> list[tuple[Path, dict]]:
    """Every evaluation in ``RUN/evaluations/`` that :func:`stored_evaluation` returns for its own
    settings, with its file, by file name (each file read once, the checkpoint hashed once)."""
    paths = sorted((Path(run_dir) / EVALUATIONS).glob("*.json"))
    digest = best_checkpoint_digest(run_dir) if paths else None
    found = []
    for path in paths:
        stored = _read_record(path)
        try:
            settings = EvaluationSettings.from_dict(stored["settings"])
        except (ValueError, KeyError, TypeError):  # unreadable, or not an evaluation record
            continue
        if (evaluation_path(run_dir, settings) == path and stored.get("identity") == settings.identity()
                and _of_checkpoint(stored, digest)):
            found.append((path, stored))
    return found


def _read_record(path: Path) -> dict | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


def _of_checkpoint(stored: dict, digest: str | None) -> bool:
    """Whether a record was computed from the checkpoint whose sha256 is ``digest`` (None: the run
    has no weights, so nothing makes the record stale)."""
    return digest is None or stored.get("checkpoint_sha256") == digest


def evaluate_run(run_dir: str | os.PathLike, settings: EvaluationSettings, *, recompute: bool = False,
                 progress: bool = True, allow_data_change: bool = False, model=None) -> dict:
    """Evaluate the best checkpoint of a training run on ``settings.split`` and cache the result
    in ``RUN/evaluations/<split>-<hash of settings>.json``; a cached result with the same
    settings, checkpoint and data is returned without computing unless ``recompute``.

    Data that changed since the run was trained (its marker records the digest) is refused unless
    ``allow_data_change``; then the evaluation scores the new data and records its digest. The
    device, the memory the settings need and that the result can be written are checked before
    any work. ``model``: for a run of a researcher's own model (:func:`airvae.fit.fit`), an untrained
    instance to load its weights into (:func:`airvae.runs.load_trained_model`)."""
    from .data import DatasetError, load_dataset
    from .runs import load_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
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
    cfg, model, digest, dataset, x, n_split = _load_best(run_dir, settings.split, settings.max_examples, device,
                                                         progress, settings, dataset, model)
    estimates = evaluate_model(model, x, settings, bound_k=cfg.k, progress=progress)
    return store_evaluation(run_dir, settings, cfg, dataset, estimates, n=x.shape[0], n_split=n_split, device=device,
                            digest=digest, seconds=time.perf_counter() - started, data_digest=data_digest)


def check_run_data(run_dir: Path, cfg, dataset, allow_data_change: bool = False) -> str:
    """The digest of ``dataset`` (:func:`airvae.data.dataset_digest`), after checking that it is the
    data the run was trained on (its marker's record) unless ``allow_data_change``, and that its
    examples fit the run's model."""
    from .data import dataset_digest
    from .runs import read_marker

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


def store_evaluation(run_dir, settings: EvaluationSettings, cfg, dataset, estimates: dict[str, Estimate], *, n: int,
                     n_split: int, device, digest: str, seconds: float, data_digest: str | None = None) -> dict:
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


def _load_best(run_dir, split: str, max_examples: int | None, device: torch.device, progress: bool,
               settings: EvaluationSettings | None = None, dataset=None, model=None):
    """The run's best checkpoint and ``max_examples`` examples of ``split`` (evenly spread) on ``device``:
    (config, model, checkpoint sha256, dataset, x, size of the whole split). With ``settings``,
    the memory they need is checked before the model is loaded."""
    from .data import load_dataset
    from .resources import check_fits, evaluation_memory
    from .runs import load_config, load_trained_model_with_digest

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


def _as_summary(est) -> dict:
    return est.to_dict(per_example=False) if isinstance(est, Estimate) else est


def _label(name: str, est: dict) -> tuple[str, float]:
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


def format_table(result: dict) -> str:
    """A text table, estimator | mean | ± stderr | bits/dim | n | seconds, in the paper's sign
    convention; bits/dim is the mean over (data dimensions x ln 2), exact for discrete likelihoods.

    ``result``: what :func:`evaluate_run` returns, or :func:`evaluate_model`'s ``{name: Estimate}``.
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
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    title = []
    if "dataset" in result:
        title.append(f"{result['dataset']} / {result.get('split')} ({result.get('n')} of {result.get('n_split')} "
                     f"examples), training k = {result.get('bound_k')}")
    if result.get("deviation"):
        title.append(f"data deviation: {result['deviation']}")
    out = title + [line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Figure 3: IW-SVI versus IWAE-k


def iwsvi_vs_iwae_study(model, x, *, ks=(1, 10, 100, 1000, 5000), steps_list=(0, 10, 30, 100, 300, 1000),
                        fixed_steps: int = 1000, svi_k: int = 5000, l: int = 8,  # noqa: E741
                        lr: float = DEFAULT_SVI_LR, lr_decay: float = DEFAULT_SVI_LR_DECAY, seed: int = 0,
                        chunk_samples: int = DEFAULT_CHUNK_SAMPLES,
                        chunk_examples: int = DEFAULT_SVI_CHUNK_EXAMPLES, out_dir=None,
                        progress: bool = False) -> dict:
    """Appendix C's Figure 3 for one model on examples ``x``:
    (a) mean estimate vs wall time, IWAE-k over ``ks`` and IW-SVI(k=``svi_k``) over ``steps_list``;
    (b) IWAE-k vs IW-SVI(T=``fixed_steps``) over ``ks``; (c) IW-SVI(k=``svi_k``) over ``steps_list``.

    Defaults take minutes on a laptop for ~100 examples; the paper's are ks up to 100000,
    T up to 3000 and fixed_steps=3000. Each IW-SVI point over T is its own optimization (the
    learning-rate decay depends on T); for (b) the q fitted with ``fixed_steps`` is scored with
    every k, which is exactly what separate runs would give (the optimization's random stream
    does not depend on k). Writes ``figure3.png`` and ``figure3.json`` to ``out_dir`` if given.
    """
    x = torch.as_tensor(x)
    ks, steps_list = sorted(set(int(k) for k in ks)), sorted(set(int(t) for t in steps_list))
    svi_kw = dict(l=l, lr=lr, lr_decay=lr_decay, seed=seed, chunk_examples=chunk_examples, progress=progress)

    def point(est: Estimate, **extra) -> dict:
        return {**extra, "mean": est.mean, "stderr": est.stderr, "seconds": est.seconds}

    iwae = [point(iwae_log_likelihood(model, x, k, seed=seed, chunk_samples=chunk_samples, progress=progress), k=k)
            for k in ks]
    svi_over_t = [point(iw_svi_log_likelihood(model, x, k=svi_k, steps=t, chunk_samples=chunk_samples, **svi_kw),
                        steps=t, k=svi_k) for t in steps_list]
    started = time.perf_counter()
    mean, std = fit_iw_svi(model, x, steps=fixed_steps, **svi_kw)
    fit_seconds = time.perf_counter() - started
    svi_over_k = []
    with frozen(model):
        xd = x.to(device=mean.device, dtype=torch.float32)
        for k in ks:
            started = time.perf_counter()
            values = iwae_given_q(model, xd, mean, std, k, seed=seed, chunk_samples=chunk_samples)
            est = Estimate(f"iwsvi-{k}", values, seconds=fit_seconds + time.perf_counter() - started)
            svi_over_k.append(point(est, k=k, steps=fixed_steps))
    data = {"n": int(x.shape[0]), "l": l, "lr": lr, "lr_decay": lr_decay, "seed": seed, "svi_k": svi_k,
            "fixed_steps": fixed_steps, "iwae": iwae, "iwsvi_over_steps": svi_over_t, "iwsvi_over_k": svi_over_k}
    if out_dir is not None:
        _write_figure3(data, Path(out_dir))
    return data


def _write_figure3(data: dict, out_dir: Path) -> None:
    """figure3.json and figure3.png in ``out_dir``; their paths are added to ``data["files"]``."""
    write_json(out_dir / "figure3.json", data, out_dir)
    _plot_figure3(data, out_dir / "figure3.png")
    data["files"] = [str(out_dir / "figure3.png"), str(out_dir / "figure3.json")]


def _plot_figure3(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # No error bars: the stderr over examples (kept in figure3.json) is dominated by how much
    # ln p(x) varies between examples, which is common to every curve and hides their differences.
    def series(ax, points, xkey, label, marker):
        ax.plot([p[xkey] for p in points], [p["mean"] for p in points], marker=marker, label=label)

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    series(a, data["iwae"], "seconds", "IWAE-k (k varies)", "o")
    series(a, data["iwsvi_over_steps"], "seconds", f"IW-SVI k={data['svi_k']}, l={data['l']} (T varies)", "s")
    a.set_xscale("log")
    a.set_xlabel("wall time (s)")
    a.set_title("(a) estimate vs computation time")
    series(b, data["iwae"], "k", "IWAE-k", "o")
    series(b, data["iwsvi_over_k"], "k", f"IW-SVI (T={data['fixed_steps']})", "s")
    b.set_xscale("log")
    b.set_xlabel("importance samples k")
    b.set_title("(b) IWAE-k vs IW-SVI over k")
    series(c, data["iwsvi_over_steps"], "steps", f"IW-SVI (k={data['svi_k']})", "s")
    c.set_xscale("symlog", linthresh=1.0)
    c.set_xlabel("gradient steps T")
    c.set_title("(c) IW-SVI over T")
    for ax in (a, b, c):
        ax.set_ylabel(f"mean ln p(x) estimate (nats, n={data['n']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, path.parent)
    plt.close(fig)


def run_study(run_dir: str | os.PathLike, *, split: str = "test", max_examples: int | None = 100,
              device: str = "auto", out_dir: str | os.PathLike | None = None, progress: bool = True,
              **study_kwargs) -> dict:
    """:func:`iwsvi_vs_iwae_study` on a run's best checkpoint and ``max_examples`` (evenly spread)
    examples of ``split``; files go to ``out_dir`` (default ``RUN/evaluations/``)."""
    require(split in SPLITS, "split", split, " | ".join(SPLITS))
    require(max_examples is None or (is_int(max_examples) and max_examples >= 1), "max_examples", max_examples,
           "an integer >= 1, or None for the whole split")
    cfg, model, _, _, x, _ = _load_best(run_dir, split, max_examples, resolve_device(device), progress)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / EVALUATIONS
    data = iwsvi_vs_iwae_study(model, x, progress=progress, **study_kwargs)
    data.update(dataset=cfg.dataset, split=split, run_dir=str(run_dir))
    _write_figure3(data, out_dir)
    return data
