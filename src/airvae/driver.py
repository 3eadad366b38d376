"""One training driver for every model airvae trains: a run alone ([`airvae.train.train`][]), a
stacked group of runs ([`airvae.stacked.train_group`][]) and a researcher's own model
([`airvae.fit.fit`][]).

The driver ([`drive`][airvae.driver.drive]) owns what is the same for all of them: the learning-rate schedule of
eq. 43, each run's minibatch order, validation, the staging of best and last checkpoints, early
stopping, divergence, interrupts, and the run's files and tracking ([`RunLog`][airvae.driver.RunLog]). An *engine*
([`Engine`][airvae.driver.Engine]) owns the model or models and knows how to take a step, validate and save: a
single model with torch's Adam ([`SingleEngine`][airvae.driver.SingleEngine]), or a stacked group with
[`airvae.stacked.StackedAdam`][].

Exact resume rests on three choices: the minibatch of step t is a pure function of (seed, t), the
learning rate of step t is a pure function of t, and the state of each run's own training
generator (which draws the reparameterization and denoising noise) is saved with the model and
optimizer. Validation uses its own per-example random streams and never touches the training
generator.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, cast

import torch
from tqdm.auto import tqdm

from .checkpoints import check_training_checkpoint, load_checkpoint, save_checkpoint
from .devices import accumulator_dtype
from .estimators import iwae_log_likelihood
from .evaluation import current_evaluations
from .files import RunError, RunIOError, append_line, read_metrics, write_error, write_json, write_metrics
from .model import air_objective
from .runs import BEST, BEST_NEXT, LAST, METRICS, SUMMARY
from .tracking import Tracker

if TYPE_CHECKING:
    from .config import FitConfig, RunConfig
    from .model import LatentVariableModel


class TrainingDiverged(RuntimeError):
    """The training objective became NaN or infinite."""


@dataclass
class TrainResult:
    """How a run's training ended: what [`airvae.train.train`][], [`airvae.fit.fit`][] and
    [`drive`][airvae.driver.drive] return.

    Attributes:
        run_dir: the run directory.
        status: ``"completed"``, ``"early-stopped"``, ``"interrupted"`` or ``"diverged"``.
        steps: training steps taken.
        best_step: the step of the best validation (the model in ``best.pt``); None before the first.
        best_val_log_likelihood: its validation IWAE-``val_k`` estimate, in nats.
        seconds: training time, over every start of the run.
    """
    run_dir: Path
    status: str  # "completed" | "early-stopped" | "interrupted" | "diverged"
    steps: int
    best_step: int | None
    best_val_log_likelihood: float | None
    seconds: float


class MinibatchSchedule:
    """Shuffled epochs without replacement; batch ``t`` depends only on (seed, t), which makes resuming
    exact. Each epoch's permutation is drawn on the CPU and moved to ``device`` once, so a step
    indexes there without a host-to-device copy (on CUDA, a copy from the host waits for the queued
    work).

    Args:
        n: training examples.
        batch_size: examples per step (at most ``n``; an epoch is ``n // batch_size`` steps).
        seed: the run's seed.
        device: where the indices live.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device | str = "cpu"):
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples")
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.steps_per_epoch = n // batch_size
        self._epoch = -1
        self._perm: torch.Tensor | None = None  # epoch self._epoch's permutation

    def indices(self, step: int) -> torch.Tensor:
        """The indices ``[batch_size]`` of step ``step``'s minibatch."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator).to(self.device)
        assert self._perm is not None  # drawn above for this epoch
        return self._perm[position * self.batch_size:(position + 1) * self.batch_size]


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a run stops at a consistent
    state and saves it instead of dying mid-update."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}  # signal -> the handler it had

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None and signum == signal.SIGINT:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        # A repeated SIGTERM must not abort the checkpoint it asked for: a sweep worker whose parent
        # died was measured to receive two within milliseconds (see sweep._stop_with_parent).
        self.signal = self.signal or signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _LoopState(TypedDict):
    """What a run's loop carries from step to step (RunLog.state), checkpointed in ``last.pt``."""

    step: int
    best_val: float
    best_step: int | None
    bad_validations: int
    seconds: float
    loss_sum: float
    loss_count: int


class RunLog:
    """A training run's bookkeeping and files: the loop state that is checkpointed (step, best
    validation, loss average, elapsed time), metrics lines, best and last checkpoints, and the
    summary. The one place that writes a run directory during training, whether the run trains
    alone ([`airvae.train.train`][]) or in a stacked group ([`airvae.stacked`][]). It also feeds the
    run's tracking sinks (``RUN/tracking.json``: [`airvae.tracking`][]), rebuilt from metrics.jsonl at
    each start.

    Args:
        cfg (RunConfig | FitConfig): the run's settings (``iterations``, ``val_every``,
            ``checkpoint_every``, ``patience``, ``lr_at``, ...).
        run_dir: the run directory, created and locked by the caller.
        deviation: how the run's data depart from the paper's, recorded in its summary (None: they
            do not).
    """

    def __init__(self, cfg: RunConfig | FitConfig, run_dir: Path, deviation: str | None = None):
        self.cfg, self.run_dir, self.deviation = cfg, Path(run_dir), deviation
        # Everything the loop carries from step to step; checkpointed so resume continues exactly.
        self.state: _LoopState = {"step": 0, "best_val": -math.inf, "best_step": None, "bad_validations": 0,
                                  "seconds": 0.0, "loss_sum": 0.0, "loss_count": 0}
        self._clock = time.perf_counter()
        self.tracker = Tracker()  # no sinks until start()

    @property
    def step(self) -> int:
        """Training steps taken so far."""
        return self.state["step"]

    def resume(self, device: torch.device, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, Any] | None, TrainResult | None]:
        """Where the run stands: its last checkpoint (None for a fresh start; its loop state is
        restored here), checked against the model's tensor ``shapes``, and, for a run that is
        already over, its result (summary rewritten). An unfinished run is then started: what a
        killed process wrote after the checkpoint is undone, the tracking sinks are rebuilt, the
        summary says running and the clock runs on."""
        saved = None
        if (self.run_dir / LAST).exists():
            saved = load_checkpoint(self.run_dir / LAST, device)
            check_training_checkpoint(saved, self.cfg.iterations, shapes, self.run_dir / LAST)  # before any rewrite
            # (checked just above to hold every field of _LoopState, with its type)
            self.state = cast(_LoopState, dict(saved["state"]))
        self._clock = time.perf_counter() - self.state["seconds"]
        self.tracker = Tracker.start(self.run_dir, self.cfg, _forget_after(self.run_dir, self.step, device),
                                     lambda: current_evaluations(self.run_dir))
        status = self.finished_status() if saved is not None else None
        if status is not None:
            return saved, self.finish(status, EARLY_STOP_MESSAGE.format(self.cfg.patience)
                                      if status == "early-stopped" else None)
        write_json(self.run_dir / SUMMARY, {"status": "running", "model": self.cfg.model_name, "steps": self.step})
        return saved, None

    def finished_status(self) -> str | None:
        """"completed" or "early-stopped" when the loop state says the run is over (told by the
        checkpoint, not by summary.json, which is only ever rewritten from it)."""
        if self.step >= self.cfg.iterations:
            return "completed"
        if self.cfg.patience is not None and self.state["bad_validations"] >= self.cfg.patience:
            return "early-stopped"
        return None

    def _tick(self) -> None:
        self.state["seconds"] = time.perf_counter() - self._clock

    def add_loss(self, total: float, count: int = 1) -> None:
        """Add ``count`` steps' summed loss to the average reported at the next validation."""
        self.state["loss_sum"] += total
        self.state["loss_count"] += count

    def validation_due(self) -> bool:
        """Whether the current step validates (every ``val_every`` steps, and the last one)."""
        return self.step % self.cfg.val_every == 0 or self.step == self.cfg.iterations

    def checkpoint_due(self, validated: bool) -> bool:
        """Whether the current step writes ``last.pt`` (after a validation, and every ``checkpoint_every`` steps)."""
        return validated or self.step % self.cfg.checkpoint_every == 0

    def record_validation(self, val: float, model_state: dict[str, Any], test_bound: float | None = None) -> None:
        """Log a validation estimate; a new best saves best.pt (early stopping keeps that model)."""
        state, step = self.state, self.step
        record = {"step": step, "train_loss": state["loss_sum"] / max(state["loss_count"], 1),
                  "val_log_likelihood": val, "lr": self.cfg.lr_at(step - 1)}
        if test_bound is not None:
            record["test_bound"] = test_bound
        if val > state["best_val"]:
            state.update({"best_val": val, "best_step": step, "bad_validations": 0})
            # Staged: it becomes best.pt once last.pt (whose state names it the best) is written, so a
            # kill in between never leaves a best.pt that the resumed run's state knows nothing of.
            save_checkpoint(self.run_dir / BEST_NEXT, {"model": model_state, "step": step, "val_log_likelihood": val})
        else:
            state["bad_validations"] += 1
        self._tick()
        # Logged before last.pt is written: a kill in between is undone on resume (_forget_after).
        record["seconds"] = state["seconds"]
        append_line(self.run_dir / METRICS, json.dumps(record))
        self.tracker.validation(record)
        state.update({"loss_sum": 0.0, "loss_count": 0})

    def checkpoint(self, model_state: dict[str, Any], optimizer_state: dict[str, Any], rng_state: torch.Tensor) -> None:
        """Write ``last.pt`` (model, optimizer, loop state, the training generator's state), then promote a
        staged new best to ``best.pt``.
        """
        self._tick()
        save_checkpoint(self.run_dir / LAST, {"model": model_state, "optimizer": optimizer_state,
                                              "state": dict(self.state), "rng": rng_state})
        _promote_best(self.run_dir)

    def finish(self, status: str, message: str | None = None) -> TrainResult:
        """Write the run's summary with ``status`` and ``message``, close its sinks and return its result."""
        self._tick()
        state = self.state
        write_json(self.run_dir / SUMMARY, {
            "status": status, "message": message, "model": self.cfg.model_name, "dataset": self.cfg.dataset,
            "data_deviation": self.deviation, "steps": state["step"], "best_step": state["best_step"],
            "best_val_log_likelihood": state["best_val"] if state["best_step"] is not None else None,
            "val_k": self.cfg.val_k, "seconds": state["seconds"],
        })
        self.tracker.close(status)
        return _result(self.run_dir, status, state)

    def fail(self, error: BaseException) -> None:
        """After anything that stops the loop unplanned (a full disk, out of memory, a second
        Ctrl-C, a bug), leave a summary that tells the truth: "interrupted" or "failed", with why;
        the last checkpoint is intact."""
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        message = (f"{type(error).__name__}: {error}" if not isinstance(error, RunIOError) else str(error)) + \
            f"; resume with `airvae train --resume --run-dir {self.run_dir}`"
        try:
            self.finish(status, message)
        except RunIOError:
            (self.run_dir / SUMMARY).unlink(missing_ok=True)  # rather none than a stale "running"
            self.tracker.close(status)

    def interrupted(self, signum: int) -> TrainResult:
        """Finish as ``"interrupted"`` by signal ``signum``, saying how to resume."""
        return self.finish("interrupted", f"stopped by signal {signum} at step {self.step}; resume with "
                           f"`airvae train --resume --run-dir {self.run_dir}`")


EARLY_STOP_MESSAGE = "no improvement in {} validations"


class Engine(Protocol):
    """What [`drive`][airvae.driver.drive] needs of whatever holds the models of ``R`` runs (``R = 1`` for
    a run alone): [`SingleEngine`][airvae.driver.SingleEngine] or
    [`StackedEngine`][airvae.stacked.StackedEngine].

    ``step`` takes one optimizer step of the ``active`` runs on their minibatches ``x`` ``[R, B, ...]``
    at learning rate ``lr`` and returns each run's loss ``[R]`` on the device (read by the driver only
    when it validates or saves: no host sync per step); inactive runs must be left exactly as they
    were. ``validate`` gives the mean IWAE-``k`` estimate of the runs ``rows`` on ``x``, run r drawing
    from the per-example streams of ``seeds[r]``. The rest restores and saves run r: ``shapes`` (its
    model's tensor shapes, to check a checkpoint against), ``restore`` (from a checkpoint),
    ``model_state``, ``optimizer_state`` (as ``torch.optim.Adam`` would save it) and ``rng_state`` (its
    training generator's).
    """

    def shapes(self, r: int) -> dict[str, tuple[int, ...]]: ...

    def restore(self, r: int, saved: dict[str, Any]) -> None: ...

    def step(self, x: torch.Tensor, active: list[bool], lr: float) -> torch.Tensor: ...

    def validate(self, rows: list[int], x: torch.Tensor, k: int, seeds: list[int]) -> list[float]: ...

    def model_state(self, r: int) -> dict[str, Any]: ...

    def optimizer_state(self, r: int, lr: float) -> dict[str, Any]: ...

    def rng_state(self, r: int) -> torch.Tensor: ...


Objective = Callable[..., torch.Tensor]  # (model, x, k, m, alpha, generator) -> per-example objective [B]


class SingleEngine:
    """One model and torch's Adam (fused where available): a run trained alone, or any model that
    follows [`airvae.model.LatentVariableModel`][] and the objective's needs (by default
    [`airvae.model.air_objective`][]: ``encoder``, ``decoder``, ``likelihood``, ``z_dim``).

    Args:
        model: the model, on ``device``.
        lr: Adam's initial learning rate (the driver sets each step's).
        k: the training bound's importance samples.
        m: its Monte Carlo repeats.
        alpha: eq. 16's weight of the noisy encoder's bound.
        generator: the run's training stream ([`training_generator`][airvae.driver.training_generator]).
        device: where the model trains.
        objective: ``(model, x, k, m, alpha, generator=) -> [B]``, maximized (default
            [`air_objective`][airvae.model.air_objective]).
    """

    def __init__(self, model: LatentVariableModel, *, lr: float, k: int, m: int, alpha: float,
                 generator: torch.Generator, device: torch.device, objective: Objective | None = None):
        self.model, self.generator = model, generator
        self.k, self.m, self.alpha = k, m, alpha
        self.objective: Objective = objective or air_objective
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, **fast_adam_options(device))
        model.train()  # validation (estimators.frozen) puts it back in training mode when it is done

    def shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        """Its model's tensor shapes (one run: ``r`` is 0)."""
        return {name: tuple(t.shape) for name, t in self.model.state_dict().items()}

    def restore(self, r: int, saved: dict[str, Any]) -> None:
        """Load the model, Adam state and training generator from a checkpoint."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        restore_generator(self.generator, saved)

    def step(self, x: torch.Tensor, active: list[bool], lr: float) -> torch.Tensor:
        """One Adam step on ``x[0]``, the minibatch ``[1, B, ...]``; returns the loss ``[1]``."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = -self.objective(self.model, x[0], self.k, self.m, self.alpha, generator=self.generator).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach().reshape(1)

    def validate(self, rows: list[int], x: torch.Tensor, k: int, seeds: list[int]) -> list[float]:
        """The mean IWAE-``k`` estimate on ``x``, from the streams of ``seeds[0]``."""
        return [iwae_log_likelihood(self.model, x, k, seed=seeds[0]).mean]

    def model_state(self, r: int) -> dict[str, Any]:
        """The model's ``state_dict``."""
        return self.model.state_dict()

    def optimizer_state(self, r: int, lr: float) -> dict[str, Any]:
        """Adam's ``state_dict``."""
        return self.optimizer.state_dict()

    def rng_state(self, r: int) -> torch.Tensor:
        """The training generator's state."""
        return self.generator.get_state()


@dataclass
class Batches:
    """The data a drive sees, on its device.

    Attributes:
        train: training examples (minibatches by index).
        valid: validation examples.
        test: optionally, test examples whose amortized bound is logged at each validation (Figure 4).
    """

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor | None = None


def drive(engine: Engine, cfgs: Sequence[RunConfig | FitConfig], logs: list[RunLog], data: Batches,
          device: torch.device, *, progress: bool = True, desc: str = "training") -> list[TrainResult]:
    """Train the runs of ``engine`` to the end of their schedules, resuming each from its last
    checkpoint.

    The runs step in lockstep: a run whose checkpoint is ahead sits out until the others catch up.
    A run that stops early (early stopping, divergence) stays in the engine, inactive. SIGINT and
    SIGTERM stop every run at a consistent state and save it.

    Args:
        engine: holds the runs' models and takes their steps.
        cfgs (list[RunConfig | FitConfig]): each run's settings, with ``iterations``, ``batch_size``,
            ``seed``, ``k``, ``val_k``, ``patience``, ``lr_at``.
        logs: each run's [`RunLog`][airvae.driver.RunLog].
        data: the examples, on ``device``.
        device: where the runs train.
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        Each run's [`TrainResult`][airvae.driver.TrainResult], in the order of ``cfgs``.
    """
    R, first = len(cfgs), cfgs[0]
    results: list[TrainResult | None] = [None] * R
    for r, log in enumerate(logs):
        saved, results[r] = log.resume(device, engine.shapes(r))
        if saved is not None:
            engine.restore(r, saved)
    schedules = [MinibatchSchedule(data.train.shape[0], cfg.batch_size, cfg.seed, device) for cfg in cfgs]
    loss_sums = torch.zeros(R, dtype=accumulator_dtype(device), device=device)  # per-step losses stay on the device
    loss_counts = [0] * R

    def unfinished() -> list[int]:
        return [r for r in range(R) if results[r] is None]

    def flush_losses(r: int) -> bool:
        """Move run r's loss sum into its log; False if it is not finite (the run diverged)."""
        total = float(loss_sums[r])
        logs[r].add_loss(total, loss_counts[r])
        loss_sums[r], loss_counts[r] = 0.0, 0
        return math.isfinite(total)

    def checkpoint(r: int) -> None:
        # the lr of the step just taken: what torch's param_group holds when a run alone checkpoints
        logs[r].checkpoint(engine.model_state(r), engine.optimizer_state(r, cfgs[r].lr_at(logs[r].step - 1)),
                           engine.rng_state(r))

    kept: list[bool] | None = None  # the active runs, and their mask (keep), rebuilt when they change
    keep: torch.Tensor | None = None
    bar = tqdm(total=first.iterations, initial=min(log.step for log in logs), desc=desc, unit="step",
               disable=not progress, dynamic_ncols=True)
    try:
        with StopFlag() as stop:
            while unfinished():
                group_step = min(logs[r].step for r in unfinished())
                active = [results[r] is None and logs[r].step == group_step for r in range(R)]
                x = data.train[torch.stack([s.indices(log.step) for s, log in zip(schedules, logs, strict=True)])]
                per_run = engine.step(x, active, first.lr_at(group_step))  # [R]
                if active != kept:  # a host-to-device copy only when the active runs change
                    kept, keep = active, torch.tensor(active, device=device)
                assert keep is not None  # made at the first step
                loss_sums += torch.where(keep, per_run.to(loss_sums.dtype), torch.zeros_like(loss_sums))
                validate, save = [], []
                for r in range(R):
                    if active[r]:
                        logs[r].state["step"] += 1
                        loss_counts[r] += 1
                        if logs[r].validation_due():
                            validate.append(r)
                        if logs[r].checkpoint_due(r in validate):
                            save.append(r)
                bar.update(min(logs[r].step for r in range(R)) - bar.n)
                interrupted = stop.signal is not None
                if validate or save or interrupted:  # the only host syncs: validation and checkpoints
                    for r in (unfinished() if interrupted else sorted(set(validate) | set(save))):
                        if not flush_losses(r):
                            results[r] = logs[r].finish("diverged", diverged_message(
                                f"became non-finite before step {logs[r].step}", logs[r].run_dir))
                    validate = [r for r in validate if results[r] is None]
                    if validate:
                        seeds = [cfg.seed for cfg in cfgs]
                        vals = engine.validate(validate, data.valid, first.val_k, [s + 1 for s in seeds])
                        tests = (engine.validate(validate, data.test, first.k, [s + 2 for s in seeds])
                                 if data.test is not None else [None] * len(validate))
                        for r, val, test_bound in zip(validate, vals, tests, strict=True):
                            logs[r].record_validation(val, engine.model_state(r), test_bound)
                        bar.set_postfix(best=f"{max(logs[r].state['best_val'] for r in validate):.2f}")
                    for r in unfinished():
                        if r in save or interrupted:
                            checkpoint(r)
                        if r in validate and logs[r].finished_status() == "early-stopped":
                            results[r] = logs[r].finish("early-stopped", EARLY_STOP_MESSAGE.format(cfgs[r].patience))
                        elif stop.signal is not None:  # interrupted
                            results[r] = logs[r].interrupted(stop.signal)
                for r in unfinished():
                    if logs[r].step >= cfgs[r].iterations:
                        results[r] = logs[r].finish("completed")
    except BaseException as error:  # a full disk, out of memory, a second Ctrl-C...: true statuses
        for r in unfinished():
            logs[r].fail(error)
        raise
    finally:
        bar.close()
    finished = [result for result in results if result is not None]
    assert len(finished) == R  # the loop ends when no run is unfinished
    return finished


def training_generator(seed: int, device: torch.device) -> torch.Generator:
    """The random stream of a run's training draws (reparameterization and denoising noise): its own
    generator, seeded by the run's seed, so that a run draws the same numbers whether it trains
    alone or in a stacked group.

    Args:
        seed: the run's seed.
        device: where the draws are made.
    """
    return torch.Generator(device=device).manual_seed(seed)


def restore_generator(generator: torch.Generator, saved: dict[str, Any]) -> None:
    """Continue a checkpoint's training stream. A checkpoint written on another kind of device
    (CPU vs CUDA states differ) restarts the stream from a seed derived from (seed, step):
    still a valid run, no longer bit-for-bit the uninterrupted one."""
    state = saved.get("rng")
    try:  # a generator's state is a CPU ByteTensor even for a CUDA generator (the checkpoint's map_location moved it)
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"a generator's state is a tensor, not {type(state).__name__}")
        generator.set_state(state.cpu())
    except (RuntimeError, TypeError):
        generator.manual_seed(int(saved["state"]["step"]) * 1_000_003 + generator.initial_seed())


def _forget_after(run_dir: Path, step: int, device: torch.device) -> list[dict[str, Any]]:
    """Undo what a killed process wrote after the checkpoint we resume from (step 0: none): its
    metrics lines and a staged best from a later step (both are produced again). A staged best
    that the checkpoint already knows (the kill fell between last.pt and its promotion) becomes
    best.pt. Returns the metrics records kept."""
    kept = []
    if (run_dir / METRICS).exists():  # rewritten whole: this also drops a line torn by the kill
        kept = [record for record in read_metrics(run_dir / METRICS) if record["step"] <= step]
        write_metrics(run_dir / METRICS, kept)
    if (run_dir / BEST_NEXT).exists():
        if load_checkpoint(run_dir / BEST_NEXT, device)["step"] <= step:
            _promote_best(run_dir)
        else:
            (run_dir / BEST_NEXT).unlink()
    return kept


def _promote_best(run_dir: Path) -> None:
    if (run_dir / BEST_NEXT).exists():
        try:
            os.replace(run_dir / BEST_NEXT, run_dir / BEST)
        except OSError as error:
            raise write_error(run_dir / BEST, error) from error


def fast_adam_options(device: torch.device) -> dict[str, Any]:
    # The fused kernel updates all parameters in one call: 1.2-2x faster than the default
    # per-tensor loop on CPU, and it makes optimizer.step() atomic with respect to signals.
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def diverged_message(what: str, run_dir: Path) -> str:
    """Why a run stopped with a non-finite objective, where its last good state is, what to try."""
    return (f"training objective {what}; the last checkpoint ({run_dir / LAST}) holds step "
            f"{_checkpoint_step(run_dir)}. Try a lower learning rate (--lr) or a different seed.")


def _checkpoint_step(run_dir: Path) -> int | str:
    try:
        return load_checkpoint(run_dir / LAST)["state"]["step"]
    except RunError:
        return "none yet"


def _result(run_dir: Path, status: str, state: _LoopState) -> TrainResult:
    best = state["best_val"] if state["best_step"] is not None else None
    return TrainResult(run_dir, status, state["step"], state["best_step"], best, state["seconds"])
