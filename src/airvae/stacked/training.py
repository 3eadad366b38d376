"""Training a stacked group through the one driver ([`airvae.driver.drive`][airvae.driver.drive]): the
group's engine, each run's own training draws, and the step's timing that ``--executor auto``
measures."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints import load_checkpoint
from ..compiling import LONG_TRAINING_STEPS, call_compiled, compile_for, torch_compile
from ..config import RunConfig
from ..data import dataset_digest
from ..driver import Batches, RunLog, SingleEngine, TrainResult, drive, restore_generator, training_generator
from ..estimators import DEFAULT_CHUNK_SAMPLES
from ..files import RunError
from ..locks import RunLock, check_unlocked
from ..model import denoising_parts, model_from_config
from ..objectives import Denoising, draw_step, seen_input
from ..runs import LAST, check_run_dir_use, open_run_dir
from ..tracking import TrackingSettings, choose_sinks
from ..train import check_training_inputs
from .evaluation import stacked_iwae
from .group import StackedAdam, StackedModel, adam_state_dict, group_key, load_adam_state, stacked_objectives

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
    tracking: TrackingSettings | None = None


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
        denoising = [denoising_parts(model, cfg.regularizer.alpha)[1] for model, cfg in zip(models, cfgs, strict=True)]
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
    logs = [RunLog(cfg, run_dir, getattr(dataset, "deviation", None)) for cfg, run_dir in zip(cfgs, run_dirs, strict=True)]
    done = min(_checkpointed_step(run_dir) for run_dir in run_dirs)
    if compile_for(first.iterations - done >= _long_group_steps(len(cfgs))):
        engine.compile()
    return drive(engine, cfgs, logs, data, device, progress=progress, desc=f"{len(cfgs)} stacked runs, {first.dataset}")


def _checkpointed_step(run_dir: Path) -> int:

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
                if eps_clean is not None:  # self.two
                    eps_clean[r] = eps_clean[source]
                g.set_state(self.generators[source].get_state())
                continue
            d = draw_step(self.denoising[r], tuple(x.shape[1:]), self.eps_shape, generator=g, device=self.device,
                          dtype=dtype)
            if d.noise is not None:
                noise[r] = d.noise
            eps[r] = d.eps
            if eps_clean is not None:  # self.two: every run of the group draws eps_clean
                assert d.eps_clean is not None
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
