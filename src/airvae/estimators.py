"""Log-likelihood estimators for trained models, separate from training.

All of them use the model's one log-weights path (:func:`airvae.model.log_weights_given_q`).
Random draws are tied to (seed, example index), so an estimate does not depend on how the work
is chunked: chunked and unchunked runs agree for the same seed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .model import VAE, log_weights_given_q

# Latent samples decoded per chunk: large enough for efficient matmuls, small enough that
# [samples, x_dim] activations stay in cache-friendly memory (2.5k-10k measured best on CPU).
DEFAULT_CHUNK_SAMPLES = 8192


@dataclass
class Estimate:
    """Per-example values of an estimator with its settings and cost."""

    name: str
    values: torch.Tensor  # [n] float64, on CPU
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def mean(self) -> float:
        return float(self.values.mean())

    @property
    def stderr(self) -> float:
        n = self.values.numel()
        return float(self.values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")

    def to_dict(self, per_example: bool = True) -> dict:
        out = {"name": self.name, "settings": self.settings, "mean": self.mean, "stderr": self.stderr,
               "n": self.values.numel(), "seconds": self.seconds}
        if per_example:
            out["values"] = self.values.tolist()
        return out


def example_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The random stream of one example: independent of batching and chunking."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + index) % (2**63))


def _per_example_noise(seed: int, start: int, count: int, k: int, z_dim: int, device, dtype) -> torch.Tensor:
    """Standard-normal draws [k, count, z_dim] for examples start..start+count-1."""
    eps = [torch.randn(k, z_dim, generator=example_generator(seed, start + i, device), device=device, dtype=dtype)
           for i in range(count)]
    return torch.stack(eps, dim=1)


@torch.no_grad()
def iwae_log_likelihood(model: VAE, x: torch.Tensor, k: int = 5000, *, seed: int = 0,
                        chunk_samples: int = DEFAULT_CHUNK_SAMPLES, progress: bool = False,
                        name: str | None = None) -> Estimate:
    """IWAE-k with the amortized encoder (eq. 40): per-example log (1/k) sum_i p(x, z_i)/q(z_i|x).

    Exactly ``k`` samples per example. Work is split into chunks of about ``chunk_samples``
    decoded latents: several examples per chunk when k is small, several chunks per example
    (merged with a running logsumexp) when k is large.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    was_training = model.training
    model.eval()
    start_time = time.perf_counter()
    x = x.float()
    n = x.shape[0]
    values = torch.empty(n, dtype=torch.float64)
    per_chunk = max(1, chunk_samples // k)  # examples per chunk
    k_chunk = min(k, max(1, chunk_samples))
    bar = tqdm(total=n, desc=name or f"IWAE-{k}", unit="ex", disable=not progress, leave=False)
    try:
        for start in range(0, n, per_chunk):
            xb = x[start:start + per_chunk]
            mean, std = model.encode(xb, noisy=False)
            eps = _per_example_noise(seed, start, xb.shape[0], k, mean.shape[-1], mean.device, mean.dtype)
            running = None
            for k0 in range(0, k, k_chunk):
                e = eps[k0:k0 + k_chunk]
                log_w = _log_weights_from_noise(model, xb, mean, std, e)  # [kc, b]
                chunk_lse = torch.logsumexp(log_w.double(), dim=0)
                running = chunk_lse if running is None else torch.logaddexp(running, chunk_lse)
            values[start:start + xb.shape[0]] = (running - math.log(k)).cpu()
            bar.update(xb.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    return Estimate(name or f"iwae-{k}", values, {"k": k, "seed": seed}, time.perf_counter() - start_time)


def _log_weights_from_noise(model: VAE, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                            eps: torch.Tensor) -> torch.Tensor:
    """log w for given standard-normal draws ``eps`` [k, b, z] -> [k, b] (the shared path)."""
    return log_weights_given_q(model.decoder, x, mean, std, k=eps.shape[0], noise=eps)[0]
