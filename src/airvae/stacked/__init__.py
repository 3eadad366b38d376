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

from .evaluation import STACKED_ESTIMATORS, evaluate_group, evaluation_key, stacked_fit_iw_svi, stacked_iwae
from .group import StackedAdam, StackedModel, adam_state_dict, group_key, load_adam_state, stacked_objectives
from .training import Member, StackedEngine, step_rates, train_group, training_steps

__all__ = ["STACKED_ESTIMATORS", "Member", "StackedAdam", "StackedEngine", "StackedModel", "adam_state_dict",
           "evaluate_group", "evaluation_key", "group_key", "load_adam_state", "stacked_fit_iw_svi", "stacked_iwae",
           "stacked_objectives", "step_rates", "train_group", "training_steps"]
