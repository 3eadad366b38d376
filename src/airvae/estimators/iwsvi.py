"""Importance-weighted SVI (appendix C, eq. 41-42): a Gaussian q fitted to each example on the
IWAE-l bound, then scored with IWAE-k
([`airvae.estimators.amortized.iwae_given_q`][airvae.estimators.iwae_given_q]) on draws
independent of the fit, so the result is an unbiased estimate of a lower bound on ln p(x)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..bounds import iwae_bound
from ..model import LatentVariableModel
from .amortized import iwae_given_q, log_weights_from_noise
from .common import (
    DEFAULT_CHUNK_SAMPLES,
    STREAM_SVI,
    Estimate,
    StepNoise,
    as_input,
    check_k,
    data_dims,
    encode_all,
    example_generator,
    frozen,
)

# IW-SVI optimizes this many examples at once (one batched parameter tensor).
DEFAULT_SVI_CHUNK_EXAMPLES = 1000

# IW-SVI's Adam step size; the paper (appendix C) does not give one. Adam moves each parameter by
# about lr per step, and the encoder's q can be far from q*_x (that is the point of IW-SVI), so a
# small lr leaves most of the gap unclosed in T steps. Measured on an MNIST VAE (d300-d300, z=32,
# 6000 training steps), 40 test examples, k=1000, l=8, gain over IWAE-1000 (nats):
#   lr=1e-3: +0.59 (T=300), +0.97 (T=1000);  lr=1e-2: +0.96 (T=100), +1.12 (T=300), +1.27 (T=3000);
#   lr=3e-2: +1.20 (T=3000);  lr=0.1: +0.32 (T=3000, Adam's jitter blurs q).
# Decaying lr to 0.1x over the run (eq. 43's form, ``lr_decay=0.1``) helped only large lr's
# (3e-2: +1.20 at T=300) and cost 0.06 nats at lr=1e-2, T=3000. Hence 1e-2, constant.
DEFAULT_SVI_LR = 1e-2
DEFAULT_SVI_LR_DECAY = 1.0


def fit_iw_svi(model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any], *,
               l: int = 8, steps: int = 3000, lr: float = DEFAULT_SVI_LR,  # noqa: E741
               lr_decay: float = DEFAULT_SVI_LR_DECAY, seed: int = 0,
               chunk_examples: int = DEFAULT_SVI_CHUNK_EXAMPLES, first_index: int = 0,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q*_{x,l} of eq. 42 for every example: a Gaussian q fitted to each example on its IWAE-l bound.

    q = N(mu, diag(exp(rho)^2)) per example, initialised from the clean encoder, then ``steps``
    Adam steps on the IWAE-l bound with lr decaying as ``lr * lr_decay ** (t / (steps - 1))``
    (eq. 43's form). A chunk of examples is one batched parameter tensor; the loss is the sum of
    the per-example bounds, so each example's gradient, and hence (Adam being elementwise) its
    trajectory, is its own. The model is frozen throughout ([`frozen`][airvae.estimators.frozen]).

    Args:
        model: any [`LatentVariableModel`][airvae.model.LatentVariableModel].
        x: the examples, ``[n, ...]``.
        l: importance samples of the bound optimized (eq. 42's l).
        steps: Adam steps (0: the encoder's q itself).
        lr: Adam's initial step size (the paper gives none; see ``DEFAULT_SVI_LR``).
        lr_decay: the final learning rate as a fraction of ``lr``, in (0, 1] (1: constant).
        seed: the seed of the examples' random streams.
        chunk_examples: examples optimized at once (no effect on the result).
        first_index: the example index of ``x[0]`` (its stream).
        progress: show a progress bar.

    Returns:
        ``(mean, std)``, each ``[n, z]`` on the model's device.
    """
    check_k("l", l)
    check_k("chunk_examples", chunk_examples)
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"invalid steps = {steps!r}: allowed an integer >= 0")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"invalid lr = {lr!r}: allowed a finite number > 0")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"invalid lr_decay = {lr_decay!r}: allowed (0, 1]")
    examples = as_input(model, x)
    n = examples.shape[0]
    means, stds = [], []
    bar = tqdm(total=n * steps, desc=f"IW-SVI fit (l={l}, T={steps})", unit="ex-step", unit_scale=True,
               disable=not progress or steps == 0, leave=False)
    try:
        with frozen(model):
            mean0, std0 = encode_all(model, examples)
            for start in range(0, n, chunk_examples):
                xb = examples[start:start + chunk_examples]
                m0, s0 = mean0[start:start + chunk_examples], std0[start:start + chunk_examples]
                m, s = _fit_chunk(model, xb, m0, s0, l, steps, lr, lr_decay, seed, first_index + start, bar)
                means.append(m)
                stds.append(s)
    finally:
        bar.close()
    return torch.cat(means), torch.cat(stds)


def _fit_chunk(model: LatentVariableModel, xb: torch.Tensor, m0: torch.Tensor, s0: torch.Tensor, l: int,  # noqa: E741
               steps: int, lr: float, lr_decay: float, seed: int, first_index: int,
               bar: tqdm) -> tuple[torch.Tensor, torch.Tensor]:
    if steps == 0:
        return m0, s0
    b = xb.shape[0]
    gens = [example_generator(seed, first_index + i, m0.device, STREAM_SVI) for i in range(b)]
    noise = StepNoise(gens, (l, m0.shape[-1]), None, m0.device, m0.dtype)
    return fit_gaussian_q(m0, s0, lambda mu, std, eps: log_weights_from_noise(model, xb, mu, std, eps), noise,
                          steps=steps, lr=lr, lr_decay=lr_decay, on_step=lambda: bar.update(b))


def fit_gaussian_q(m0: torch.Tensor, s0: torch.Tensor,
                   log_weights: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], noise: StepNoise,
                   *, steps: int, lr: float, lr_decay: float,
                   on_step: Callable[[], object] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """IW-SVI's optimization (eq. 42) for a batch of examples: Adam on each example's (mean, log std),
    from the encoder's q, maximizing the sum of their IWAE-l bounds, with the learning rate decayed
    geometrically from ``lr`` to ``lr * lr_decay``. A diverged example falls back to its encoder q.

    Leading dimensions are independent problems: a stacked group's runs
    ([`stacked_fit_iw_svi`][airvae.stacked.stacked_fit_iw_svi]) share this code with a single model.

    Args:
        m0: the encoder's means, ``[..., b, z]``: the starting point.
        s0: the encoder's standard deviations, ``[..., b, z]``.
        log_weights (Callable): ``log_weights(mean, std, eps)`` gives log w ``[..., l, b]`` for draws
            ``eps`` ``[l, b, z]``.
        noise: the examples' own streams, drawing ``eps`` at each step.
        steps: Adam steps.
        lr: the initial learning rate.
        lr_decay: the final learning rate as a fraction of ``lr``.
        on_step (Callable | None): called after every step (a progress bar).

    Returns:
        ``(mean, std)``, each ``[..., b, z]``.
    """
    mu = m0.detach().clone().requires_grad_(True)
    rho = s0.detach().log().clone().requires_grad_(True)  # log sigma: unconstrained
    opt = torch.optim.Adam([mu, rho], lr=lr)
    with torch.enable_grad():
        for t in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * lr_decay ** (t / (steps - 1)) if steps > 1 else lr
            eps, _ = noise.next()  # [l, b, z]
            loss = -iwae_bound(log_weights(mu, rho.exp(), eps), dim=-2).sum()  # summed: examples stay independent
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step()
    mu, std = mu.detach(), rho.detach().exp()
    # A diverged example (non-finite parameters) falls back to its encoder q: any q gives a valid bound.
    bad = ~(torch.isfinite(mu).all(-1) & torch.isfinite(std).all(-1) & (std > 0).all(-1))
    return torch.where(bad[..., None], m0, mu), torch.where(bad[..., None], s0, std)


def iw_svi_log_likelihood(model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any], *, k: int = 5000,
                          l: int = 8, steps: int = 3000, lr: float = DEFAULT_SVI_LR,  # noqa: E741
                          lr_decay: float = DEFAULT_SVI_LR_DECAY, seed: int = 0,
                          chunk_examples: int = DEFAULT_SVI_CHUNK_EXAMPLES,
                          chunk_samples: int = DEFAULT_CHUNK_SAMPLES, first_index: int = 0,
                          progress: bool = False) -> Estimate:
    """IW-SVI (appendix C, eq. 41-42), the paper's estimator of ln p(x): fit a Gaussian q per example
    on IWAE-l for ``steps`` Adam steps ([`fit_iw_svi`][airvae.estimators.fit_iw_svi]), then score it
    with exactly ``k`` samples ([`iwae_given_q`][airvae.estimators.iwae_given_q]).

    Because q is fitted per example, with enough steps the estimate measures the decoder (the
    generative model), not how good the encoder is. ``steps=0`` scores the encoder's q, i.e.
    equals IWAE-k with the same seed. The scoring draws are independent of the optimization draws,
    so the result is an unbiased estimate of a lower bound on ln p(x) for the fitted q.

    Args:
        model: any [`LatentVariableModel`][airvae.model.LatentVariableModel].
        x: the examples, ``[n, ...]``.
        k: importance samples of the final scoring (appendix C: 5000).
        l: importance samples of the bound optimized (appendix C: 8).
        steps: Adam steps T (appendix C: 3000).
        lr: Adam's initial step size.
        lr_decay: the final learning rate as a fraction of ``lr`` (1: constant).
        seed: the seed of the examples' random streams.
        chunk_examples: examples optimized at once (no effect on the result).
        chunk_samples: latents decoded at once when scoring (no effect on the result).
        first_index: the index of ``x[0]`` among the examples evaluated: example ``i`` draws from the
            random streams of example ``first_index + i``, so a slice of the examples gets their values.
        progress: show progress bars.

    Returns:
        The per-example [`Estimate`][airvae.estimators.Estimate], named ``iwsvi-<k>``.
    """
    check_k("k", k)
    start_time = time.perf_counter()
    examples = as_input(model, x)
    mean, std = fit_iw_svi(model, examples, l=l, steps=steps, lr=lr, lr_decay=lr_decay, seed=seed,
                           chunk_examples=chunk_examples, first_index=first_index, progress=progress)
    with frozen(model), tqdm(total=examples.shape[0], desc=f"IW-SVI score (k={k})", unit="ex",
                             disable=not progress, leave=False) as bar:
        values = iwae_given_q(model, examples, mean, std, k, seed=seed, first_index=first_index,
                              chunk_samples=chunk_samples, bar=bar)
    settings = {"k": k, "l": l, "steps": steps, "lr": lr, "lr_decay": lr_decay, "seed": seed}
    return Estimate(f"iwsvi-{k}", values, settings, time.perf_counter() - start_time, data_dims(model, examples))
