"""A stacked group: R models of one architecture held as one (each parameter an ``[R, ...]``
tensor), Adam over it with each run's own state, and the training objectives of all runs in one
vmapped call."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.optim.adam import adam as torch_adam

from ..config import Regularizer, RunConfig
from ..driver import fast_adam_options
from ..model import encode_log_weights, mean_bound
from ..networks import DenoisingEncoder
from ..objectives import mix_bounds

BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which single runs use


# ----------------------------------------------------------------------------------------------
# Which runs share a group


def group_key(cfg: RunConfig) -> str:
    """Runs with equal keys can train as one stacked model: everything but the seed and the
    regularizer's values is shared; WNI (a different module structure) and two-bound runs form
    their own groups."""
    shared = cfg.replace(seed=0, regularizer=Regularizer(), data_dir=None).to_json()
    shared["wni"] = math.isfinite(cfg.regularizer.max_norm)
    shared["two_bounds"] = cfg.regularizer.two_bounds
    return json.dumps(shared, sort_keys=True)


# ----------------------------------------------------------------------------------------------
# Adam over stacked tensors


class StackedAdam:
    """Adam on stacked tensors ``[R, ...]`` (slice r belongs to run r) with torch's own kernel, the
    very arithmetic a run trained alone gets, and a step count per run. A step updates the active
    runs, which must be at the same step (they are: a group steps its runs in lockstep, and runs
    whose checkpoints are ahead sit out until the others catch up); the others are left exactly
    as they were (parameters and moments), so catching up changes nothing bit for bit.

    Args:
        params: the stacked leaf tensors (``StackedModel.leaves``), their gradients set by backward.
    """

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = [0] * params[0].shape[0]
        self.fused = bool(fast_adam_options(params[0].device))
        self._counts: list[torch.Tensor] | None = None  # the kernel's step tensors (kept on the device)
        self._counted: int | None = None  # the step they count
        self._idle: list[int] | None = None  # the runs sitting out,
        self._idle_index: torch.Tensor | None = None  # as a device index tensor

    def step(self, lr: float, active: list[bool]) -> None:
        """One Adam step at learning rate ``lr`` for the runs whose ``active`` flag is set.

        Raises:
            ValueError: the active runs are not at one step.
        """
        steps = {s for s, a in zip(self.steps, active, strict=True) if a}
        if len(steps) != 1:
            raise ValueError(f"StackedAdam: the active runs must be at one step, not {sorted(steps)}")
        (step,) = steps
        if self._counts is None or self._counted != step:  # the kernel increments these itself
            device = self.params[0].device if self.fused else "cpu"
            self._counts = [torch.tensor(float(step), device=device) for _ in self.params]
        idle = [r for r, a in enumerate(active) if not a]
        if idle and idle != self._idle:  # an index tensor on the device: no host sync per step
            self._idle, self._idle_index = idle, torch.tensor(idle, device=self.params[0].device)
        idle_index = self._idle_index if idle else None  # this step's runs sitting out
        tensors = [t for trio in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True) for t in trio]
        with torch.no_grad():
            kept = [t.index_select(0, idle_index) for t in tensors] if idle_index is not None else []
            torch_adam(self.params, [_grad(p) for p in self.params], self.exp_avg, self.exp_avg_sq, [], self._counts,
                       fused=self.fused, amsgrad=False, beta1=BETAS[0], beta2=BETAS[1], lr=lr, weight_decay=0.0,
                       eps=ADAM_EPS, maximize=False)
            if idle_index is not None:  # the runs sitting out get back exactly what they had
                for t, old in zip(tensors, kept, strict=True):
                    t.index_copy_(0, idle_index, old)
        self._counted = step + 1
        self.steps = [s + 1 if a else s for s, a in zip(self.steps, active, strict=True)]


def _grad(leaf: torch.Tensor) -> torch.Tensor:
    assert leaf.grad is not None, "backward sets the gradient of every stacked leaf"
    return leaf.grad


# ----------------------------------------------------------------------------------------------
# The stacked model


@dataclass(frozen=True)
class _Slot:
    part: str  # "encoder", "decoder" or "likelihood"
    name: str  # inside the part


class _LogProb(nn.Module):
    """A likelihood's log_prob as a module's forward, so that functional_call can give it each
    run's own parameters (a learned std)."""

    def __init__(self, likelihood):
        super().__init__()
        self.likelihood = likelihood

    def forward(self, x, params):
        return self.likelihood.log_prob(x, params)


class _BoundLikelihood:
    """What the log-weights path needs of a likelihood (``log_prob``), with one run's parameters."""

    def __init__(self, template: _LogProb, params: dict):
        self.template, self.params = template, params

    def log_prob(self, x, params):
        return functional_call(self.template, self.params, (x, params))


class StackedModel:
    """R models of one architecture: each parameter stacked ``[R, ...]`` (one leaf tensor per
    parameter, so gradients land without any scatter), buffers stacked the same way, and the
    modules of run 0 as the template every run is computed with.

    Args:
        models: the runs' models (same architecture and module structure), each initialized as its
            run would be alone.
        device: where the stacked tensors live.
    """

    def __init__(self, models: list, device: torch.device):
        self.device = device
        self.R = len(models)
        members = {"encoder": [_inner_encoder(m) for m in models], "decoder": [m.decoder for m in models],
                   "likelihood": [_LogProb(m.likelihood) for m in models]}
        self.templates = {part: modules[0] for part, modules in members.items()}
        self.slots = [_Slot(part, name) for part, module in self.templates.items()
                      for name, _ in module.named_parameters()]
        self.leaves = [torch.stack([dict(m.named_parameters())[s.name].detach() for m in members[s.part]]).to(device)
                       .requires_grad_(True) for s in self.slots]
        self.buffers = {part: {name: torch.stack([dict(m.named_buffers())[name] for m in modules]).to(device)
                               for name, _ in self.templates[part].named_buffers()}
                        for part, modules in members.items()}
        # What a run's model saves (persistent buffers included, the WNI cap H not), under its own names:
        # a denoising encoder nests the encoder one level deeper.
        self.saved = {part: set(module.state_dict()) for part, module in self.templates.items()}
        self.prefixes = [{"encoder": "encoder.encoder." if isinstance(m.encoder, DenoisingEncoder) else "encoder.",
                          "decoder": "decoder.", "likelihood": ""} for m in models]

    def parameters(self, detach: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """Per part, the stacked ``[R, ...]`` parameters and buffers by name."""
        out = {part: dict(buffers) for part, buffers in self.buffers.items()}
        for s, leaf in zip(self.slots, self.leaves, strict=True):
            out[s.part][s.name] = leaf.detach() if detach else leaf
        return out

    def run_state_dict(self, r: int) -> dict[str, torch.Tensor]:
        """Run r's model state_dict, exactly what a run trained alone saves."""
        return {self.prefixes[r][part] + name: t[r].clone() for part, tensors in self.parameters(detach=True).items()
                for name, t in tensors.items() if name in self.saved[part]}

    def load_run(self, r: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Load run r's weights from a model ``state_dict`` (as a run trained alone saves it)."""
        with torch.no_grad():
            for s, leaf in zip(self.slots, self.leaves, strict=True):
                leaf[r] = state_dict[self.prefixes[r][s.part] + s.name]

    def runs(self, rows: list[int]) -> dict[str, dict[str, torch.Tensor]]:
        """The parameters and buffers of the runs ``rows`` only (detached)."""
        index = torch.tensor(rows, device=self.device)
        return {part: {name: t.index_select(0, index) for name, t in tensors.items()}
                for part, tensors in self.parameters(detach=True).items()}

    def bind(self, params: dict[str, dict[str, torch.Tensor]]):
        """(encoder, decoder, likelihood) computing with one run's ``params`` (inside vmap)."""
        enc, dec, lik = (self.templates[p] for p in ("encoder", "decoder", "likelihood"))
        return (lambda x: functional_call(enc, params["encoder"], (x,)),
                lambda z: functional_call(dec, params["decoder"], (z,)),
                _BoundLikelihood(lik, params["likelihood"]))


def _inner_encoder(model):
    """The deterministic encoder (a denoising encoder's noise is drawn outside, per run)."""
    return model.encoder.encoder if isinstance(model.encoder, DenoisingEncoder) else model.encoder


# ----------------------------------------------------------------------------------------------
# Optimizer state in torch.optim.Adam's format (what a single run checkpoints)


def adam_state_dict(group: StackedModel, adam: StackedAdam, r: int, lr: float) -> dict:
    """Run r's Adam state as ``torch.optim.Adam(model.parameters(), fused=...)`` would save it, so
    a stacked run resumes alone and a single run resumes in a group."""
    template = torch.optim.Adam([torch.zeros(1, device=group.device)], lr=lr, **fast_adam_options(group.device))
    param_group = dict(template.state_dict()["param_groups"][0], params=list(range(len(group.slots))))
    if not adam.steps[r]:
        return {"state": {}, "param_groups": [param_group]}
    step = torch.tensor(float(adam.steps[r]), device=group.device if param_group.get("fused") else "cpu")
    return {"state": {i: {"step": step.clone(), "exp_avg": adam.exp_avg[i][r].clone(),
                          "exp_avg_sq": adam.exp_avg_sq[i][r].clone()} for i in range(len(group.slots))},
            "param_groups": [param_group]}


def load_adam_state(group: StackedModel, adam: StackedAdam, r: int, optimizer_state: dict) -> None:
    """Load run r's slice of the stacked Adam from a ``torch.optim.Adam`` state dict (the inverse of
    [`adam_state_dict`][airvae.stacked.adam_state_dict]): a run trained alone resumes in a group.
    """
    state = optimizer_state["state"]
    with torch.no_grad():
        for i in range(len(group.slots)):
            if i in state:
                adam.exp_avg[i][r] = state[i]["exp_avg"]
                adam.exp_avg_sq[i][r] = state[i]["exp_avg_sq"]
    adam.steps[r] = int(float(state[0]["step"])) if 0 in state else 0


# ----------------------------------------------------------------------------------------------
# Objectives and estimates for the whole group


def stacked_objectives(group: StackedModel, x: torch.Tensor, x_seen: torch.Tensor, eps: torch.Tensor,
                       eps_clean: torch.Tensor | None, alpha: torch.Tensor) -> torch.Tensor:
    """Per run and example, the training objective of [`airvae.model.air_objective`][]:
    ``[R, B]``. ``x_seen`` is what each encoder sees (x plus its run's denoising noise);
    ``eps``/``eps_clean`` are the reparameterization draws ``[R, m, k, B, z]`` of the (noisy) bound
    and, for two-bound groups, of the clean one."""

    def one_run(params, x, x_seen, eps, eps_clean, alpha):
        enc, dec, lik = group.bind(params)
        bound = mean_bound(encode_log_weights(enc, dec, lik, x, x_seen, eps))
        clean = None if eps_clean is None else mean_bound(encode_log_weights(enc, dec, lik, x, x, eps_clean))
        return mix_bounds(bound, clean, alpha)  # eq. 16

    in_dims = (0, 0, 0, 0, None if eps_clean is None else 0, 0)
    return vmap(one_run, in_dims=in_dims)(group.parameters(), x, x_seen, eps, eps_clean, alpha)


