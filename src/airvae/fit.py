"""Train a researcher's own model with airvae's trainer: [`fit`][airvae.fit.fit] gives any model that follows
[`airvae.model.LatentVariableModel`][] (any networks, any likelihood) the run folder, exact
resume, validation and early stopping, checkpoints, locks, tracking and safety guarantees of
``airvae train``, through the driver every airvae run uses ([`airvae.driver`][]).

The model keeps AIR's regularizers if it has them: a [`DenoisingEncoder`][airvae.networks.DenoisingEncoder]
(eq. 13, with eq. 16's ``alpha``) and [`cap_weight_norms`][airvae.model.cap_weight_norms] (WNI, eq. 17/18).
``airvae evaluate RUN --model package.module:function`` and ``airvae plot`` read such a run; the
model is never rebuilt from the run folder (that would mean running code named in a file).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError, FitConfig
from .data import Dataset, dataset_digest, load_dataset
from .devices import resolve_device
from .driver import Batches, Objective, RunLog, SingleEngine, TrainingDiverged, TrainResult, drive, training_generator
from .estimators import latent_dim
from .files import read_json
from .locks import RunLock
from .model import LatentVariableModel, air_objective, protocol_objective
from .runs import SUMMARY, check_run_dir_use, open_run_dir
from .tracking import TrackingSettings, choose_sinks


def fit(model: LatentVariableModel, data: str | Dataset, run_dir: str | Path, *, k: int = 1, m: int = 1,
        alpha: float = 1.0, lr: float = 1e-3, iterations: int = 10_000, batch_size: int = 100,
        val_every: int | None = None, val_k: int = 100, val_examples: int | None = 1000,
        patience: int | None = None, checkpoint_every: int | None = None, seed: int = 0, device: str = "auto",
        data_dir: str | None = None, built_by: str | None = None, resume: bool = False, overwrite: bool = False,
        allow_data_change: bool = False, tracking: TrackingSettings | None = None,
        progress: bool = True) -> TrainResult:
    """Train ``model`` on ``data`` into the run folder ``run_dir`` and return the run's result.

    Args:
        model: any ``nn.Module`` following [`LatentVariableModel`][airvae.model.LatentVariableModel], built (and
            initialized) by the caller. With ``encoder``, ``decoder``, ``likelihood`` and ``z_dim`` it
            trains on [`air_objective`][airvae.model.air_objective] (a denoising encoder then gets eq. 16's
            ``alpha``); otherwise on the IWAE-k bound of its ``encode``.
        data: a dataset's name or a ``.npz`` path (as ``--dataset``), or a [`Dataset`][airvae.data.Dataset].
        run_dir: the run folder; refused if it holds anything but this run (``resume``) or an airvae
            run to discard (``overwrite``).
        k: importance samples of the training bound (IWAE-k, eq. 20; 1: the ELBO, eq. 5).
        m: Monte Carlo repeats of that bound, averaged.
        alpha: eq. 16's weight of the noisy bound (denoising encoders only).
        lr: Adam's initial learning rate, decayed by eq. 43 over the ``iterations`` steps.
        iterations: training steps.
        batch_size: examples per step.
        val_every: steps between validations (default: 20 validations in all).
        val_k: importance samples of the validation estimate, IWAE-``val_k``.
        val_examples: validation examples used (None: all).
        patience: stop after this many validations without a new best (None: never).
        checkpoint_every: steps between checkpoints (default: ``val_every``).
        seed: the training draws' and minibatch order's seed (the model's initialization is yours).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        data_dir: where a named dataset's files are (offline machines).
        built_by: what built the model, recorded in ``config.json`` (default: its class).
        resume: continue the run in ``run_dir`` from its last checkpoint (``airvae train --resume``).
        overwrite: discard the airvae run in ``run_dir`` and start again (``--overwrite``).
        allow_data_change: resume although the data differ from those the run started on
            (``--allow-data-change``).
        tracking: TensorBoard or MLflow sinks besides ``metrics.jsonl`` (``--log``); None: the
            run's own choice, none for a new run.
        progress: show a progress bar.

    Returns:
        The run's [`TrainResult`][airvae.driver.TrainResult].

    Raises:
        TrainingDiverged: the objective became non-finite; the run records why before this is raised
            ([`TrainingDiverged`][airvae.driver.TrainingDiverged]).
    """
    run_dir = Path(run_dir)
    check_run_dir_use(run_dir, resume=resume, overwrite=overwrite)  # refused before any work
    dataset = data if isinstance(data, Dataset) else load_dataset(data, data_dir=data_dir, progress=progress)
    resolved = resolve_device(device)
    model = model.to(resolved)
    x_valid = torch.as_tensor(dataset.valid[:val_examples], device=resolved).float()
    model.likelihood.validate(x_valid)  # data that does not fit the likelihood is refused, e.g. grey levels
    every = val_every or max(1, iterations // 20)
    cfg = FitConfig(dataset=data if isinstance(data, str) else dataset.name, model=built_by or f"{type(model).__module__}.{type(model).__qualname__}",
                    x_dim=dataset.dim, z_dim=latent_dim(model, x_valid[:1]), k=k, m=m, alpha=alpha, seed=seed, lr=lr,
                    iterations=iterations, batch_size=batch_size, val_every=every, val_k=val_k,
                    val_examples=val_examples, patience=patience, checkpoint_every=checkpoint_every or every,
                    data_dir=data_dir, device=device)
    if batch_size > len(dataset.train):
        raise ConfigError(f"invalid batch_size = {batch_size}: allowed at most the {len(dataset.train)} training "
                          f"examples of {dataset.name!r}")
    objective: Objective = air_objective if all(hasattr(model, a) for a in ("encoder", "z_dim")) else protocol_objective
    with RunLock(run_dir):
        cfg = open_run_dir(cfg, run_dir, dataset_digest(dataset), resume=resume, overwrite=overwrite,
                           allow_data_change=allow_data_change)
        if tracking is not None:
            choose_sinks(run_dir, tracking)
        data_on_device = Batches(torch.as_tensor(dataset.train, device=resolved).float(), x_valid)
        engine = SingleEngine(model, lr=cfg.lr, k=cfg.k, m=cfg.m, alpha=cfg.alpha,
                              generator=training_generator(cfg.seed, resolved), device=resolved, objective=objective)
        log = RunLog(cfg, run_dir, getattr(dataset, "deviation", None))
        (result,) = drive(engine, [cfg], [log], data_on_device, resolved, progress=progress,
                          desc=f"{cfg.model_name} {cfg.dataset}")
    if result.status == "diverged":
        raise TrainingDiverged(read_json(run_dir / SUMMARY)["message"])
    return result
