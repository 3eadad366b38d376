"""Likelihoods p(x|z): the decoder emits their parameters, the likelihood scores x.

One contract for every likelihood, so that any decoder fits any likelihood and every bound and
estimator goes through the one log-weights path ([`airvae.model.log_weights_given_q`][]):

* ``x`` has exactly one batch axis: ``[B, D]`` (flat data) or ``[B, C, H, W]`` (images; any number
  of event axes works). Its first event axis (features ``D`` or channels ``C``) is the *parameter
  axis*.
* The decoder maps latents ``[N, z_dim]`` to ``[N, P * x.shape[1], *x.shape[2:]]`` with
  ``P = likelihood.params_per_dim``: P parameter tensors shaped like one example of x, stacked as
  P contiguous blocks along the parameter axis (parameter ``p`` of channel ``c`` is output
  channel ``p * C + c``). A Bernoulli or fixed-std Gaussian decoder (P = 1) emits one value per
  data dimension; a dense decoder's last layer has ``P * D`` outputs, a conv decoder's last layer
  ``P * C`` channels.
* [`Likelihood.log_prob`][airvae.likelihoods.Likelihood.log_prob] takes ``x [B, *event]`` and parameters with
  any leading sample axes, ``[*sample, B, P * C, ...]``, and returns ``log p(x|z)`` summed over the event
  axes, ``[*sample, B]``.

Likelihoods are modules: learned parameters (a Gaussian's learned std) are trained, saved and
frozen together with the model that holds them. Discrete likelihoods (Bernoulli,
DiscretizedLogistic) give probabilities, so ``-ln p(x)`` converts exactly to bits per dimension
([`bits_per_dim`][airvae.likelihoods.bits_per_dim]); a Gaussian gives a density.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from .bounds import bernoulli_log_prob, gaussian_log_prob

if TYPE_CHECKING:
    import numpy as np

LN2 = math.log(2.0)

# What bits_per_dim converts: a number, or numbers in an array or a tensor (returned as the same kind).
Values = TypeVar("Values", float, "np.ndarray[Any, Any]", torch.Tensor)

__all__ = ["Bernoulli", "DiscretizedLogistic", "Gaussian", "Likelihood", "bits_per_dim",
           "discretized_logistic_log_prob", "log_likelihood_from_bits_per_dim"]


def bits_per_dim(log_likelihood: Values, dims: int) -> Values:
    """A log-likelihood in nats as bits per data dimension, ``-ln p(x) / (dims * ln 2)``; exact for
    discrete likelihoods (a density's bits/dim mean nothing).

    Args:
        log_likelihood (float | numpy.ndarray | torch.Tensor): ln p(x) in nats.
        dims: data dimensions per example.
    """
    return -log_likelihood / (dims * LN2)


def log_likelihood_from_bits_per_dim(bits: Values, dims: int) -> Values:
    """Inverse of [`bits_per_dim`][airvae.likelihoods.bits_per_dim]: ``-bits * dims * ln 2`` nats.

    Args:
        bits (float | numpy.ndarray | torch.Tensor): bits per data dimension.
        dims: data dimensions per example.
    """
    return -bits * (dims * LN2)


class Likelihood(nn.Module):
    """p(x|z) given the decoder's output (see the module docstring for the shapes).

    Subclasses set ``params_per_dim`` (P) and ``discrete``, and implement ``log_prob``, ``sample``
    and ``mean``; ``validate`` refuses data the likelihood cannot score.
    """

    params_per_dim: int = 1  # P: parameter tensors the decoder emits per data dimension
    discrete: bool = True  # a probability of discrete data (bits/dim mean something), not a density

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over the event axes.

        Args:
            x: the examples, ``[B, *event]``.
            params: the decoder's output for latents with any leading sample axes,
                ``[*sample, B, P*C, ...]``.

        Returns:
            ``[*sample, B]``.
        """
        raise NotImplementedError

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x ~ p(x|z).

        Args:
            params: the decoder's output for N latents, ``[N, P*C, ...]``.
            generator: the draws' random stream (default: torch's global one).

        Returns:
            ``[N, C, ...]``.
        """
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x|z] for params ``[N, P*C, ...]`` -> ``[N, C, ...]``: what a picture of a sample or a
        reconstruction shows."""
        raise NotImplementedError

    def validate(self, x: torch.Tensor) -> None:
        """Raise ValueError, saying what is wrong, if ``x`` is not data this likelihood scores."""
        if x.dim() < 2:
            raise ValueError(f"x has shape {list(x.shape)}: expected [batch, D] or [batch, C, H, W] "
                             "(one batch axis; use x[None] for a single example)")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values")

    def split(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The P parameter tensors, each ``[*sample, *x.shape]``, after checking the shapes."""
        event_dims = x.dim() - 1
        expected = (self.params_per_dim * x.shape[1], *x.shape[2:]) if event_dims >= 1 else None
        if expected is None or tuple(params.shape[params.dim() - event_dims:]) != expected:
            raise ValueError(
                f"{self!r}: decoder output {list(params.shape)} does not fit x {list(x.shape)}; for x of shape "
                f"[B, C, ...] the decoder must emit [N, {self.params_per_dim} * C, ...] "
                f"({self.params_per_dim} parameter(s) per data dimension, stacked along axis 1)")
        return params.chunk(self.params_per_dim, dim=-event_dims) if self.params_per_dim > 1 else (params,)

    def _sample_split(self, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if params.dim() < 2 or params.shape[1] % self.params_per_dim:
            raise ValueError(f"{self!r}: decoder output {list(params.shape)} is not "
                             f"[N, {self.params_per_dim} * C, ...]")
        return params.chunk(self.params_per_dim, dim=1)


def _flat(t: torch.Tensor, event_dims: int) -> torch.Tensor:
    """The event axes merged into one (a no-op for flat data), so the 1-d densities of bounds.py apply."""
    return t.flatten(-event_dims) if event_dims > 1 else t


class Bernoulli(Likelihood):
    """p(x|z) = prod_d Bernoulli(x_d; sigmoid(logit_d)); the decoder emits logits (P = 1).
    airvae's default: the paper's likelihood for binary data."""

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x|z) for binary x and logits;
        see [`Likelihood.log_prob`][airvae.likelihoods.Likelihood.log_prob].
        """
        (logits,) = self.split(x, params)
        event_dims = x.dim() - 1
        return bernoulli_log_prob(_flat(x, event_dims), _flat(logits, event_dims))

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Binary x ~ p(x|z);
        see [`Likelihood.sample`][airvae.likelihoods.Likelihood.sample].
        """
        (logits,) = self._sample_split(params)
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        return (u < torch.sigmoid(logits)).to(logits.dtype)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """``sigmoid(logits)``;
        see [`Likelihood.mean`][airvae.likelihoods.Likelihood.mean].
        """
        (logits,) = self._sample_split(params)
        return torch.sigmoid(logits)

    def validate(self, x: torch.Tensor) -> None:
        """Also refuses x that is not binary (0 or 1)."""
        super().validate(x)
        if x.numel() and not bool(((x == 0) | (x == 1)).all()):
            raise ValueError(f"Bernoulli likelihood: x must be binary (0 or 1), got values in [{x.min().item():g}, "
                             f"{x.max().item():g}] that are not; for grey levels use DiscretizedLogistic(num_bins=...), "
                             "for real values Gaussian()")


class Gaussian(Likelihood):
    """p(x|z) = N(x; mean(z), diag(std^2)), a density for real-valued x; the decoder emits the mean.

    Learned stds are ``min_std + exp(l)`` for a learned (or decoder-emitted) l: without a floor, a
    dimension that is constant in the data (a black image border) drives its std to 0 and the
    likelihood to infinity, and a smooth floor (unlike clamping) never leaves a gradient of 0.

    Args:
        std: the fixed std, or the initial value of a learned one (``std_mode`` ``"decoder"``: leave
            it at 1).
        std_mode: where the standard deviation comes from: ``"fixed"``, ``std`` itself, never
            trained (P = 1); ``"global"``, one learned std for every dimension (P = 1);
            ``"per-dimension"``, one learned std per data dimension (P = 1); ``"decoder"``, the
            decoder emits the log std of every dimension after the means (P = 2).
        event_shape: the shape of one example (``(D,)`` or ``(C, H, W)``), for and only for
            ``"per-dimension"``.
        min_std: the floor of a learned std, in ``[0, std)``.

    Raises:
        ValueError: an invalid setting or combination, naming it.
    """

    STD_MODES = ("fixed", "global", "per-dimension", "decoder")
    discrete = False
    std: torch.Tensor  # std_mode "fixed": a buffer
    log_std: nn.Parameter  # "global" and "per-dimension": l of min_std + exp(l)

    def __init__(self, std: float = 1.0, std_mode: str = "fixed", event_shape: tuple[int, ...] | None = None,
                 min_std: float = 1e-3) -> None:
        super().__init__()
        if std_mode not in self.STD_MODES:
            raise ValueError(f"invalid std_mode = {std_mode!r}: allowed {', '.join(self.STD_MODES)}")
        if not (std > 0 and math.isfinite(std)):
            raise ValueError(f"invalid std = {std!r}: allowed a finite number > 0")
        if std_mode != "fixed" and not 0 <= min_std < std:
            raise ValueError(f"invalid min_std = {min_std!r}: allowed [0, std)")
        if std_mode == "decoder" and std != 1.0:
            raise ValueError(f"invalid std = {std!r} with std_mode='decoder': the decoder emits the std; leave std "
                             "at its default")
        if (std_mode == "per-dimension") != (event_shape is not None):
            raise ValueError("Gaussian: event_shape (the shape of one example) is needed for, and only for, "
                             "std_mode='per-dimension'")
        self.std_mode, self.min_std = std_mode, float(min_std)
        self.params_per_dim = 2 if std_mode == "decoder" else 1
        if std_mode == "fixed":
            self.register_buffer("std", torch.tensor(float(std)))
        elif std_mode in ("global", "per-dimension"):
            shape = () if std_mode == "global" or event_shape is None else tuple(event_shape)
            self.log_std = nn.Parameter(torch.full(shape, math.log(std - min_std)))  # starts at std

    def _mean_and_std(self, parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.std_mode == "fixed":
            return parts[0], self.std
        log_std = parts[1] if self.std_mode == "decoder" else self.log_std
        return parts[0], self.min_std + log_std.exp()

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The Gaussian log density of x;
        see [`Likelihood.log_prob`][airvae.likelihoods.Likelihood.log_prob].
        """
        event_dims = x.dim() - 1
        mean, std = self._mean_and_std(self.split(x, params))
        if self.std_mode == "per-dimension" and tuple(std.shape) != tuple(x.shape[1:]):
            raise ValueError(f"Gaussian: event_shape {tuple(std.shape)} does not match x {list(x.shape)}")
        return gaussian_log_prob(_flat(x, event_dims), _flat(mean, event_dims),
                                 _flat(std, event_dims) if std.dim() else std)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x ~ N(mean, std^2);
        see [`Likelihood.sample`][airvae.likelihoods.Likelihood.sample].
        """
        mean, std = self._mean_and_std(self._sample_split(params))
        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The decoder's mean;
        see [`Likelihood.mean`][airvae.likelihoods.Likelihood.mean].
        """
        return self._sample_split(params)[0]

    def extra_repr(self) -> str:
        std = f", std={float(self.std):g}" if self.std_mode == "fixed" else ""
        return f"std_mode={self.std_mode!r}{std}"


def _log1mexp(t: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(t)) for t < 0, accurate for t near 0 and for t very negative (Maechler 2012)."""
    return torch.where(t > -LN2, torch.log(-torch.expm1(t)), torch.log1p(-torch.exp(t)))


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                  num_bins: int) -> torch.Tensor:
    """Elementwise log P(bin of x) under a logistic(mean, scale) discretized to ``num_bins`` bins.

    x lies on the grid ``i / (num_bins - 1)``; bin i is ``x +- w/2`` with ``w = 1 / (num_bins - 1)``,
    and the two edge bins take the tails (``(-inf, w/2]`` and ``[1 - w/2, inf)``), so the bins
    partition the real line and their probabilities sum to 1. With ``a = (x + w/2 - mean) / scale``
    and ``b = (x - w/2 - mean) / scale``, an inner bin has probability ``sigmoid(a) - sigmoid(b)``
    ``= sigmoid(a) sigmoid(-b) (1 - exp(b - a))``, evaluated in log space: no cancellation in
    either tail and no underflow for narrow scales.

    Args:
        x: the data, on the grid.
        mean: the logistic's location, broadcastable with x.
        log_scale: the log of its scale (clamped to [-20, 20]).
        num_bins: the grid's levels.

    Returns:
        log P per element, x's shape broadcast with ``mean``'s.
    """
    half = 0.5 / (num_bins - 1)
    # Scales beyond e^-20 (a millionth of a bin) or e^20 mean nothing, and exp(-log_scale) would
    # overflow to inf (NaN gradients) below about -88 in float32.
    inv_scale = torch.exp(-log_scale.clamp(-20.0, 20.0))
    centred = x - mean
    upper, lower = (centred + half) * inv_scale, (centred - half) * inv_scale
    inner = F.logsigmoid(upper) + F.logsigmoid(-lower) + _log1mexp(-2 * half * inv_scale)
    return torch.where(x < half, F.logsigmoid(upper), torch.where(x > 1 - half, F.logsigmoid(-lower), inner))


class DiscretizedLogistic(Likelihood):
    """Each dimension of x is a logistic (or a mixture of ``components`` logistics) discretized to
    ``num_bins`` levels (Salimans et al. 2017, PixelCNN++, without the channel coupling).

    x must lie on the grid ``i / (num_bins - 1)`` in [0, 1]: 8-bit images as ``x.float() / 255``
    with the default 256 bins; 17 grey levels (scikit-learn's digits, 0..16) as ``x / 16`` with
    ``num_bins=17``. The decoder emits, per data dimension, the mean and log scale (P = 2) for
    one component; for K > 1 components, K mixture logits, K means and K log scales in that order
    (P = 3K). Gives probabilities: report ``-ln p(x)`` as
    [`bits_per_dim`][airvae.likelihoods.bits_per_dim] too.

    Args:
        num_bins: the grid's levels (>= 2).
        components: K, the logistics mixed per dimension (>= 1).
    """

    def __init__(self, num_bins: int = 256, components: int = 1) -> None:
        super().__init__()
        if not (isinstance(num_bins, int) and num_bins >= 2):
            raise ValueError(f"invalid num_bins = {num_bins!r}: allowed an integer >= 2")
        if not (isinstance(components, int) and components >= 1):
            raise ValueError(f"invalid components = {components!r}: allowed an integer >= 1")
        self.num_bins, self.components = num_bins, components
        self.params_per_dim = 2 if components == 1 else 3 * components

    def _components(self, parts: tuple[torch.Tensor, ...],
                    axis: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(mixture logits or None, means, log scales), components stacked on ``axis``."""
        if self.components == 1:
            return None, parts[0], parts[1]
        k = self.components
        return (torch.stack(parts[:k], axis), torch.stack(parts[k:2 * k], axis), torch.stack(parts[2 * k:], axis))

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log P(x) summed over the bins of every dimension;
        see [`Likelihood.log_prob`][airvae.likelihoods.Likelihood.log_prob].
        """
        event_dims = x.dim() - 1
        logits, mean, log_scale = self._components(self.split(x, params), axis=-event_dims - 1)
        if logits is None:
            per_dim = discretized_logistic_log_prob(x, mean, log_scale, self.num_bins)
        else:
            axis = -event_dims - 1
            per_component = discretized_logistic_log_prob(x.unsqueeze(axis), mean, log_scale, self.num_bins)
            per_dim = torch.logsumexp(F.log_softmax(logits, dim=axis) + per_component, dim=axis)
        return _flat(per_dim, event_dims).sum(-1)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x on the grid, drawn with exactly the bins' probabilities;
        see [`Likelihood.sample`][airvae.likelihoods.Likelihood.sample].
        """
        logits, mean, log_scale = self._components(self._sample_split(params), axis=1)

        def uniform(shape: torch.Size) -> torch.Tensor:  # in (0, 1): finite logs
            u = torch.rand(shape, generator=generator, device=params.device, dtype=params.dtype)
            return u.clamp(torch.finfo(params.dtype).tiny, 1 - torch.finfo(params.dtype).eps)

        if logits is not None:  # pick a component per dimension (Gumbel-max), then its mean and scale
            choice = (logits - torch.log(-torch.log(uniform(logits.shape)))).argmax(1, keepdim=True)
            mean, log_scale = mean.gather(1, choice).squeeze(1), log_scale.gather(1, choice).squeeze(1)
        u = uniform(mean.shape)
        continuous = mean + log_scale.exp() * (torch.log(u) - torch.log1p(-u))  # a logistic draw
        top = self.num_bins - 1
        return torch.round(continuous * top).clamp(0, top) / top  # its bin: exactly the bin probabilities

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        # The logistics' locations, weighted by the mixture, clamped to the data's range: the mean of each
        # continuous logistic before discretization (the edge bins pile its tails at 0 and 1).
        """The logistics' locations, weighted by the mixture and clamped to [0, 1] (the continuous mean
        before discretization, whose edge bins pile the tails at 0 and 1).
        """
        logits, mean, _ = self._components(self._sample_split(params), axis=1)
        if logits is not None:
            mean = (torch.softmax(logits, 1) * mean).sum(1)
        return mean.clamp(0, 1)

    def validate(self, x: torch.Tensor) -> None:
        """Also refuses x off the grid ``i / (num_bins - 1)`` in [0, 1]."""
        super().validate(x)
        top = self.num_bins - 1
        off_grid = (x * top - torch.round(x * top)).abs().max() if x.numel() else 0.0
        if x.numel() and not (x.min() >= 0 and x.max() <= 1 and off_grid < 1e-3):
            raise ValueError(
                f"DiscretizedLogistic(num_bins={self.num_bins}): x must lie on the grid i/{top} in [0, 1] "
                f"(e.g. 8-bit images as x.float() / 255 with num_bins=256); got values in "
                f"[{x.min().item():g}, {x.max().item():g}]")

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, components={self.components}"
