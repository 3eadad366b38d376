"""A stacked group's estimates: IWAE-k and IW-SVI of every run at once, and the evaluation of runs
that share an architecture as one group, exactly what evaluating each alone gives."""

from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path

import torch
from torch.func import vmap

from ..config import RunConfig
from ..data import evenly_spaced, load_dataset
from ..devices import accumulator_dtype, resolve_device
from ..estimators import (
    DEFAULT_CHUNK_SAMPLES,
    DEFAULT_SVI_CHUNK_EXAMPLES,
    REGISTRY,
    STREAM_SVI,
    StepNoise,
    chunked_iwae,
    data_dims,
    example_generator,
    fit_gaussian_q,
)
from ..estimators.registry import StackedRuns
from ..evaluation import check_run_data, store_evaluation
from ..model import log_weights_from_eps
from ..resources import check_fits, evaluation_memory
from ..runs import load_config, load_trained_model_with_digest
from .group import StackedModel


def _stacked_log_weights(group: StackedModel):
    """log w for each run from its own decoder: (params [S], x [b, ...] shared, mean, std [S, b, z],
    eps [S, m, k, b, z]) -> [S, m, k, b]; the single-run path (model.log_weights_from_eps), vmapped."""

    def one_run(p, x, mean, std, eps):
        _, dec, lik = group.bind(p)
        return log_weights_from_eps(dec, lik, x, mean, std, eps)

    return vmap(one_run, in_dims=(0, None, 0, 0, 0))


def _encode_stacked(group: StackedModel, params: dict, x: torch.Tensor, batch: int = 4096):
    """Each run's clean encoder on ``x``: (mean, std), each [S, n, z]."""
    means, stds = [], []
    encode = vmap(lambda p, chunk: group.bind(p)[0](chunk), in_dims=(0, None))
    for start in range(0, x.shape[0], batch):
        mean, std = encode(params, x[start:start + batch])
        means.append(mean)
        stds.append(std)
    return torch.cat(means, 1), torch.cat(stds, 1)


@torch.no_grad()
def stacked_iwae(group: StackedModel, rows: list[int], x: torch.Tensor, k: int, seeds: list[int],
                 chunk_samples: int = DEFAULT_CHUNK_SAMPLES, q: tuple[torch.Tensor, torch.Tensor] | None = None,
                 repeats: int = 1) -> torch.Tensor:
    """Per-example IWAE-k of the runs ``rows``, averaged over ``repeats`` sets of k samples: what
    [`airvae.estimators.iwae_given_q`][] gives each run alone, up to float rounding (runs that share a
    seed share their draws).

    Args:
        group: the stacked runs.
        rows: the runs to score (S of them).
        x: the examples, ``[n, ...]``, shared by the runs.
        k: importance samples per set.
        seeds: per run, the seed of its per-example streams.
        chunk_samples: latents decoded at once (no effect on the result).
        q: the proposal, ``(mean, std)`` each ``[S, n, z]``; None: each run's clean encoder.
        repeats: independent sets of k samples, averaged.

    Returns:
        ``[S, n]``, float64 (float32 on MPS).
    """
    params = group.runs(rows)
    means, stds = q if q is not None else _encode_stacked(group, params, x)
    n, z_dim = x.shape[0], means.shape[-1]
    per_chunk = max(1, chunk_samples // k)
    k_chunk = min(k, chunk_samples)
    log_weights = _stacked_log_weights(group)
    values = torch.empty(len(rows), n, dtype=accumulator_dtype(x.device), device=x.device)
    for start in range(0, n, per_chunk):
        xb = x[start:start + per_chunk]
        b = xb.shape[0]
        generators = {seed: [example_generator(seed, start + i, x.device) for i in range(b)]
                      for seed in sorted(set(seeds[r] for r in rows))}

        def draw(generators=generators):  # [S, k, b, z]
            draws = {seed: torch.stack([torch.randn(k, z_dim, generator=g, device=x.device, dtype=x.dtype)
                                        for g in gens], dim=1) for seed, gens in generators.items()}  # [k, b, z]
            return torch.stack([draws[seeds[r]] for r in rows])

        def run_log_weights(eps, xb=xb, start=start, b=b):  # [S, kc, b]
            return log_weights(params, xb, means[:, start:start + b], stds[:, start:start + b], eps.unsqueeze(1))[:, 0]

        values[:, start:start + b] = chunked_iwae(run_log_weights, draw, k, k_chunk, repeats, (len(rows), b), x.device)
    return values


def stacked_fit_iw_svi(group: StackedModel, rows: list[int], x: torch.Tensor, *, l: int, steps: int,  # noqa: E741
                       lr: float, lr_decay: float, seed: int,
                       chunk_examples: int = DEFAULT_SVI_CHUNK_EXAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """q*_{x,l} of eq. 42 for every example and run, as [`airvae.estimators.fit_iw_svi`][] fits it for
    each run alone (same initialization from the encoder, Adam, learning-rate decay and random
    streams, which all runs share), one batched parameter tensor for all runs.

    Args:
        group: the stacked runs.
        rows: the runs (S of them).
        x: the examples, ``[n, ...]``.
        l: importance samples of the bound optimized.
        steps: Adam steps.
        lr: Adam's initial step size.
        lr_decay: the final learning rate as a fraction of ``lr``.
        seed: the seed of the examples' streams.
        chunk_examples: examples optimized at once (no effect on the result).

    Returns:
        ``(mean, std)``, each ``[S, n, z]``.
    """
    params = group.runs(rows)
    mean0, std0 = _encode_stacked(group, params, x)
    log_weights = _stacked_log_weights(group)
    means, stds = [], []
    for start in range(0, x.shape[0], chunk_examples):
        xb = x[start:start + chunk_examples]
        m0, s0 = mean0[:, start:start + chunk_examples], std0[:, start:start + chunk_examples]
        if steps == 0:
            means.append(m0)
            stds.append(s0)
            continue
        gens = [example_generator(seed, start + i, x.device, STREAM_SVI) for i in range(xb.shape[0])]
        noise = StepNoise(gens, (l, m0.shape[-1]), None, x.device, m0.dtype)

        def run_log_weights(mu, std, eps, xb=xb):  # eps [l, b, z] shared by the runs -> [S, l, b]
            return log_weights(params, xb, mu, std, eps.expand(len(rows), *eps.shape).unsqueeze(1))[:, 0]

        mu, std = fit_gaussian_q(m0, s0, run_log_weights, noise, steps=steps, lr=lr, lr_decay=lr_decay)
        means.append(mu)
        stds.append(std)
    return torch.cat(means, 1), torch.cat(stds, 1)


# What evaluate_group batches (the estimators with a stacked call); others run per run.
STACKED_ESTIMATORS = tuple(name for name, estimator in REGISTRY.items() if estimator.stacked is not None)


def evaluation_key(cfg: RunConfig, settings) -> str:
    """Runs with equal keys can be evaluated as one stacked model: the same data and model
    structure, and the same k for the amortized bound."""
    shared = cfg.to_json()
    return json.dumps({"architecture": shared["architecture"], "dataset": shared["dataset"], "x_dim": shared["x_dim"],
                       "wni": math.isfinite(cfg.regularizer.max_norm), "bound_k": settings.bound_k or cfg.k},
                      sort_keys=True)


def evaluate_group(run_dirs: list[Path], settings, *, progress: bool = False) -> list[dict]:
    """[`airvae.evaluation.evaluate_run`][] for runs that share an architecture (and training k),
    batched: every estimator of ``settings`` computed for all runs at once by its stacked call
    ([`REGISTRY`][airvae.estimators.registry.REGISTRY]), with the evaluation's random streams
    (``settings.seed``) shared by all, as they are when each run is evaluated alone.

    Args:
        run_dirs: the runs (same dataset, architecture, WNI or not, and bound k:
            [`evaluation_key`][airvae.stacked.evaluation_key]).
        settings (EvaluationSettings): the evaluation; its estimators a subset of
            [`STACKED_ESTIMATORS`][airvae.stacked.STACKED_ESTIMATORS].
        progress: show progress bars.

    Returns:
        Each run's evaluation record, exactly what ``evaluate_run`` writes.

    Raises:
        ValueError: an estimator the group does not batch, or runs that do not share a key.
    """

    if not set(settings.estimators) <= set(STACKED_ESTIMATORS):
        raise ValueError(f"evaluate_group batches {', '.join(STACKED_ESTIMATORS)} only, not {settings.estimators}")
    started = time.perf_counter()
    device = resolve_device(settings.device)
    cfgs: list[RunConfig] = []  # everything checked before models are loaded
    for run_dir in run_dirs:
        cfg = load_config(run_dir)
        if not isinstance(cfg, RunConfig):  # a FitConfig: a researcher's own model, which no group stacks
            raise ValueError(f"evaluate_group: {run_dir} trained a model of your own; evaluate it with evaluate_run")
        cfgs.append(cfg)
    if len({evaluation_key(cfg, settings) for cfg in cfgs}) != 1:
        raise ValueError("evaluate_group: the runs do not share a dataset, an architecture and a training k")
    dataset = load_dataset(cfgs[0].dataset, cfgs[0].data_dir, progress=progress)
    data_digests = [check_run_data(run_dir, cfg, dataset) for run_dir, cfg in zip(run_dirs, cfgs, strict=True)]
    split = dataset.split(settings.split)
    index = evenly_spaced(len(split), settings.max_examples)
    check_fits(evaluation_memory(cfgs[0], settings, len(index), runs=len(run_dirs)), device,
               "evaluate fewer runs at once, or lower --chunk-samples")
    loaded = [load_trained_model_with_digest(run_dir, "best", device) for run_dir in run_dirs]
    x = torch.as_tensor(split[index]).to(device=device, dtype=torch.float32)
    loaded[0][1].likelihood.validate(x)  # the data fits the likelihood, as evaluate_run checks
    group = StackedModel([model for _, model, _ in loaded], device)
    rows, seeds = list(range(len(run_dirs))), [settings.seed] * len(run_dirs)
    runs = StackedRuns(size=len(rows), dims=data_dims(loaded[0][1], x),
                       iwae=partial(stacked_iwae, group, rows, x, seeds=seeds, chunk_samples=settings.chunk_samples),
                       fit_iw_svi=partial(stacked_fit_iw_svi, group, rows, x))
    done: list[dict] = [{} for _ in rows]  # each run's estimates, in canonical order
    for name in settings.estimators:
        stacked = REGISTRY[name].stacked
        assert stacked is not None  # settings.estimators are among the STACKED_ESTIMATORS (checked above)
        for estimates, estimate in zip(done, stacked(runs, settings, cfgs[0].k, done), strict=True):
            estimates[name] = estimate
    return [store_evaluation(run_dir, settings, cfg, dataset, estimates, n=x.shape[0], n_split=len(split),
                             device=device, digest=digest, data_digest=data_digest,
                             seconds=(time.perf_counter() - started) / len(rows))
            for run_dir, (cfg, _, digest), data_digest, estimates in zip(run_dirs, loaded, data_digests, done, strict=True)]


