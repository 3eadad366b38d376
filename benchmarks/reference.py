"""The plain eager baseline every airvae row is measured against: a VAE written directly in PyTorch
(Gaussian encoder with mean and softplus-variance heads, Bernoulli decoder, N(0, I) prior), its
naive IWAE-k, IW-SVI and training step, with no airvae code inside."""

from __future__ import annotations

import math

import torch
from harness import X_DIM, Z_DIM
from torch import nn
from torch.nn import functional as F

from airvae.networks import parse_hidden_spec

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------
# The plain eager reference: the same model and bound, written the obvious way.


class RefVAE(nn.Module):
    """Gaussian encoder (mean, softplus-variance heads), Bernoulli decoder, N(0, I) prior; IWAE-k."""

    def __init__(self, enc: str, dec: str):
        super().__init__()

        def trunk(width, spec):
            layers = []
            for units in parse_hidden_spec(spec):
                layers += [nn.Linear(width, units), nn.ELU()]
                width = units
            return nn.Sequential(*layers), width

        self.enc, w = trunk(X_DIM, enc)
        self.enc_mean, self.enc_var = nn.Linear(w, Z_DIM), nn.Linear(w, Z_DIM)
        dec_trunk, w = trunk(Z_DIM, dec)
        self.dec = nn.Sequential(dec_trunk, nn.Linear(w, X_DIM))

    def encode(self, x):
        h = self.enc(x)
        return self.enc_mean(h), torch.sqrt(F.softplus(self.enc_var(h)) + 1e-8)

    def log_weights(self, x, mean, std, k):
        eps = torch.randn(k, *mean.shape, device=mean.device)
        z = mean + std * eps
        logits = self.dec(z)
        log_px = (x * logits - F.softplus(logits)).sum(-1)
        log_pz = (-0.5 * z ** 2 - 0.5 * LOG_2PI).sum(-1)
        log_qz = (-0.5 * ((z - mean) / std) ** 2 - torch.log(std) - 0.5 * LOG_2PI).sum(-1)
        return log_px + log_pz - log_qz  # [k, batch]

    def bound(self, x, k):
        mean, std = self.encode(x)
        return torch.logsumexp(self.log_weights(x, mean, std, k), dim=0) - math.log(k)


@torch.no_grad()
def ref_iwae(model: RefVAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """Naive IWAE-k: one example at a time, all k samples decoded at once."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        mean, std = model.encode(xi)
        out.append(torch.logsumexp(model.log_weights(xi, mean, std, k).double(), dim=0) - math.log(k))
    return torch.cat(out)


def ref_iw_svi_steps(model: RefVAE, x: torch.Tensor, l: int, lr: float = 3e-3):  # noqa: E741
    """Naive IW-SVI: per-example (mu, log sigma) as two batched tensors, default Adam on IWAE-l.
    Returns a function doing one optimization step."""
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        mean, std = model.encode(x)
    mu = mean.clone().requires_grad_(True)
    rho = std.log().clone().requires_grad_(True)
    opt = torch.optim.Adam([mu, rho], lr=lr)

    def step():
        log_w = model.log_weights(x, mu, rho.exp(), l)
        loss = -(torch.logsumexp(log_w, dim=0) - math.log(l)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step



def ref_train_step(case: dict, device: torch.device, data: torch.Tensor):
    """The same step written plainly: RefVAE, default Adam, random minibatch indices."""
    torch.manual_seed(0)
    model = RefVAE(case["enc"], case["dec"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=case["lr"])
    n, batch, k = data.shape[0], case["batch"], case["k"]
    lr0, T = case["lr"], case["T"]
    state = {"step": 0}

    def step():
        t = state["step"]
        for group in optimizer.param_groups:
            group["lr"] = lr0 * 0.1 ** (t / (T - 1))
        x = data[torch.randint(0, n, (batch,), device=device)]
        loss = -model.bound(x, k).mean()
        loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state["step"] = t + 1

    return step


