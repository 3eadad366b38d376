"""The optional torch.compile'd kernels (AIRVAE_COMPILE) against eager: same draws, same values."""

import warnings

import pytest
import torch

from airvae import air_objective, build_vae
from airvae.compiling import LONG_EVALUATION_LATENTS, _compile, compile_for, set_compile
from airvae.evaluation import EvaluationSettings, _latents_decoded
from airvae.model import log_weights_given_q
from airvae.targets import EVALUATION_BUDGETS


@pytest.fixture
def compiled():
    before = (_compile.mode, _compile.enabled)
    set_compile(True)
    yield
    _compile.mode, _compile.enabled = before


def _loss_and_grads(model, x, compile_on):
    set_compile(compile_on)
    torch.manual_seed(3)  # the DVAE noise and the reparameterization draws
    model.zero_grad()
    loss = -air_objective(model, x, k=3, m=2, alpha=0.5).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_compiled_training_objective_matches_eager_with_the_same_draws(compiled):
    torch.manual_seed(0)
    # Every variant at once: denoising (partial, alpha = 0.5) on a weight-normalized encoder.
    model = build_vae(30, 4, "d16", "d16", sigma=0.2, max_norm=2.0)
    x = (torch.rand(5, 30) < 0.3).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a silent fallback to eager would prove nothing
        eager_loss, eager_grads = _loss_and_grads(model, x, False)
        loss, grads = _loss_and_grads(model, x, True)
    assert _compile.fns, "nothing was compiled"
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_compiled_decoder_kernel_matches_eager_for_free_q(compiled):
    torch.manual_seed(0)
    model = build_vae(30, 4, "d16", "d16")
    x = (torch.rand(5, 30) < 0.3).float()
    mean, std = torch.randn(5, 4), torch.rand(5, 4) + 0.5
    values = []
    for on in (False, True):
        set_compile(on)
        values.append(log_weights_given_q(model.decoder, x, mean, std, k=7,
                                          generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(values[1], values[0], rtol=1e-5, atol=1e-5)


def test_auto_mode_compiles_long_work_only_and_explicit_settings_win(compiled):
    set_compile(None)  # auto, the default without AIRVAE_COMPILE
    assert not compile_for(False) and compile_for(True)
    set_compile(False)
    assert not compile_for(True)
    set_compile(True)
    assert compile_for(False)


def test_paper_evaluations_count_as_long_and_quick_ones_do_not():
    def size(budget, n):
        return _latents_decoded(EvaluationSettings(**EVALUATION_BUDGETS[budget]), n, bound_k=1)

    assert size("paper", 10_000) >= LONG_EVALUATION_LATENTS  # MNIST's test set, T = 3000
    assert size("quick", 500) < LONG_EVALUATION_LATENTS and size("smoke", 32) < LONG_EVALUATION_LATENTS


@pytest.mark.skipif(not hasattr(__import__("os"), "getuid"), reason="POSIX owners and modes")
def test_the_compile_cache_is_used_only_when_it_is_private(tmp_path, monkeypatch):
    """Inductor runs the code it finds in its cache: airvae points it at ~/.cache/airvae/torchinductor
    only when that folder (created 0700) and its parent are real folders no one else can write."""
    import os

    from airvae.compiling import torch_compile

    def chosen(home):
        monkeypatch.setenv("XDG_CACHE_HOME", str(home))
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        torch_compile(torch.sin)  # compiling itself is lazy: nothing runs here
        return os.environ.get("TORCHINDUCTOR_CACHE_DIR")

    fresh = tmp_path / "fresh"
    assert chosen(fresh) == str(fresh / "airvae" / "torchinductor")
    assert (fresh / "airvae" / "torchinductor").stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    (shared / "airvae" / "torchinductor").mkdir(parents=True)
    (shared / "airvae" / "torchinductor").chmod(0o777)
    ours = str(shared / "airvae" / "torchinductor")
    assert chosen(shared) != ours  # Inductor keeps its own default
    linked = tmp_path / "linked"
    (linked / "airvae").mkdir(parents=True)
    (linked / "airvae" / "torchinductor").symlink_to(shared / "airvae" / "torchinductor")
    assert chosen(linked) != str(linked / "airvae" / "torchinductor")
    (shared / "airvae").chmod(0o777)
    (shared / "airvae" / "torchinductor").chmod(0o700)
    assert chosen(shared) != ours  # its parent writable by anyone: the folder could be swapped
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/mine")
    torch_compile(torch.sin)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/mine"  # the user's choice stands
