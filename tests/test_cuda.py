"""CUDA checks (benchmarks/gpu_check.sh runs them; skipped where no GPU is present): stacked
training on the device equals separate runs, its compiled (CUDA-graph) objective equals eager,
and evaluation keeps fp32 products (TF32 stays off)."""

import pytest
import torch

from airvae.checkpoints import load_checkpoint
from airvae.estimators import iwae_log_likelihood
from airvae.model import build_vae
from airvae.runs import LAST
from airvae.stacked import StackedModel, stacked_objectives
from airvae.stacked.training import _compiled
from airvae.train import train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_a_stacked_group_on_the_gpu_equals_its_runs_trained_separately(tmp_path):
    from test_stacked import GROUPS, alone_and_stacked, tiny_dataset

    alone_and_stacked([c.replace(device="cuda") for c in GROUPS["plain+dvae"]], tiny_dataset(), tmp_path, rtol=1e-4)


def test_the_compiled_stacked_objective_equals_eager():
    device = torch.device("cuda")
    torch.manual_seed(0)
    group = StackedModel([build_vae(30, 4, "d16", "d16").to(device) for _ in range(3)], device)
    x = (torch.rand(3, 5, 30, device=device) < 0.3).float()
    eps = torch.randn(3, 1, 2, 5, 4, device=device)
    alpha = torch.ones(3, device=device)
    eager = stacked_objectives(group, x, x, eps, None, alpha)
    compiled = _compiled(stacked_objectives, device)
    for _ in range(3):  # CUDA graphs record, then replay
        value = compiled(group, x, x, eps, None, alpha)
    torch.testing.assert_close(value, eager, rtol=1e-5, atol=1e-4)
    # and the replayed graph's backward gives eager's gradients
    eager_grads = torch.autograd.grad(eager.sum(), group.leaves)
    compiled_grads = torch.autograd.grad(compiled(group, x, x, eps, None, alpha).sum(), group.leaves)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_evaluation_uses_fp32_products():
    """Log weights on the GPU against a float64 CPU reference: fp32 products keep them within
    1e-3 nats (CPU fp32: 1e-4 on this model); TF32 matmuls (10-bit mantissas) would miss by more
    than 2e-3 (measured by rounding only the weights so)."""
    import copy

    from airvae.estimators import log_weights_from_noise

    assert not torch.backends.cuda.matmul.allow_tf32  # airvae never turns TF32 on (benchmarks/README.md)
    torch.manual_seed(0)
    model = build_vae(784, 16, "d512-d512", "d512-d512").eval()
    x, eps = (torch.rand(64, 784) < 0.3).float(), torch.randn(5, 64, 16)

    @torch.no_grad()
    def log_weights(model, x, eps):
        return log_weights_from_noise(model, x, *model.encode(x), eps)

    reference = log_weights(copy.deepcopy(model).double(), x.double(), eps.double())
    on_gpu = log_weights(model.cuda(), x.cuda(), eps.cuda()).cpu().double()
    assert (on_gpu - reference).abs().max() < 1e-3
    assert torch.isfinite(iwae_log_likelihood(model, x.cuda(), 50).values).all()


def test_a_run_killed_on_the_gpu_resumes_exactly(tmp_path):
    """The training stream is restored on the device (the checkpoint's CPU generator state is
    loaded onto the GPU by map_location): a resumed run ends bit for bit as an uninterrupted one."""
    from test_stacked import GROUPS, _kill_at, tiny_dataset

    cfg, dataset = GROUPS["plain+dvae"][2].replace(device="cuda"), tiny_dataset()
    train(cfg, tmp_path / "reference", progress=False, dataset=dataset)
    _kill_at(cfg, tmp_path / "killed", dataset, 20)
    train(cfg, tmp_path / "killed", resume=True, progress=False, dataset=dataset)
    a, b = (load_checkpoint(tmp_path / d / LAST)["model"] for d in ("reference", "killed"))
    assert all(torch.equal(a[name], b[name]) for name in a)
