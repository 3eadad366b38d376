"""Ground truth for the estimator tests: a tiny VAE with a 2-d latent whose exact ln p(x) is a
2-d integral, computed by quadrature on a fine grid.

ln p(x) = ln int p(x|z) N(z; 0, I) dz over z in [-limit, limit]^2 (the prior mass outside
[-8, 8]^2 is below 1e-14), by the midpoint rule in float64: logsumexp of log p(x, z) over the
cell centres plus the log cell area. The midpoint rule converges very fast for smooth integrands;
``test_grid_is_fine_enough`` checks two resolutions agree.
"""

from __future__ import annotations

import copy
import math

import torch

from airvae.bounds import bernoulli_log_prob, standard_normal_log_prob
from airvae.model import VAE, build_vae

X_DIM, Z_DIM = 12, 2


def tiny_model(seed: int = 0, decoder_scale: float = 3.0) -> VAE:
    """``build_vae(12, 2, "d16", "d16")`` with fixed weights. Scaling the decoder's output layer
    makes p(x|z) sharp, so the posterior is narrow, skewed and far from the untrained encoder's
    q: the bounds have visible gaps that the estimators must close."""
    torch.manual_seed(seed)
    model = build_vae(X_DIM, Z_DIM, encoder_hidden="d16", decoder_hidden="d16")
    with torch.no_grad():
        model.decoder.logits.weight.mul_(decoder_scale)
        for layer in model.decoder.trunk:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(decoder_scale)
    return model.eval()


def tiny_data(model: VAE, n: int = 6, seed: int = 1) -> torch.Tensor:
    """Binary x drawn from the model itself (typical data, posterior concentrated), [n, 12] float."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(n, Z_DIM, generator=g)
        probs = torch.sigmoid(model.decoder(z))
        return torch.bernoulli(probs, generator=g)


@torch.no_grad()
def exact_log_marginal(model: VAE, x: torch.Tensor, grid_size: int = 400, limit: float = 8.0) -> torch.Tensor:
    """Exact ln p(x) per example, [n] float64, by midpoint quadrature over [-limit, limit]^2."""
    decoder = copy.deepcopy(model.decoder).double()
    width = 2 * limit / grid_size
    centres = -limit + width * (torch.arange(grid_size, dtype=torch.float64) + 0.5)
    z = torch.cartesian_prod(centres, centres)  # [G, 2]
    log_prior = standard_normal_log_prob(z)  # [G]
    logits = decoder(z)  # [G, D]
    x = x.double()
    out = []
    for xi in x:
        log_joint = bernoulli_log_prob(xi, logits) + log_prior
        out.append(torch.logsumexp(log_joint, dim=0) + 2 * math.log(width))
    return torch.stack(out)
