"""Networks, AIR regularizers and bounds against their definitions (eqs. 13, 16, 17/18, 20)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from airvae import (
    CappedWeightNormLinear,
    DenoisingEncoder,
    GaussianEncoder,
    Regularizer,
    air_objective,
    bernoulli_log_prob,
    build_vae,
    cap_weight_norms,
    elbo,
    gaussian_log_prob,
    iwae_bound,
    parse_hidden_spec,
)
from airvae.config import ConfigError


def binary(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g) < 0.3).float()


@settings(max_examples=60, deadline=None)
@given(v_scale=st.floats(1e-4, 1e4), u_shift=st.floats(-30, 30), h=st.floats(1e-3, 1e3), seed=st.integers(0, 10_000))
def test_wni_weight_norms_never_exceed_h(v_scale, u_shift, h, seed):
    torch.manual_seed(seed)
    layer = CappedWeightNormLinear(7, 5, max_norm=h)
    with torch.no_grad():
        layer.v.mul_(v_scale)
        layer.u.copy_(torch.randn(5) * 10 + u_shift)
    norms = layer.weight.norm(dim=1)
    assert torch.all(norms <= h * (1 + 1e-5)), (norms.max().item(), h)
    # Eq. 18: s_i = min(||v_i||, H sigmoid(u_i)) exactly, direction of v kept.
    expected = torch.minimum(layer.v.norm(dim=1), h * torch.sigmoid(layer.u))
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=1e-6 * h)


def test_wni_is_identity_below_the_cap():
    plain = torch.nn.Linear(6, 4)
    capped = cap_weight_norms(torch.nn.Sequential(plain), max_norm=1e6)[0]
    with torch.no_grad():
        capped.u.fill_(20.0)  # sigmoid ~ 1: the cap H * sigmoid(u) >> ||v||
    x = torch.randn(3, 6)
    torch.testing.assert_close(capped(x), torch.nn.functional.linear(x, capped.v, capped.bias))


def test_h_infinite_and_sigma_zero_give_the_plain_model_exactly():
    from airvae import VAE, BernoulliDecoder

    torch.manual_seed(0)  # the plain VAE, built by hand from its two networks
    plain = VAE(GaussianEncoder(12, 2, "d8"), BernoulliDecoder(2, 12, "d8"))
    torch.manual_seed(0)
    same = build_vae(12, 2, "d8", "d8", sigma=0.0, max_norm=math.inf)
    assert list(plain.state_dict()) == list(same.state_dict())
    assert all(torch.equal(p, same.state_dict()[name]) for name, p in plain.state_dict().items())
    assert not any(isinstance(m, CappedWeightNormLinear) for m in same.modules())
    assert not isinstance(same.encoder, DenoisingEncoder)
    x = binary(4, 12)
    torch.testing.assert_close(same.encode(x), plain.encode(x), rtol=0, atol=0)


def test_sigma_zero_denoising_wrapper_reduces_to_vae_exactly():
    torch.manual_seed(0)
    vae = build_vae(12, 2, "d8", "d8")
    x = binary(5, 12)
    wrapped = build_vae(12, 2, "d8", "d8")
    wrapped.load_state_dict(vae.state_dict())
    wrapped.encoder = DenoisingEncoder(wrapped.encoder, sigma=0.0)
    torch.manual_seed(1)
    a = air_objective(vae, x, k=4, m=2)
    torch.manual_seed(1)
    b = air_objective(wrapped, x, k=4, m=2)
    assert torch.equal(a, b)


def test_alpha_zero_is_the_clean_objective_and_alpha_interpolates_linearly():
    torch.manual_seed(0)
    model = build_vae(12, 2, "d8", "d8", sigma=0.7)
    clean_model = build_vae(12, 2, "d8", "d8")
    clean_model.encoder.load_state_dict(model.encoder.encoder.state_dict())
    clean_model.decoder.load_state_dict(model.decoder.state_dict())
    model.train(), clean_model.train()
    x = binary(6, 12)
    torch.manual_seed(3)
    a0 = air_objective(model, x, k=3, alpha=0.0)
    torch.manual_seed(3)
    assert torch.equal(a0, air_objective(clean_model, x, k=3))
    # Eq. 16: with the same draws, L(alpha) = alpha * L(noisy) + (1 - alpha) * L(clean).
    for alpha in (0.25, 0.5, 0.9):
        torch.manual_seed(5)
        mixed = air_objective(model, x, k=3, alpha=alpha)
        torch.manual_seed(5)
        noisy = air_objective(model, x, k=3, alpha=1.0)
        clean = air_objective(model, x, k=3, alpha=0.0)  # continues the same stream
        torch.testing.assert_close(mixed, alpha * noisy + (1 - alpha) * clean)
    assert not torch.allclose(noisy, clean)  # the noise really changes the objective


class _Spy(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.seen = encoder, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.encoder(x)


def test_denoising_encoder_sees_gaussian_noise_of_std_sigma_only_in_training():
    sigma, d = 0.3, 50
    spy = _Spy(GaussianEncoder(d, 2, "d8"))
    enc = DenoisingEncoder(spy, sigma)
    x = binary(400, d)
    enc.train()
    enc(x)
    noise = spy.seen[-1] - x
    assert abs(noise.std().item() - sigma) < 0.01 and abs(noise.mean().item()) < 0.005
    enc.eval()
    enc(x)
    assert torch.equal(spy.seen[-1], x)


def test_decoder_scores_the_clean_input_under_denoising():
    torch.manual_seed(0)
    model = build_vae(12, 2, "d8", "d8", sigma=2.0)
    model.train()
    x = binary(4, 12)
    torch.manual_seed(0)
    log_w = model.log_weights(x, k=1)
    # Recompute with the same draws by hand: noise for the encoder first, then z.
    torch.manual_seed(0)
    noisy_x = x + 2.0 * torch.randn_like(x)
    mean, std = model.encoder.encoder(noisy_x)
    eps = torch.randn((1, 1, *mean.shape))
    z = mean + std * eps
    by_hand = (bernoulli_log_prob(x, model.decoder(z)) + torch.distributions.Normal(0, 1).log_prob(z).sum(-1)
               - torch.distributions.Normal(mean, std).log_prob(z).sum(-1))
    torch.testing.assert_close(log_w, by_hand, rtol=1e-5, atol=1e-4)


def test_densities_match_torch_distributions():
    torch.manual_seed(0)
    logits, x = torch.randn(4, 9) * 3, binary(4, 9)
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    torch.testing.assert_close(bernoulli_log_prob(x, logits), expected)
    z, mean, std = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4, 3) + 0.1
    torch.testing.assert_close(gaussian_log_prob(z, mean, std), torch.distributions.Normal(mean, std).log_prob(z).sum(-1))


def test_iwae_bound_definition():
    log_w = torch.randn(2, 5, 3) * 4
    expected = torch.log(torch.exp(log_w.double()).mean(dim=1)).float()
    torch.testing.assert_close(iwae_bound(log_w), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(iwae_bound(log_w[:, :1]), elbo(log_w[:, :1]))
    # Jensen: the IWAE bound of a set of weights is never below their average log weight.
    assert torch.all(iwae_bound(log_w) >= elbo(log_w))


def test_parse_hidden_spec():
    assert parse_hidden_spec("d300-d300") == (300, 300)
    assert parse_hidden_spec("d1000-d1000-d1000") == (1000,) * 3
    assert parse_hidden_spec("") == ()
    with pytest.raises(ValueError, match="d<units>"):
        parse_hidden_spec("d300-relu")


def test_paper_parameterization_of_table_7():
    reg = Regularizer.from_paper(784, sigma_sqrt_d=5.0, ten_over_h=2.5, alpha=0.5)
    assert reg.sigma == pytest.approx(5.0 / 28) and reg.max_norm == pytest.approx(4.0) and reg.alpha == 0.5
    assert math.isinf(Regularizer.from_paper(784, ten_over_h=0.0).max_norm)


@pytest.mark.parametrize("kwargs, field", [({"sigma": -0.1}, "sigma"), ({"alpha": 1.5}, "alpha"),
                                           ({"alpha": -0.1}, "alpha"), ({"max_norm": 0.0}, "H"),
                                           ({"max_norm": -1.0}, "H")])
def test_regularizer_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Regularizer(**kwargs)


# ----------------------------------------------------------------------------------------------
# WNI for convolutions: the cap per output channel over its whole filter


def conv_layer(kind: str, dim: int, groups: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = getattr(torch.nn, f"{kind}{dim}d")
    return cls(2 * groups, 3 * groups, kernel_size=(3, 2, 2)[:dim] if dim > 1 else 3, groups=groups)


def filters(layer: torch.nn.Module, weight: torch.Tensor) -> list[torch.Tensor]:
    """Per output channel o, every weight feeding o, written out one channel at a time."""
    if not layer.transposed:  # [out, in/groups, *kernel]
        return [weight[o] for o in range(layer.out_channels)]
    in_g, out_g = layer.in_channels // layer.groups, layer.out_channels // layer.groups  # [in, out/groups, *kernel]
    return [weight[(o // out_g) * in_g:(o // out_g + 1) * in_g, o % out_g] for o in range(layer.out_channels)]


def filter_norms(layer: torch.nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    return torch.stack([f.norm() for f in filters(layer, layer.weight if weight is None else weight)])


CONVS = [(kind, dim) for kind in ("Conv", "ConvTranspose") for dim in (1, 2, 3)]


@pytest.mark.parametrize("kind,dim", CONVS)
def test_filter_of_an_output_channel_is_every_weight_that_feeds_it(kind, dim):
    """Ground truth for ``filters``: the weights with a nonzero gradient of output channel o."""
    layer = conv_layer(kind, dim, groups=2)
    x = torch.randn(2, layer.in_channels, *(5,) * dim)
    for o in range(layer.out_channels):
        (grad,) = torch.autograd.grad(layer(x)[:, o].sum(), layer.weight)
        assert torch.isclose(layer.weight[grad != 0].norm(), filter_norms(layer)[o])
        assert (grad != 0).sum() == layer.weight.numel() // layer.out_channels  # in/groups * kernel weights each


@settings(max_examples=60, deadline=None)
@given(conv=st.sampled_from(CONVS), groups=st.sampled_from([1, 2]), v_scale=st.floats(1e-4, 1e4),
       u_shift=st.floats(-30, 30), h=st.floats(1e-3, 1e3), seed=st.integers(0, 10_000))
def test_conv_wni_filter_norms_never_exceed_h(conv, groups, v_scale, u_shift, h, seed):
    layer = conv_layer(*conv, groups=groups, seed=seed)
    with torch.no_grad():
        layer.weight.mul_(v_scale)
    v = layer.weight.detach().clone()
    cap_weight_norms(layer, max_norm=h)
    cap = layer.parametrizations.weight[0]
    with torch.no_grad():
        cap.u.copy_(torch.randn(layer.out_channels) * 10 + u_shift)
    norms = filter_norms(layer)
    assert torch.all(norms <= h * (1 + 1e-5)), (norms.max().item(), h)
    torch.testing.assert_close(cap.filter_norms(layer.weight), norms)  # what `airvae plot` draws
    # Eq. 18 per output channel: s_o = min(||v_o||, H sigmoid(u_o)), and each filter keeps its direction.
    expected = torch.minimum(filter_norms(layer, v), h * torch.sigmoid(cap.u))
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=1e-6 * h)
    for w_o, v_o in zip(filters(layer, layer.weight), filters(layer, v), strict=True):
        w_o = w_o / w_o.abs().max()  # a filter capped near 0 (u << 0) would underflow in w_o.norm()
        torch.testing.assert_close(w_o / w_o.norm(), v_o / v_o.norm(), rtol=1e-4, atol=1e-5)


def test_conv_wni_is_identity_below_the_cap_and_trains_u():
    layer = conv_layer("ConvTranspose", 2, groups=1)
    x = torch.randn(3, layer.in_channels, 4, 4)
    expected = layer(x).detach()
    cap_weight_norms(torch.nn.Sequential(layer), max_norm=1e6)
    cap = layer.parametrizations.weight[0]
    with torch.no_grad():
        cap.u.fill_(20.0)  # sigmoid ~ 1: the cap H * sigmoid(u) >> ||v||
    torch.testing.assert_close(layer(x), expected)
    layer(x).square().sum().backward()
    assert cap.u.grad.abs().sum() == 0  # below the cap the cap has no say
    with torch.no_grad():
        cap.u.fill_(-20.0)  # now every filter is at its (tiny) cap: u is what sets their norms
    layer.zero_grad()
    layer(x).square().sum().backward()
    assert (cap.u.grad.abs() > 0).all() and layer.parametrizations.weight.original.grad.abs().sum() > 0


def test_cap_weight_norms_converts_every_dense_and_conv_layer_once():
    encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ELU(), torch.nn.Flatten(),
                                  torch.nn.Sequential(torch.nn.Linear(4 * 6 * 6, 8), torch.nn.ConvTranspose1d(1, 1, 1)))
    cap_weight_norms(encoder, max_norm=2.0)
    cap_weight_norms(encoder, max_norm=2.0)  # idempotent
    assert len(encoder[0].parametrizations.weight) == 1 and len(encoder[3][1].parametrizations.weight) == 1
    assert isinstance(encoder[3][0], CappedWeightNormLinear)
    assert sum(name.endswith(".u") for name, _ in encoder.named_parameters()) == 3
    assert isinstance(cap_weight_norms(torch.nn.Linear(3, 2), 1.0), CappedWeightNormLinear)  # a bare layer too
