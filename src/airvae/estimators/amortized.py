"""IWAE-k scoring (appendix C, eq. 40-41), one function for every Gaussian q: the amortized
encoder's ([`iwae_log_likelihood`][airvae.estimators.iwae_log_likelihood], the model's own bound
[`amortized_bound`][airvae.estimators.amortized_bound]) and IW-SVI's fitted one (``airvae.estimators.iwsvi``).

Every log weight goes through the model's one log-weights path
([`airvae.model.log_weights_given_q`][]), with standard-normal draws from each example's
scoring stream (stream 0, [`airvae.estimators.common.example_generator`][airvae.estimators.example_generator]).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..devices import accumulator_dtype
from ..model import LatentVariableModel, log_weights_given_q
from .common import DEFAULT_CHUNK_SAMPLES, Estimate, as_input, check_k, data_dims, encode_all, example_generator, frozen


def log_weights_from_noise(model: LatentVariableModel, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                           eps: torch.Tensor) -> torch.Tensor:
    """log w of ``model`` with proposal q = N(mean, diag(std^2)) for given standard-normal draws: the
    model's log-weights path ([`log_weights_given_q`][airvae.model.log_weights_given_q]) with its own
    likelihood.

    Args:
        model: the model.
        x: the examples, ``[b, ...]``.
        mean: q's mean, ``[b, z]``.
        std: q's standard deviation, ``[b, z]``.
        eps: the draws, ``[k, b, z]``.

    Returns:
        ``[k, b]``.
    """
    return log_weights_given_q(model.decoder, x, mean, std, k=eps.shape[0], noise=eps, likelihood=model.likelihood)[0]


def chunked_iwae(log_weights: Callable[[torch.Tensor], torch.Tensor], draw: Callable[[], torch.Tensor], k: int,
                 k_chunk: int, repeats: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """IWAE-k of a batch of examples ``shape`` (``[b]``, or ``[S, b]`` for a stacked group's runs),
    averaged over ``repeats`` sets of k samples. ``draw()`` gives one set's standard-normal draws
    ``[..., k, b, z]`` (each example from its own stream), ``log_weights(eps)`` the log weights
    ``[..., kc, b]`` of a slice of them; the slices of ``k_chunk`` samples are merged with a running
    logsumexp, in float64 (float32 on MPS), so chunking changes no result beyond rounding."""
    total = torch.zeros(shape, dtype=accumulator_dtype(device), device=device)
    for _ in range(repeats):
        eps = draw()
        running = torch.logsumexp(log_weights(eps[..., :k_chunk, :, :]).to(total.dtype), dim=-2)
        for k0 in range(k_chunk, k, k_chunk):
            chunk = torch.logsumexp(log_weights(eps[..., k0:k0 + k_chunk, :, :]).to(total.dtype), dim=-2)
            running = torch.logaddexp(running, chunk)
        total += running - math.log(k)
    return total / repeats


@torch.no_grad()
def iwae_given_q(model: LatentVariableModel, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, k: int, *,
                 repeats: int = 1, seed: int = 0, first_index: int = 0,
                 chunk_samples: int = DEFAULT_CHUNK_SAMPLES, bar: tqdm | None = None) -> torch.Tensor:
    """Per-example IWAE-k (eq. 40/41) with proposal q = N(mean, diag(std^2)), averaged over
    ``repeats`` independent sets of k samples: the scoring step that IWAE-k, the amortized bound
    and IW-SVI share.

    Exactly ``k`` samples per set. Work is split into chunks of about ``chunk_samples`` decoded
    latents: several examples per chunk when k is small, several chunks per example (merged with
    a running logsumexp) when k is large. Example ``i`` of ``x`` draws from stream 0 of example
    index ``first_index + i``; its r-th set of k samples is the r-th ``randn(k, z)`` draw of that
    stream, so ``repeats=1`` reproduces IWAE-k with the same seed exactly. The caller holds the
    model [`frozen`][airvae.estimators.frozen].

    Args:
        model: the model.
        x: the examples, ``[n, ...]``, on the model's device.
        mean: q's mean per example, ``[n, z]``.
        std: q's standard deviation per example, ``[n, z]``.
        k: importance samples per set.
        repeats: independent sets of k samples, averaged.
        seed: the seed of the examples' random streams.
        first_index: the example index of ``x[0]`` (its stream), when ``x`` is a slice of a split.
        chunk_samples: latents decoded at once (memory against speed; no effect on the result).
        bar: a progress bar advanced by the examples done.

    Returns:
        ``[n]`` float64, on the CPU.
    """
    check_k("k", k)
    check_k("repeats", repeats)
    check_k("chunk_samples", chunk_samples)
    n = x.shape[0]
    values = torch.empty(n, dtype=torch.float64)
    per_chunk = max(1, chunk_samples // k)  # examples per chunk
    k_chunk = min(k, chunk_samples)
    for start in range(0, n, per_chunk):
        xb, mb, sb = x[start:start + per_chunk], mean[start:start + per_chunk], std[start:start + per_chunk]
        b = xb.shape[0]
        gens = [example_generator(seed, first_index + start + i, mb.device) for i in range(b)]

        def draw(gens: list[torch.Generator] = gens, mb: torch.Tensor = mb) -> torch.Tensor:  # [k, b, z]
            return torch.stack([torch.randn(k, mb.shape[-1], generator=g, device=mb.device, dtype=mb.dtype)
                                for g in gens], dim=1)

        def log_weights(eps: torch.Tensor, xb: torch.Tensor = xb, mb: torch.Tensor = mb,
                        sb: torch.Tensor = sb) -> torch.Tensor:  # [kc, b]
            return log_weights_from_noise(model, xb, mb, sb, eps)

        values[start:start + b] = chunked_iwae(log_weights, draw, k, k_chunk, repeats, (b,), mb.device).cpu().double()
        if bar is not None:
            bar.update(b)
    return values


def iwae_log_likelihood(model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any], k: int = 5000, *,
                        seed: int = 0, chunk_samples: int = DEFAULT_CHUNK_SAMPLES, first_index: int = 0,
                        progress: bool = False, name: str | None = None) -> Estimate:
    """IWAE-k with the amortized (clean) encoder (eq. 40): per example,
    ``log (1/k) sum_i p(x, z_i) / q(z_i|x)`` with exactly ``k`` samples. A lower bound on ln p(x) that
    scores encoder and decoder together; IW-SVI scores the decoder alone.

    Args:
        model: any [`LatentVariableModel`][airvae.model.LatentVariableModel].
        x: the examples (tensor or array, ``[n, ...]``), any data its likelihood scores.
        k: importance samples per example.
        seed: the seed of the examples' random streams.
        chunk_samples: latents decoded at once (memory against speed; no effect on the result).
        first_index: the index of ``x[0]`` among the examples evaluated: example ``i`` draws from the
            random streams of example ``first_index + i``, so a slice of the examples gets their values.
        progress: show a progress bar.
        name: the estimate's name (default ``iwae-<k>``).

    Returns:
        The per-example [`Estimate`][airvae.estimators.Estimate].
    """
    start_time = time.perf_counter()
    values = _amortized_iwae(model, x, k, 1, seed, chunk_samples, first_index, progress, name or f"IWAE-{k}")
    return Estimate(name or f"iwae-{k}", values, {"k": k, "seed": seed}, time.perf_counter() - start_time,
                    data_dims(model, x))


def amortized_bound(model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any], k: int, *, repeats: int = 1,
                    seed: int = 0, chunk_samples: int = DEFAULT_CHUNK_SAMPLES, first_index: int = 0,
                    progress: bool = False) -> Estimate:
    """The model's own training bound L_k(x) with the clean encoder: the amortized ELBO (eq. 5) for
    k = 1, IWAE-k (eq. 20) otherwise; per example, averaged over ``repeats`` independent draws of k
    samples (a lower-variance estimate of the same expectation). ``repeats=1`` equals
    [`iwae_log_likelihood`][airvae.estimators.iwae_log_likelihood] with the same k and seed.

    Args:
        model: any [`LatentVariableModel`][airvae.model.LatentVariableModel].
        x: the examples, ``[n, ...]``.
        k: the training k.
        repeats: independent draws of k samples, averaged.
        seed: the seed of the examples' random streams.
        chunk_samples: latents decoded at once (no effect on the result).
        first_index: the index of ``x[0]`` among the examples evaluated: example ``i`` draws from the
            random streams of example ``first_index + i``, so a slice of the examples gets their values.
        progress: show a progress bar.

    Returns:
        The per-example [`Estimate`][airvae.estimators.Estimate], named ``bound-<k>``.
    """
    start_time = time.perf_counter()
    values = _amortized_iwae(model, x, k, repeats, seed, chunk_samples, first_index, progress, f"L_{k} x{repeats}")
    return Estimate(f"bound-{k}", values, {"k": k, "repeats": repeats, "seed": seed},
                    time.perf_counter() - start_time, data_dims(model, x))


def _amortized_iwae(model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any], k: int, repeats: int,
                    seed: int, chunk_samples: int, first_index: int, progress: bool, desc: str) -> torch.Tensor:
    """[`iwae_given_q`][airvae.estimators.iwae_given_q] with the clean encoder's q, the model frozen."""
    check_k("k", k)
    examples = as_input(model, x)
    with frozen(model):
        mean, std = encode_all(model, examples)
        with tqdm(total=examples.shape[0], desc=desc, unit="ex", disable=not progress, leave=False) as bar:
            return iwae_given_q(model, examples, mean, std, k, repeats=repeats, seed=seed, first_index=first_index,
                                chunk_samples=chunk_samples, bar=bar)
