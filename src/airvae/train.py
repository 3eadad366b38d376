"""Training per appendix E: Adam, exponential learning-rate decay (eq. 43), periodic validation
on an IWAE-k log-likelihood estimate with early stopping, checkpoints and exact resume.

Exact resume rests on three choices: the minibatch of step t is a pure function of (seed, t), the
learning rate of step t is a pure function of t, and the global RNG state (which draws the
reparameterization and denoising noise) is saved with the model and optimizer. Validation uses its
own per-example random streams and never touches the training RNG.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import ConfigError, RunConfig
from .data import dataset_digest
from .devices import resolve_device
from .estimators import iwae_log_likelihood
from .model import LONG_TRAINING_STEPS, air_objective, compile_for
from .resources import check_fits, training_memory
from .runs import (BEST, CONFIG, LAST, METRICS, SUMMARY, RunError, RunIOError, RunLock, append_line,
                   check_clearable, clean_temporaries, clear_run_dir, load_checkpoint, load_config, model_from_config,
                   read_marker, read_metrics, run_dir_state, save_checkpoint, write_json, write_marker,
                   write_metrics)


class TrainingDiverged(RuntimeError):
    """The training objective became NaN or infinite."""


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # "completed" | "early-stopped" | "interrupted" | "diverged"
    steps: int
    best_step: int | None
    best_val_log_likelihood: float | None
    seconds: float


class MinibatchSchedule:
    """Shuffled epochs without replacement; batch ``t`` depends only on (seed, t)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        return self._perm[position * self.batch_size:(position + 1) * self.batch_size]


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a run stops at a consistent
    state and saves it instead of dying mid-update."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        # A repeated SIGTERM must not abort the checkpoint it asked for: a sweep worker whose parent
        # died was measured to receive two within milliseconds (see sweep._stop_with_parent).
        self.signal = self.signal or signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_training_inputs(cfg: RunConfig, dataset) -> torch.device:
    """Everything about a run that can be checked before its directory is touched: the data fits
    the config, the device exists, and the memory the run needs is there. Returns the device."""
    if dataset.dim != cfg.x_dim:
        raise ConfigError(f"invalid x_dim = {cfg.x_dim}: dataset {cfg.dataset!r} has dimension {dataset.dim}")
    n_train = len(dataset.train)
    if cfg.batch_size > n_train:
        raise ConfigError(f"invalid batch_size = {cfg.batch_size}: allowed at most the {n_train} training examples "
                          f"of {cfg.dataset!r}")
    if len(dataset.valid) == 0:
        raise ConfigError(f"dataset {cfg.dataset!r} has an empty validation split: validation needs examples")
    device = resolve_device(cfg.device)
    n_valid = len(dataset.valid) if cfg.val_examples is None else min(len(dataset.valid), cfg.val_examples)
    rows = n_train + n_valid + min(len(dataset.test), cfg.track_test_examples)
    check_fits(training_memory(cfg, rows), device,
               "lower --k, --m, --batch-size, --val-k, --z-dim or the layer widths (--encoder, --decoder)")
    return device


def check_run_dir_use(run_dir: Path, *, resume: bool, overwrite: bool) -> str:
    """Refuse a use of ``run_dir`` that cannot succeed (a file, a link, a foreign folder, an
    existing run without --resume/--overwrite, an --overwrite airvae may not perform) before
    anything is written, even a lock file. Returns :func:`airvae.runs.run_dir_state`."""
    state = run_dir_state(run_dir)
    if state == "run":
        if overwrite:
            check_clearable(run_dir)
        elif not resume:
            raise RunError(f"run directory {run_dir} already holds a run; pass --resume to continue it "
                           "or --overwrite to discard it and start again")
    return state


def open_run_dir(cfg: RunConfig, run_dir: Path, dataset, *, resume: bool, overwrite: bool,
                 allow_data_change: bool = False) -> RunConfig:
    """Create the run directory, or check that resuming it is consistent; the caller holds its
    lock. Returns the config to train with (the stored one when resuming)."""
    data_digest = dataset_digest(dataset)
    if check_run_dir_use(run_dir, resume=resume, overwrite=overwrite) == "run":
        if overwrite:
            clear_run_dir(run_dir)
        else:
            stored = load_config(run_dir)
            changed = {key: (old, new) for key, old, new in _diff(stored.to_json(), cfg.to_json())
                       if key not in ("device", "data_dir")}
            if changed:
                details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
                raise RunError(f"cannot resume {run_dir} with a different configuration ({details}); "
                               "resume with the stored settings or use --overwrite to start again")
            marker = read_marker(run_dir)
            recorded = marker.get("data_sha256") if marker else None
            if recorded is not None and recorded != data_digest and not allow_data_change:
                raise RunError(f"cannot resume {run_dir}: its data changed since the run was created (sha256 "
                               f"{recorded[:12]}... then, {data_digest[:12]}... now); resume on the original data, "
                               "or pass --allow-data-change to continue on the new data")
            if marker is None or recorded != data_digest:  # a run from before markers, or an allowed change
                write_marker(run_dir, data_digest)
            clean_temporaries(run_dir)
            return stored.replace(device=cfg.device, data_dir=cfg.data_dir)
    clean_temporaries(run_dir)
    write_marker(run_dir, data_digest)
    write_json(run_dir / CONFIG, cfg.to_json())
    return cfg


def _diff(a: dict, b: dict, prefix: str = ""):
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            yield from _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            yield f"{prefix}{key}", va, vb


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, dataset=None, allow_data_change: bool = False) -> TrainResult:
    """Train (or resume) one model and write its run directory. ``dataset`` optionally supplies an
    already loaded :class:`airvae.data.BinaryDataset`.

    Nothing is written before every check has passed (:func:`check_training_inputs`); the run
    directory is then locked for the whole call (:class:`airvae.runs.RunLock`)."""
    run_dir = Path(run_dir)
    check_run_dir_use(run_dir, resume=resume, overwrite=overwrite)  # refused before any work
    if dataset is None:
        from .data import load_dataset

        dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir, progress=progress)
    device = check_training_inputs(cfg, dataset)
    with RunLock(run_dir):
        cfg = open_run_dir(cfg, run_dir, dataset, resume=resume, overwrite=overwrite,
                           allow_data_change=allow_data_change)
        return _train_locked(cfg, run_dir, dataset, device, progress)


def _train_locked(cfg: RunConfig, run_dir: Path, dataset, device: torch.device, progress: bool) -> TrainResult:
    # The whole (small) dataset lives on the device: no per-step host-to-device copies.
    train_x = torch.as_tensor(dataset.train, device=device).float()
    val_x = torch.as_tensor(dataset.valid[:cfg.val_examples], device=device).float()
    test_x = (torch.as_tensor(dataset.test[:cfg.track_test_examples], device=device).float()
              if cfg.track_test_examples else None)

    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, **_fast_adam_options(device))
    schedule = MinibatchSchedule(train_x.shape[0], cfg.batch_size, cfg.seed)
    # Everything the loop carries from step to step; checkpointed so resume continues exactly.
    state = {"step": 0, "best_val": -math.inf, "best_step": None, "bad_validations": 0, "seconds": 0.0,
             "loss_sum": 0.0, "loss_count": 0}

    def checkpoint() -> None:
        save_checkpoint(run_dir / LAST, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": dict(state),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        })

    def finish(status: str, message: str | None = None) -> TrainResult:
        write_json(run_dir / SUMMARY, {
            "status": status, "message": message, "model": cfg.model_name, "dataset": cfg.dataset,
            "data_deviation": getattr(dataset, "deviation", None), "steps": state["step"],
            "best_step": state["best_step"],
            "best_val_log_likelihood": state["best_val"] if state["best_step"] is not None else None,
            "val_k": cfg.val_k, "seconds": state["seconds"],
        })
        return _result(run_dir, status, state)

    if (run_dir / LAST).exists():
        saved = load_checkpoint(run_dir / LAST, device)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng_cpu"])
        if device.type == "cuda" and saved.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(saved["rng_cuda"], device)
        state = saved["state"]
        # A finished run is told by its checkpoint, not by summary.json (which is only rewritten).
        if state["step"] >= cfg.iterations:
            return finish("completed")
        if cfg.patience is not None and state["bad_validations"] >= cfg.patience:
            return finish("early-stopped", f"no improvement in {cfg.patience} validations")
    _forget_after(run_dir, state["step"], device)

    compiling = compile_for(cfg.iterations - state["step"] >= LONG_TRAINING_STEPS)  # auto: long runs only
    write_json(run_dir / SUMMARY, {"status": "running", "model": cfg.model_name, "steps": state["step"]})
    bar = tqdm(total=cfg.iterations, initial=state["step"], desc=f"{cfg.model_name} {cfg.dataset}",
               unit="step", disable=not progress, dynamic_ncols=True)
    if compiling and progress:
        bar.write("compiling the model (torch.compile: 10-30 s once per process, cached; --no-compile skips it)")
    started = time.perf_counter() - state["seconds"]
    alpha = cfg.regularizer.alpha
    model.train()
    with _StopFlag() as stop:
        try:
            while state["step"] < cfg.iterations:
                step = state["step"]
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr_at(step)
                x = train_x[schedule.indices(step).to(device)]
                loss = -air_objective(model, x, cfg.k, cfg.m, alpha).mean()
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    state["seconds"] = time.perf_counter() - started
                    message = (f"training objective became {loss_value} at step {step}; the last "
                               f"checkpoint ({run_dir / LAST}) holds step "
                               f"{_checkpoint_step(run_dir)}. Try a lower learning rate (--lr) or "
                               "a different seed.")
                    finish("diverged", message)
                    raise TrainingDiverged(message)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                state["step"] = step = step + 1
                state["loss_sum"] += loss_value
                state["loss_count"] += 1
                bar.update(1)

                validated = step % cfg.val_every == 0 or step == cfg.iterations
                if validated:
                    val = iwae_log_likelihood(model, val_x, cfg.val_k, seed=cfg.seed + 1).mean
                    record = {"step": step, "train_loss": state["loss_sum"] / state["loss_count"],
                              "val_log_likelihood": val, "lr": cfg.lr_at(step - 1)}
                    if test_x is not None:
                        record["test_bound"] = iwae_log_likelihood(model, test_x, cfg.k, seed=cfg.seed + 2).mean
                    model.train()
                    improved = val > state["best_val"]
                    if improved:
                        state.update(best_val=val, best_step=step, bad_validations=0)
                        save_checkpoint(run_dir / BEST, {"model": model.state_dict(), "step": step,
                                                         "val_log_likelihood": val})
                    else:
                        state["bad_validations"] += 1
                    state["seconds"] = time.perf_counter() - started
                    # Logged before last.pt is written: a kill in between is undone on resume (_forget_after).
                    append_line(run_dir / METRICS, json.dumps({**record, "seconds": state["seconds"]}))
                    state.update(loss_sum=0.0, loss_count=0)
                    bar.set_postfix(loss=f"{loss_value:.2f}", val=f"{val:.2f}", best=f"{state['best_val']:.2f}")
                if validated or step % cfg.checkpoint_every == 0:
                    state["seconds"] = time.perf_counter() - started
                    checkpoint()
                if validated and cfg.patience is not None and state["bad_validations"] >= cfg.patience:
                    return finish("early-stopped", f"no improvement in {cfg.patience} validations")
                if stop.signal is not None:
                    state["seconds"] = time.perf_counter() - started
                    checkpoint()
                    return finish("interrupted", f"stopped by signal {stop.signal} at step {step}; "
                                  f"resume with `airvae train --resume --run-dir {run_dir}`")
        except RunIOError as error:  # disk full...: leave a summary that tells the truth
            try:
                finish("failed", str(error))
            except RunIOError:
                (run_dir / SUMMARY).unlink(missing_ok=True)  # rather none than a stale "running"
            raise
        finally:
            bar.close()
    return finish("completed")


def _forget_after(run_dir: Path, step: int, device: torch.device) -> None:
    """Undo what a killed process logged after the checkpoint we resume from (step 0: none): its
    metrics lines and a best.pt from a later step will be produced again, identically."""
    if (run_dir / METRICS).exists():  # rewritten whole: this also drops a line torn by the kill
        write_metrics(run_dir / METRICS, [record for record in read_metrics(run_dir / METRICS)
                                          if record["step"] <= step])
    if (run_dir / BEST).exists() and load_checkpoint(run_dir / BEST, device)["step"] > step:
        (run_dir / BEST).unlink()


def _fast_adam_options(device: torch.device) -> dict:
    # The fused kernel updates all parameters in one call: 1.2-2x faster than the default
    # per-tensor loop on CPU, and it makes optimizer.step() atomic with respect to signals.
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def _checkpoint_step(run_dir: Path):
    try:
        return load_checkpoint(run_dir / LAST)["state"]["step"]
    except RunError:
        return "none yet"


def _result(run_dir: Path, status: str, state: dict) -> TrainResult:
    best = state["best_val"] if state["best_step"] is not None else None
    return TrainResult(run_dir, status, state["step"], state["best_step"], best, state["seconds"])
