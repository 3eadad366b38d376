"""The amortized bounds against the exact ln p(x) of a 2-d latent model (quadrature).

Checks the ordering the paper relies on (section 2, eq. 5, 20, 40): the ELBO (k = 1) and
IWAE-k lie below ln p(x) in expectation, E[L_k] increases with k, and L_k approaches ln p(x).
Every comparison allows Monte Carlo error in one direction only, so a bound that is too high
(e.g. a missing -log k, a wrong density) fails, and so does one stuck below the truth.
"""

import math

import pytest
import torch
from ground_truth import exact_log_marginal, tiny_data, tiny_model

from airvae.estimators import amortized_bound, iwae_log_likelihood
from airvae.model import build_vae

KS = (1, 4, 16, 64, 256)


@pytest.fixture(scope="module")
def case():
    model = tiny_model()
    x = tiny_data(model, n=6)
    return model, x, exact_log_marginal(model, x)


def repeated(model, x, k, repeats, seed=0):
    """IWAE-k drawn ``repeats`` times per example (independent streams): per-example mean, stderr."""
    n = x.shape[0]
    values = iwae_log_likelihood(model, x.repeat(repeats, 1), k, seed=seed).values.view(repeats, n)
    return values.mean(0), values.std(0) / math.sqrt(repeats)


def test_grid_is_fine_enough(case):
    model, x, exact = case
    finer = exact_log_marginal(model, x, grid_size=600, limit=10.0)
    assert (finer - exact).abs().max() < 1e-4
    coarse = exact_log_marginal(model, x, grid_size=40)  # a too-coarse grid is visibly off: the check has teeth
    assert (coarse - exact).abs().max() > 1e-4


def test_quadrature_is_exact_when_x_does_not_depend_on_z():
    """With every decoder weight zero, p(x|z) = prod Bernoulli(x; sigmoid(bias)): ln p(x) is known."""
    torch.manual_seed(3)
    model = build_vae(12, 2, "d16", "d16")
    with torch.no_grad():
        for module in model.decoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.zero_()
    x = torch.bernoulli(torch.full((4, 12), 0.5), generator=torch.Generator().manual_seed(0))
    probs = torch.sigmoid(model.decoder.logits.bias.double())
    expected = (x.double() * probs.log() + (1 - x.double()) * (1 - probs).log()).sum(-1)
    assert torch.allclose(exact_log_marginal(model, x), expected, atol=1e-9)


def test_elbo_and_iwae_lie_below_the_exact_log_likelihood(case):
    model, x, exact = case
    for k in KS:
        mean, se = repeated(model, x, k, repeats=400 if k == 1 else 100)
        # Never above the truth beyond Monte Carlo error...
        assert (mean <= exact + 4 * se + 1e-6).all(), (k, (mean - exact).tolist(), se.tolist())
        if k == 1:  # ...and the ELBO strictly below it (the posterior is not Gaussian here).
            gap = exact - mean
            assert (gap > 4 * se).all(), (gap.tolist(), se.tolist())


def test_amortized_bound_repeats_estimate_the_same_expectation(case):
    model, x, exact = case
    mean, se = repeated(model, x, 1, repeats=400, seed=1)
    bound = amortized_bound(model, x, 1, repeats=400, seed=2)  # other draws, same expectation E[L_1]
    assert bound.settings == {"k": 1, "repeats": 400, "seed": 2}
    assert ((bound.values - mean).abs() < 5 * math.sqrt(2) * se).all()
    assert (bound.values < exact).all()


def test_iwae_increases_with_k_towards_the_exact_value(case):
    model, x, exact = case
    stats = [repeated(model, x, k, repeats=400 if k == 1 else 150, seed=5) for k in KS]
    # Averages over the examples (the per-example draws are independent across k).
    means = [m.mean().item() for m, _ in stats]
    ses = [math.sqrt((s ** 2).sum().item()) / len(s) for _, s in stats]
    for i in range(len(KS) - 1):
        diff, se = means[i + 1] - means[i], math.hypot(ses[i], ses[i + 1])
        assert diff > -3 * se, (KS[i], KS[i + 1], diff, se)  # monotone in expectation
        if KS[i] < 16:
            assert diff > 4 * se, (KS[i], KS[i + 1], diff, se)  # and visibly so where the gap is large
    truth = exact.mean().item()
    assert truth - means[0] > 0.5  # k = 1 leaves a large gap on this model
    assert -4 * ses[-1] < truth - means[-1] < 0.05  # k = 256 all but closes it, from below
