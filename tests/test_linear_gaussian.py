"""Every estimator against the exact ln p(x) of a linear-Gaussian model in 16 + 64 dimensions.

x = W z + b + s * noise with z ~ N(0, I_16), so p(x) = N(x; b, W W^T + s^2 I_64) exactly. W has
orthogonal columns, so the posterior p(z|x) is a diagonal Gaussian: IW-SVI's q family contains it.
The model is a plain ``nn.Module`` following airvae's protocol (no airvae model class), with a
deliberately imperfect linear encoder (mean map 0.8x the posterior's, std 1.4x), so the amortized
bounds have visible gaps. Comparisons allow Monte Carlo error in one direction only.
"""

import math

import pytest
import torch
from torch import nn

from airvae import Gaussian
from airvae.estimators import ais_log_likelihood, bdmc, fit_iw_svi, iwae_given_q, iwae_log_likelihood, simulate

Z_DIM, X_DIM, NOISE_STD, SCALES = 16, 64, 1.0, (0.5, 1.5)


class LinearGaussianModel(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(X_DIM, Z_DIM, generator=g, dtype=torch.float64))
        scales = torch.linspace(*SCALES, Z_DIM, dtype=torch.float64)
        self.W = basis * scales  # orthogonal columns of norms 0.5 .. 1.5
        self.b = 0.3 * torch.randn(X_DIM, generator=g, dtype=torch.float64)
        self.decoder = nn.Linear(Z_DIM, X_DIM)
        with torch.no_grad():
            self.decoder.weight.copy_(self.W)
            self.decoder.bias.copy_(self.b)
        self.likelihood = Gaussian(std=NOISE_STD)
        self.z_dim = Z_DIM
        # Exact posterior: precision I + W^T W / s^2 (diagonal), mean = cov W^T (x - b) / s^2.
        precision = 1 + scales ** 2 / NOISE_STD ** 2
        posterior_map = (self.W / NOISE_STD ** 2).T / precision[:, None]
        self.encoder_map = nn.Parameter((0.8 * posterior_map).float())
        self.encoder_log_std = nn.Parameter((1.4 * precision.rsqrt()).log().float())

    def encode(self, x):
        mean = (x - self.b.float()) @ self.encoder_map.T
        return mean, self.encoder_log_std.exp().expand_as(mean)

    def exact_log_marginal(self, x):
        cov = self.W @ self.W.T + NOISE_STD ** 2 * torch.eye(X_DIM, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x.double())


@pytest.fixture(scope="module")
def case():
    model = LinearGaussianModel().eval()
    x, z = simulate(model, 8, seed=0)
    return model, x, z, model.exact_log_marginal(x)


def test_iwae_lies_below_exact_and_rises_with_k(case):
    model, x, _, exact = case
    n = x.shape[0]
    means, ses = [], []
    for k, repeats in ((1, 40), (10, 40), (100, 40), (1000, 10)):
        values = iwae_log_likelihood(model, x.repeat(repeats, 1), k).values.view(repeats, n)
        mean, se = values.mean(0), values.std(0) / math.sqrt(repeats)
        assert (mean <= exact + 4 * se + 1e-6).all(), (k, (mean - exact).tolist())
        means.append(mean.mean().item())
        ses.append(math.sqrt((se ** 2).sum().item()) / n)
    assert exact.mean().item() - means[0] > 1.0  # the imperfect encoder leaves a large gap at k = 1
    for i in range(len(means) - 1):  # rising with k, visibly so from 1 to 10 to 100
        diff, se = means[i + 1] - means[i], math.hypot(ses[i], ses[i + 1])
        assert diff > (4 * se if i < 2 else -3 * se), (i, diff, se)
    assert exact.mean().item() - means[-1] < 0.05


def test_iw_svi_is_within_002_nats(case):
    model, x, _, exact = case
    mean_q, std_q = fit_iw_svi(model, x, l=8, steps=1000, lr=1e-2, lr_decay=0.1, seed=0)
    values = iwae_given_q(model, x, mean_q, std_q, 5000, seed=1)
    assert ((exact - values).abs() < 0.02).all(), (exact - values).tolist()


def test_ais_is_within_005_nats(case):
    """Every example within 0.05 nats, and within 0.02 on average. The Monte Carlo error of 256
    chains is itself up to about 0.04 nats per example here (measured: at most 0.037 with this seed,
    0.047 with 1000 steps, 0.031 with 2000 steps and 128 chains), so 0.05 is the issue's bound with
    little to spare, and a real bias of 0.02 on average would show."""
    model, x, _, exact = case
    est = ais_log_likelihood(model, x, num_intermediate=500, chains=256, seed=0)
    error = exact - est.values
    assert abs(error.mean()) < 0.02 and (error.abs() < 0.05).all(), error.tolist()


def test_bdmc_sandwich_contains_the_exact_value_and_narrows_with_more_steps():
    """On average over simulated examples, lower <= ln p(x) <= upper (each side allowing its
    Monte Carlo error in one direction only), and the sandwich narrows as annealing gets longer."""
    model = LinearGaussianModel().eval()
    x, z = simulate(model, 32, seed=1)
    exact = model.exact_log_marginal(x)
    widths = {}
    for steps in (10, 300):
        lower, upper = bdmc(model, x, z, num_intermediate=steps, chains=4, seed=0)
        below, above = exact - lower.values, upper.values - exact
        se_below, se_above = below.std() / math.sqrt(len(x)), above.std() / math.sqrt(len(x))
        assert below.mean() > -3 * se_below and above.mean() > -3 * se_above, (steps, below.mean(), above.mean())
        widths[steps] = (upper.values - lower.values).mean().item()
    assert widths[10] > 1.0 and widths[300] < widths[10] / 3, widths
    assert widths[300] < 0.5, widths
