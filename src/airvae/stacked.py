"""Stacked training: the runs of a sweep that share an architecture, trained as one model.

A group's R runs keep each parameter as one ``[R, ...]`` tensor. Every step evaluates the R
training objectives with one vmapped call of the very code a single run uses
(``torch.func.functional_call`` over the run's own encoder and decoder modules), so each layer
becomes one batched matrix product over the group instead of R small ones: on a GPU, where one
of these MLPs uses a few percent of the device, that is the difference between launch-bound and
compute-bound.

Each run keeps everything else its own: regularizer (sigma, alpha and H differ within a group),
seed and initialization, minibatch order, training random stream (its own generator, drawn in the
order [`airvae.model.air_objective`][] draws), Adam state and step count
([`StackedAdam`][airvae.stacked.StackedAdam]), validation estimate (its own per-example streams), early stopping,
checkpoints, metrics and summary, written by the same [`airvae.driver.RunLog`][] as a run trained
alone, in the same format. So a run trained in a group equals its separate training up to float
rounding, its directory is indistinguishable from a separately trained one (selection, ``report``
and ``evaluate`` are unchanged, and either trainer can resume the other's checkpoints), and a group
killed at any point resumes every run exactly: runs whose checkpoints are ahead wait (their updates
masked) until the others catch up.

Groups are formed by [`group_key`][airvae.stacked.group_key]: same dataset, architecture, schedule, k and m,
and the same module structure (WNI or not) and number of bounds per step (eq. 16 with 0 < alpha < 1 evaluates
two).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.optim.adam import adam as torch_adam

from .config import Regularizer, RunConfig
from .data import dataset_digest
from .devices import accumulator_dtype
from .driver import (Batches, RunLog, SingleEngine, TrainResult, drive, fast_adam_options, restore_generator,
                     training_generator)
from .estimators import (DEFAULT_CHUNK_SAMPLES, DEFAULT_SVI_CHUNK_EXAMPLES, REGISTRY, STREAM_SVI, StepNoise,
                         chunked_iwae, data_dims, example_generator, fit_gaussian_q)
from .estimators.registry import StackedRuns
from .compiling import call_compiled, compile_for, torch_compile
from .model import denoising_parts, encode_log_weights, log_weights_from_eps, mean_bound
from .networks import DenoisingEncoder
from .objectives import Denoising, draw_step, mix_bounds, seen_input
from .model import model_from_config
from .runs import RunLock

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
        self._counts, self._counted = None, None  # the kernel's step tensors (kept on the device)
        self._idle, self._idle_index = None, None  # the runs sitting out, as a device index tensor

    def step(self, lr: float, active: list[bool]) -> None:
        """One Adam step at learning rate ``lr`` for the runs whose ``active`` flag is set.

        Raises:
            ValueError: the active runs are not at one step.
        """
        steps = {s for s, a in zip(self.steps, active) if a}
        if len(steps) != 1:
            raise ValueError(f"StackedAdam: the active runs must be at one step, not {sorted(steps)}")
        (step,) = steps
        if self._counted != step:  # the kernel increments these itself
            device = self.params[0].device if self.fused else "cpu"
            self._counts = [torch.tensor(float(step), device=device) for _ in self.params]
        idle = [r for r, a in enumerate(active) if not a]
        if idle and idle != self._idle:  # an index tensor on the device: no host sync per step
            self._idle, self._idle_index = idle, torch.tensor(idle, device=self.params[0].device)
        tensors = [t for trio in zip(self.params, self.exp_avg, self.exp_avg_sq) for t in trio]
        with torch.no_grad():
            kept = [t.index_select(0, self._idle_index) for t in tensors] if idle else None
            torch_adam(self.params, [p.grad for p in self.params], self.exp_avg, self.exp_avg_sq, [], self._counts,
                       fused=self.fused, amsgrad=False, beta1=BETAS[0], beta2=BETAS[1], lr=lr, weight_decay=0.0,
                       eps=ADAM_EPS, maximize=False)
            if kept is not None:  # the runs sitting out get back exactly what they had
                for t, old in zip(tensors, kept):
                    t.index_copy_(0, self._idle_index, old)
        self._counted = step + 1
        self.steps = [s + 1 if a else s for s, a in zip(self.steps, active)]


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
        for s, leaf in zip(self.slots, self.leaves):
            out[s.part][s.name] = leaf.detach() if detach else leaf
        return out

    def run_state_dict(self, r: int) -> dict[str, torch.Tensor]:
        """Run r's model state_dict, exactly what a run trained alone saves."""
        return {self.prefixes[r][part] + name: t[r].clone() for part, tensors in self.parameters(detach=True).items()
                for name, t in tensors.items() if name in self.saved[part]}

    def load_run(self, r: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Load run r's weights from a model ``state_dict`` (as a run trained alone saves it)."""
        with torch.no_grad():
            for s, leaf in zip(self.slots, self.leaves):
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


def _stacked_log_weights(group: StackedModel):
    """log w for each run from its own decoder: (params [S], x [b, ...] shared, mean, std [S, b, z],
    eps [S, m, k, b, z]) -> [S, m, k, b]; the single-run path (model.log_weights_from_eps), vmapped."""

    def one_run(p, x, mean, std, eps):
        _, dec, lik = group.bind(p)
        return log_weights_from_eps(dec, lik, x, mean, std, eps)

    return vmap(one_run, in_dims=(0, None, 0, 0, 0))


def _encode_stacked(group: StackedModel, params: dict, x: torch.Tensor, batch: int = 4096):
    """Each run's clean encoder on ``x``: (mean, std), each [S, n, z]."""
    means, stds = [], []
    for start in range(0, x.shape[0], batch):
        mean, std = vmap(lambda p: group.bind(p)[0](x[start:start + batch]))(params)
        means.append(mean)
        stds.append(std)
    return torch.cat(means, 1), torch.cat(stds, 1)


@torch.no_grad()
def stacked_iwae(group: StackedModel, rows: list[int], x: torch.Tensor, k: int, seeds: list[int],
                 chunk_samples: int = DEFAULT_CHUNK_SAMPLES, q: tuple[torch.Tensor, torch.Tensor] | None = None,
                 repeats: int = 1) -> torch.Tensor:
    """Per-example IWAE-k of the runs ``rows``, averaged over ``repeats`` sets of k samples: what
    [`airvae.estimators.iwae_given_q`][] gives each run alone, up to float rounding (runs that share a
    seed share their draws).

    Args:
        group: the stacked runs.
        rows: the runs to score (S of them).
        x: the examples, ``[n, ...]``, shared by the runs.
        k: importance samples per set.
        seeds: per run, the seed of its per-example streams.
        chunk_samples: latents decoded at once (no effect on the result).
        q: the proposal, ``(mean, std)`` each ``[S, n, z]``; None: each run's clean encoder.
        repeats: independent sets of k samples, averaged.

    Returns:
        ``[S, n]``, float64 (float32 on MPS).
    """
    params = group.runs(rows)
    means, stds = q if q is not None else _encode_stacked(group, params, x)
    n, z_dim = x.shape[0], means.shape[-1]
    per_chunk = max(1, chunk_samples // k)
    k_chunk = min(k, chunk_samples)
    log_weights = _stacked_log_weights(group)
    values = torch.empty(len(rows), n, dtype=accumulator_dtype(x.device), device=x.device)
    for start in range(0, n, per_chunk):
        xb = x[start:start + per_chunk]
        b = xb.shape[0]
        generators = {seed: [example_generator(seed, start + i, x.device) for i in range(b)]
                      for seed in sorted(set(seeds[r] for r in rows))}

        def draw(generators=generators):  # [S, k, b, z]
            draws = {seed: torch.stack([torch.randn(k, z_dim, generator=g, device=x.device, dtype=x.dtype)
                                        for g in gens], dim=1) for seed, gens in generators.items()}  # [k, b, z]
            return torch.stack([draws[seeds[r]] for r in rows])

        def run_log_weights(eps, xb=xb, start=start, b=b):  # [S, kc, b]
            return log_weights(params, xb, means[:, start:start + b], stds[:, start:start + b], eps.unsqueeze(1))[:, 0]

        values[:, start:start + b] = chunked_iwae(run_log_weights, draw, k, k_chunk, repeats, (len(rows), b), x.device)
    return values


def stacked_fit_iw_svi(group: StackedModel, rows: list[int], x: torch.Tensor, *, l: int, steps: int,  # noqa: E741
                       lr: float, lr_decay: float, seed: int,
                       chunk_examples: int = DEFAULT_SVI_CHUNK_EXAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """q*_{x,l} of eq. 42 for every example and run, as [`airvae.estimators.fit_iw_svi`][] fits it for
    each run alone (same initialization from the encoder, Adam, learning-rate decay and random
    streams, which all runs share), one batched parameter tensor for all runs.

    Args:
        group: the stacked runs.
        rows: the runs (S of them).
        x: the examples, ``[n, ...]``.
        l: importance samples of the bound optimized.
        steps: Adam steps.
        lr: Adam's initial step size.
        lr_decay: the final learning rate as a fraction of ``lr``.
        seed: the seed of the examples' streams.
        chunk_examples: examples optimized at once (no effect on the result).

    Returns:
        ``(mean, std)``, each ``[S, n, z]``.
    """
    params = group.runs(rows)
    mean0, std0 = _encode_stacked(group, params, x)
    log_weights = _stacked_log_weights(group)
    means, stds = [], []
    for start in range(0, x.shape[0], chunk_examples):
        xb = x[start:start + chunk_examples]
        m0, s0 = mean0[:, start:start + chunk_examples], std0[:, start:start + chunk_examples]
        if steps == 0:
            means.append(m0)
            stds.append(s0)
            continue
        gens = [example_generator(seed, start + i, x.device, STREAM_SVI) for i in range(xb.shape[0])]
        noise = StepNoise(gens, (l, m0.shape[-1]), None, x.device, m0.dtype)

        def run_log_weights(mu, std, eps, xb=xb):  # eps [l, b, z] shared by the runs -> [S, l, b]
            return log_weights(params, xb, mu, std, eps.expand(len(rows), *eps.shape).unsqueeze(1))[:, 0]

        mu, std = fit_gaussian_q(m0, s0, run_log_weights, noise, steps=steps, lr=lr, lr_decay=lr_decay)
        means.append(mu)
        stds.append(std)
    return torch.cat(means, 1), torch.cat(stds, 1)


# What evaluate_group batches (the estimators with a stacked call); others run per run.
STACKED_ESTIMATORS = tuple(name for name, estimator in REGISTRY.items() if estimator.stacked is not None)


def evaluation_key(cfg: RunConfig, settings) -> str:
    """Runs with equal keys can be evaluated as one stacked model: the same data and model
    structure, and the same k for the amortized bound."""
    shared = cfg.to_json()
    return json.dumps({"architecture": shared["architecture"], "dataset": shared["dataset"], "x_dim": shared["x_dim"],
                       "wni": math.isfinite(cfg.regularizer.max_norm), "bound_k": settings.bound_k or cfg.k},
                      sort_keys=True)


def evaluate_group(run_dirs: list[Path], settings, *, progress: bool = False) -> list[dict]:
    """[`airvae.evaluation.evaluate_run`][] for runs that share an architecture (and training k),
    batched: every estimator of ``settings`` computed for all runs at once by its stacked call
    ([`REGISTRY`][airvae.estimators.registry.REGISTRY]), with the evaluation's random streams
    (``settings.seed``) shared by all, as they are when each run is evaluated alone.

    Args:
        run_dirs: the runs (same dataset, architecture, WNI or not, and bound k:
            [`evaluation_key`][airvae.stacked.evaluation_key]).
        settings (EvaluationSettings): the evaluation; its estimators a subset of
            [`STACKED_ESTIMATORS`][airvae.stacked.STACKED_ESTIMATORS].
        progress: show progress bars.

    Returns:
        Each run's evaluation record, exactly what ``evaluate_run`` writes.

    Raises:
        ValueError: an estimator the group does not batch, or runs that do not share a key.
    """
    from .data import evenly_spaced, load_dataset
    from .devices import resolve_device
    from .evaluation import check_run_data, store_evaluation
    from .resources import check_fits, evaluation_memory
    from .runs import load_config, load_trained_model_with_digest

    if not set(settings.estimators) <= set(STACKED_ESTIMATORS):
        raise ValueError(f"evaluate_group batches {', '.join(STACKED_ESTIMATORS)} only, not {settings.estimators}")
    started = time.perf_counter()
    device = resolve_device(settings.device)
    cfgs = [load_config(run_dir) for run_dir in run_dirs]  # everything checked before models are loaded
    if len({evaluation_key(cfg, settings) for cfg in cfgs}) != 1:
        raise ValueError("evaluate_group: the runs do not share a dataset, an architecture and a training k")
    dataset = load_dataset(cfgs[0].dataset, cfgs[0].data_dir, progress=progress)
    data_digests = [check_run_data(run_dir, cfg, dataset) for run_dir, cfg in zip(run_dirs, cfgs)]
    split = dataset.split(settings.split)
    index = evenly_spaced(len(split), settings.max_examples)
    check_fits(evaluation_memory(cfgs[0], settings, len(index), runs=len(run_dirs)), device,
               "evaluate fewer runs at once, or lower --chunk-samples")
    loaded = [load_trained_model_with_digest(run_dir, "best", device) for run_dir in run_dirs]
    x = torch.as_tensor(split[index]).to(device=device, dtype=torch.float32)
    loaded[0][1].likelihood.validate(x)  # the data fits the likelihood, as evaluate_run checks
    group = StackedModel([model for _, model, _ in loaded], device)
    rows, seeds = list(range(len(run_dirs))), [settings.seed] * len(run_dirs)
    runs = StackedRuns(size=len(rows), dims=data_dims(loaded[0][1], x),
                       iwae=partial(stacked_iwae, group, rows, x, seeds=seeds, chunk_samples=settings.chunk_samples),
                       fit_iw_svi=partial(stacked_fit_iw_svi, group, rows, x))
    done: list[dict] = [{} for _ in rows]  # each run's estimates, in canonical order
    for name in settings.estimators:
        for estimates, estimate in zip(done, REGISTRY[name].stacked(runs, settings, cfgs[0].k, done)):
            estimates[name] = estimate
    return [store_evaluation(run_dir, settings, cfg, dataset, estimates, n=x.shape[0], n_split=len(split),
                             device=device, digest=digest, data_digest=data_digest,
                             seconds=(time.perf_counter() - started) / len(rows))
            for run_dir, (cfg, _, digest), data_digest, estimates in zip(run_dirs, loaded, data_digests, done)]


# ----------------------------------------------------------------------------------------------
# Training a group


@dataclass
class Member:
    """One run of a group.

    Attributes:
        cfg: its configuration.
        run_dir: its run directory.
        tracking: its tracking sinks, a [`TrackingSettings`][airvae.tracking.TrackingSettings] (None: the
            run's own choice, [`airvae.tracking`][]).
    """

    cfg: RunConfig
    run_dir: Path
    tracking: object = None


def train_group(members: list[Member], dataset, *, progress: bool = True,
                chunk_samples: int | None = None) -> list[TrainResult]:
    """Train (or resume) the runs of ``members`` as one stacked model.

    Every run is checked and locked as [`airvae.train.train`][] checks and locks it (a run that
    another process is writing makes the call fail with RunLocked: leave it out), and every member is
    checked before any is touched.

    Args:
        members: the runs; they must share [`group_key`][airvae.stacked.group_key] and a device.
        dataset (Dataset): their data, loaded once.
        progress: show a progress bar.
        chunk_samples: latents decoded at once when validating (default: 8192 on CUDA, split among
            the runs on a CPU).

    Returns:
        Each run's [`TrainResult`][airvae.driver.TrainResult], in the order of ``members``.

    Raises:
        ValueError: the runs cannot form a group (different keys or devices).
    """
    from .runs import check_unlocked
    from .tracking import choose_sinks
    from .runs import check_run_dir_use, open_run_dir
    from .train import check_training_inputs

    if len({group_key(m.cfg) for m in members}) != 1:
        raise ValueError("train_group: the runs do not share an architecture, schedule, k, m and structure")
    devices = {str(check_training_inputs(m.cfg, dataset, runs=len(members))) for m in members}
    if len(devices) != 1:
        raise ValueError(f"train_group: the runs ask for different devices ({', '.join(sorted(devices))})")
    device = torch.device(devices.pop())
    for m in members:  # every member checked before any is touched, as train() does for one
        check_run_dir_use(m.run_dir, resume=True, overwrite=False)
        check_unlocked(m.run_dir)
    with contextlib.ExitStack() as locks:
        for m in members:
            locks.enter_context(RunLock(m.run_dir))
        digest = dataset_digest(dataset)  # one hash for the group
        cfgs = [open_run_dir(m.cfg, m.run_dir, digest, resume=True, overwrite=False) for m in members]
        for m in members:
            if m.tracking is not None:
                choose_sinks(m.run_dir, m.tracking)
        # A CPU's caches want small chunks (the group's split among its runs); a GPU wants large products.
        chunk = chunk_samples or (DEFAULT_CHUNK_SAMPLES if device.type == "cuda"
                                  else max(1, DEFAULT_CHUNK_SAMPLES // len(members)))
        return _train_group_locked(cfgs, [m.run_dir for m in members], dataset, device, progress, chunk)


class StackedEngine:
    """The [`airvae.driver.Engine`][] of a stacked group: R models of one architecture as one
    [`StackedModel`][airvae.stacked.StackedModel], [`StackedAdam`][airvae.stacked.StackedAdam], each
    run's training generator, and the objectives of all runs in one vmapped call. Each run's sigma is
    its own model's (the denoising encoder it was built with), its alpha its own configuration's.

    Args:
        cfgs: the runs' configurations (one [`group_key`][airvae.stacked.group_key]); each model is
            initialized from its seed exactly as it would be alone.
        device: where the group trains.
        chunk_samples: latents decoded at once when validating.
        x_shape: the shape of the group's minibatch, ``[R, B, ...]``.
    """

    def __init__(self, cfgs: list[RunConfig], device: torch.device, chunk_samples: int, x_shape: tuple[int, ...]):
        models = []
        for cfg in cfgs:  # each run initialized exactly as it would be alone
            torch.manual_seed(cfg.seed)
            models.append(model_from_config(cfg).to(device))
        self.cfgs, self.device, self.chunk_samples = cfgs, device, chunk_samples
        self.group = StackedModel(models, device)
        self.adam = StackedAdam(self.group.leaves)
        self.generators = [training_generator(cfg.seed, device) for cfg in cfgs]
        denoising = [denoising_parts(model, cfg.regularizer.alpha)[1] for model, cfg in zip(models, cfgs)]
        self.draws = _GroupDraws(denoising, self.generators, x_shape, cfgs[0], device)
        self.alpha = torch.tensor([cfg.regularizer.alpha for cfg in cfgs], device=device)
        self.objectives = stacked_objectives
        self._shapes = [{name: tuple(t.shape) for name, t in model.state_dict().items()} for model in models]

    def compile(self) -> None:
        """Use a torch.compile'd objective from now on."""
        self.objectives = _compiled(stacked_objectives, self.device)

    def shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        """Run r's model tensor shapes, to check a checkpoint against."""
        return self._shapes[r]  # names differ: a denoising encoder nests the encoder one level deeper

    def restore(self, r: int, saved: dict) -> None:
        """Load run r's model, Adam state and training generator from a checkpoint."""
        self.group.load_run(r, saved["model"])
        load_adam_state(self.group, self.adam, r, saved["optimizer"])
        restore_generator(self.generators[r], saved)

    def step(self, x: torch.Tensor, active: list[bool], lr: float) -> torch.Tensor:
        """One Adam step of the ``active`` runs on their minibatches ``x`` ``[R, B, ...]``; returns each
        run's loss ``[R]``.
        """
        x_seen, eps, eps_clean = self.draws.next(x, active)
        per_run = -self.objectives(self.group, x, x_seen, eps, eps_clean, self.alpha).mean(-1)  # [R]
        keep = torch.tensor(active, device=self.device) if not all(active) else None
        for leaf in self.group.leaves:
            leaf.grad = None
        (per_run if keep is None else torch.where(keep, per_run, torch.zeros_like(per_run))).sum().backward()
        self.adam.step(lr, active)
        return per_run.detach()

    def validate(self, rows: list[int], x: torch.Tensor, k: int, seeds: list[int]) -> list[float]:
        """The mean IWAE-``k`` estimate of the runs ``rows`` on ``x``, run r from the streams of
        ``seeds[r]``.
        """
        return stacked_iwae(self.group, rows, x, k, seeds, self.chunk_samples).mean(-1).tolist()

    def model_state(self, r: int) -> dict:
        """Run r's model ``state_dict``."""
        return self.group.run_state_dict(r)

    def optimizer_state(self, r: int, lr: float) -> dict:
        """Run r's Adam state, as ``torch.optim.Adam`` would save it."""
        return adam_state_dict(self.group, self.adam, r, lr)

    def rng_state(self, r: int) -> torch.Tensor:
        """Run r's training generator's state."""
        return self.generators[r].get_state()


def _train_group_locked(cfgs: list[RunConfig], run_dirs: list[Path], dataset, device: torch.device,
                        progress: bool, chunk_samples: int) -> list[TrainResult]:
    first = cfgs[0]
    data = Batches(torch.as_tensor(dataset.train, device=device).float(),
                   torch.as_tensor(dataset.valid[:first.val_examples], device=device).float(),
                   torch.as_tensor(dataset.test[:first.track_test_examples], device=device).float()
                   if first.track_test_examples else None)
    engine = StackedEngine(cfgs, device, chunk_samples, tuple(data.train.shape[1:]))
    logs = [RunLog(cfg, run_dir, getattr(dataset, "deviation", None)) for cfg, run_dir in zip(cfgs, run_dirs)]
    done = min(_checkpointed_step(run_dir) for run_dir in run_dirs)
    if compile_for(first.iterations - done >= _long_group_steps(len(cfgs))):
        engine.compile()
    return drive(engine, cfgs, logs, data, device, progress=progress, desc=f"{len(cfgs)} stacked runs, {first.dataset}")


def _checkpointed_step(run_dir: Path) -> int:
    from .runs import LAST, RunError, load_checkpoint

    try:
        return int(load_checkpoint(Path(run_dir) / LAST)["state"]["step"]) if (Path(run_dir) / LAST).exists() else 0
    except (RunError, KeyError, TypeError, ValueError):
        return 0  # named when the run resumes from it


def _compiled(fn, device: torch.device):
    """``fn`` through torch.compile; on CUDA with CUDA graphs ("reduce-overhead": a whole step's
    kernels replayed with one launch, the point of stacking on a launch-bound GPU). Falls back to
    eager, with one warning, if compiling fails."""
    state = {"fn": torch_compile(fn, mode="reduce-overhead" if device.type == "cuda" else None)}

    def call(*args):
        if state["fn"] is fn:
            return fn(*args)
        out, worked = call_compiled(state["fn"], fn, args, "the stacked objective")
        if not worked:
            state["fn"] = fn
        return out

    return call


def _long_group_steps(runs: int) -> int:
    """Compile (in auto mode) when the group's remaining work is long: the per-run threshold of a
    single run, counted in run-steps."""
    from .compiling import LONG_TRAINING_STEPS

    return max(1, LONG_TRAINING_STEPS // runs)


class _GroupDraws:
    """Each run's training draws from its own generator, made by [`airvae.objectives.draw_step`][]
    (so in the order a run alone draws them). Runs whose generators are in the same state (same seed
    and step, e.g. one seed across the strength grid) and that draw the same things share the numbers."""

    def __init__(self, denoising: list[Denoising], generators: list[torch.Generator], x_shape, cfg: RunConfig,
                 device):
        self.denoising, self.generators, self.device = denoising, generators, device
        self.two = denoising[0].two_bounds  # the same in a group (group_key)
        self.eps_shape = (cfg.m, cfg.k, cfg.batch_size, cfg.architecture.z_dim)
        sigma = torch.tensor([d.sigma for d in denoising], device=device)
        self.sigma = sigma.view(-1, *[1] * (1 + len(x_shape)))  # [R, 1, 1, ...] against x [R, B, ...]

    def next(self, x: torch.Tensor, active: list[bool]):
        """(x_seen, eps, eps_clean) for the group's minibatch ``x`` [R, B, ...]; inactive runs draw nothing."""
        R, dtype = x.shape[0], x.dtype
        noise = torch.zeros_like(x)
        eps = torch.zeros(R, *self.eps_shape, device=self.device, dtype=dtype)
        eps_clean = torch.zeros_like(eps) if self.two else None
        drawn: dict[tuple, int] = {}
        for r in range(R):
            if not active[r]:
                continue
            g = self.generators[r]
            key = (self.denoising[r].draws_noise, bytes(g.get_state().cpu().numpy()))
            source = drawn.setdefault(key, r)
            if source != r:  # the same stream at the same position: the same numbers
                noise[r], eps[r] = noise[source], eps[source]
                if self.two:
                    eps_clean[r] = eps_clean[source]
                g.set_state(self.generators[source].get_state())
                continue
            d = draw_step(self.denoising[r], tuple(x.shape[1:]), self.eps_shape, generator=g, device=self.device,
                          dtype=dtype)
            if d.noise is not None:
                noise[r] = d.noise
            eps[r] = d.eps
            if self.two:
                eps_clean[r] = d.eps_clean
        return seen_input(x, self.sigma, noise), eps, eps_clean


# ----------------------------------------------------------------------------------------------
# Measuring


def training_steps(cfgs: list[RunConfig], x: torch.Tensor, device: torch.device, compile: bool = False):
    """Two callables that each take one training step on throwaway models: the very step
    [`airvae.driver.drive`][] takes (objective, backward, Adam) for the runs ``cfgs`` stacked
    ([`StackedEngine`][airvae.stacked.StackedEngine]) and for the first run alone
    ([`airvae.driver.SingleEngine`][]), on minibatches of ``x``. What ``--executor auto`` measures
    and what benchmarks/ times.

    Args:
        cfgs: the runs.
        x: training examples to draw minibatches from.
        device: where the steps run.
        compile: use torch.compile'd objectives.

    Returns:
        (tuple[Callable, Callable]): ``(group_step, single_step)``.
    """
    cfg, batch = cfgs[0], cfgs[0].batch_size
    stacked = StackedEngine(cfgs, device, DEFAULT_CHUNK_SAMPLES, tuple(x.shape[1:]))
    if compile:
        stacked.compile()
    xs = x[:batch].expand(len(cfgs), *x[:batch].shape).contiguous()
    torch.manual_seed(cfg.seed)
    single = SingleEngine(model_from_config(cfg).to(device), lr=cfg.lr, k=cfg.k, m=cfg.m, alpha=cfg.regularizer.alpha,
                          generator=training_generator(cfg.seed, device), device=device)
    x1, all_runs = x[:batch].unsqueeze(0), [True] * len(cfgs)
    return (lambda: stacked.step(xs, all_runs, cfg.lr)), (lambda: single.step(x1, [True], cfg.lr))


def step_rates(cfgs: list[RunConfig], dataset, device: torch.device, steps: int = 10,
               threads_alone: int | None = None) -> tuple[float, float]:
    """[`training_steps`][airvae.stacked.training_steps] timed here.

    Args:
        cfgs: the runs.
        dataset (Dataset): their data.
        device: where the steps run.
        steps: group steps timed, after one warm-up step (the run alone is timed over 4x as many).
        threads_alone: torch threads for the run alone (None: the current number).

    Returns:
        ``(group steps/s of the runs stacked, steps/s of the first run alone)``.
    """
    x = torch.as_tensor(dataset.train[:cfgs[0].batch_size], device=device).float()
    group_step, single_step = training_steps(cfgs, x, device)
    threads = torch.get_num_threads()
    try:
        group_rate = _rate(group_step, steps, device)
        torch.set_num_threads(threads_alone or threads)
        single_rate = _rate(single_step, steps * 4, device)
    finally:
        torch.set_num_threads(threads)
    return group_rate, single_rate


def _rate(step, steps: int, device: torch.device) -> float:
    step()  # warm up (allocations, kernel selection)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps / (time.perf_counter() - started)
