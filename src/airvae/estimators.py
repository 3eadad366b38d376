"""Log-likelihood estimators for trained models, separate from training.

* :func:`iwae_log_likelihood` -- IWAE-k with the amortized encoder (appendix C, eq. 40);
* :func:`amortized_bound` -- the model's own training bound L_k(x) (eq. 5 for k = 1, eq. 20);
* :func:`iw_svi_log_likelihood` -- importance-weighted SVI (appendix C, eq. 41-42): a per-example
  Gaussian q optimized on the IWAE-l bound, then scored with IWAE-k;
* :func:`inference_gap` -- Delta_inf = ln p(x) - L_k(x) per example (Table 1);
* :func:`ais_log_likelihood` -- annealed importance sampling with HMC (not in the paper; an
  independent check of IW-SVI);
* :func:`bdmc` -- bidirectional Monte Carlo (Grosse et al. 2015) on data :func:`simulate`-d from
  the model: a stochastic lower *and upper* bound on ln p(x), certifying how tight AIS is.

Every estimator takes any model that follows :class:`airvae.model.LatentVariableModel`
(``encode``, ``decoder``, ``likelihood``) and any data shape the likelihood scores. All of them
use the model's one log-weights path (:func:`airvae.model.log_weights_given_q`) or, for AIS and
BDMC, its log p(x|z) (:func:`airvae.model.conditional_log_prob`).

Random draws are tied to (seed, stream, example index): every example owns its random streams, so
an estimate does not depend on how the work is chunked, and chunked and unchunked runs agree for
the same seed (up to floating-point rounding of batched matrix products). Stream 0 is the
scoring stream shared by IWAE-k, the amortized bound and IW-SVI's final scoring (common random
numbers make their comparisons less noisy); the IW-SVI optimization, AIS, BDMC's reverse chains
and the simulation of data from the model use their own streams.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .bounds import iwae_bound, standard_normal_log_prob
from .devices import accumulator_dtype, resolve_device
from .likelihoods import Likelihood, bits_per_dim
from .model import LatentVariableModel, conditional_log_prob, decode, log_weights_given_q

__all__ = [
    "DEFAULT_CHUNK_SAMPLES", "DEFAULT_SVI_LR", "DEFAULT_SVI_LR_DECAY", "Estimate", "ais_log_likelihood",
    "amortized_bound", "annealing_schedule", "bdmc", "example_generator", "fit_iw_svi", "frozen",
    "inference_gap", "iw_svi_log_likelihood", "iwae_given_q", "iwae_log_likelihood", "latent_dim",
    "resolve_device", "simulate",
]

# Latent samples decoded per chunk: large enough for efficient matmuls, small enough that
# [samples, x_dim] activations stay in cache-friendly memory (2.5k-10k measured best on CPU).
DEFAULT_CHUNK_SAMPLES = 8192
# IW-SVI optimizes this many examples at once (one batched parameter tensor).
DEFAULT_SVI_CHUNK_EXAMPLES = 1000
# AIS runs this many examples (times `chains` states) at once.
DEFAULT_AIS_CHUNK_EXAMPLES = 256

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

# Random streams per example (see the module docstring).
STREAM_SCORE, STREAM_SVI, STREAM_AIS, STREAM_BDMC_REVERSE, STREAM_SIMULATE = 0, 1, 2, 3, 4
_NOISE_BLOCK = 16  # per-step noise is drawn in blocks of this many steps per example (bounded memory)


@dataclass
class Estimate:
    """Per-example values of an estimator with its settings and cost."""

    name: str
    values: torch.Tensor  # [n] float64, on CPU
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    dims: int | None = None  # data dimensions per example, for bits/dim

    @property
    def mean(self) -> float:
        return float(self.values.mean())

    @property
    def bits_per_dim(self) -> float | None:
        """The mean as bits per dimension, ``-mean / (dims ln 2)`` (exact for discrete likelihoods)."""
        return None if self.dims is None else float(bits_per_dim(self.mean, self.dims))

    @property
    def stderr(self) -> float:
        n = self.values.numel()
        return float(self.values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")

    def to_dict(self, per_example: bool = True) -> dict:
        out = {"name": self.name, "settings": self.settings, "mean": self.mean, "stderr": self.stderr,
               "n": self.values.numel(), "seconds": self.seconds, "dims": self.dims}
        if per_example:
            out["values"] = self.values.tolist()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Estimate":
        """Inverse of :meth:`to_dict` (needs the per-example values)."""
        return cls(d["name"], torch.tensor(d["values"], dtype=torch.float64), dict(d.get("settings", {})),
                   float(d.get("seconds", 0.0)), d.get("dims"))


# ----------------------------------------------------------------------------------------------
# Random streams


def example_generator(seed: int, index: int, device: torch.device, stream: int = STREAM_SCORE) -> torch.Generator:
    """The random stream ``stream`` of example ``index``: independent of batching and chunking."""
    if stream == STREAM_SCORE:
        state = (seed * 1_000_003 + index) % (2**63)
    else:  # other streams: a well-mixed seed, so they never coincide with stream 0 of another example
        state = int(np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0]) % (2**63)
    return torch.Generator(device=device).manual_seed(state)


class _StepNoise:
    """Per-step random draws for a chunk of examples, each example from its own generator.

    ``next()`` returns one standard-normal tensor of shape ``[*normal_shape[:1], b, *normal_shape[1:]]``
    (the example axis second, like log-weights) and, if ``uniform_shape`` is given, a uniform tensor
    laid out the same way. Draws are made in fixed blocks of steps per example so the stream of
    an example never depends on which other examples share its chunk.
    """

    def __init__(self, generators: list[torch.Generator], normal_shape: tuple[int, ...],
                 uniform_shape: tuple[int, ...] | None, device, dtype):
        self.gens, self.normal_shape, self.uniform_shape = generators, normal_shape, uniform_shape
        self.device, self.dtype = device, dtype
        self._normal = self._uniform = None
        self._pos = _NOISE_BLOCK

    def _refill(self) -> None:
        normals, uniforms = [], []
        for g in self.gens:
            normals.append(torch.randn(_NOISE_BLOCK, *self.normal_shape, generator=g, device=self.device,
                                       dtype=self.dtype))
            if self.uniform_shape is not None:
                uniforms.append(torch.rand(_NOISE_BLOCK, *self.uniform_shape, generator=g, device=self.device,
                                           dtype=self.dtype))
        self._normal = torch.stack(normals, dim=2)  # [block, n0, b, ...]
        self._uniform = torch.stack(uniforms, dim=2) if uniforms else None
        self._pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._pos == _NOISE_BLOCK:
            self._refill()
        i, self._pos = self._pos, self._pos + 1
        return self._normal[i], (self._uniform[i] if self._uniform is not None else None)


# ----------------------------------------------------------------------------------------------
# Helpers


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_model(model) -> None:
    """A clear error for a model that does not follow :class:`airvae.model.LatentVariableModel`."""
    missing = [name for name in ("encode", "decoder", "likelihood") if not hasattr(model, name)]
    if not isinstance(model, torch.nn.Module) or missing or not isinstance(model.likelihood, Likelihood):
        what = f"missing {', '.join(missing)}" if missing else (
            "not an nn.Module" if not isinstance(model, torch.nn.Module)
            else f"likelihood is {type(model.likelihood).__name__}, not an airvae.likelihoods.Likelihood")
        raise TypeError(f"{type(model).__name__} cannot be evaluated ({what}): the estimators need an nn.Module "
                        "with encode(x) -> (mean, std), a decoder module z -> likelihood parameters and a "
                        "likelihood attribute (e.g. airvae.Bernoulli()); see airvae.model.LatentVariableModel")


def _as_input(model: torch.nn.Module, x) -> torch.Tensor:
    """``x`` (tensor or array of any dtype) as float32 on the model's device, after checking that the
    model follows the protocol and that its likelihood can score x."""
    _check_model(model)
    x = torch.as_tensor(x).to(device=_model_device(model), dtype=torch.float32)
    model.likelihood.validate(x)
    return x


def _dims(model: LatentVariableModel, x) -> int | None:
    """Data dimensions per example of ``x`` (a tensor, array or nested list), for bits/dim; None
    where bits/dim mean nothing (a density over real values, not a probability of discrete data)."""
    return math.prod(np.shape(x)[1:]) if getattr(model.likelihood, "discrete", True) else None


def latent_dim(model: LatentVariableModel, x: torch.Tensor | None = None) -> int:
    """The latent size: ``model.z_dim``, else ``model.decoder.z_dim``, else the width of the
    encoder's mean for the first example of ``x``."""
    for owner in (model, model.decoder):
        z_dim = getattr(owner, "z_dim", None)
        if isinstance(z_dim, int):
            return z_dim
    if x is None:
        raise ValueError(f"the latent size of {type(model).__name__} is unknown: give the model (or its decoder) "
                         "a z_dim attribute, or pass z_dim")
    with torch.no_grad(), frozen(model):
        return int(model.encode(_as_input(model, x[:1]))[0].shape[-1])


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode and ``requires_grad=False`` on every parameter, restored on exit.

    Per-example optimization (IW-SVI) and HMC (AIS) differentiate with respect to q's parameters
    or z only; freezing keeps the decoder out of the autograd graph, so no ``.grad`` is ever
    accumulated on it and nothing can update it.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@torch.no_grad()
def _encode_all(model: LatentVariableModel, x: torch.Tensor, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's (mean, std) for every example: clean, since callers hold the model :func:`frozen`
    (eval mode)."""
    means, stds = [], []
    for start in range(0, x.shape[0], batch):
        m, s = model.encode(x[start:start + batch])
        means.append(m)
        stds.append(s)
    return torch.cat(means), torch.cat(stds)


def _log_weights_from_noise(model: LatentVariableModel, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                            eps: torch.Tensor) -> torch.Tensor:
    """log w for given standard-normal draws ``eps`` [k, b, z] -> [k, b] (the shared path)."""
    return log_weights_given_q(model.decoder, x, mean, std, k=eps.shape[0], noise=eps, likelihood=model.likelihood)[0]


def _check_k(name: str, value: int) -> None:
    if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"invalid {name} = {value!r}: allowed an integer >= 1")


# ----------------------------------------------------------------------------------------------
# IWAE-k scoring: one function for the amortized q (IWAE-k, the bound) and IW-SVI's fitted q


def chunked_iwae(log_weights, draw, k: int, k_chunk: int, repeats: int, shape: tuple[int, ...],
                 device: torch.device) -> torch.Tensor:
    """IWAE-k of a batch of examples ``shape`` (``[b]``, or ``[S, b]`` for a stacked group's runs),
    averaged over ``repeats`` sets of k samples. ``draw()`` gives one set's standard-normal draws
    ``[..., k, b, z]`` (each example from its own stream), ``log_weights(eps)`` the log weights
    ``[..., kc, b]`` of a slice of them; the slices of ``k_chunk`` samples are merged with a running
    logsumexp, in float64 (float32 on MPS), so chunking changes no result beyond rounding."""
    total = torch.zeros(shape, dtype=accumulator_dtype(device), device=device)
    for _ in range(repeats):
        eps = draw()
        running = None
        for k0 in range(0, k, k_chunk):
            chunk = torch.logsumexp(log_weights(eps[..., k0:k0 + k_chunk, :, :]).to(total.dtype), dim=-2)
            running = chunk if running is None else torch.logaddexp(running, chunk)
        total += running - math.log(k)
    return total / repeats


@torch.no_grad()
def iwae_given_q(model: LatentVariableModel, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, k: int, *,
                 repeats: int = 1, seed: int = 0, first_index: int = 0,
                 chunk_samples: int = DEFAULT_CHUNK_SAMPLES, bar: tqdm | None = None) -> torch.Tensor:
    """Per-example IWAE-k (eq. 40/41) with proposal q = N(mean, diag(std^2)), averaged over
    ``repeats`` independent sets of k samples; returns [n] float64 on CPU.

    Exactly ``k`` samples per set. Work is split into chunks of about ``chunk_samples`` decoded
    latents: several examples per chunk when k is small, several chunks per example (merged with
    a running logsumexp) when k is large. Example ``i`` of ``x`` draws from stream 0 of example
    index ``first_index + i``; its r-th set of k samples is the r-th ``randn(k, z)`` draw of that
    stream, so ``repeats=1`` reproduces IWAE-k with the same seed exactly.
    """
    _check_k("k", k)
    _check_k("repeats", repeats)
    _check_k("chunk_samples", chunk_samples)
    n = x.shape[0]
    values = torch.empty(n, dtype=torch.float64)
    per_chunk = max(1, chunk_samples // k)  # examples per chunk
    k_chunk = min(k, chunk_samples)
    for start in range(0, n, per_chunk):
        xb, mb, sb = x[start:start + per_chunk], mean[start:start + per_chunk], std[start:start + per_chunk]
        b = xb.shape[0]
        gens = [example_generator(seed, first_index + start + i, mb.device) for i in range(b)]

        def draw(gens=gens, mb=mb):  # [k, b, z]
            return torch.stack([torch.randn(k, mb.shape[-1], generator=g, device=mb.device, dtype=mb.dtype)
                                for g in gens], dim=1)

        def log_weights(eps, xb=xb, mb=mb, sb=sb):  # [kc, b]
            return _log_weights_from_noise(model, xb, mb, sb, eps)

        values[start:start + b] = chunked_iwae(log_weights, draw, k, k_chunk, repeats, (b,), mb.device).cpu().double()
        if bar is not None:
            bar.update(b)
    return values


def iwae_log_likelihood(model: LatentVariableModel, x: torch.Tensor, k: int = 5000, *, seed: int = 0,
                        chunk_samples: int = DEFAULT_CHUNK_SAMPLES, progress: bool = False,
                        name: str | None = None) -> Estimate:
    """IWAE-k with the amortized (clean) encoder (eq. 40): per-example
    log (1/k) sum_i p(x, z_i)/q(z_i|x), exactly ``k`` samples per example."""
    start_time = time.perf_counter()
    values = _amortized_iwae(model, x, k, 1, seed, chunk_samples, progress, name or f"IWAE-{k}")
    return Estimate(name or f"iwae-{k}", values, {"k": k, "seed": seed}, time.perf_counter() - start_time,
                    _dims(model, x))


def amortized_bound(model: LatentVariableModel, x: torch.Tensor, k: int, *, repeats: int = 1, seed: int = 0,
                    chunk_samples: int = DEFAULT_CHUNK_SAMPLES, progress: bool = False) -> Estimate:
    """The model's own training bound L_k(x) with the clean encoder: the amortized ELBO (eq. 5)
    for k = 1, IWAE-k (eq. 20) otherwise; per example, averaged over ``repeats`` independent
    draws of k samples (a lower-variance estimate of the same expectation).

    ``repeats=1`` equals :func:`iwae_log_likelihood` with the same k and seed.
    """
    start_time = time.perf_counter()
    values = _amortized_iwae(model, x, k, repeats, seed, chunk_samples, progress, f"L_{k} x{repeats}")
    return Estimate(f"bound-{k}", values, {"k": k, "repeats": repeats, "seed": seed},
                    time.perf_counter() - start_time, _dims(model, x))


def _amortized_iwae(model: LatentVariableModel, x, k: int, repeats: int, seed: int, chunk_samples: int, progress: bool,
                    desc: str) -> torch.Tensor:
    """:func:`iwae_given_q` with the clean encoder's q, the model frozen."""
    _check_k("k", k)
    x = _as_input(model, x)
    with frozen(model):
        mean, std = _encode_all(model, x)
        with tqdm(total=x.shape[0], desc=desc, unit="ex", disable=not progress, leave=False) as bar:
            return iwae_given_q(model, x, mean, std, k, repeats=repeats, seed=seed,
                                chunk_samples=chunk_samples, bar=bar)


# ----------------------------------------------------------------------------------------------
# IW-SVI (appendix C)


def fit_iw_svi(model: LatentVariableModel, x: torch.Tensor, *, l: int = 8, steps: int = 3000,  # noqa: E741
               lr: float = DEFAULT_SVI_LR, lr_decay: float = DEFAULT_SVI_LR_DECAY, seed: int = 0,
               chunk_examples: int = DEFAULT_SVI_CHUNK_EXAMPLES, first_index: int = 0,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q*_{x,l} of eq. 42 for every example: (mean, std), each [n, z] on the model's device.

    q = N(mu, diag(exp(rho)^2)) per example, initialised from the clean encoder, then ``steps``
    Adam steps on the IWAE-l bound with lr decaying as ``lr * lr_decay ** (t / (steps - 1))``
    (eq. 43's form). A chunk of examples is one batched parameter tensor; the loss is the sum of
    the per-example bounds, so each example's gradient, and hence (Adam being elementwise) its
    trajectory, is its own. The model is frozen throughout (:func:`frozen`).
    """
    _check_k("l", l)
    _check_k("chunk_examples", chunk_examples)
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"invalid steps = {steps!r}: allowed an integer >= 0")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"invalid lr = {lr!r}: allowed a finite number > 0")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"invalid lr_decay = {lr_decay!r}: allowed (0, 1]")
    x = _as_input(model, x)
    n = x.shape[0]
    means, stds = [], []
    bar = tqdm(total=n * steps, desc=f"IW-SVI fit (l={l}, T={steps})", unit="ex-step", unit_scale=True,
               disable=not progress or steps == 0, leave=False)
    try:
        with frozen(model):
            mean0, std0 = _encode_all(model, x)
            for start in range(0, n, chunk_examples):
                xb = x[start:start + chunk_examples]
                m0, s0 = mean0[start:start + chunk_examples], std0[start:start + chunk_examples]
                m, s = _fit_chunk(model, xb, m0, s0, l, steps, lr, lr_decay, seed, first_index + start, bar)
                means.append(m)
                stds.append(s)
    finally:
        bar.close()
    return torch.cat(means), torch.cat(stds)


def _fit_chunk(model, xb, m0, s0, l, steps, lr, lr_decay, seed, first_index, bar):  # noqa: E741
    if steps == 0:
        return m0, s0
    b = xb.shape[0]
    gens = [example_generator(seed, first_index + i, m0.device, STREAM_SVI) for i in range(b)]
    noise = _StepNoise(gens, (l, m0.shape[-1]), None, m0.device, m0.dtype)
    return fit_gaussian_q(m0, s0, lambda mu, std, eps: _log_weights_from_noise(model, xb, mu, std, eps), noise,
                          steps=steps, lr=lr, lr_decay=lr_decay, on_step=lambda: bar.update(b))


def fit_gaussian_q(m0: torch.Tensor, s0: torch.Tensor, log_weights, noise: "_StepNoise", *, steps: int, lr: float,
                   lr_decay: float, on_step=None) -> tuple[torch.Tensor, torch.Tensor]:
    """IW-SVI's optimization (eq. 42) for a batch of examples: Adam on each example's (mean, log std),
    from the encoder's ``m0, s0`` ``[..., b, z]``, maximizing the sum of their IWAE-l bounds, with the
    learning rate decayed geometrically from ``lr`` to ``lr * lr_decay``.

    ``log_weights(mean, std, eps)`` gives log w ``[..., l, b]`` for draws ``eps`` ``[l, b, z]`` from
    ``noise`` (the examples' own streams). Leading dimensions are independent problems: a stacked
    group's runs (:func:`airvae.stacked.stacked_fit_iw_svi`) share this code with a single model."""
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


def iw_svi_log_likelihood(model: LatentVariableModel, x: torch.Tensor, *, k: int = 5000, l: int = 8,  # noqa: E741
                          steps: int = 3000, lr: float = DEFAULT_SVI_LR, lr_decay: float = DEFAULT_SVI_LR_DECAY,
                          seed: int = 0, chunk_examples: int = DEFAULT_SVI_CHUNK_EXAMPLES,
                          chunk_samples: int = DEFAULT_CHUNK_SAMPLES, progress: bool = False) -> Estimate:
    """IW-SVI (appendix C, eq. 41-42): fit a Gaussian q per example on IWAE-l for ``steps`` Adam
    steps (:func:`fit_iw_svi`), then score it with exactly ``k`` samples (:func:`iwae_given_q`).

    ``steps=0`` scores the encoder's q, i.e. equals IWAE-k with the same seed. The scoring draws
    are independent of the optimization draws, so the result is an unbiased estimate of a lower
    bound on ln p(x) for the fitted q.
    """
    _check_k("k", k)
    start_time = time.perf_counter()
    x = _as_input(model, x)
    mean, std = fit_iw_svi(model, x, l=l, steps=steps, lr=lr, lr_decay=lr_decay, seed=seed,
                           chunk_examples=chunk_examples, progress=progress)
    with frozen(model), tqdm(total=x.shape[0], desc=f"IW-SVI score (k={k})", unit="ex",
                             disable=not progress, leave=False) as bar:
        values = iwae_given_q(model, x, mean, std, k, seed=seed, chunk_samples=chunk_samples, bar=bar)
    settings = {"k": k, "l": l, "steps": steps, "lr": lr, "lr_decay": lr_decay, "seed": seed}
    return Estimate(f"iwsvi-{k}", values, settings, time.perf_counter() - start_time, _dims(model, x))


def inference_gap(log_likelihood: Estimate, bound: Estimate) -> Estimate:
    """Per-example Delta_inf = ln p(x) - L_k(x) (Table 1), ln p(x) from IW-SVI (or AIS)."""
    if log_likelihood.values.shape != bound.values.shape:
        raise ValueError(f"inference_gap: {log_likelihood.name} has {log_likelihood.values.numel()} examples, "
                         f"{bound.name} has {bound.values.numel()}; they must be the same examples")
    settings = {"log_likelihood": log_likelihood.name, "bound": bound.name}
    return Estimate("gap", log_likelihood.values - bound.values, settings,
                    log_likelihood.seconds + bound.seconds, log_likelihood.dims)


# ----------------------------------------------------------------------------------------------
# AIS with HMC (beyond the paper)


def annealing_schedule(num_steps: int, kind: str = "sigmoid", sharpness: float = 4.0) -> torch.Tensor:
    """Inverse temperatures beta_0 = 0 < ... < beta_T = 1 (float64, T + 1 values).

    ``sigmoid``: beta_t proportional to sigmoid(sharpness * (2t/T - 1)), rescaled to [0, 1]; it
    spends more steps near both ends, where the geometric path changes fastest (Grosse et al. 2015).
    ``linear``: evenly spaced.
    """
    _check_k("num_steps", num_steps)
    t = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    if kind == "linear":
        return t
    if kind != "sigmoid":
        raise ValueError(f"invalid schedule = {kind!r}: allowed 'sigmoid' or 'linear'")
    s = torch.sigmoid(sharpness * (2 * t - 1))
    betas = (s - s[0]) / (s[-1] - s[0])
    betas[0], betas[-1] = 0.0, 1.0
    return betas


def _log_densities(model: LatentVariableModel, x: torch.Tensor, z: torch.Tensor):
    """log p(x|z), its z-gradient, log p(z), its z-gradient (all detached)."""
    z = z.detach().requires_grad_(True)
    log_lik = conditional_log_prob(model.decoder, model.likelihood, x, z)
    (grad_lik,) = torch.autograd.grad(log_lik.sum(), z)
    log_prior = standard_normal_log_prob(z)
    (grad_prior,) = torch.autograd.grad(log_prior.sum(), z)
    return log_lik.detach(), grad_lik, log_prior.detach(), grad_prior


def _check_ais(num_intermediate, chains, leapfrog_steps, chunk_examples, tuning_chains, step_size, target_accept,
               adapt_rate) -> None:
    for name, value in (("num_intermediate", num_intermediate), ("chains", chains),
                        ("leapfrog_steps", leapfrog_steps), ("chunk_examples", chunk_examples)):
        _check_k(name, value)
    if not (isinstance(tuning_chains, int) and tuning_chains >= 0):
        raise ValueError(f"invalid tuning_chains = {tuning_chains!r}: allowed an integer >= 0")
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"invalid step_size = {step_size!r}: allowed a finite number > 0")
    if not 0 < target_accept < 1:
        raise ValueError(f"invalid target_accept = {target_accept!r}: allowed (0, 1)")
    if not (adapt_rate >= 0 and math.isfinite(adapt_rate)):
        raise ValueError(f"invalid adapt_rate = {adapt_rate!r}: allowed a finite number >= 0")


def _ais_settings(num_intermediate, chains, leapfrog_steps, step_size, schedule, tuning_chains, target_accept,
                  adapt_rate, seed) -> dict:
    return {"num_intermediate": num_intermediate, "chains": chains, "leapfrog_steps": leapfrog_steps,
            "step_size": step_size, "schedule": schedule, "tuning_chains": tuning_chains,
            "target_accept": target_accept, "adapt_rate": adapt_rate, "seed": seed}


def ais_log_likelihood(model: LatentVariableModel, x: torch.Tensor, *, num_intermediate: int = 500, chains: int = 16,
                       leapfrog_steps: int = 10, step_size: float = 0.1, schedule: str = "sigmoid",
                       tuning_chains: int = 4, target_accept: float = 0.65, adapt_rate: float = 0.2,
                       seed: int = 0, chunk_examples: int = DEFAULT_AIS_CHUNK_EXAMPLES,
                       progress: bool = False) -> Estimate:
    """Annealed importance sampling (Neal 2001) of ln p(x) with HMC transitions.

    Path: f_t(z) = p(z) p(x|z)^beta_t, geometric from the prior N(0, I) (beta = 0, sampled
    exactly, normalizer 1) to p(x, z) (beta = 1); ``num_intermediate`` annealing steps after the
    prior (the last one targets the posterior), spaced by :func:`annealing_schedule`. Each chain
    accumulates log w += (beta_t - beta_{t-1}) log p(x|z_{t-1}), then makes one HMC transition
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
    """
    _check_ais(num_intermediate, chains, leapfrog_steps, chunk_examples, tuning_chains, step_size, target_accept,
               adapt_rate)
    betas = annealing_schedule(num_intermediate, schedule).tolist()
    start_time = time.perf_counter()
    x = _as_input(model, x)
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
                                                   step_size, (target_accept, adapt_rate), seed, start, bar)
                values[start:start + xb.shape[0]] = estimate.cpu()
                accept_sum += accept
    finally:
        bar.close()
    settings = {**_ais_settings(num_intermediate, chains, leapfrog_steps, step_size, schedule, tuning_chains,
                                target_accept, adapt_rate, seed),
                "mean_acceptance": accept_sum / max(n, 1)}  # a diagnostic, not a setting
    return Estimate("ais", values, settings, time.perf_counter() - start_time, _dims(model, x))


def _forward_ais(model, xb, z_dim, betas, chains, tuning_chains, leapfrog_steps, step_size, adaptation, seed,
                 first_index, bar):
    """AIS from the prior for one chunk of examples: (ln p(x) estimates [b], sum over examples of the
    mean acceptance rate, step sizes used [T, b])."""
    b, device = xb.shape[0], xb.device
    dtype = next(model.decoder.parameters()).dtype
    c = chains + tuning_chains  # chains [:chains] estimate, [chains:] only tune the step size
    gens = [example_generator(seed, first_index + i, device, STREAM_AIS) for i in range(b)]
    # z_0 ~ N(0, I): exactly the beta = 0 distribution, whose normalizer is 1.
    z = torch.stack([torch.randn(c, z_dim, generator=g, device=device, dtype=dtype) for g in gens], dim=1)
    return _anneal(model, xb, betas, z, gens, chains, leapfrog_steps, step_size, adaptation, bar)


def _anneal(model, xb, betas, z, gens, chains, leapfrog_steps, step_size, adaptation, bar):
    """AIS chains for a chunk of b examples along ``betas`` (increasing from the prior or, for
    BDMC's reverse chains, decreasing from the posterior), from states ``z`` [c, b, z_dim] that
    are exact samples of the first distribution. Chains ``[:chains]`` estimate; the others, if
    any, only tune the step size. ``step_size`` is either the starting step size, adapted after
    every transition from the tuning chains' acceptance (``adaptation = (target_accept,
    adapt_rate)``, see :func:`ais_log_likelihood`), or a ``[T, b]`` tensor of fixed step sizes,
    one per transition and example. Returns (logmeanexp of the estimating chains' log weights
    [b], an estimate of ln Z_last - ln Z_first; the sum over examples of their mean acceptance
    rate; the step sizes used [T, b])."""
    c, b, z_dim = z.shape
    dtype, device = z.dtype, z.device
    tuning_chains = c - chains
    noise = _StepNoise(gens, (c, z_dim), (c,), device, dtype)  # momenta, Metropolis uniforms
    log_lik, g_lik, log_prior, g_prior = _log_densities(model, xb, z)
    log_w = torch.zeros(c, b, dtype=accumulator_dtype(device), device=device)
    fixed = isinstance(step_size, torch.Tensor)
    eps = torch.full((1, b, 1), step_size, dtype=dtype, device=device) if not fixed else None
    used = torch.empty(len(betas) - 1, b, dtype=dtype, device=device)
    accept_total = torch.zeros(b, dtype=log_w.dtype, device=device)
    for t in range(1, len(betas)):
        beta = betas[t]
        if fixed:
            eps = step_size[t - 1].to(dtype)[None, :, None]
        used[t - 1] = eps[0, :, 0]
        log_w += (beta - betas[t - 1]) * log_lik.to(log_w.dtype)  # ln f_t(z_{t-1}) - ln f_{t-1}(z_{t-1})
        momentum, uniform = noise.next()
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
        if tuning_chains and not fixed:  # the tuning chains' acceptance only: see ais_log_likelihood
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
    """``num_examples`` pairs drawn from the model, z ~ N(0, I) then x ~ p(x|z): (x, z) on the
    model's device. Given x, each z is an exact sample of the posterior p(z|x), which is what
    :func:`bdmc`'s reverse chains need. Example i draws from its own stream (as in every
    estimator), so the first examples do not depend on ``num_examples``."""
    _check_model(model)
    _check_k("num_examples", num_examples)
    _check_k("chunk_examples", chunk_examples)
    z_dim = latent_dim(model) if z_dim is None else z_dim
    device = _model_device(model)
    dtype = next(model.decoder.parameters()).dtype
    gens = [example_generator(seed, i, device, STREAM_SIMULATE) for i in range(num_examples)]
    z = torch.stack([torch.randn(z_dim, generator=g, device=device, dtype=dtype) for g in gens])
    xs = []
    with frozen(model):
        for start in range(0, num_examples, chunk_examples):
            params = decode(model.decoder, z[start:start + chunk_examples])
            xs += [model.likelihood.sample(params[i:i + 1], generator=gens[start + i]) for i in range(params.shape[0])]
    return torch.cat(xs).to(torch.float32), z


def bdmc(model: LatentVariableModel, x: torch.Tensor, z: torch.Tensor, *, num_intermediate: int = 500,
         chains: int = 16, leapfrog_steps: int = 10, step_size: float = 0.1, schedule: str = "sigmoid",
         tuning_chains: int = 4, target_accept: float = 0.65, adapt_rate: float = 0.2, seed: int = 0,
         chunk_examples: int = DEFAULT_AIS_CHUNK_EXAMPLES, progress: bool = False) -> tuple[Estimate, Estimate]:
    """Bidirectional Monte Carlo: a sandwich ``lower <= ln p(x) <= upper`` per example, for data
    ``(x, z)`` simulated from the model (:func:`simulate`), so that each z is an exact sample of
    p(z|x). Returns (lower, upper) Estimates. In expectation, ``upper - lower`` bounds the error of
    each, and ``upper`` minus any other lower bound on these examples (IW-SVI) bounds its slack.

    * lower: forward AIS from the prior, exactly :func:`ais_log_likelihood` with the same settings
      and seed (an unbiased estimate of p(x), so E[lower] <= ln p(x));
    * upper: reverse AIS, the same annealing path run from beta = 1 down to 0, every chain started
      at the z that generated x. Its weights are unbiased estimates of 1/p(x) (it is AIS from the
      normalized posterior to the prior), so minus their logmeanexp has E[upper] >= ln p(x).

    Each reverse transition uses the step size that forward AIS's tuning chains chose at the same
    beta: the kernels then depend only on x and chains independent of z, which keeps the reverse
    estimate exact (adapting on the reverse chains themselves would not). The sandwich narrows to
    0 as ``num_intermediate`` grows.
    """
    _check_ais(num_intermediate, chains, leapfrog_steps, chunk_examples, tuning_chains, step_size, target_accept,
               adapt_rate)
    betas = annealing_schedule(num_intermediate, schedule).tolist()
    start_time = time.perf_counter()
    x = _as_input(model, x)
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
    dims = _dims(model, x)
    return (Estimate("bdmc-lower", lower, {**settings, "mean_acceptance": accept[0] / n}, seconds, dims),
            Estimate("bdmc-upper", upper, {**settings, "mean_acceptance": accept[1] / n}, seconds, dims))
