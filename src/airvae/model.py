"""The VAE: a Gaussian encoder, a decoder emitting the parameters of a likelihood (Bernoulli by
default) and an N(0, I) prior, with the one log-weights path that training and every evaluator
share, and the protocol that lets the estimators work on any model."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize

from .bounds import gaussian_log_ratio_from_noise, iwae_bound
from .compiling import run_kernel
from .likelihoods import Bernoulli, Likelihood
from .networks import (
    CONV_TYPES,
    BernoulliDecoder,
    CappedFilterNorm,
    CappedWeightNormLinear,
    ConvDecoder,
    ConvEncoder,
    DenoisingEncoder,
    GaussianEncoder,
    MLPDecoder,
    parse_spec,
)
from .objectives import Denoising, draw_step, mix_bounds, seen_input

if TYPE_CHECKING:
    from typing_extensions import Self

    from .config import RunConfig


class LatentVariableModel(Protocol):
    """What every estimator of [`airvae.estimators`][] needs from a model: any ``nn.Module`` with

    * ``encode(x) -> (mean, std)``: q(z|x) = N(mean, diag(std^2)), each ``[B, z_dim]``; in eval
      mode (the estimators put the model there) it must be the *clean* encoder (a
      [`DenoisingEncoder`][airvae.networks.DenoisingEncoder] is);
    * ``decoder``: a module mapping latents ``[N, z_dim]`` to the likelihood's parameters (the
      estimators flatten any sample axes into N, so conv decoders work unchanged);
    * ``likelihood``: an [`airvae.likelihoods.Likelihood`][];
    * optionally ``z_dim`` (else read from ``decoder.z_dim``, or from encoding one example):
      needed where no data is given ([`airvae.estimators.simulate`][]).

    The prior is N(0, I). [`VAE`][airvae.model.VAE] follows the protocol; nothing needs to subclass it.
    """

    @property
    def decoder(self) -> nn.Module: ...

    @property
    def likelihood(self) -> Likelihood: ...

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    # What airvae uses of the nn.Module (every nn.Module has them): its parameters, its mode (the
    # estimators freeze it), its device, and its weights (training, checkpoints, loading a run).
    training: bool

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def train(self, mode: bool = True) -> Self: ...

    def eval(self) -> Self: ...

    def to(self, device: torch.device | str) -> Self: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...


_BERNOULLI = Bernoulli()


def decode(decoder: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``decoder(z)`` for latents with any leading sample axes ``[..., z_dim]``: the decoder sees
    ``[N, z_dim]``, and its output's leading axis is split back into the sample axes."""
    params = decoder(z.reshape(-1, z.shape[-1]))
    return params.reshape(*z.shape[:-1], *params.shape[1:])


def conditional_log_prob(decoder: nn.Module, likelihood: Likelihood, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x|z): the one place the decoder and the likelihood meet (the log weights below, AIS and BDMC).

    Args:
        decoder: maps latents ``[N, z_dim]`` to the likelihood's parameters.
        likelihood: scores x from those parameters.
        x: the examples, ``[B, *event]``.
        z: latents with any leading sample axes, ``[*sample, B, z_dim]``.

    Returns:
        log p(x|z) summed over the event axes, ``[*sample, B]``.
    """
    return likelihood.log_prob(x, decode(decoder, z))


def log_weights_given_q(
    decoder: nn.Module,
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    k: int,
    m: int = 1,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    likelihood: Likelihood | None = None,
) -> torch.Tensor:
    """log w = log p(x, z) - log q(z) for z ~ q = N(mean, diag(std^2)): the log-weights path of training
    and of every estimator.

    ``q`` may come from an encoder (amortized) or be free per-example parameters (IW-SVI).

    Args:
        decoder: maps latents ``[N, z_dim]`` to the likelihood's parameters.
        x: the examples, ``[batch, ...]``.
        mean: q's mean, ``[batch, z_dim]``.
        std: q's standard deviation, ``[batch, z_dim]``.
        k: importance samples per repeat.
        m: Monte Carlo repeats.
        generator: the random stream of the draws (default: torch's global one); unused with ``noise``.
        noise: the standard-normal draws, ``[m, k, batch, z_dim]`` or ``[k, batch, z_dim]``, so that an
            estimator controls its random streams; ``k`` and ``m`` are then read from it.
        likelihood: scores x from the decoder's output (default:
            [`Bernoulli`][airvae.likelihoods.Bernoulli], the decoder emitting logits).

    Returns:
        The log weights, ``[m, k, batch]`` (``[1, k, batch]`` for ``noise`` of shape ``[k, batch, z_dim]``).
    """
    if noise is None:
        eps = torch.randn((m, k, *mean.shape), device=mean.device, dtype=mean.dtype, generator=generator)
    else:
        eps = noise if noise.dim() == mean.dim() + 2 else noise.unsqueeze(0)
    # The draws stay outside the (optionally compiled) kernel: random streams are the same either way.
    likelihood = _BERNOULLI if likelihood is None else likelihood
    return run_kernel(log_weights_from_eps, decoder, likelihood, x, mean, std, eps)


def log_weights_from_eps(decoder: nn.Module, likelihood: Likelihood, x: torch.Tensor, mean: torch.Tensor,
                          std: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    z = torch.addcmul(mean, std, eps)  # mean + std * eps in one pass
    # log p(x|z) + [log p(z) - log q(z|x)], the bracket from eps directly (bounds.py)
    return conditional_log_prob(decoder, likelihood, x, z) + gaussian_log_ratio_from_noise(z, eps, std)


def encode_log_weights(encoder: nn.Module, decoder: nn.Module, likelihood: Likelihood, x: torch.Tensor,
                        x_seen: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The amortized log weights: the encoder sees ``x_seen`` (x, or x + noise for DVAE)."""
    mean, std = encoder(x_seen)
    return log_weights_from_eps(decoder, likelihood, x, mean, std, eps)


class VAE(nn.Module):
    """A VAE: ``encoder(x) -> (mean, std)``, ``decoder(z) -> params``, ``likelihood`` p(x|z) from the
    params, prior N(0, I). Follows [`LatentVariableModel`][airvae.model.LatentVariableModel].

    [`build_vae`][airvae.model.build_vae] builds the paper's models; any encoder and decoder modules work.

    Args:
        encoder: maps x to q(z|x)'s ``(mean, std)``, e.g. a
            [`GaussianEncoder`][airvae.networks.GaussianEncoder], possibly wrapped in a
            [`DenoisingEncoder`][airvae.networks.DenoisingEncoder] (eq. 13).
        decoder: maps latents ``[N, z_dim]`` to the likelihood's parameters.
        likelihood: p(x|z) from the decoder's output (default: Bernoulli, the decoder emitting logits).
        z_dim: the latent size (default: ``decoder.z_dim``).

    Raises:
        ValueError: the latent size is unknown (no ``z_dim`` given, none on the decoder).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: Likelihood | None = None,
                 z_dim: int | None = None) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.likelihood: Likelihood = Bernoulli() if likelihood is None else likelihood
        z_dim = z_dim if z_dim is not None else getattr(decoder, "z_dim", None)
        if not (isinstance(z_dim, int) and z_dim >= 1):
            raise ValueError(f"VAE: the latent size is unknown (decoder has no z_dim attribute); pass z_dim, "
                             f"got {z_dim!r}")
        self.z_dim: int = z_dim

    def _encoder_and_input(self, x: torch.Tensor, noisy: bool | None,
                           generator: torch.Generator | None = None) -> tuple[nn.Module, torch.Tensor]:
        """The deterministic encoder and what it sees: a denoising encoder's noise is drawn here,
        outside any compiled graph."""
        if isinstance(self.encoder, DenoisingEncoder):
            return self.encoder.encoder, self.encoder.perturb(x, noisy, generator)
        return self.encoder, x

    def encode(self, x: torch.Tensor, noisy: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x)'s parameters.

        Args:
            x: the examples, ``[B, ...]``.
            noisy: with a denoising encoder, whether it sees the perturbed input ``x + eps`` (eq. 13);
                None: perturbed in training mode only.

        Returns:
            ``(mean, std)``, each ``[B, z_dim]``.
        """
        encoder, x_seen = self._encoder_and_input(x, noisy)
        return encoder(x_seen)

    def log_weights(self, x: torch.Tensor, k: int = 1, m: int = 1, noisy: bool | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Log importance weights with the model's own encoder. The encoder may see a noisy x; the decoder
        always scores the clean x (eq. 13).

        Args:
            x: the examples, ``[batch, ...]``.
            k: importance samples per repeat.
            m: Monte Carlo repeats.
            noisy: as in [`encode`][airvae.model.VAE.encode].
            generator: the random stream of the input noise and the latent draws (default: torch's global one).

        Returns:
            ``[m, k, batch]``.
        """
        encoder, x_seen = self._encoder_and_input(x, noisy, generator)
        eps = torch.randn((m, k, x.shape[0], self.z_dim), device=x.device, dtype=x.dtype,
                          generator=generator)  # the same draws log_weights_given_q would make
        return run_kernel(encode_log_weights, encoder, self.decoder, self.likelihood, x, x_seen, eps)


def denoising_parts(model: VAE, alpha: float = 1.0) -> tuple[nn.Module, Denoising]:
    """The deterministic encoder of ``model`` (a [`DenoisingEncoder`][airvae.networks.DenoisingEncoder]'s inner
    one) and what its denoising asks of a training step: the model owns sigma, the caller alpha."""
    if isinstance(model.encoder, DenoisingEncoder):
        return model.encoder.encoder, Denoising(model.encoder.sigma, alpha)
    return model.encoder, Denoising(0.0, alpha)


def air_objective(model: VAE, x: torch.Tensor, k: int = 1, m: int = 1, alpha: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The per-example training objective, to be maximized: the IWAE-k bound (eq. 20; the ELBO, eq. 5,
    at k = 1) averaged over m repeats.

    With a denoising encoder, the partially denoising objective of eq. 16,
    ``alpha * L_k(noisy encoder) + (1 - alpha) * L_k(clean encoder)``; both terms are computed
    exactly (no per-example coin flip) so that alpha interpolates linearly.

    Random draws come from ``generator`` in the order [`airvae.objectives`][] fixes, which a stacked
    group's runs draw in too.

    Args:
        model: a [`VAE`][airvae.model.VAE], or any model with ``encoder`` (possibly a
            [`DenoisingEncoder`][airvae.networks.DenoisingEncoder]), ``decoder``, ``likelihood`` and ``z_dim``.
        x: the examples, ``[batch, ...]``.
        k: importance samples.
        m: Monte Carlo repeats, averaged.
        alpha: eq. 16's weight of the noisy encoder's bound (used with a denoising encoder only).
        generator: the random stream (default: torch's global one).

    Returns:
        ``[batch]``.
    """
    encoder, denoising = denoising_parts(model, alpha)
    draws = draw_step(denoising, tuple(x.shape), (m, k, x.shape[0], model.z_dim), generator=generator,
                      device=x.device, dtype=x.dtype)
    # The draws stay outside the (optionally compiled) kernel: random streams are the same either way.
    x_seen = seen_input(x, denoising.sigma, draws.noise)
    bound = mean_bound(run_kernel(encode_log_weights, encoder, model.decoder, model.likelihood, x, x_seen,
                                    draws.eps))
    clean = None if draws.eps_clean is None else mean_bound(
        run_kernel(encode_log_weights, encoder, model.decoder, model.likelihood, x, x, draws.eps_clean))
    return mix_bounds(bound, clean, alpha)


def protocol_objective(model: LatentVariableModel, x: torch.Tensor, k: int = 1, m: int = 1, alpha: float = 1.0,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """[`air_objective`][airvae.model.air_objective] for a model that offers only
    [`LatentVariableModel`][airvae.model.LatentVariableModel]'s ``encode``: the IWAE-k bound averaged
    over m repeats, ``[batch]``. ``alpha`` is unused: any denoising is the model's own ``encode``'s
    business.
    """
    mean, std = model.encode(x)
    eps = torch.randn((m, k, *mean.shape), generator=generator, device=x.device, dtype=x.dtype)
    return mean_bound(log_weights_from_eps(model.decoder, model.likelihood, x, mean, std, eps))


def mean_bound(log_w: torch.Tensor) -> torch.Tensor:
    """IWAE-k bound of ``[m, k, batch]`` log weights averaged over the m repeats -> ``[batch]``."""
    bound = iwae_bound(log_w)
    return bound[0] if bound.shape[0] == 1 else bound.mean(0)  # m = 1: the mean is the value itself


def model_from_config(cfg: RunConfig) -> VAE:
    """The untrained model a [`RunConfig`][airvae.config.RunConfig] describes (Table 6 specs, its
    regularizer and likelihood); the same every time for the same seed set before the call."""
    arch, reg = cfg.architecture, cfg.regularizer
    return build_vae(cfg.x_dim, arch.z_dim, arch.encoder, arch.decoder, reg.sigma, reg.max_norm,
                     cfg.likelihood.build(cfg.x_dim), cfg.image_shape)


def cap_weight_norms(module: nn.Module, max_norm: float) -> nn.Module:
    """Weight-normalized inference (WNI, eq. 17/18) for any encoder, in place.

    Every ``nn.Linear`` inside ``module`` becomes a
    [`CappedWeightNormLinear`][airvae.networks.CappedWeightNormLinear], and every ``Conv1d/2d/3d`` and
    ``ConvTranspose1d/2d/3d`` gets a [`CappedFilterNorm`][airvae.networks.CappedFilterNorm]
    parametrization of its weight (it stays the same layer). Either way, each output unit's weight
    vector -- a dense layer's row, a convolution's whole filter for one output channel -- has norm
    ``min(||v||, H sigmoid(u)) <= H``, direction kept, with a learned ``u`` per output unit (starting
    at 0: a cap of H/2). Bounding the norms bounds the encoder's Lipschitz constant: that is the
    regularization.

    Args:
        module: the encoder (or any module); its layers are replaced in place.
        max_norm: the cap H of eq. 18; ``inf`` leaves the module untouched.

    Returns:
        ``module``, or the converted layer if ``module`` is itself an ``nn.Linear``.
    """
    if math.isinf(max_norm):
        return module
    if isinstance(module, nn.Linear):
        return _capped_linear(module, max_norm)
    if isinstance(module, CONV_TYPES):
        if not _has_capped_filters(module):
            cap = CappedFilterNorm(module.out_channels, max_norm, module.groups, module.transposed)
            parametrize.register_parametrization(module, "weight", cap.to(module.weight.device, module.weight.dtype))
        return module
    for name, child in list(module.named_children()):
        setattr(module, name, cap_weight_norms(child, max_norm))
    return module


def _has_capped_filters(conv: nn.Module) -> bool:
    """Whether ``conv``'s weight already has a CappedFilterNorm parametrization (converting twice changes nothing)."""
    if not parametrize.is_parametrized(conv, "weight"):
        return False
    parametrizations = conv.parametrizations  # a ModuleDict: one ParametrizationList per parametrized tensor
    return isinstance(parametrizations, nn.ModuleDict) and any(
        isinstance(p, CappedFilterNorm) for p in parametrizations["weight"].children())


def _capped_linear(linear: nn.Linear, max_norm: float) -> CappedWeightNormLinear:
    capped = CappedWeightNormLinear(linear.in_features, linear.out_features, max_norm)
    capped = capped.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        capped.v.copy_(linear.weight)
        if linear.bias is not None:
            capped.bias.copy_(linear.bias)
        else:
            capped.bias.zero_()
    return capped


def build_vae(x_dim: int, z_dim: int, encoder_hidden: str, decoder_hidden: str,
              sigma: float = 0.0, max_norm: float = math.inf, likelihood: Likelihood | None = None,
              image_shape: tuple[int, int, int] | None = None) -> VAE:
    """The paper's model family: plain VAE/IWAE at ``sigma=0, max_norm=inf``; WNI when ``max_norm`` is
    finite; denoising when ``sigma > 0``; both together compose.

    Specs with convolution layers ([`airvae.networks`][]) need ``image_shape``: the model then still
    takes flattened data ``[B, x_dim]`` (the conv encoder reshapes it, the conv decoder emits the
    flattened layout), so training and every estimator see the same shapes whatever the
    architecture.

    Args:
        x_dim: data dimensions per example.
        z_dim: the latent size.
        encoder_hidden: the encoder's architecture spec (Table 6's notation: ``"d300-d300"``;
            convolutions ``"c32k4s2-c64k4s2-d256"``).
        decoder_hidden: the decoder's spec (dense layers first: ``"d256-c64k4s2-c32k4s2"``).
        sigma: the denoising noise std of eq. 13 (0: none).
        max_norm: the WNI cap H of eq. 18 (``inf``: none).
        likelihood: p(x|z) (default: Bernoulli, the paper's); the decoder emits its parameters.
        image_shape: ``(C, H, W)`` with ``C*H*W = x_dim``, for specs with convolutions.

    Returns:
        The untrained [`VAE`][airvae.model.VAE].

    Raises:
        ValueError: a spec is invalid, or has convolutions without a matching ``image_shape``.
    """
    def conv(spec: str, role: str) -> tuple[int, int, int] | None:
        """The image shape for a spec with convolutions, None for a dense one."""
        if not parse_spec(spec, role)[0]:
            return None
        if image_shape is None or math.prod(image_shape) != x_dim:
            raise ValueError(f"{role} {spec!r} has convolution layers: they need image data, image_shape (C, H, W) "
                             f"with C*H*W = x_dim = {x_dim}, got {image_shape!r}")
        return image_shape

    params_per_dim = 1 if likelihood is None else likelihood.params_per_dim
    if (shape := conv(encoder_hidden, "encoder")) is not None:
        encoder: nn.Module = ConvEncoder(shape, z_dim, encoder_hidden)
    else:
        encoder = GaussianEncoder(x_dim, z_dim, encoder_hidden)
    encoder = cap_weight_norms(encoder, max_norm)
    if sigma > 0:
        encoder = DenoisingEncoder(encoder, sigma)
    if (shape := conv(decoder_hidden, "decoder")) is not None:
        decoder: nn.Module = ConvDecoder(z_dim, shape, decoder_hidden, params_per_dim, flatten=True)
    elif likelihood is None or isinstance(likelihood, Bernoulli):
        decoder = BernoulliDecoder(z_dim, x_dim, decoder_hidden)
    else:
        decoder = MLPDecoder(z_dim, x_dim, decoder_hidden, params_per_dim)
    return VAE(encoder, decoder, likelihood)
