"""The estimators an evaluation can choose, one object each: its name and what it measures, what it
costs (latents decoded), the memory it needs at its peak, its call on one model and, for those a
stacked group batches, its call on a group's runs.

[`airvae.evaluation`][] (the allowed names, [`evaluate_model`][airvae.evaluation.evaluate_model], the size
that decides compiling), ``airvae.resources.evaluation_memory`` and
[`airvae.stacked.evaluate_group`][] look estimators up in [`REGISTRY`][airvae.estimators.registry.REGISTRY]
instead of choosing by name. This module depends on the estimator functions only: what it needs of a run's
sizes ([`Footprint`][airvae.estimators.registry.Footprint]) and of a stacked group
([`StackedRuns`][airvae.estimators.registry.StackedRuns]) those callers pass in, so it imports none of them.

``settings`` is an [`airvae.evaluation.EvaluationSettings`][] throughout (what the estimators read of it:
[`EstimatorSettings`][airvae.estimators.registry.EstimatorSettings]).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import torch

from ..model import LatentVariableModel
from .ais import ais_log_likelihood, bdmc, simulate
from .amortized import amortized_bound, iwae_log_likelihood
from .common import NOISE_BLOCK, Estimate, latent_dim
from .gap import inference_gap
from .iwsvi import iw_svi_log_likelihood


class EstimatorSettings(Protocol):
    """What the estimators read of an evaluation's settings: the fields of
    [`EvaluationSettings`][airvae.evaluation.EvaluationSettings], which follows this protocol."""

    estimators: tuple[str, ...]
    bound_k: int | None
    bound_repeats: int
    k_iwae: int
    svi_k: int
    svi_l: int
    svi_steps: int
    svi_lr: float
    svi_lr_decay: float
    ais_intermediate: int
    ais_chains: int
    ais_leapfrog: int
    ais_step_size: float
    ais_schedule: str
    ais_tuning_chains: int
    bdmc_examples: int
    seed: int
    chunk_samples: int
    svi_chunk_examples: int
    ais_chunk_examples: int


@dataclass(frozen=True)
class Footprint:
    """A run's sizes, as the estimators' peak memory depends on them. Built from the run's
    configuration by ``airvae.resources.evaluation_memory``, which owns the memory model."""

    z_dim: int
    row: int  # floats held per decoded latent
    training_k: int  # the bound's k unless settings.bound_k
    iwae: Callable[[int, int, int], int]  # (k, examples, chunk_samples) -> bytes of one chunk of IWAE-k
    float_bytes: int


@dataclass(frozen=True)
class StackedRuns:
    """A group of runs evaluated together ([`airvae.stacked.evaluate_group`][]), as the stacked
    calls see it: ``iwae(k, repeats=1, q=None)`` gives each run's per-example IWAE-k ``[size, n]``
    (q: (mean, std) ``[size, n, z]``, else each run's encoder), ``fit_iw_svi(l=, steps=, lr=,
    lr_decay=, seed=, chunk_examples=)`` each run's IW-SVI q; both with the random streams a run
    evaluated alone uses."""

    size: int  # runs
    dims: int | None  # data dimensions per example, for bits/dim
    iwae: Callable[..., torch.Tensor]
    fit_iw_svi: Callable[..., tuple[torch.Tensor, torch.Tensor]]


class Estimator(ABC):
    """One estimator of an evaluation: what [`evaluate_model`][airvae.evaluation.evaluate_model] and
    [`evaluate_group`][airvae.stacked.evaluate_group] call, and what sizes an evaluation before it
    runs.

    Attributes:
        name: its name in ``--estimators`` and in evaluation records.
        meaning: one line: what it measures.
        needs: estimators it is computed from; it is then computed after them, costs nothing more,
            and is chosen whenever they all are.
        stacked: ``(runs, settings, bound_k, done) -> one Estimate per run`` for a group of runs
            ([`StackedRuns`][airvae.estimators.registry.StackedRuns]; ``done``: each run's estimates so
            far), or None where a group does not batch it (its runs are then evaluated one by one).
        per_example: whether its values are per example of ``x``, each from that example's own random
            streams, so that ``x`` can be evaluated in parts (``first_index``) and the parts joined
            ([`Estimate.concat`][airvae.estimators.Estimate.concat]); False for ``bdmc``, which scores
            data of its own.
    """

    name: str
    meaning: str  # one line: what it measures
    needs: tuple[str, ...] = ()
    per_example: bool = True
    stacked: Callable[..., list[Estimate]] | None = None

    @abstractmethod
    def cost(self, settings: EstimatorSettings, examples: int, bound_k: int | None) -> int:
        """Latents the decoder sees when this estimator evaluates ``examples`` examples: the size
        of the work (``bound_k``: the training k, unless ``settings.bound_k``)."""

    @abstractmethod
    def memory(self, footprint: Footprint, settings: EstimatorSettings, examples: int) -> dict[str, int]:
        """Bytes at this estimator's peak on ``examples`` examples, by named part (estimators run one
        after the other, so an evaluation needs the largest part of any)."""

    @abstractmethod
    def single(self, model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any], settings: EstimatorSettings,
               *, bound_k: int | None, progress: bool, done: dict[str, Estimate],
               first_index: int = 0) -> dict[str, Estimate]:
        """The estimates it adds for ``model`` on the examples ``x``, by name (``done``: those
        computed so far, which include its ``needs``; ``first_index``: the index of ``x[0]`` among the
        examples evaluated, for an estimator that is ``per_example``)."""


def _training_k(settings: EstimatorSettings, bound_k: int | None) -> int | None:
    return settings.bound_k or bound_k


def _svi_latents(settings: EstimatorSettings) -> int:
    """Latents IW-SVI decodes per example: the fit's l per step, forward and backward, then k."""
    return settings.svi_k + 2 * settings.svi_steps * settings.svi_l


def _ais_latents(settings: EstimatorSettings) -> int:
    """Latents one AIS run decodes per example: every leapfrog step of every chain, with its gradient."""
    return 2 * settings.ais_intermediate * settings.ais_chains * settings.ais_leapfrog


def _ais_floats(footprint: Footprint, settings: EstimatorSettings, examples: int) -> int:
    """Floats of one AIS chunk: each chain's state with its gradients, and blocks of per-step draws."""
    chains = settings.ais_chains + settings.ais_tuning_chains
    per_example = chains * (2 * footprint.row + NOISE_BLOCK * (footprint.z_dim + 1))
    return 2 * min(examples, settings.ais_chunk_examples) * per_example


def _svi_kwargs(settings: EstimatorSettings, progress: bool) -> dict[str, Any]:
    return dict(k=settings.svi_k, l=settings.svi_l, steps=settings.svi_steps, lr=settings.svi_lr,
                lr_decay=settings.svi_lr_decay, seed=settings.seed, chunk_examples=settings.svi_chunk_examples,
                chunk_samples=settings.chunk_samples, progress=progress)


def _ais_kwargs(settings: EstimatorSettings, progress: bool) -> dict[str, Any]:
    return dict(num_intermediate=settings.ais_intermediate, chains=settings.ais_chains,
                leapfrog_steps=settings.ais_leapfrog, step_size=settings.ais_step_size,
                schedule=settings.ais_schedule, tuning_chains=settings.ais_tuning_chains, seed=settings.seed,
                chunk_examples=settings.ais_chunk_examples, progress=progress)


def _per_run(runs: StackedRuns, compute: Callable[[], torch.Tensor], name: str,
             settings: dict[str, Any]) -> list[Estimate]:
    """``compute()``'s values ``[size, n]`` as one Estimate per run, each charged its share of the time;
    ``name`` and ``settings`` are those the single-model estimator records."""
    started = time.perf_counter()
    values = compute()
    seconds = (time.perf_counter() - started) / runs.size
    return [Estimate(name, values[r].cpu().double(), settings, seconds, runs.dims) for r in range(runs.size)]


class Bound(Estimator):
    """``bound``: L_k(x), the model's own training bound with the clean encoder (eq. 5 for k = 1,
    eq. 20), averaged over ``settings.bound_repeats`` draws
    ([`amortized_bound`][airvae.estimators.amortized_bound]).
    """
    name = "bound"
    meaning = "L_k(x), the model's own training bound with the clean encoder (eq. 5 for k = 1, eq. 20)"

    def cost(self, settings: EstimatorSettings, examples: int, bound_k: int | None) -> int:
        return examples * (_training_k(settings, bound_k) or 1) * settings.bound_repeats

    def memory(self, footprint: Footprint, settings: EstimatorSettings, examples: int) -> dict[str, int]:
        k = settings.bound_k or footprint.training_k
        return {"the amortized bound": footprint.iwae(k, examples, settings.chunk_samples)}

    def single(self, model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any], settings: EstimatorSettings,
               *, bound_k: int | None, progress: bool, done: dict[str, Estimate],
               first_index: int = 0) -> dict[str, Estimate]:
        k = _training_k(settings, bound_k)
        if k is None:
            raise ValueError("estimator 'bound' needs the training k: pass bound_k or set settings.bound_k")
        return {"bound": amortized_bound(model, x, k, repeats=settings.bound_repeats, seed=settings.seed,
                                         chunk_samples=settings.chunk_samples, first_index=first_index,
                                         progress=progress)}

    def stacked(self, runs: StackedRuns, settings: EstimatorSettings, bound_k: int | None,
                done: list[dict[str, Estimate]]) -> list[Estimate]:
        k = _training_k(settings, bound_k)
        return _per_run(runs, lambda: runs.iwae(k, repeats=settings.bound_repeats), f"bound-{k}",
                        {"k": k, "repeats": settings.bound_repeats, "seed": settings.seed})


class Iwae(Estimator):
    """``iwae``: IWAE-``settings.k_iwae`` with the amortized encoder's q (eq. 40)
    ([`iwae_log_likelihood`][airvae.estimators.iwae_log_likelihood]).
    """
    name = "iwae"
    meaning = "IWAE-k with the amortized encoder's q (eq. 40): scores encoder and decoder together"

    def cost(self, settings: EstimatorSettings, examples: int, bound_k: int | None) -> int:
        return examples * settings.k_iwae

    def memory(self, footprint: Footprint, settings: EstimatorSettings, examples: int) -> dict[str, int]:
        return {f"IWAE-{settings.k_iwae:,}": footprint.iwae(settings.k_iwae, examples, settings.chunk_samples)}

    def single(self, model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any], settings: EstimatorSettings,
               *, bound_k: int | None, progress: bool, done: dict[str, Estimate],
               first_index: int = 0) -> dict[str, Estimate]:
        return {"iwae": iwae_log_likelihood(model, x, settings.k_iwae, seed=settings.seed,
                                            chunk_samples=settings.chunk_samples, first_index=first_index,
                                            progress=progress)}

    def stacked(self, runs: StackedRuns, settings: EstimatorSettings, bound_k: int | None,
                done: list[dict[str, Estimate]]) -> list[Estimate]:
        return _per_run(runs, lambda: runs.iwae(settings.k_iwae), f"iwae-{settings.k_iwae}",
                        {"k": settings.k_iwae, "seed": settings.seed})


class IwSvi(Estimator):
    """``iwsvi``: ln p(x) by IW-SVI (eq. 41-42), the ``svi_*`` settings
    ([`iw_svi_log_likelihood`][airvae.estimators.iw_svi_log_likelihood]).
    """
    name = "iwsvi"
    meaning = "ln p(x) by IW-SVI (eq. 41-42): a Gaussian q fitted to each example, scored with IWAE-k"

    def cost(self, settings: EstimatorSettings, examples: int, bound_k: int | None) -> int:
        return examples * _svi_latents(settings)

    def memory(self, footprint: Footprint, settings: EstimatorSettings, examples: int) -> dict[str, int]:
        fit = footprint.float_bytes * 2 * min(examples, settings.svi_chunk_examples) * settings.svi_l * footprint.row
        score = footprint.iwae(settings.svi_k, examples, settings.chunk_samples)
        return {f"IW-SVI (l = {settings.svi_l:,}, k = {settings.svi_k:,})": max(fit, score)}

    def single(self, model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any], settings: EstimatorSettings,
               *, bound_k: int | None, progress: bool, done: dict[str, Estimate],
               first_index: int = 0) -> dict[str, Estimate]:
        return {"iwsvi": iw_svi_log_likelihood(model, x, first_index=first_index, **_svi_kwargs(settings, progress))}

    def stacked(self, runs: StackedRuns, settings: EstimatorSettings, bound_k: int | None,
                done: list[dict[str, Estimate]]) -> list[Estimate]:
        def compute() -> torch.Tensor:
            q = runs.fit_iw_svi(l=settings.svi_l, steps=settings.svi_steps, lr=settings.svi_lr,
                                lr_decay=settings.svi_lr_decay, seed=settings.seed,
                                chunk_examples=settings.svi_chunk_examples)
            return runs.iwae(settings.svi_k, q=q)

        return _per_run(runs, compute, f"iwsvi-{settings.svi_k}",
                        {"k": settings.svi_k, "l": settings.svi_l, "steps": settings.svi_steps,
                         "lr": settings.svi_lr, "lr_decay": settings.svi_lr_decay, "seed": settings.seed})


class Ais(Estimator):
    """``ais``: ln p(x) by annealed importance sampling with HMC, the ``ais_*`` settings
    ([`ais_log_likelihood`][airvae.estimators.ais_log_likelihood]). Not batched across a stacked group.
    """
    name = "ais"
    meaning = "ln p(x) by annealed importance sampling with HMC, from the prior, without the encoder"

    def cost(self, settings: EstimatorSettings, examples: int, bound_k: int | None) -> int:
        return examples * _ais_latents(settings)

    def memory(self, footprint: Footprint, settings: EstimatorSettings, examples: int) -> dict[str, int]:
        chains = settings.ais_chains + settings.ais_tuning_chains
        return {f"AIS with {chains:,} chains": footprint.float_bytes * _ais_floats(footprint, settings, examples)}

    def single(self, model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any], settings: EstimatorSettings,
               *, bound_k: int | None, progress: bool, done: dict[str, Estimate],
               first_index: int = 0) -> dict[str, Estimate]:
        return {"ais": ais_log_likelihood(model, x, first_index=first_index, **_ais_kwargs(settings, progress))}


class Gap(Estimator):
    """``gap``: Delta_inf = ln p(x) [IW-SVI] - L_k per example
    ([`inference_gap`][airvae.estimators.inference_gap]); needs ``bound`` and ``iwsvi`` and costs nothing
    more.
    """
    name = "gap"
    meaning = "Delta_inf = ln p(x) [IW-SVI] - L_k"
    needs = ("bound", "iwsvi")

    def cost(self, settings: EstimatorSettings, examples: int, bound_k: int | None) -> int:
        return 0

    def memory(self, footprint: Footprint, settings: EstimatorSettings, examples: int) -> dict[str, int]:
        return {}

    def single(self, model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any], settings: EstimatorSettings,
               *, bound_k: int | None, progress: bool, done: dict[str, Estimate],
               first_index: int = 0) -> dict[str, Estimate]:
        return {"gap": self._compose(done)}

    def stacked(self, runs: StackedRuns, settings: EstimatorSettings, bound_k: int | None,
                done: list[dict[str, Estimate]]) -> list[Estimate]:
        return [self._compose(estimates) for estimates in done]

    @staticmethod
    def _compose(done: dict[str, Estimate]) -> Estimate:
        """Delta_inf per example (Table 1) from the estimates it needs: the one place it is formed."""
        return inference_gap(done["iwsvi"], done["bound"])


class Bdmc(Estimator):
    """``bdmc``: the sandwich lower <= ln p(x) <= upper by forward and reverse AIS
    ([`bdmc`][airvae.estimators.bdmc]) on ``settings.bdmc_examples`` examples simulated from the model
    ([`simulate`][airvae.estimators.simulate]); with ``iwsvi`` chosen, IW-SVI on them too. Not batched
    across a stacked group.
    """
    name = "bdmc"
    meaning = "the sandwich lower <= ln p(x) <= upper, by forward and reverse AIS on data simulated from the model"
    per_example = False  # its examples are simulated, not x's

    def cost(self, settings: EstimatorSettings, examples: int, bound_k: int | None) -> int:
        """On ``settings.bdmc_examples`` simulated examples whatever ``examples``: forward and reverse
        AIS, and IW-SVI when it is chosen too."""
        latents_each = 2 * _ais_latents(settings) + (_svi_latents(settings) if "iwsvi" in settings.estimators else 0)
        return settings.bdmc_examples * latents_each

    def memory(self, footprint: Footprint, settings: EstimatorSettings, examples: int) -> dict[str, int]:
        # forward and reverse AIS, one after the other
        chains = settings.ais_chains + settings.ais_tuning_chains
        return {f"BDMC with {chains:,} chains":
                footprint.float_bytes * _ais_floats(footprint, settings, settings.bdmc_examples)}

    def single(self, model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any], settings: EstimatorSettings,
               *, bound_k: int | None, progress: bool, done: dict[str, Estimate],
               first_index: int = 0) -> dict[str, Estimate]:
        """``bdmc_lower`` and ``bdmc_upper`` on ``settings.bdmc_examples`` examples simulated from the
        model (the AIS settings); with ``iwsvi`` chosen, ``bdmc_iwsvi`` on them too, so that IW-SVI's
        slack there is known."""
        x_sim, z_sim = simulate(model, settings.bdmc_examples, seed=settings.seed, z_dim=latent_dim(model, x),
                                chunk_examples=settings.ais_chunk_examples)
        lower, upper = bdmc(model, x_sim, z_sim, **_ais_kwargs(settings, progress))
        out = {"bdmc_lower": lower, "bdmc_upper": upper}
        if "iwsvi" in settings.estimators:
            out["bdmc_iwsvi"] = iw_svi_log_likelihood(model, x_sim, **_svi_kwargs(settings, progress))
        return out


# Canonical order: estimators are computed (and stored, and listed) in it, each after its needs.
REGISTRY: Mapping[str, Estimator] = MappingProxyType({e.name: e for e in (Bound(), Iwae(), IwSvi(), Ais(), Gap(),
                                                                         Bdmc())})
