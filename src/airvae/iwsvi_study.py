"""Appendix C's Figure 3 for one model: how IW-SVI (a Gaussian fitted to each example, then
importance-sampled) and IWAE-k with the encoder approach ln p(x) as k, T and wall time grow. The
numbers go to ``figure3.json``; [`airvae.figures.draw_figure3`][] draws them."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import is_int, require
from .estimators import (
    DEFAULT_CHUNK_SAMPLES,
    DEFAULT_SVI_CHUNK_EXAMPLES,
    DEFAULT_SVI_LR,
    DEFAULT_SVI_LR_DECAY,
    Estimate,
    fit_iw_svi,
    frozen,
    iw_svi_log_likelihood,
    iwae_given_q,
    iwae_log_likelihood,
    resolve_device,
)
from .evaluation import SPLITS, load_best_examples
from .files import write_json
from .runs import EVALUATIONS

if TYPE_CHECKING:
    from .model import LatentVariableModel


def iwsvi_vs_iwae_study(model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any], *,
                        ks: Iterable[int] = (1, 10, 100, 1000, 5000),
                        steps_list: Iterable[int] = (0, 10, 30, 100, 300, 1000),
                        fixed_steps: int = 1000, svi_k: int = 5000, l: int = 8,  # noqa: E741
                        lr: float = DEFAULT_SVI_LR, lr_decay: float = DEFAULT_SVI_LR_DECAY, seed: int = 0,
                        chunk_samples: int = DEFAULT_CHUNK_SAMPLES,
                        chunk_examples: int = DEFAULT_SVI_CHUNK_EXAMPLES,
                        out_dir: str | os.PathLike[str] | None = None, progress: bool = False) -> dict[str, Any]:
    """Appendix C's Figure 3 for one model on examples ``x``:
    (a) mean estimate vs wall time, IWAE-k over ``ks`` and IW-SVI(k=``svi_k``) over ``steps_list``;
    (b) IWAE-k vs IW-SVI(T=``fixed_steps``) over ``ks``; (c) IW-SVI(k=``svi_k``) over ``steps_list``.

    Defaults take minutes on a laptop for ~100 examples; the paper's are ks up to 100000,
    T up to 3000 and fixed_steps=3000. Each IW-SVI point over T is its own optimization (the
    learning-rate decay depends on T); for (b) the q fitted with ``fixed_steps`` is scored with
    every k, which is exactly what separate runs would give (the optimization's random stream
    does not depend on k).

    Args:
        model (LatentVariableModel): the model.
        x (torch.Tensor | numpy.ndarray): the examples.
        ks (Iterable[int]): the IWAE sample sizes k.
        steps_list (Iterable[int]): the IW-SVI step counts T.
        fixed_steps: T of panel (b).
        svi_k: IW-SVI's scoring k in panels (a) and (c).
        l: IW-SVI's optimized bound's samples.
        lr: IW-SVI's Adam step size.
        lr_decay: its final learning rate as a fraction of ``lr``.
        seed: the seed of the examples' random streams.
        chunk_samples: latents decoded at once.
        chunk_examples: examples IW-SVI optimizes at once.
        out_dir (str | os.PathLike | None): where to write ``figure3.json`` (None: nowhere; draw it
            with [`draw_figure3`][airvae.figures.draw_figure3]).
        progress: show progress bars.

    Returns:
        The study's numbers: ``iwae``, ``iwsvi_over_steps`` and ``iwsvi_over_k``, lists of points
        (``mean``, ``stderr``, ``seconds`` and k or T), with the settings.
    """
    x = torch.as_tensor(x)
    ks, steps_list = sorted(set(int(k) for k in ks)), sorted(set(int(t) for t in steps_list))
    svi_kw: dict[str, Any] = dict(l=l, lr=lr, lr_decay=lr_decay, seed=seed, chunk_examples=chunk_examples,
                                  progress=progress)

    def point(est: Estimate, **extra: int) -> dict[str, Any]:
        return {**extra, "mean": est.mean, "stderr": est.stderr, "seconds": est.seconds}

    iwae = [point(iwae_log_likelihood(model, x, k, seed=seed, chunk_samples=chunk_samples, progress=progress), k=k)
            for k in ks]
    svi_over_t = [point(iw_svi_log_likelihood(model, x, k=svi_k, steps=t, chunk_samples=chunk_samples, **svi_kw),
                        steps=t, k=svi_k) for t in steps_list]
    started = time.perf_counter()
    mean, std = fit_iw_svi(model, x, steps=fixed_steps, **svi_kw)
    fit_seconds = time.perf_counter() - started
    svi_over_k = []
    with frozen(model):
        xd = x.to(device=mean.device, dtype=torch.float32)
        for k in ks:
            started = time.perf_counter()
            values = iwae_given_q(model, xd, mean, std, k, seed=seed, chunk_samples=chunk_samples)
            est = Estimate(f"iwsvi-{k}", values, seconds=fit_seconds + time.perf_counter() - started)
            svi_over_k.append(point(est, k=k, steps=fixed_steps))
    data = {"n": int(x.shape[0]), "l": l, "lr": lr, "lr_decay": lr_decay, "seed": seed, "svi_k": svi_k,
            "fixed_steps": fixed_steps, "iwae": iwae, "iwsvi_over_steps": svi_over_t, "iwsvi_over_k": svi_over_k}
    if out_dir is not None:
        _write_figure3(data, Path(out_dir))
    return data


def _write_figure3(data: dict[str, Any], out_dir: Path) -> None:
    """figure3.json in ``out_dir`` (drawn by [`draw_figure3`][airvae.figures.draw_figure3]); its path is added
    to ``data["files"]``."""
    write_json(out_dir / "figure3.json", data, out_dir)
    data["files"] = [str(out_dir / "figure3.json")]


def run_study(run_dir: str | os.PathLike[str], *, split: str = "test", max_examples: int | None = 100,
              device: str = "auto", out_dir: str | os.PathLike[str] | None = None, progress: bool = True,
              **study_kwargs: Any) -> dict[str, Any]:
    """[`iwsvi_vs_iwae_study`][airvae.iwsvi_study.iwsvi_vs_iwae_study] on a run's best checkpoint.

    Args:
        run_dir: the run directory.
        split: the split the examples come from.
        max_examples: examples, spread evenly over the split (None: all of it).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        out_dir: where ``figure3.png`` and ``figure3.json`` go (default ``RUN/evaluations/``).
        progress: show progress bars.
        **study_kwargs (Any): passed on to the study (``ks``, ``steps_list``, ``fixed_steps``, ...).

    Returns:
        The study's numbers, with the dataset, split and run directory.
    """
    require(split in SPLITS, "split", split, " | ".join(SPLITS))
    require(max_examples is None or (is_int(max_examples) and max_examples >= 1), "max_examples", max_examples,
           "an integer >= 1, or None for the whole split")
    cfg, model, _, _, x, _ = load_best_examples(run_dir, split, max_examples, resolve_device(device), progress)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / EVALUATIONS
    data = iwsvi_vs_iwae_study(model, x, progress=progress, **study_kwargs)
    data.update(dataset=cfg.dataset, split=split, run_dir=str(run_dir))
    _write_figure3(data, out_dir)
    return data
