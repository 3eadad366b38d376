"""The training objective's random draws and eq. 16's mix, in one place for a model trained alone
([`airvae.model.air_objective`][]) and for a stacked group ([`airvae.stacked`][]).

A training step of a model with denoising noise ``sigma`` (eq. 13) and partial-denoising weight
``alpha`` (eq. 16) draws, from the run's own generator and in this order:

1. the denoising noise ``eps_x ~ N(0, I)`` of the input's shape (the encoder sees ``x + sigma eps_x``),
   when the step uses a noisy encoder at all (sigma > 0 and alpha > 0);
2. the reparameterization noise ``[m, k, B, z]`` of the (noisy) bound;
3. when eq. 16 mixes two bounds (0 < alpha < 1), the reparameterization noise of the clean bound.

Runs that draw in this order from generators in the same state get the same numbers, which is
what makes a run trained in a group equal to the same run trained alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Denoising:
    """What a model's denoising asks of a step: the noise std ``sigma`` (eq. 13; 0 = none) and eq. 16's
    ``alpha``. The one place that decides which draws a step makes."""

    sigma: float = 0.0
    alpha: float = 1.0

    @property
    def draws_noise(self) -> bool:
        """The step feeds a noisy input to the encoder (its bound enters eq. 16 with weight alpha > 0)."""
        return self.sigma > 0 and self.alpha > 0

    @property
    def two_bounds(self) -> bool:
        """Eq. 16 mixes the noisy and the clean bound (0 < alpha < 1): two bounds per step."""
        return self.sigma > 0 and 0 < self.alpha < 1


@dataclass(frozen=True)
class StepDraws:
    """The standard-normal draws of one step: ``noise`` (the input's shape, or None), ``eps`` and
    ``eps_clean`` (``[m, k, B, z]``; ``eps_clean`` None unless two bounds)."""

    noise: torch.Tensor | None
    eps: torch.Tensor
    eps_clean: torch.Tensor | None


def draw_step(denoising: Denoising, x_shape: tuple[int, ...], eps_shape: tuple[int, ...], *,
              generator: torch.Generator | None, device: torch.device | str | None,
              dtype: torch.dtype | None) -> StepDraws:
    """One step's draws, in the order of the module docstring (input noise, then eps, then eps_clean).

    Args:
        denoising: which draws the step makes.
        x_shape: the input's shape (of the noise).
        eps_shape: ``[m, k, B, z]``, the shape of each reparameterization draw.
        generator: the run's random stream (None: torch's global one).
        device (torch.device | str): where the draws are made.
        dtype (torch.dtype): their dtype.

    Returns:
        The step's [`StepDraws`][airvae.objectives.StepDraws].
    """
    def normal(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    noise = normal(x_shape) if denoising.draws_noise else None
    eps = normal(eps_shape)
    return StepDraws(noise, eps, normal(eps_shape) if denoising.two_bounds else None)


def seen_input(x: torch.Tensor, sigma: float | torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """What the encoder sees: ``x + sigma * noise`` (eq. 13), or ``x`` without noise."""
    return x if noise is None else x + sigma * noise


def mix_bounds(noisy: torch.Tensor, clean: torch.Tensor | None, alpha: float | torch.Tensor) -> torch.Tensor:
    """Eq. 16: ``alpha * L(noisy encoder) + (1 - alpha) * L(clean encoder)``; the noisy bound alone
    when only one was computed."""
    return noisy if clean is None else alpha * noisy + (1 - alpha) * clean
