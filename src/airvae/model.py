"""The VAE: a Gaussian encoder, a Bernoulli decoder and an N(0, I) prior, with the one
log-weights path that training and every evaluator share."""

from __future__ import annotations

import math

import torch
from torch import nn

from .bounds import bernoulli_log_prob, gaussian_log_prob_from_noise, iwae_bound, standard_normal_log_prob
from .networks import BernoulliDecoder, CappedWeightNormLinear, DenoisingEncoder, GaussianEncoder


def log_weights_given_q(
    decoder: nn.Module,
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    k: int,
    m: int = 1,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(x, z) - log q(z) for ``z ~ q = N(mean, std^2)``; returns ``[m, k, batch]``.

    ``q`` may come from an encoder (amortized) or be free per-example parameters (IW-SVI).
    ``noise`` optionally supplies the standard-normal draws (``[m, k, batch, z]`` or
    ``[k, batch, z]``) so estimators can control their random streams.
    """
    if noise is None:
        eps = torch.randn((m, k, *mean.shape), device=mean.device, dtype=mean.dtype, generator=generator)
    else:
        eps = noise if noise.dim() == mean.dim() + 2 else noise.unsqueeze(0)
    z = mean + std * eps
    log_px_given_z = bernoulli_log_prob(x, decoder(z))
    return log_px_given_z + standard_normal_log_prob(z) - gaussian_log_prob_from_noise(eps, std)


class VAE(nn.Module):
    """``encoder(x) -> (mean, std)``, ``decoder(z) -> logits``, prior N(0, I)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def encode(self, x: torch.Tensor, noisy: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) parameters; ``noisy`` selects the denoising encoder's perturbed input (eq. 13)."""
        if isinstance(self.encoder, DenoisingEncoder):
            return self.encoder(x, noisy=noisy)
        return self.encoder(x)

    def log_weights(self, x: torch.Tensor, k: int = 1, m: int = 1, noisy: bool | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Log importance weights ``[m, k, batch]``. The encoder may see a noisy x; the decoder
        always scores the clean x (eq. 13)."""
        mean, std = self.encode(x, noisy)
        return log_weights_given_q(self.decoder, x, mean, std, k, m, generator)


def air_objective(model: VAE, x: torch.Tensor, k: int = 1, m: int = 1, alpha: float = 1.0) -> torch.Tensor:
    """Per-example training objective: the IWAE-k bound averaged over m repeats, ``[batch]``.

    With a denoising encoder, the partially denoising objective of eq. 16 is
    ``alpha * L_k(noisy encoder) + (1 - alpha) * L_k(clean encoder)``; both terms are computed
    exactly (no per-example coin flip) so that alpha interpolates linearly.
    """
    if not isinstance(model.encoder, DenoisingEncoder) or model.encoder.sigma == 0 or alpha == 0:
        return iwae_bound(model.log_weights(x, k, m, noisy=False)).mean(0)
    noisy = iwae_bound(model.log_weights(x, k, m, noisy=True)).mean(0)
    if alpha == 1:
        return noisy
    clean = iwae_bound(model.log_weights(x, k, m, noisy=False)).mean(0)
    return alpha * noisy + (1 - alpha) * clean


def cap_weight_norms(module: nn.Module, max_norm: float) -> nn.Module:
    """Weight-normalized inference (eq. 17/18) for any encoder: every ``nn.Linear`` inside
    ``module`` becomes a :class:`CappedWeightNormLinear` with cap ``H = max_norm`` (in place).

    The direction of each weight vector is kept; ``H = inf`` leaves the module untouched.
    """
    if math.isinf(max_norm):
        return module
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            capped = CappedWeightNormLinear(child.in_features, child.out_features, max_norm)
            capped = capped.to(device=child.weight.device, dtype=child.weight.dtype)
            with torch.no_grad():
                capped.v.copy_(child.weight)
                if child.bias is not None:
                    capped.bias.copy_(child.bias)
                else:
                    capped.bias.zero_()
            setattr(module, name, capped)
        else:
            cap_weight_norms(child, max_norm)
    return module


def build_vae(x_dim: int, z_dim: int, encoder_hidden: str, decoder_hidden: str,
              sigma: float = 0.0, max_norm: float = math.inf) -> VAE:
    """The paper's model family: plain VAE/IWAE at ``sigma=0, max_norm=inf``; WNI when
    ``max_norm`` is finite; denoising when ``sigma > 0``; both together compose."""
    encoder: nn.Module = cap_weight_norms(GaussianEncoder(x_dim, z_dim, encoder_hidden), max_norm)
    if sigma > 0:
        encoder = DenoisingEncoder(encoder, sigma)
    return VAE(encoder, BernoulliDecoder(z_dim, x_dim, decoder_hidden))
