"""Likelihoods against their definitions: discretized logistic probabilities sum to 1 over all bins
and equal CDF differences, Gaussian and Bernoulli match torch.distributions on images, samples
follow the probabilities, bits/dim conversions are exact, and the log-weights path scores images
through any decoder."""

import math

import pytest
import torch
from scipy.special import expit
from torch import nn

from airvae import (
    Bernoulli,
    DiscretizedLogistic,
    Gaussian,
    air_objective,
    bits_per_dim,
    build_vae,
    log_likelihood_from_bits_per_dim,
    log_weights_given_q,
)
from airvae.estimators import Estimate, iwae_log_likelihood
from airvae.likelihoods import discretized_logistic_log_prob


def all_bins(num_bins):
    """Every value x can take, one per example: [num_bins, 1]."""
    return (torch.arange(num_bins, dtype=torch.float64) / (num_bins - 1))[:, None]


def parameter_grid(components, settings=64, seed=0):
    """[settings, 1, P] decoder outputs: means far outside [0, 1] too, scales from far narrower than a
    bin (log scale -12) to far wider than the data range (log scale 3)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.rand(settings, components, generator=g, dtype=torch.float64) * 3 - 1
    log_scale = torch.rand(settings, components, generator=g, dtype=torch.float64) * 15 - 12
    if components == 1:
        return torch.cat([mean, log_scale], -1)[:, None, :]
    logits = torch.randn(settings, components, generator=g, dtype=torch.float64) * 3
    return torch.cat([logits, mean, log_scale], -1)[:, None, :]


@pytest.mark.parametrize("num_bins,components", [(256, 1), (256, 3), (17, 1), (17, 2), (2, 1)])
def test_discretized_logistic_probabilities_sum_to_one_over_all_bins(num_bins, components):
    likelihood = DiscretizedLogistic(num_bins, components)
    params = parameter_grid(components)  # [settings, 1, P]: broadcast over the bins
    log_p = likelihood.log_prob(all_bins(num_bins), params.expand(-1, num_bins, -1))  # [settings, bins]
    assert torch.isfinite(log_p).all() and (log_p <= 1e-12).all()
    torch.testing.assert_close(torch.logsumexp(log_p, dim=1), torch.zeros(len(params), dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_discretized_logistic_bins_are_cdf_differences():
    """An independent reference: P(bin i) = F((i + 1/2) w - mean) - F((i - 1/2) w - mean), w = 1/255,
    with the tails in the edge bins, F the logistic CDF (scipy) -- for moderate parameters."""
    x = all_bins(256)
    for mean, log_scale in [(0.3, -3.0), (0.95, -5.0), (0.0, -1.0), (0.5, 0.5)]:
        scale, half = math.exp(log_scale), 0.5 / 255
        upper = expit(((x + half - mean) / scale).numpy())
        lower = expit(((x - half - mean) / scale).numpy())
        upper[-1], lower[0] = 1.0, 0.0
        reference = torch.from_numpy(upper - lower)[:, 0]
        log_p = discretized_logistic_log_prob(x, torch.tensor(mean, dtype=torch.float64),
                                              torch.tensor(log_scale, dtype=torch.float64), 256)[:, 0]
        torch.testing.assert_close(log_p.exp(), reference, atol=1e-14, rtol=1e-9)


def test_discretized_logistic_is_stable_in_the_tails_and_differentiable():
    x = torch.tensor([[0.0, 128 / 255, 1.0]])
    mean = torch.tensor([[5.0, 128 / 255, -4.0]], requires_grad=True)  # far away, exactly centred, far away
    log_scale = torch.full((1, 3), -10.0, requires_grad=True)  # a scale 1e-4 of a bin
    log_p = discretized_logistic_log_prob(x, mean, log_scale, 256)
    assert torch.isfinite(log_p).all()
    assert log_p[0, 1].abs() < 1e-6 and log_p[0, 0] < -1e4 and log_p[0, 2] < -1e4
    log_p.sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()


def test_mixture_is_the_weighted_sum_of_its_components():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (5, 3, 2, 2), generator=g).double() / 255
    logits, means = torch.randn(2, 5, 3, 2, 2, generator=g, dtype=torch.float64), torch.rand(2, 5, 3, 2, 2, generator=g)
    log_scales = torch.rand(2, 5, 3, 2, 2, generator=g, dtype=torch.float64) * 3 - 5
    params = torch.cat([*logits, *means.double(), *log_scales], dim=1)  # K = 2: [5, 6 * 3, 2, 2], documented order
    weights = torch.softmax(logits, dim=0)
    cells = [discretized_logistic_log_prob(x, means[j].double(), log_scales[j], 256).exp() for j in range(2)]
    by_hand = torch.log(weights[0] * cells[0] + weights[1] * cells[1]).sum((1, 2, 3))
    torch.testing.assert_close(DiscretizedLogistic(256, components=2).log_prob(x, params), by_hand,
                               atol=1e-10, rtol=0)


def test_bits_per_dim_conversions_are_exact():
    dims = 3 * 32 * 32
    assert bits_per_dim(-dims * math.log(256), dims) == pytest.approx(8.0, abs=1e-12)  # uniform over 256 levels
    assert bits_per_dim(-dims * math.log(2), dims) == 1.0
    for nats in (-123.456, -0.5, -7000.0):
        assert log_likelihood_from_bits_per_dim(bits_per_dim(nats, dims), dims) == pytest.approx(nats, rel=1e-15)
    est = Estimate("x", torch.tensor([-100.0, -200.0], dtype=torch.float64), dims=50)
    assert est.bits_per_dim == pytest.approx(150 / (50 * math.log(2)), rel=1e-15)
    assert Estimate.from_dict(est.to_dict()).dims == 50
    # A DiscretizedLogistic on a 2-level grid with a huge scale is uniform: 1 bit per dimension.
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    params = torch.cat([torch.full((1, 4), 0.5), torch.full((1, 4), 30.0)], dim=1).double()
    assert bits_per_dim(DiscretizedLogistic(2).log_prob(x, params), 4).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("std_mode", Gaussian.STD_MODES)
def test_gaussian_matches_torch_on_images_with_sample_axes(std_mode):
    torch.manual_seed(0)
    x = torch.randn(4, 2, 3, 3)
    std0 = 1.0 if std_mode == "decoder" else 0.7  # (the decoder emits the std: std itself is refused)
    likelihood = Gaussian(std0, std_mode, event_shape=(2, 3, 3) if std_mode == "per-dimension" else None)
    if std_mode in ("global", "per-dimension"):
        with torch.no_grad():
            likelihood.log_std.add_(torch.randn(likelihood.log_std.shape) * 0.3)
        assert list(likelihood.parameters()) == [likelihood.log_std]  # learned
    params = torch.randn(5, 4, likelihood.params_per_dim * 2, 3, 3)  # 5 samples of z per example
    mean = params[:, :, :2]
    if std_mode == "fixed":
        std = torch.tensor(0.7)
    else:
        # a learned std is min_std (1e-3 by default) + exp(its log parameter)
        std = 1e-3 + (params[:, :, 2:].exp() if std_mode == "decoder" else likelihood.log_std.exp())
    expected = torch.distributions.Normal(mean, std).log_prob(x).sum((-3, -2, -1))
    torch.testing.assert_close(likelihood.log_prob(x, params), expected)


def test_gaussian_learned_std_is_floored_and_validated():
    likelihood = Gaussian(1.0, "global", min_std=0.01)
    with torch.no_grad():
        likelihood.log_std.fill_(-50.0)
    x, mean = torch.zeros(1, 3), torch.full((1, 3), 0.5)
    expected = torch.distributions.Normal(mean, 0.01).log_prob(x).sum(-1)
    torch.testing.assert_close(likelihood.log_prob(x, mean), expected)
    for kwargs in ({"std_mode": "learned"}, {"std": 0.0}, {"std_mode": "per-dimension"}, {"std": 0.5, "std_mode": "decoder"},
                   {"std_mode": "global", "event_shape": (3,)}):
        with pytest.raises(ValueError):
            Gaussian(**kwargs)


def test_bernoulli_scores_images_as_their_flattened_pixels():
    torch.manual_seed(0)
    x = (torch.rand(4, 1, 5, 5) < 0.4).float()
    logits = torch.randn(3, 4, 1, 5, 5)
    image = Bernoulli().log_prob(x, logits)
    flat = Bernoulli().log_prob(x.flatten(1), logits.flatten(-3))
    assert torch.equal(image, flat)
    torch.testing.assert_close(image, torch.distributions.Bernoulli(logits=logits).log_prob(x).sum((-3, -2, -1)))


def test_shape_and_data_errors_say_what_to_do():
    x = torch.rand(2, 3, 4, 4).mul(255).round().div(255)
    with pytest.raises(ValueError, match=r"\[N, 2 \* C, \.\.\.\]"):
        DiscretizedLogistic().log_prob(x, torch.zeros(2, 3, 4, 4))  # the log scales are missing
    with pytest.raises(ValueError, match="x.float\\(\\) / 255"):
        DiscretizedLogistic().validate(x * 255)  # raw 0..255 values
    with pytest.raises(ValueError, match="must be binary"):
        Bernoulli().validate(torch.tensor([[0.0, 2.0]]))
    with pytest.raises(ValueError, match="for grey levels use DiscretizedLogistic"):
        Bernoulli().validate(torch.tensor([[0.0, 0.5]]))  # grey levels inside [0, 1] are not binary either
    with pytest.raises(ValueError, match="one batch axis"):
        Gaussian().validate(torch.zeros(5))
    DiscretizedLogistic().validate(x)  # on the grid: fine
    DiscretizedLogistic(17).validate(torch.arange(17.0)[None] / 16)


@pytest.mark.parametrize("likelihood", [DiscretizedLogistic(5), DiscretizedLogistic(5, components=2)],
                         ids=["single", "mixture"])
def test_discretized_logistic_samples_follow_its_probabilities(likelihood):
    g = torch.Generator().manual_seed(0)
    k = likelihood.components
    means, log_scales = 0.5 + 0.3 * torch.randn(1, k, generator=g), -1.5 + 0.3 * torch.randn(1, k, generator=g)
    params = torch.cat(([torch.randn(1, k, generator=g)] if k > 1 else []) + [means, log_scales], dim=1).double()
    draws = likelihood.sample(params.expand(40_000, -1), generator=torch.Generator().manual_seed(1))
    assert draws.shape == (40_000, 1)
    freq = torch.stack([(draws == i / 4).double().mean() for i in range(5)])
    probs = likelihood.log_prob(all_bins(5), params.expand(5, -1)).exp()
    se = (probs * (1 - probs) / 40_000).sqrt()
    assert ((freq - probs).abs() < 4.5 * se + 1e-4).all(), (freq.tolist(), probs.tolist())
    assert torch.isclose(freq.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_gaussian_and_bernoulli_samples_have_the_right_moments():
    g = torch.Generator().manual_seed(0)
    draws = Gaussian(0.5).sample(torch.full((20_000, 3), 2.0), generator=g)
    assert abs(draws.mean() - 2.0) < 0.01 and abs(draws.std() - 0.5) < 0.01
    draws = Gaussian(std_mode="decoder").sample(torch.tensor([[1.0, math.log(0.2)]]).expand(20_000, -1), generator=g)
    assert abs(draws.mean() - 1.0) < 0.01 and abs(draws.std() - 0.2) < 0.005
    draws = Bernoulli().sample(torch.full((20_000, 2), math.log(0.3 / 0.7)), generator=g)
    assert abs(draws.mean() - 0.3) < 0.01 and set(draws.unique().tolist()) == {0.0, 1.0}


class ConvDecoder(nn.Module):
    """Accepts only [N, z_dim]: the log-weights path must flatten sample axes for it."""

    def __init__(self, z_dim, channels):
        super().__init__()
        self.z_dim = z_dim
        self.net = nn.Sequential(nn.Linear(z_dim, 8 * 2 * 2), nn.Unflatten(1, (8, 2, 2)),
                                 nn.ConvTranspose2d(8, channels, 4, 2, 1))

    def forward(self, z):
        assert z.dim() == 2, z.shape
        return self.net(z)


def test_log_weights_score_images_through_a_conv_decoder():
    torch.manual_seed(0)
    likelihood = Gaussian(std_mode="decoder")
    decoder = ConvDecoder(3, 2 * likelihood.params_per_dim)
    x = torch.randn(5, 2, 4, 4)
    mean, std = torch.randn(5, 3), torch.rand(5, 3) + 0.5
    log_w = log_weights_given_q(decoder, x, mean, std, k=4, m=2, generator=torch.Generator().manual_seed(3),
                                likelihood=likelihood)
    assert log_w.shape == (2, 4, 5)
    eps = torch.randn((2, 4, 5, 3), generator=torch.Generator().manual_seed(3))  # the same draws, by hand
    z = mean + std * eps
    out = decoder(z.reshape(-1, 3)).reshape(2, 4, 5, 4, 4, 4)
    log_px = torch.distributions.Normal(out[..., :2, :, :], 1e-3 + out[..., 2:, :, :].exp()).log_prob(x).sum((-3, -2, -1))
    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = torch.distributions.Normal(mean, std).log_prob(z).sum(-1)
    torch.testing.assert_close(log_w, log_px + log_pz - log_qz, rtol=1e-5, atol=1e-4)


def test_a_learned_likelihood_trains_with_the_model_and_the_estimators_leave_it_alone():
    torch.manual_seed(0)
    model = build_vae(6, 2, "d8", "d8", likelihood=Gaussian(1.0, "per-dimension", event_shape=(6,)))
    assert model.decoder.out.out_features == 6
    x = torch.randn(10, 6)
    (-air_objective(model, x, k=2).mean()).backward()
    assert model.likelihood.log_std.grad is not None and model.likelihood.log_std.grad.abs().sum() > 0
    before = model.likelihood.log_std.detach().clone()
    iwae_log_likelihood(model, x, 8)
    assert torch.equal(model.likelihood.log_std, before)
    assert "likelihood.log_std" in model.state_dict()
    # The paper's Bernoulli model keeps its parameters (and checkpoints) exactly: its likelihood has none.
    assert not any(name.startswith("likelihood") for name in build_vae(6, 2, "d8", "d8").state_dict())


def test_a_learned_std_always_has_a_gradient_and_extreme_log_scales_stay_finite():
    # std = min_std + exp(l): at the floor a smooth parameterization still moves (a clamp would not).
    likelihood = Gaussian(1.0, "global")
    with torch.no_grad():
        likelihood.log_std.fill_(math.log(1e-3) - 5)
    likelihood.log_prob(torch.zeros(1, 3), torch.full((1, 3), 5.0)).sum().backward()
    assert likelihood.log_std.grad.abs().item() > 0
    # a decoder emitting log scales of -100 or +100 gives finite log-probabilities and gradients
    log_scale = torch.tensor([-100.0, 100.0, -90.0], requires_grad=True)
    x, mean = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.5, 0.2, 0.3])
    value = discretized_logistic_log_prob(x, mean, log_scale, 256)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(log_scale.grad).all()
