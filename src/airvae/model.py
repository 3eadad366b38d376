"""The VAE: a Gaussian encoder, a decoder emitting the parameters of a likelihood (Bernoulli by
default) and an N(0, I) prior, with the one log-weights path that training and every evaluator
share, and the protocol that lets the estimators work on any model."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize

from .bounds import gaussian_log_ratio_from_noise, iwae_bound
from .likelihoods import Bernoulli, Likelihood
from .compiling import run_kernel
from .objectives import Denoising, draw_step, mix_bounds, seen_input
from .networks import (CONV_TYPES, BernoulliDecoder, CappedFilterNorm, CappedWeightNormLinear, ConvDecoder,
                       ConvEncoder, DenoisingEncoder, GaussianEncoder, MLPDecoder, parse_spec)


class LatentVariableModel(Protocol):
    """What every estimator of :mod:`airvae.estimators` needs from a model: any ``nn.Module`` with

    * ``encode(x) -> (mean, std)``: q(z|x) = N(mean, diag(std^2)), each ``[B, z_dim]``; in eval
      mode (the estimators put the model there) it must be the *clean* encoder (a
      :class:`~airvae.networks.DenoisingEncoder` is);
    * ``decoder``: a module mapping latents ``[N, z_dim]`` to the likelihood's parameters (the
      estimators flatten any sample axes into N, so conv decoders work unchanged);
    * ``likelihood``: an :class:`airvae.likelihoods.Likelihood`;
    * optionally ``z_dim`` (else read from ``decoder.z_dim``, or from encoding one example):
      needed where no data is given (:func:`airvae.estimators.simulate`).

    The prior is N(0, I). :class:`VAE` follows the protocol; nothing needs to subclass it.
    """

    decoder: nn.Module
    likelihood: Likelihood

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


_BERNOULLI = Bernoulli()


def decode(decoder: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``decoder(z)`` for latents with any leading sample axes ``[..., z_dim]``: the decoder sees
    ``[N, z_dim]``, and its output's leading axis is split back into the sample axes."""
    params = decoder(z.reshape(-1, z.shape[-1]))
    return params.reshape(*z.shape[:-1], *params.shape[1:])


def conditional_log_prob(decoder: nn.Module, likelihood: Likelihood, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x|z) for x ``[B, *event]`` and z ``[*sample, B, z_dim]`` -> ``[*sample, B]``: the one place
    the decoder and the likelihood meet (the log weights below, AIS and BDMC)."""
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
    """log p(x, z) - log q(z) for ``z ~ q = N(mean, std^2)``; returns ``[m, k, batch]``.

    ``q`` may come from an encoder (amortized) or be free per-example parameters (IW-SVI).
    ``noise`` optionally supplies the standard-normal draws (``[m, k, batch, z]`` or
    ``[k, batch, z]``) so estimators can control their random streams. ``x`` is ``[batch, ...]``;
    ``likelihood`` scores it from the decoder's output (default: :class:`~airvae.likelihoods.Bernoulli`).
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
    """``encoder(x) -> (mean, std)``, ``decoder(z) -> params``, ``likelihood`` p(x|z) from the params
    (default Bernoulli: the decoder emits logits), prior N(0, I). Follows
    :class:`LatentVariableModel`. ``z_dim`` defaults to ``decoder.z_dim``."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: Likelihood | None = None,
                 z_dim: int | None = None):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.likelihood = Bernoulli() if likelihood is None else likelihood
        self.z_dim = z_dim if z_dim is not None else getattr(decoder, "z_dim", None)
        if not (isinstance(self.z_dim, int) and self.z_dim >= 1):
            raise ValueError(f"VAE: the latent size is unknown (decoder has no z_dim attribute); pass z_dim, "
                             f"got {self.z_dim!r}")

    def _encoder_and_input(self, x: torch.Tensor, noisy: bool | None,
                           generator: torch.Generator | None = None) -> tuple[nn.Module, torch.Tensor]:
        """The deterministic encoder and what it sees: a denoising encoder's noise is drawn here,
        outside any compiled graph."""
        if isinstance(self.encoder, DenoisingEncoder):
            return self.encoder.encoder, self.encoder.perturb(x, noisy, generator)
        return self.encoder, x

    def encode(self, x: torch.Tensor, noisy: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) parameters; ``noisy`` selects the denoising encoder's perturbed input (eq. 13)."""
        encoder, x_seen = self._encoder_and_input(x, noisy)
        return encoder(x_seen)

    def log_weights(self, x: torch.Tensor, k: int = 1, m: int = 1, noisy: bool | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Log importance weights ``[m, k, batch]``. The encoder may see a noisy x; the decoder
        always scores the clean x (eq. 13)."""
        encoder, x_seen = self._encoder_and_input(x, noisy, generator)
        eps = torch.randn((m, k, x.shape[0], self.z_dim), device=x.device, dtype=x.dtype,
                          generator=generator)  # the same draws log_weights_given_q would make
        return run_kernel(encode_log_weights, encoder, self.decoder, self.likelihood, x, x_seen, eps)


def denoising_parts(model: nn.Module, alpha: float = 1.0) -> tuple[nn.Module, Denoising]:
    """The deterministic encoder of ``model`` (a :class:`~airvae.networks.DenoisingEncoder`'s inner
    one) and what its denoising asks of a training step: the model owns sigma, the caller alpha."""
    if isinstance(model.encoder, DenoisingEncoder):
        return model.encoder.encoder, Denoising(model.encoder.sigma, alpha)
    return model.encoder, Denoising(0.0, alpha)


def air_objective(model: VAE, x: torch.Tensor, k: int = 1, m: int = 1, alpha: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-example training objective: the IWAE-k bound averaged over m repeats, ``[batch]``.

    With a denoising encoder, the partially denoising objective of eq. 16 is
    ``alpha * L_k(noisy encoder) + (1 - alpha) * L_k(clean encoder)``; both terms are computed
    exactly (no per-example coin flip) so that alpha interpolates linearly. Works for any model
    with ``encoder`` (possibly a DenoisingEncoder), ``decoder``, ``likelihood`` and ``z_dim``.

    Random draws come from ``generator`` (default: the global one) in the order
    :mod:`airvae.objectives` fixes, which a stacked group's runs draw in too.
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


def protocol_objective(model: nn.Module, x: torch.Tensor, k: int = 1, m: int = 1, alpha: float = 1.0,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`air_objective` for a model that offers only :class:`LatentVariableModel`'s ``encode``:
    the IWAE-k bound averaged over m repeats, ``[batch]`` (``alpha`` is unused: any denoising is the
    model's own ``encode``'s business)."""
    mean, std = model.encode(x)
    eps = torch.randn((m, k, *mean.shape), generator=generator, device=x.device, dtype=x.dtype)
    return mean_bound(log_weights_from_eps(model.decoder, model.likelihood, x, mean, std, eps))


def mean_bound(log_w: torch.Tensor) -> torch.Tensor:
    """IWAE-k bound of ``[m, k, batch]`` log weights averaged over the m repeats -> ``[batch]``."""
    bound = iwae_bound(log_w)
    return bound[0] if bound.shape[0] == 1 else bound.mean(0)  # m = 1: the mean is the value itself


def model_from_config(cfg) -> "VAE":
    """The untrained model a :class:`~airvae.config.RunConfig` describes (Table 6 specs, its
    regularizer and likelihood); the same every time for the same seed set before the call."""
    arch, reg = cfg.architecture, cfg.regularizer
    return build_vae(cfg.x_dim, arch.z_dim, arch.encoder, arch.decoder, reg.sigma, reg.max_norm,
                     cfg.likelihood.build(cfg.x_dim), cfg.image_shape)


def cap_weight_norms(module: nn.Module, max_norm: float) -> nn.Module:
    """Weight-normalized inference (eq. 17/18) for any encoder, in place: every ``nn.Linear``
    inside ``module`` becomes a :class:`~airvae.networks.CappedWeightNormLinear`, and every
    ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` gets a
    :class:`~airvae.networks.CappedFilterNorm` parametrization of its weight (it stays the same
    layer). Either way, each output unit's weight vector -- a dense layer's row, a convolution's
    whole filter for one output channel -- has norm ``min(||v||, H sigmoid(u)) <= H`` with
    ``H = max_norm``, direction kept, and a learned ``u`` per output unit (starting at 0: a cap
    of H/2). Returns ``module`` (the converted layer if ``module`` is itself an ``nn.Linear``).
    ``H = inf`` leaves the module untouched.
    """
    if math.isinf(max_norm):
        return module
    if isinstance(module, nn.Linear):
        return _capped_linear(module, max_norm)
    if isinstance(module, CONV_TYPES):
        if not (parametrize.is_parametrized(module, "weight")
                and any(isinstance(p, CappedFilterNorm) for p in module.parametrizations.weight)):
            cap = CappedFilterNorm(module.out_channels, max_norm, module.groups, module.transposed)
            parametrize.register_parametrization(module, "weight", cap.to(module.weight.device, module.weight.dtype))
        return module
    for name, child in list(module.named_children()):
        setattr(module, name, cap_weight_norms(child, max_norm))
    return module


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
    """The paper's model family: plain VAE/IWAE at ``sigma=0, max_norm=inf``; WNI when
    ``max_norm`` is finite; denoising when ``sigma > 0``; both together compose. ``likelihood``
    (default Bernoulli, the paper's) sets p(x|z); the decoder emits its parameters.

    Specs with convolution layers (:mod:`airvae.networks`) need ``image_shape`` ``(C, H, W)`` with
    ``C*H*W = x_dim``: the model then still takes flattened data ``[B, x_dim]`` (the conv encoder
    reshapes it, the conv decoder emits the flattened layout), so training and every estimator see
    the same shapes whatever the architecture."""
    def conv(spec: str, role: str) -> bool:
        if not parse_spec(spec, role)[0]:
            return False
        if image_shape is None or math.prod(image_shape) != x_dim:
            raise ValueError(f"{role} {spec!r} has convolution layers: they need image data, image_shape (C, H, W) "
                             f"with C*H*W = x_dim = {x_dim}, got {image_shape!r}")
        return True

    params_per_dim = 1 if likelihood is None else likelihood.params_per_dim
    if conv(encoder_hidden, "encoder"):
        encoder: nn.Module = ConvEncoder(image_shape, z_dim, encoder_hidden)
    else:
        encoder = GaussianEncoder(x_dim, z_dim, encoder_hidden)
    encoder = cap_weight_norms(encoder, max_norm)
    if sigma > 0:
        encoder = DenoisingEncoder(encoder, sigma)
    if conv(decoder_hidden, "decoder"):
        decoder: nn.Module = ConvDecoder(z_dim, image_shape, decoder_hidden, params_per_dim, flatten=True)
    elif likelihood is None or isinstance(likelihood, Bernoulli):
        decoder = BernoulliDecoder(z_dim, x_dim, decoder_hidden)
    else:
        decoder = MLPDecoder(z_dim, x_dim, decoder_hidden, params_per_dim)
    return VAE(encoder, decoder, likelihood)
