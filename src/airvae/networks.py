"""Networks: MLPs from architecture specs, the Gaussian encoder, the decoders, and the two AIR
encoder regularizers (weight-normalized inference, eq. 17/18, for dense and conv layers; denoising,
eq. 13).

Architecture specs follow the paper's Table 6 notation: ``d300-d300`` is two dense layers of 300
units, each followed by an ELU. The encoder ends in a mean layer and a softplus *variance* layer
(``z64``), the decoder in a logit layer (``x784``).

Image data (``[C, H, W]`` examples) may also use convolution layers, ``c<channels>k<kernel>s<stride>``,
each followed by an ELU, with padding ``(kernel - 1) // 2``. A spec lists layers in the order data
flows through the network, so an encoder is convolutions then dense layers, and a decoder is the
mirror image: dense layers, then in a decoder ``cCkKsS`` is the transposed convolution *from* the
C-channel map that the encoder's ``cCkKsS`` produces. The decoder mirroring the encoder
``c32k4s2-c64k4s2-d256`` is ``d256-c64k4s2-c32k4s2``: z -> 256 -> a 64-channel map -> transposed
convolution (k4 s2) -> 32 channels -> transposed convolution (k4 s2) -> the likelihood's parameters
at the image's size (each transposed convolution restores exactly the size its mirror took in).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

_DENSE = re.compile(r"d([1-9][0-9]*)")
_CONV = re.compile(r"c([1-9][0-9]*)k([1-9][0-9]*)s([1-9][0-9]*)")


@dataclass(frozen=True)
class Conv:
    """One ``c<channels>k<kernel>s<stride>`` token of an architecture spec."""

    channels: int
    kernel: int
    stride: int

    @property
    def padding(self) -> int:
        return (self.kernel - 1) // 2

    def output_size(self, size: int) -> int:
        """Side of the map a convolution with this kernel, stride and padding makes from ``size``."""
        return (size + 2 * self.padding - self.kernel) // self.stride + 1


def parse_spec(spec: str, role: str = "encoder") -> tuple[tuple[Conv, ...], tuple[int, ...]]:
    """The convolutions and dense widths of an architecture spec (the module docstring's notation).

    ``"c32k4s2-c64k4s2-d256"`` gives ``((Conv(32, 4, 2), Conv(64, 4, 2)), (256,))`` for an encoder;
    a decoder lists its dense layers first (``"d256-c64k4s2-c32k4s2"``).

    Args:
        spec: the spec; ``""`` or ``"none"``: no layers.
        role: ``"encoder"`` or ``"decoder"``, which decides the order the layers must come in.

    Returns:
        ``(convolutions, dense widths)``, each in the spec's order.

    Raises:
        ValueError: a token is neither ``d<units>`` nor ``c<channels>k<kernel>s<stride>``, or the
            layers are in the wrong order for ``role``.
    """
    spec = spec.strip()
    if spec in ("", "none"):
        return (), ()
    convs, dense, kinds = [], [], []
    for token in spec.split("-"):
        if (match := _DENSE.fullmatch(token)) is not None:
            dense.append(int(match.group(1)))
            kinds.append("d")
        elif (match := _CONV.fullmatch(token)) is not None:
            convs.append(Conv(*(int(g) for g in match.groups())))
            kinds.append("c")
        else:
            raise ValueError(
                f"architecture spec {spec!r}: layer {token!r} is neither 'd<units>' (a dense ELU layer, e.g. "
                "'d300-d300') nor 'c<channels>k<kernel>s<stride>' (a convolution, e.g. 'c32k4s2-c64k4s2')")
    order = "".join(kinds)
    if ("dc" if role == "encoder" else "cd") in order:
        example = "c32k4s2-c64k4s2-d256" if role == "encoder" else "d256-c64k4s2-c32k4s2"
        before, after = ("convolution", "dense") if role == "encoder" else ("dense", "convolution")
        raise ValueError(f"architecture spec {spec!r}: {'an' if role == 'encoder' else 'a'} {role} lists its {before} "
                         f"layers before its {after} layers (e.g. {example!r})")
    return tuple(convs), tuple(dense)


def parse_hidden_spec(spec: str) -> tuple[int, ...]:
    """``"d300-d300"`` -> ``(300, 300)``; ``""`` or ``"none"`` -> ``()`` (a linear map). Dense layers only."""
    convs, dense = parse_spec(spec)
    if convs:
        raise ValueError(f"architecture spec {spec!r}: convolution layers need an image-shaped network "
                         "(ConvEncoder, ConvDecoder); a dense network takes 'd<units>' layers only")
    return dense


def conv_map_shapes(image_shape: tuple[int, int, int], convs: tuple[Conv, ...]) -> list[tuple[int, int, int]]:
    """The feature maps ``[C, H, W]`` an encoder's convolutions make from an image, the image first.
    Raises ValueError when a layer would shrink the map below 1x1."""
    channels, height, width = image_shape
    shapes = [(channels, height, width)]
    for conv in convs:
        _, height, width = shapes[-1]
        shape = (conv.channels, conv.output_size(height), conv.output_size(width))
        if min(shape[1:]) < 1:
            raise ValueError(f"convolution c{conv.channels}k{conv.kernel}s{conv.stride} would shrink the "
                             f"{height}x{width} map to {shape[1]}x{shape[2]}: use a smaller kernel or fewer layers")
        shapes.append(shape)
    return shapes


def capped_rows(v: torch.Tensor, u: torch.Tensor, max_norm: float | torch.Tensor) -> torch.Tensor:
    """Eq. 17/18 for the rows of ``v`` [units, fan_in]: row i becomes ``v_i / ||v_i|| * s_i`` with
    ``s_i = min(||v_i||, H * sigmoid(u_i))``, so its norm never exceeds H and its direction is kept."""
    v_norm = v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cap = max_norm * torch.sigmoid(u).unsqueeze(1)
    # Below its cap a row is v itself, and written so its gradient is exactly the incoming one:
    # v * (||v|| / ||v||) would add a rounding-level radial term, which Adam turns into steps of
    # size lr on every weight whose true gradient is 0 (an input that is 0 in the whole batch).
    return torch.where(v_norm <= cap, v, v * (cap / v_norm))


class CappedWeightNormLinear(nn.Module):
    """Dense layer whose weight vectors have norm at most ``max_norm`` (eq. 17/18).

    Each output unit's weight vector (a row of ``weight``, the paper's column ``w_i``) is
    ``w_i = v_i / ||v_i|| * s_i`` with ``s_i = min(||v_i||, H * sigmoid(u_i))``. The cap bounds the
    Lipschitz constant of the layer, which is what makes the encoder smooth. ``v`` and the bias start
    as torch's ``nn.Linear`` would, ``u`` at 0 (a cap of H/2).

    Args:
        in_features: input width.
        out_features: output width (units).
        max_norm: the cap H (> 0).
    """

    h: torch.Tensor  # H, a buffer

    def __init__(self, in_features: int, out_features: int, max_norm: float) -> None:
        super().__init__()
        if not max_norm > 0:
            raise ValueError(f"max_norm (H) must be > 0, got {max_norm}")
        self.in_features, self.out_features = in_features, out_features
        # H as a (non-persistent) buffer, not a Python float: a stacked group of runs (airvae.stacked)
        # passes each run's own H through torch.func.functional_call.
        self.register_buffer("h", torch.tensor(float(max_norm)), persistent=False)
        init = nn.Linear(in_features, out_features)  # reuse torch's default initialisation
        self.v = nn.Parameter(init.weight.detach().clone())
        self.bias = nn.Parameter(init.bias.detach().clone())
        # u = 0 starts the cap at H/2; sigmoid keeps it in (0, H) whatever u becomes.
        self.u = nn.Parameter(torch.zeros(out_features))

    @property
    def max_norm(self) -> float:
        """The cap H of eq. 18."""
        return float(self.h)

    @property
    def weight(self) -> torch.Tensor:
        """The capped weight ``[out_features, in_features]``, recomputed from ``v`` and ``u`` at each use."""
        return capped_rows(self.v, self.u, self.h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias`` with the capped weight."""
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, H={self.max_norm:g}"


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class CappedFilterNorm(nn.Module):
    """Eq. 17/18 for a convolution, as a ``torch.nn.utils.parametrize`` parametrization of its
    ``weight`` (installed by [`cap_weight_norms`][airvae.model.cap_weight_norms]; the layer stays a
    ``Conv*d``).

    What is bounded: for every output channel o, the Euclidean norm of its whole filter -- every
    weight that feeds o, over all input channels of its group and all kernel positions -- is
    ``min(||v_o||, H * sigmoid(u_o)) <= H``. So each output activation (channel o at one position,
    before the bias) is an H-Lipschitz function of the inputs it sees; for a 1x1 convolution this
    is exactly the dense layer's per-unit bound. (The layer as a whole can have a larger Lipschitz
    constant, since neighbouring positions see overlapping inputs.)

    Layouts: a ``Conv*d`` weight is ``[out, in/groups, *kernel]``, so o's filter is ``weight[o]``.
    A ``ConvTranspose*d`` weight is ``[in, out/groups, *kernel]``: output channel
    ``o = g * out/groups + j`` of group g is fed by ``weight[g*in/groups:(g+1)*in/groups, j]``, a
    slice across the input-channel axis, and that slice is what is capped.

    Args:
        out_channels: the layer's output channels (one learned ``u`` each, starting at 0: a cap of H/2).
        max_norm: the cap H (> 0).
        groups: the layer's ``groups``.
        transposed: whether the layer is a ``ConvTranspose*d``.
    """

    h: torch.Tensor  # H, a buffer

    def __init__(self, out_channels: int, max_norm: float, groups: int = 1, transposed: bool = False) -> None:
        super().__init__()
        if not max_norm > 0:
            raise ValueError(f"max_norm (H) must be > 0, got {max_norm}")
        self.groups, self.transposed = groups, transposed
        # H as a non-persistent buffer, as in CappedWeightNormLinear: stacked groups pass each run's own H.
        self.register_buffer("h", torch.tensor(float(max_norm)), persistent=False)
        self.u = nn.Parameter(torch.zeros(out_channels))  # u = 0: the cap starts at H/2, as for dense layers

    @property
    def max_norm(self) -> float:
        """The cap H of eq. 18."""
        return float(self.h)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """The capped weight, in the layer's layout, from the unconstrained ``v``."""
        capped = capped_rows(self._rows(v), self.u, self.h)
        if not self.transposed:
            return capped.view_as(v)
        filters = v.unflatten(0, (self.groups, -1)).transpose(1, 2)  # [groups, out/groups, in/groups, *kernel]
        return capped.view(filters.shape).transpose(1, 2).reshape(v.shape)

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight of this layer's layout as one row per output channel (its whole filter)."""
        if not self.transposed:
            return weight.flatten(1)
        return weight.unflatten(0, (self.groups, -1)).transpose(1, 2).flatten(2).flatten(0, 1)

    def filter_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """The norm of each output channel's filter in a weight of this layer's layout (the capped
        weight: each is at most ``H * sigmoid(u_o)``)."""
        return self._rows(weight).norm(dim=1)

    def extra_repr(self) -> str:
        return f"H={self.max_norm:g}, groups={self.groups}, transposed={self.transposed}"


def mlp(in_features: int, hidden: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    """Dense + ELU layers; returns the trunk and its output width."""
    layers: list[nn.Module] = []
    width = in_features
    for units in hidden:
        layers += [nn.Linear(width, units), nn.ELU()]
        width = units
    return nn.Sequential(*layers), width


class GaussianEncoder(nn.Module):
    """q(z|x) = N(mean(x), diag(var(x))) with var = softplus(.) (Table 6's ``z64``): dense ELU layers,
    then a mean layer and a variance layer.

    Weight-normalized inference (section 3.2) is applied to it, or to any other encoder, by
    [`cap_weight_norms`][airvae.model.cap_weight_norms].

    Args:
        x_dim: data dimensions per example.
        z_dim: the latent size.
        hidden: the dense layers' widths, or their spec (``"d300-d300"``; ``""``: none, a linear map).
    """

    def __init__(self, x_dim: int, z_dim: int, hidden: tuple[int, ...] | str = ()) -> None:
        super().__init__()
        hidden = parse_hidden_spec(hidden) if isinstance(hidden, str) else tuple(hidden)
        self.x_dim, self.z_dim = x_dim, z_dim
        self.trunk, width = mlp(x_dim, hidden)
        self.mean = nn.Linear(width, z_dim)
        self.var = nn.Linear(width, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)``, each ``[..., z_dim]``, for x ``[..., x_dim]``."""
        h = self.trunk(x)
        # A tiny floor keeps log q finite when softplus underflows for very confident units.
        std = torch.sqrt(F.softplus(self.var(h)) + 1e-8)
        return self.mean(h), std


class DenoisingEncoder(nn.Module):
    """Wraps any encoder so that it sees ``x + eps``, ``eps ~ N(0, sigma^2 I)`` (eq. 13).

    The noise is added only when asked for (``noisy=True``) or, by default, in training mode:
    evaluation always sees the clean input. The decoder's log p(x|z) keeps scoring the clean x;
    that is the caller's business, this module only perturbs what the encoder sees.

    Args:
        encoder: the encoder to wrap (x to ``(mean, std)``).
        sigma: the noise std (>= 0). Table 7 gives it as ``sigma * sqrt(d)``:
            [`sigma_from_sqrt_d`][airvae.config.sigma_from_sqrt_d] converts.
    """

    def __init__(self, encoder: nn.Module, sigma: float) -> None:
        super().__init__()
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.encoder, self.sigma = encoder, float(sigma)

    def perturb(self, x: torch.Tensor, noisy: bool | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """What the wrapped encoder sees: ``x + eps`` when noisy, else ``x``.

        Args:
            x: the examples.
            noisy: add the noise; None: in training mode only.
            generator: the noise's random stream (default: torch's global one).
        """
        noisy = self.training if noisy is None else noisy
        if noisy and self.sigma > 0:
            return x + self.sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x

    def forward(self, x: torch.Tensor, noisy: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The wrapped encoder's ``(mean, std)`` for the perturbed (or clean) x; ``noisy`` as in
        [`perturb`][airvae.networks.DenoisingEncoder.perturb].
        """
        return self.encoder(self.perturb(x, noisy))

    def extra_repr(self) -> str:
        return f"sigma={self.sigma:g}"


class BernoulliDecoder(nn.Module):
    """p(x|z) = Bernoulli(sigmoid(logits(z))) (Table 6's ``x784``): the paper's decoder, dense ELU
    layers then a logit layer.

    Args:
        z_dim: the latent size.
        x_dim: data dimensions per example (one logit each).
        hidden: the dense layers' widths, or their spec (``"d300-d300"``).
    """

    def __init__(self, z_dim: int, x_dim: int, hidden: tuple[int, ...] | str = ()) -> None:
        super().__init__()
        hidden = parse_hidden_spec(hidden) if isinstance(hidden, str) else tuple(hidden)
        self.z_dim, self.x_dim = z_dim, x_dim
        self.trunk, width = mlp(z_dim, hidden)
        self.logits = nn.Linear(width, x_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The logits ``[N, x_dim]`` for latents ``[N, z_dim]``."""
        return self.logits(self.trunk(z))


class ConvEncoder(nn.Module):
    """q(z|x) for images ``[C, H, W]``: convolutions (each + ELU), then
    [`GaussianEncoder`][airvae.networks.GaussianEncoder]'s dense layers and heads on the flattened
    map. WNI converts its convolutions too ([`cap_weight_norms`][airvae.model.cap_weight_norms]).

    Args:
        image_shape: ``(C, H, W)`` of one example.
        z_dim: the latent size.
        spec: convolutions then dense layers, e.g. ``"c32k4s2-c64k4s2-d256"``.
    """

    def __init__(self, image_shape: tuple[int, int, int], z_dim: int, spec: str) -> None:
        super().__init__()
        convs, dense = parse_spec(spec, "encoder")
        channels, height, width = image_shape
        self.image_shape, self.z_dim = (channels, height, width), z_dim
        shapes = conv_map_shapes(self.image_shape, convs)
        layers: list[nn.Module] = []
        for conv, (in_channels, _, _) in zip(convs, shapes[:-1], strict=True):
            layers += [nn.Conv2d(in_channels, conv.channels, conv.kernel, conv.stride, conv.padding), nn.ELU()]
        self.convs = nn.Sequential(*layers)
        self.head = GaussianEncoder(math.prod(shapes[-1]), z_dim, dense)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)``, each ``[B, z_dim]``, for x ``[B, C, H, W]`` or flattened, ``[B, C*H*W]``."""
        return self.head(self.convs(x.reshape(x.shape[0], *self.image_shape)).flatten(1))


class ConvDecoder(nn.Module):
    """Decoder for images ``[C, H, W]``: dense layers (each + ELU), a dense projection to the
    smallest feature map, then transposed convolutions (ELU between them) up to the likelihood's
    ``params_per_dim * C`` channels at ``H x W`` (the spec's mirror image: module docstring).

    Emits ``[N, P*C, H, W]``, or with ``flatten`` the same values as ``[N, P*C*H*W]``: the layout
    of flattened data ``[B, C*H*W]``, parameter p of dimension d being output ``p*C*H*W + d``.

    Args:
        z_dim: the latent size.
        image_shape: ``(C, H, W)`` of one example.
        spec: dense layers then transposed convolutions, e.g. ``"d256-c64k4s2-c32k4s2"`` (the
            mirror of the encoder ``"c32k4s2-c64k4s2-d256"``); at least one convolution.
        params_per_dim: P, the likelihood's parameters per data dimension
            ([`Likelihood.params_per_dim`][airvae.likelihoods.Likelihood.params_per_dim]).
        flatten: emit flattened parameters, for models that take flattened data.
    """

    def __init__(self, z_dim: int, image_shape: tuple[int, int, int], spec: str, params_per_dim: int = 1,
                 flatten: bool = False) -> None:
        super().__init__()
        convs, dense = parse_spec(spec, "decoder")
        if not convs:
            raise ValueError(f"ConvDecoder: spec {spec!r} has no convolution layer; use MLPDecoder")
        channels, height, width = image_shape
        self.z_dim, self.image_shape, self.flatten = z_dim, (channels, height, width), flatten
        # The maps of the encoder this decoder mirrors, image first; the decoder walks them backwards.
        shapes = conv_map_shapes(self.image_shape, convs[::-1])[::-1]
        self.trunk, width = mlp(z_dim, dense)
        self.project = nn.Sequential(nn.Linear(width, math.prod(shapes[0])), nn.ELU(), nn.Unflatten(1, shapes[0]))
        layers: list[nn.Module] = []
        for i, conv in enumerate(convs):
            last = i == len(convs) - 1
            out_channels = params_per_dim * self.image_shape[0] if last else convs[i + 1].channels
            (_, h_in, w_in), (_, h_out, w_out) = shapes[i], shapes[i + 1]
            # the sizes a transposed convolution can make from h_in are h_full .. h_full + stride - 1
            def extra(out: int, size: int, conv: Conv = conv) -> int:
                return out - ((size - 1) * conv.stride - 2 * conv.padding + conv.kernel)

            padding = (extra(h_out, h_in), extra(w_out, w_in))
            layers.append(nn.ConvTranspose2d(conv.channels, out_channels, conv.kernel, conv.stride, conv.padding,
                                             output_padding=padding))
            if not last:
                layers.append(nn.ELU())
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameters for latents ``[N, z_dim]``: ``[N, P*C, H, W]``, or ``[N, P*C*H*W]``
        with ``flatten``.
        """
        params = self.deconvs(self.project(self.trunk(z)))
        return params.flatten(1) if self.flatten else params


class MLPDecoder(nn.Module):
    """Dense decoder for any likelihood: z -> ``params_per_dim * x_dim`` parameters of p(x|z)
    ([`airvae.likelihoods`][]). With one parameter per dimension it is
    [`BernoulliDecoder`][airvae.networks.BernoulliDecoder] up to the name of its output layer, which
    the paper's model keeps for its checkpoints.

    Args:
        z_dim: the latent size.
        x_dim: data dimensions per example.
        hidden: the dense layers' widths, or their spec (``"d300-d300"``).
        params_per_dim: P, the likelihood's parameters per data dimension.
    """

    def __init__(self, z_dim: int, x_dim: int, hidden: tuple[int, ...] | str = (), params_per_dim: int = 1) -> None:
        super().__init__()
        hidden = parse_hidden_spec(hidden) if isinstance(hidden, str) else tuple(hidden)
        self.z_dim, self.x_dim = z_dim, x_dim
        self.trunk, width = mlp(z_dim, hidden)
        self.out = nn.Linear(width, params_per_dim * x_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The parameters ``[N, params_per_dim * x_dim]`` for latents ``[N, z_dim]``, P blocks of ``x_dim``."""
        return self.out(self.trunk(z))
