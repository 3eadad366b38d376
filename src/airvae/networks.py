"""Networks: MLPs from architecture specs, the Gaussian encoder, the Bernoulli decoder, and the two
AIR encoder regularizers (weight-normalized inference, eq. 17/18; denoising, eq. 13).

Architecture specs follow the paper's Table 6 notation: ``d300-d300`` is two dense layers of 300
units, each followed by an ELU. The encoder ends in a mean layer and a softplus *variance* layer
(``z64``), the decoder in a logit layer (``x784``).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

_LAYER = re.compile(r"^d([1-9][0-9]*)$")


def parse_hidden_spec(spec: str) -> tuple[int, ...]:
    """``"d300-d300"`` -> ``(300, 300)``; ``""`` or ``"none"`` -> ``()`` (a linear map)."""
    spec = spec.strip()
    if spec in ("", "none"):
        return ()
    sizes = []
    for token in spec.split("-"):
        match = _LAYER.match(token)
        if match is None:
            raise ValueError(
                f"architecture spec {spec!r}: layer {token!r} is not of the form 'd<units>' "
                "(e.g. 'd300-d300' for two dense ELU layers of 300 units)"
            )
        sizes.append(int(match.group(1)))
    return tuple(sizes)


class CappedWeightNormLinear(nn.Module):
    """Dense layer whose weight vectors have norm at most ``max_norm`` (eq. 17/18).

    Each output unit's weight vector (a row of ``weight``, the paper's column ``w_i``) is
    ``w_i = v_i / ||v_i|| * s_i`` with ``s_i = min(||v_i||, H * sigmoid(u_i))``. The cap bounds the
    Lipschitz constant of the layer, which is what makes the encoder smooth.
    """

    def __init__(self, in_features: int, out_features: int, max_norm: float):
        super().__init__()
        if not max_norm > 0:
            raise ValueError(f"max_norm (H) must be > 0, got {max_norm}")
        self.in_features, self.out_features, self.max_norm = in_features, out_features, max_norm
        init = nn.Linear(in_features, out_features)  # reuse torch's default initialisation
        self.v = nn.Parameter(init.weight.detach().clone())
        self.bias = nn.Parameter(init.bias.detach().clone())
        # u = 0 starts the cap at H/2; sigmoid keeps it in (0, H) whatever u becomes.
        self.u = nn.Parameter(torch.zeros(out_features))

    @property
    def weight(self) -> torch.Tensor:
        v_norm = self.v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        scale = torch.minimum(v_norm, self.max_norm * torch.sigmoid(self.u).unsqueeze(1))
        return self.v * (scale / v_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, H={self.max_norm:g}"


def mlp(in_features: int, hidden: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    """Dense + ELU layers; returns the trunk and its output width."""
    layers: list[nn.Module] = []
    width = in_features
    for units in hidden:
        layers += [nn.Linear(width, units), nn.ELU()]
        width = units
    return nn.Sequential(*layers), width


class GaussianEncoder(nn.Module):
    """q(z|x) = N(mean(x), diag(var(x))) with var = softplus(.) (Table 6's ``z64``).

    Weight-normalized inference (section 3.2) is applied to it, or to any other encoder, by
    :func:`airvae.model.cap_weight_norms`.
    """

    def __init__(self, x_dim: int, z_dim: int, hidden: tuple[int, ...] | str = ()):
        super().__init__()
        hidden = parse_hidden_spec(hidden) if isinstance(hidden, str) else tuple(hidden)
        self.x_dim, self.z_dim = x_dim, z_dim
        self.trunk, width = mlp(x_dim, hidden)
        self.mean = nn.Linear(width, z_dim)
        self.var = nn.Linear(width, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (mean, std), each [..., z_dim]."""
        h = self.trunk(x)
        # A tiny floor keeps log q finite when softplus underflows for very confident units.
        std = torch.sqrt(F.softplus(self.var(h)) + 1e-8)
        return self.mean(h), std


class DenoisingEncoder(nn.Module):
    """Wraps any encoder so that it sees ``x + eps``, ``eps ~ N(0, sigma^2 I)`` (eq. 13).

    The noise is added only when asked for (``noisy=True``) or, by default, in training mode:
    evaluation always sees the clean input. The decoder's log p(x|z) keeps scoring the clean x;
    that is the caller's business, this module only perturbs what the encoder sees.
    """

    def __init__(self, encoder: nn.Module, sigma: float):
        super().__init__()
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.encoder, self.sigma = encoder, float(sigma)

    def perturb(self, x: torch.Tensor, noisy: bool | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """What the wrapped encoder sees: ``x + eps`` when noisy, else ``x``."""
        noisy = self.training if noisy is None else noisy
        if noisy and self.sigma > 0:
            return x + self.sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x

    def forward(self, x: torch.Tensor, noisy: bool | None = None):
        return self.encoder(self.perturb(x, noisy))

    def extra_repr(self) -> str:
        return f"sigma={self.sigma:g}"


class BernoulliDecoder(nn.Module):
    """p(x|z) = Bernoulli(sigmoid(logits(z))) (Table 6's ``x784``)."""

    def __init__(self, z_dim: int, x_dim: int, hidden: tuple[int, ...] | str = ()):
        super().__init__()
        hidden = parse_hidden_spec(hidden) if isinstance(hidden, str) else tuple(hidden)
        self.z_dim, self.x_dim = z_dim, x_dim
        self.trunk, width = mlp(z_dim, hidden)
        self.logits = nn.Linear(width, x_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.logits(self.trunk(z))
