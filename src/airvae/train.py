"""Training one airvae run (per appendix E: Adam, the learning-rate decay of eq. 43, early stopping
on a validation IWAE-k estimate, checkpoints and exact resume): everything checked before anything
is written, the run folder created or checked for resuming and locked, then the model trained by
[`airvae.driver.drive`][] (which every trainer shares).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoints import load_checkpoint
from .compiling import LONG_TRAINING_STEPS, compile_for
from .config import ConfigError, RunConfig
from .data import Dataset, dataset_digest, load_dataset
from .devices import resolve_device
from .driver import Batches, RunLog, SingleEngine, TrainingDiverged, TrainResult, drive, training_generator  # noqa: F401
from .files import RunError, read_json
from .locks import RunLock
from .model import model_from_config
from .resources import check_fits, training_memory
from .runs import LAST, SUMMARY, check_run_dir_use, open_run_dir
from .tracking import TrackingSettings, choose_sinks


def check_training_inputs(cfg: RunConfig, dataset: Dataset, runs: int = 1) -> torch.device:
    """Everything about a run that can be checked before its directory is touched: the data fits
    the config, the device exists, and the memory the run needs (with ``runs`` - 1 others in a
    stacked group, [`airvae.stacked`][]) is there. Returns the device."""
    cfg.check_dataset(dataset)
    n_train = len(dataset.train)
    if cfg.batch_size > n_train:
        raise ConfigError(f"invalid batch_size = {cfg.batch_size}: allowed at most the {n_train} training examples "
                          f"of {cfg.dataset!r}")
    if len(dataset.valid) == 0:
        raise ConfigError(f"dataset {cfg.dataset!r} has an empty validation split: validation needs examples")
    device = resolve_device(cfg.device)
    n_valid = len(dataset.valid) if cfg.val_examples is None else min(len(dataset.valid), cfg.val_examples)
    rows = n_train + n_valid + min(len(dataset.test), cfg.track_test_examples)
    check_fits(training_memory(cfg, rows, runs), device,
               "lower --k, --m, --batch-size, --val-k, --z-dim or the layer widths (--encoder, --decoder)"
               + (", or stack fewer runs" if runs > 1 else ""))
    return device


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, dataset: Dataset | None = None, allow_data_change: bool = False,
          tracking: TrackingSettings | None = None) -> TrainResult:
    """Train (or resume) one of airvae's models, as ``airvae train`` does, and write its run directory.

    Nothing is written before every check has passed (the data fit the config, the device exists,
    the memory is there, the run directory may be used as asked); the run directory is then locked
    for the whole call ([`airvae.locks.RunLock`][]). The schedule is appendix E's: Adam, the
    learning-rate decay of eq. 43, early stopping on a validation IWAE-k estimate.

    Args:
        cfg: the run ([`resolve_run_config`][airvae.config.resolve_run_config] builds one from the
            paper's presets).
        run_dir: the run directory.
        resume: continue the run in ``run_dir`` from its last checkpoint (its config must match).
        overwrite: discard the airvae run in ``run_dir`` and start again.
        progress: show a progress bar.
        dataset (Dataset | None): the data, already loaded
            ([`airvae.data.Dataset`][]); None: loaded from ``cfg.dataset``.
        allow_data_change: resume although the data differ from those the run started on.
        tracking: the sinks (TensorBoard, MLflow) the run writes to besides metrics.jsonl
            ([`airvae.tracking`][]); None keeps the run's own choice (none for a new run).

    Returns:
        The run's [`TrainResult`][airvae.driver.TrainResult].

    Raises:
        RunError: the run directory cannot be used as asked (a file, a link, a foreign folder, a run
            without ``resume`` or ``overwrite``, a run another process is writing).
        ConfigError: the run cannot run here (data that do not fit, a missing device, not enough
            memory).
        TrainingDiverged: the objective became non-finite; the run records why first.
    """
    run_dir = Path(run_dir)
    check_run_dir_use(run_dir, resume=resume, overwrite=overwrite)  # refused before any work
    if dataset is None:

        dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir, progress=progress)
    device = check_training_inputs(cfg, dataset)
    with RunLock(run_dir):
        cfg = open_run_dir(cfg, run_dir, dataset_digest(dataset), resume=resume, overwrite=overwrite,
                           allow_data_change=allow_data_change)
        if tracking is not None:
            choose_sinks(run_dir, tracking)
        return _train_locked(cfg, run_dir, dataset, device, progress)


def _train_locked(cfg: RunConfig, run_dir: Path, dataset: Dataset, device: torch.device, progress: bool,
                  ) -> TrainResult:
    # The whole (small) dataset lives on the device: no per-step host-to-device copies.
    data = Batches(torch.as_tensor(dataset.train, device=device).float(),
                   torch.as_tensor(dataset.valid[:cfg.val_examples], device=device).float(),
                   torch.as_tensor(dataset.test[:cfg.track_test_examples], device=device).float()
                   if cfg.track_test_examples else None)
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg).to(device)
    engine = SingleEngine(model, lr=cfg.lr, k=cfg.k, m=cfg.m, alpha=cfg.regularizer.alpha,
                          generator=training_generator(cfg.seed, device), device=device)
    log = RunLog(cfg, run_dir, getattr(dataset, "deviation", None))
    if compile_for(cfg.iterations - _checkpoint_step_or_zero(run_dir) >= LONG_TRAINING_STEPS) and progress:
        tqdm.write("compiling the model (torch.compile: seconds to tens of seconds once per process, cached; "
                   "--no-compile skips it)")
    (result,) = drive(engine, [cfg], [log], data, device, progress=progress, desc=f"{cfg.model_name} {cfg.dataset}")
    if result.status == "diverged":
        raise TrainingDiverged(read_json(run_dir / SUMMARY)["message"])
    return result


def _checkpoint_step_or_zero(run_dir: Path) -> int:
    """The step of the run's last checkpoint (0 without one): how much of the schedule is done."""
    try:
        return int(load_checkpoint(run_dir / LAST)["state"]["step"]) if (run_dir / LAST).exists() else 0
    except (RunError, KeyError, TypeError, ValueError):
        return 0  # a bad checkpoint is named when the run resumes from it
