"""Annealed importance sampling with HMC (not in the paper; an independent check of IW-SVI that
never uses the encoder) and bidirectional Monte Carlo (Grosse, Ghahramani & Adams 2015): on data
[`simulate`][airvae.estimators.simulate]-d from the model, a stochastic lower *and upper* bound on ln p(x), certifying
how tight AIS is.

Both use the model's log p(x|z) ([`airvae.model.conditional_log_prob`][]) and each example's
own random streams (AIS, BDMC's reverse chains, the simulation: ``airvae.estimators.common``).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..bounds import standard_normal_log_prob
from ..devices import accumulator_dtype
from ..model import LatentVariableModel, conditional_log_prob, decode
from .common import (
    STREAM_AIS,
    STREAM_BDMC_REVERSE,
    STREAM_SIMULATE,
    Estimate,
    StepNoise,
    as_input,
    check_k,
    check_model,
    data_dims,
    example_generator,
    frozen,
    latent_dim,
    model_device,
)

# AIS runs this many examples (times `chains` states) at once.
DEFAULT_AIS_CHUNK_EXAMPLES = 256


def annealing_schedule(num_steps: int, kind: str = "sigmoid", sharpness: float = 4.0) -> torch.Tensor:
    """Inverse temperatures beta_0 = 0 < ... < beta_T = 1 of AIS's geometric path.

    Args:
        num_steps: T.
        kind: ``"sigmoid"``: beta_t proportional to sigmoid(sharpness * (2t/T - 1)), rescaled to
            [0, 1]; it spends more steps near both ends, where the geometric path changes fastest
            (Grosse et al. 2015). ``"linear"``: evenly spaced.
        sharpness: the sigmoid's slope.

    Returns:
        T + 1 values, float64.
    """
    check_k("num_steps", num_steps)
    t = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    if kind == "linear":
        return t
    if kind != "sigmoid":
        raise ValueError(f"invalid schedule = {kind!r}: allowed 'sigmoid' or 'linear'")
    s = torch.sigmoid(sharpness * (2 * t - 1))
    betas = (s - s[0]) / (s[-1] - s[0])
    betas[0], betas[-1] = 0.0, 1.0
    return betas


def _log_densities(model: LatentVariableModel, x: torch.Tensor,
                   z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(x|z), its z-gradient, log p(z), its z-gradient (all detached)."""
    z = z.detach().requires_grad_(True)
    log_lik = conditional_log_prob(model.decoder, model.likelihood, x, z)
    (grad_lik,) = torch.autograd.grad(log_lik.sum(), z)
    log_prior = standard_normal_log_prob(z)
    (grad_prior,) = torch.autograd.grad(log_prior.sum(), z)
    return log_lik.detach(), grad_lik, log_prior.detach(), grad_prior


def _check_ais(num_intermediate: int, chains: int, leapfrog_steps: int, chunk_examples: int, tuning_chains: int,
               step_size: float, target_accept: float, adapt_rate: float) -> None:
    for name, value in (("num_intermediate", num_intermediate), ("chains", chains),
                        ("leapfrog_steps", leapfrog_steps), ("chunk_examples", chunk_examples)):
        check_k(name, value)
    if not (isinstance(tuning_chains, int) and tuning_chains >= 0):
        raise ValueError(f"invalid tuning_chains = {tuning_chains!r}: allowed an integer >= 0")
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"invalid step_size = {step_size!r}: allowed a finite number > 0")
    if not 0 < target_accept < 1:
        raise ValueError(f"invalid target_accept = {target_accept!r}: allowed (0, 1)")
    if not (adapt_rate >= 0 and math.isfinite(adapt_rate)):
        raise ValueError(f"invalid adapt_rate = {adapt_rate!r}: allowed a finite number >= 0")


def _ais_settings(num_intermediate: int, chains: int, leapfrog_steps: int, step_size: float, schedule: str,
                  tuning_chains: int, target_accept: float, adapt_rate: float, seed: int) -> dict[str, Any]:
    return {"num_intermediate": num_intermediate, "chains": chains, "leapfrog_steps": leapfrog_steps,
            "step_size": step_size, "schedule": schedule, "tuning_chains": tuning_chains,
            "target_accept": target_accept, "adapt_rate": adapt_rate, "seed": seed}


def ais_log_likelihood(model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any], *,
                       num_intermediate: int = 500, chains: int = 16, leapfrog_steps: int = 10,
                       step_size: float = 0.1, schedule: str = "sigmoid", tuning_chains: int = 4,
                       target_accept: float = 0.65, adapt_rate: float = 0.2, seed: int = 0,
                       chunk_examples: int = DEFAULT_AIS_CHUNK_EXAMPLES, first_index: int = 0,
                       progress: bool = False) -> Estimate:
    """Annealed importance sampling (Neal 2001) of ln p(x) with HMC transitions: not in the paper, an
    independent check of IW-SVI that never uses the encoder.

    Path: f_t(z) = p(z) p(x|z)^beta_t, geometric from the prior N(0, I) (beta = 0, sampled
    exactly, normalizer 1) to p(x, z) (beta = 1); ``num_intermediate`` annealing steps after the
    prior (the last one targets the posterior), spaced by
    [`annealing_schedule`][airvae.estimators.annealing_schedule]. Each chain accumulates
    log w += (beta_t - beta_{t-1}) log p(x|z_{t-1}), then makes one HMC transition
    (``leapfrog_steps`` leapfrog steps, Metropolis accept) that leaves f_t invariant. ln p(x) is
    estimated by logmeanexp over the ``chains`` independent chains of each example: an unbiased
    estimate of p(x), hence a stochastic lower bound of ln p(x) like the other estimators.

    Step-size adaptation without bias: each example also runs ``tuning_chains`` extra chains
    whose weights are discarded. The example's step size (shared by all its chains) is multiplied
    by exp(adapt_rate * (a - target_accept)) after every transition, a being the mean Metropolis
    acceptance probability of the *tuning* chains in that transition. The estimating chains'
    kernels therefore depend only on chains independent of them, so given the tuning chains their
    AIS is exact. (Adapting a chain on its own acceptance history, as is common, is not: on the
    tests' ground-truth model it overestimated ln p(x) by 0.01-0.03 nats.) ``tuning_chains=0``
    keeps ``step_size`` fixed. Chains and examples never otherwise interact, so results do not
    depend on chunking.

    Args:
        model: any [`LatentVariableModel`][airvae.model.LatentVariableModel] (its encoder is not used).
        x: the examples, ``[n, ...]``.
        num_intermediate: annealing steps T after the prior (more: tighter, slower).
        chains: independent estimating chains per example.
        leapfrog_steps: leapfrog steps per HMC transition.
        step_size: the leapfrog step size (the starting one when adapted).
        schedule: ``"sigmoid"`` or ``"linear"`` ([`annealing_schedule`][airvae.estimators.annealing_schedule]).
        tuning_chains: extra chains per example that only adapt the step size (0: fixed step size).
        target_accept: the acceptance probability the adaptation aims at, in (0, 1).
        adapt_rate: how fast the step size adapts (>= 0).
        seed: the seed of the examples' random streams.
        chunk_examples: examples annealed at once (no effect on the result).
        first_index: the index of ``x[0]`` among the examples evaluated: example ``i`` draws from the
            random streams of example ``first_index + i``, so a slice of the examples gets their values.
        progress: show a progress bar.

    Returns:
        The per-example [`Estimate`][airvae.estimators.Estimate], named ``ais``; its settings
        include the mean acceptance rate, a diagnostic.
    """
    _check_ais(num_intermediate, chains, leapfrog_steps, chunk_examples, tuning_chains, step_size, target_accept,
               adapt_rate)
    betas = annealing_schedule(num_intermediate, schedule).tolist()
    start_time = time.perf_counter()
    x = as_input(model, x)
    z_dim = latent_dim(model, x)
    n = x.shape[0]
    values = torch.empty(n, dtype=torch.float64)
    accept_sum = 0.0
    bar = tqdm(total=n * num_intermediate, desc=f"AIS (T={num_intermediate}, {chains} chains)", unit="ex-step",
               unit_scale=True, disable=not progress, leave=False)
    try:
        with frozen(model), torch.enable_grad():
            for start in range(0, n, chunk_examples):
                xb = x[start:start + chunk_examples]
                estimate, accept, _ = _forward_ais(model, xb, z_dim, betas, chains, tuning_chains, leapfrog_steps,
                                                   step_size, (target_accept, adapt_rate), seed, first_index + start,
                                                   bar)
                values[start:start + xb.shape[0]] = estimate.cpu()
                accept_sum += accept
    finally:
        bar.close()
    settings = {**_ais_settings(num_intermediate, chains, leapfrog_steps, step_size, schedule, tuning_chains,
                                target_accept, adapt_rate, seed),
                "mean_acceptance": accept_sum / max(n, 1)}  # a diagnostic, not a setting
    return Estimate("ais", values, settings, time.perf_counter() - start_time, data_dims(model, x))


def _forward_ais(model: LatentVariableModel, xb: torch.Tensor, z_dim: int, betas: list[float], chains: int,
                 tuning_chains: int, leapfrog_steps: int, step_size: float, adaptation: tuple[float, float], seed: int,
                 first_index: int, bar: tqdm) -> tuple[torch.Tensor, float, torch.Tensor]:
    """AIS from the prior for one chunk of examples: (ln p(x) estimates [b], sum over examples of the
    mean acceptance rate, step sizes used [T, b])."""
    b, device = xb.shape[0], xb.device
    dtype = next(model.decoder.parameters()).dtype
    c = chains + tuning_chains  # chains [:chains] estimate, [chains:] only tune the step size
    gens = [example_generator(seed, first_index + i, device, STREAM_AIS) for i in range(b)]
    # z_0 ~ N(0, I): exactly the beta = 0 distribution, whose normalizer is 1.
    z = torch.stack([torch.randn(c, z_dim, generator=g, device=device, dtype=dtype) for g in gens], dim=1)
    return _anneal(model, xb, betas, z, gens, chains, leapfrog_steps, step_size, adaptation, bar)


def _anneal(model: LatentVariableModel, xb: torch.Tensor, betas: list[float], z: torch.Tensor,
            gens: list[torch.Generator], chains: int, leapfrog_steps: int, step_size: float | torch.Tensor,
            adaptation: tuple[float, float] | None, bar: tqdm) -> tuple[torch.Tensor, float, torch.Tensor]:
    """AIS chains for a chunk of b examples along ``betas`` (increasing from the prior or, for
    BDMC's reverse chains, decreasing from the posterior), from states ``z`` [c, b, z_dim] that
    are exact samples of the first distribution. Chains ``[:chains]`` estimate; the others, if
    any, only tune the step size. ``step_size`` is either the starting step size, adapted after
    every transition from the tuning chains' acceptance (``adaptation = (target_accept,
    adapt_rate)``, see [`ais_log_likelihood`][airvae.estimators.ais_log_likelihood]), or a ``[T, b]`` tensor
    of fixed step sizes, one per transition and example. Returns (logmeanexp of the estimating chains' log
    weights [b], an estimate of ln Z_last - ln Z_first; the sum over examples of their mean acceptance
    rate; the step sizes used [T, b])."""
    c, b, z_dim = z.shape
    dtype, device = z.dtype, z.device
    tuning_chains = c - chains
    noise = StepNoise(gens, (c, z_dim), (c,), device, dtype)  # momenta, Metropolis uniforms
    log_lik, g_lik, log_prior, g_prior = _log_densities(model, xb, z)
    log_w = torch.zeros(c, b, dtype=accumulator_dtype(device), device=device)
    if isinstance(step_size, torch.Tensor):  # fixed: one per transition and example, [T, b]
        fixed: torch.Tensor | None = step_size.to(dtype)[:, None, :, None]
        eps = torch.empty(0)  # set at each transition
    else:
        fixed, eps = None, torch.full((1, b, 1), step_size, dtype=dtype, device=device)
    used = torch.empty(len(betas) - 1, b, dtype=dtype, device=device)
    accept_total = torch.zeros(b, dtype=log_w.dtype, device=device)
    for t in range(1, len(betas)):
        beta = betas[t]
        if fixed is not None:
            eps = fixed[t - 1]  # [1, b, 1]
        used[t - 1] = eps[0, :, 0]
        log_w += (beta - betas[t - 1]) * log_lik.to(log_w.dtype)  # ln f_t(z_{t-1}) - ln f_{t-1}(z_{t-1})
        momentum, uniform = noise.next()
        assert uniform is not None  # noise draws uniforms: it was given their shape
        # Leapfrog on U(z) = -(ln p(z) + beta ln p(x|z)) with kinetic energy |p|^2 / 2.
        p = momentum + 0.5 * eps * (g_prior + beta * g_lik)
        z_new = z
        for i in range(leapfrog_steps):
            z_new = z_new + eps * p
            ll_new, gl_new, lp_new, gp_new = _log_densities(model, xb, z_new)
            p = p + (eps if i < leapfrog_steps - 1 else 0.5 * eps) * (gp_new + beta * gl_new)
        h_old = -(log_prior + beta * log_lik) + 0.5 * momentum.square().sum(-1)
        h_new = -(lp_new + beta * ll_new) + 0.5 * p.square().sum(-1)
        log_accept = torch.nan_to_num(h_old - h_new, nan=-math.inf).clamp(max=0.0)  # [c, b]
        accept = uniform.log() < log_accept
        keep = accept[..., None]
        z = torch.where(keep, z_new, z)
        g_lik, g_prior = torch.where(keep, gl_new, g_lik), torch.where(keep, gp_new, g_prior)
        log_lik, log_prior = torch.where(accept, ll_new, log_lik), torch.where(accept, lp_new, log_prior)
        accept_prob = log_accept.exp()
        accept_total += accept_prob[:chains].to(log_w.dtype).mean(0)
        # The tuning chains' acceptance only (see ais_log_likelihood); step sizes not fixed come with adaptation.
        if tuning_chains and fixed is None and adaptation is not None:
            target_accept, adapt_rate = adaptation
            rate = accept_prob[chains:].mean(0)  # [b]
            eps = (eps * torch.exp(adapt_rate * (rate - target_accept))[None, :, None]).clamp(1e-4, 10.0)
        bar.update(b)
    estimate = torch.logsumexp(log_w[:chains], dim=0) - math.log(chains)
    return estimate, float((accept_total / (len(betas) - 1)).sum()), used


# ----------------------------------------------------------------------------------------------
# Bidirectional Monte Carlo (Grosse, Ghahramani & Adams 2015) on data simulated from the model


@torch.no_grad()
def simulate(model: LatentVariableModel, num_examples: int, *, seed: int = 0, z_dim: int | None = None,
             chunk_examples: int = DEFAULT_AIS_CHUNK_EXAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples drawn from the model, z ~ N(0, I) then x ~ p(x|z). Given x, each z is an exact sample of
    the posterior p(z|x), which is what [`bdmc`][airvae.estimators.bdmc]'s reverse chains need.
    Example i draws from its own stream (as in every estimator), so the first examples do not depend
    on ``num_examples``.

    Args:
        model: any [`LatentVariableModel`][airvae.model.LatentVariableModel].
        num_examples: pairs to draw.
        seed: the seed of the examples' random streams.
        z_dim: the latent size (default: read from the model, ``z_dim`` or ``decoder.z_dim``).
        chunk_examples: examples decoded at once.

    Returns:
        ``(x, z)`` on the model's device, x float32.
    """
    check_model(model)
    check_k("num_examples", num_examples)
    check_k("chunk_examples", chunk_examples)
    z_dim = latent_dim(model) if z_dim is None else z_dim
    device = model_device(model)
    dtype = next(model.decoder.parameters()).dtype
    gens = [example_generator(seed, i, device, STREAM_SIMULATE) for i in range(num_examples)]
    z = torch.stack([torch.randn(z_dim, generator=g, device=device, dtype=dtype) for g in gens])
    xs = []
    with frozen(model):
        for start in range(0, num_examples, chunk_examples):
            params = decode(model.decoder, z[start:start + chunk_examples])
            xs += [model.likelihood.sample(params[i:i + 1], generator=gens[start + i]) for i in range(params.shape[0])]
    return torch.cat(xs).to(torch.float32), z


def bdmc(model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any], z: torch.Tensor | np.ndarray[Any, Any], *,
         num_intermediate: int = 500, chains: int = 16, leapfrog_steps: int = 10, step_size: float = 0.1,
         schedule: str = "sigmoid", tuning_chains: int = 4, target_accept: float = 0.65, adapt_rate: float = 0.2,
         seed: int = 0, chunk_examples: int = DEFAULT_AIS_CHUNK_EXAMPLES,
         progress: bool = False) -> tuple[Estimate, Estimate]:
    """Bidirectional Monte Carlo (Grosse, Ghahramani & Adams 2015): a sandwich
    ``lower <= ln p(x) <= upper`` per example, for data ``(x, z)`` simulated from the model
    ([`simulate`][airvae.estimators.simulate]), so that each z is an exact sample of p(z|x). In
    expectation, ``upper - lower`` bounds the error of each, and ``upper`` minus any other lower
    bound on these examples (IW-SVI) bounds its slack.

    * lower: forward AIS from the prior, exactly
      [`ais_log_likelihood`][airvae.estimators.ais_log_likelihood] with the same settings and seed
      (an unbiased estimate of p(x), so E[lower] <= ln p(x));
    * upper: reverse AIS, the same annealing path run from beta = 1 down to 0, every chain started
      at the z that generated x. Its weights are unbiased estimates of 1/p(x) (it is AIS from the
      normalized posterior to the prior), so minus their logmeanexp has E[upper] >= ln p(x).

    Each reverse transition uses the step size that forward AIS's tuning chains chose at the same
    beta: the kernels then depend only on x and chains independent of z, which keeps the reverse
    estimate exact (adapting on the reverse chains themselves would not). The sandwich narrows to
    0 as ``num_intermediate`` grows.

    Args:
        model: any [`LatentVariableModel`][airvae.model.LatentVariableModel].
        x: simulated examples, ``[n, ...]``.
        z: the latents that generated them, ``[n, z_dim]``.
        num_intermediate: as in [`ais_log_likelihood`][airvae.estimators.ais_log_likelihood], which
            runs the forward half; so are ``chains``, ``leapfrog_steps``, ``step_size``, ``schedule``,
            ``tuning_chains``, ``target_accept``, ``adapt_rate``, ``seed``, ``chunk_examples`` and
            ``progress``: one set of settings for both directions.

    Returns:
        ``(lower, upper)``, per-example [`Estimate`][airvae.estimators.Estimate]s named ``bdmc-lower``
        and ``bdmc-upper``.

    Raises:
        ValueError: ``z`` is not one finite latent per example of ``x``.
    """
    _check_ais(num_intermediate, chains, leapfrog_steps, chunk_examples, tuning_chains, step_size, target_accept,
               adapt_rate)
    betas = annealing_schedule(num_intermediate, schedule).tolist()
    start_time = time.perf_counter()
    x = as_input(model, x)
    z = torch.as_tensor(z).to(device=x.device, dtype=next(model.decoder.parameters()).dtype)
    z_dim = latent_dim(model, x[:1])
    if z.dim() != 2 or z.shape[0] != x.shape[0] or z.shape[1] != z_dim:
        raise ValueError(f"bdmc: z has shape {list(z.shape)}; expected [n, z_dim] with n = {x.shape[0]} and the "
                         f"model's z_dim = {z_dim} (one latent per example of x, as simulate() "
                         "returns)")
    if not torch.isfinite(z).all():
        raise ValueError("bdmc: z contains NaN or infinite values")
    n = x.shape[0]
    lower, upper = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    accept = [0.0, 0.0]
    bar = tqdm(total=2 * n * num_intermediate, desc=f"BDMC (T={num_intermediate}, {chains} chains)",
               unit="ex-step", unit_scale=True, disable=not progress, leave=False)
    try:
        with frozen(model), torch.enable_grad():
            for start in range(0, n, chunk_examples):
                xb, zb = x[start:start + chunk_examples], z[start:start + chunk_examples]
                b = xb.shape[0]
                forward, accept_f, used = _forward_ais(model, xb, z.shape[1], betas, chains, tuning_chains,
                                                       leapfrog_steps, step_size, (target_accept, adapt_rate), seed,
                                                       start, bar)
                # Transition j of the reverse path targets betas[T - j]: the step size forward used there
                # (the last one, at beta = 0, changes no weight).
                reverse_steps = torch.cat([used[:-1].flip(0), used[:1]])
                gens = [example_generator(seed, start + i, xb.device, STREAM_BDMC_REVERSE) for i in range(b)]
                inverse, accept_r, _ = _anneal(model, xb, betas[::-1], zb.expand(chains, *zb.shape), gens, chains,
                                               leapfrog_steps, reverse_steps, None, bar)
                lower[start:start + b], upper[start:start + b] = forward.cpu(), -inverse.cpu()
                accept[0] += accept_f
                accept[1] += accept_r
    finally:
        bar.close()
    settings = _ais_settings(num_intermediate, chains, leapfrog_steps, step_size, schedule, tuning_chains,
                             target_accept, adapt_rate, seed)
    seconds = time.perf_counter() - start_time
    dims = data_dims(model, x)
    return (Estimate("bdmc-lower", lower, {**settings, "mean_acceptance": accept[0] / n}, seconds, dims),
            Estimate("bdmc-upper", upper, {**settings, "mean_acceptance": accept[1] / n}, seconds, dims))
