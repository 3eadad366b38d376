"""Objectives as pure functions of tensors.

Everything in airvae (training, validation, every evaluator) goes through one path: the log
importance weights ``log w = log p(x, z) - log q(z|x)`` of shape ``[m, k, batch]`` (``m`` Monte
Carlo repeats of ``k`` importance samples), from which the bounds below are computed.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return -(0.5 * z.square() + HALF_LOG_2PI).sum(-1)


def gaussian_log_prob_from_noise(eps: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(mean + std * eps; mean, diag(std^2)), summed over the last dimension.

    Written in terms of the standard-normal draw ``eps`` instead of ``z``: this avoids the
    cancellation in ``(z - mean) / std`` and is exact for reparameterized samples.
    """
    return -(0.5 * eps.square() + std.log() + HALF_LOG_2PI).sum(-1)


def gaussian_log_ratio_from_noise(z: torch.Tensor, eps: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) - log N(z; mean, diag(std^2)) for ``z = mean + std * eps``, summed over the
    last dimension: ``0.5 * (|eps|^2 - |z|^2) + sum(log std)``.

    Equal to ``standard_normal_log_prob(z) - gaussian_log_prob_from_noise(eps, std)`` (the 2 pi
    constants cancel) in fewer passes: ``sum(log std)`` is taken once per example and broadcast
    over the sample axes instead of being added to every sample.
    """
    return 0.5 * (eps.square() - z.square()).sum(-1) + std.log().sum(-1)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(std^2)), summed over the last dimension."""
    return gaussian_log_prob_from_noise((z - mean) / std, std)


def bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over the last dimension, as ``x * logits -
    softplus(logits)`` (stable for any logits); ``x`` broadcasts against ``logits``.
    """
    # x * l - softplus(l) is the numerically stable form of x log s(l) + (1 - x) log(1 - s(l)).
    return (x * logits).sum(-1) - F.softplus(logits).sum(-1)


def iwae_bound(log_w: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """The IWAE-k bound (eq. 20), ``log (1/k) sum_i w_i``, by logsumexp over the k axis.

    Args:
        log_w: log importance weights, e.g. ``[m, k, batch]``.
        dim: the k axis.

    Returns:
        ``log_w`` without the k axis (``[m, batch]`` for ``[m, k, batch]``).
    """
    if log_w.shape[dim] == 1:  # k = 1: the bound is the weight itself (exactly what logsumexp gives)
        return log_w.squeeze(dim)
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def elbo(log_w: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """The ELBO (eq. 5): the average log weight over the sample axis; equals
    [`iwae_bound`][airvae.bounds.iwae_bound] at k = 1, and is below it for k > 1.

    Args:
        log_w: log importance weights, e.g. ``[m, k, batch]``.
        dim: the sample axis.

    Returns:
        ``log_w`` without the sample axis.
    """
    return log_w.mean(dim=dim)
