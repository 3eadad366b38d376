"""Sweeps: many training runs (and their evaluations) as idempotent, resumable tasks, run by a
local executor (this machine, one or several worker processes) or by Ray (a cluster).

A task's output lives in a directory named after its settings, so re-running a sweep skips what
is finished, resumes what was interrupted (from its last checkpoint), and a failing task writes
``error.json`` and never stops or corrupts the others.
"""

from __future__ import annotations

import ctypes
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .compiling import COMPILE_ENV
from .config import Regularizer, RunConfig, check_int, is_real, resolve_run_config
from .data import Dataset, load_dataset
from .devices import resolve_device
from .evaluation import EvaluationSettings, evaluate_run, stored_evaluation
from .files import RunError, RunLocked, append_line, read_json, real_folder, write_json
from .locks import check_unlocked
from .resources import evaluation_memory, largest_group, training_memory
from .runs import ERROR, FINISHED, MARKER, SUMMARY, load_config, run_dir_state, write_marker
from .stacked import STACKED_ESTIMATORS, Member, evaluate_group, evaluation_key, group_key, step_rates, train_group
from .tracking import TrackingSettings
from .train import train

# Table 7's search space for sigma*sqrt(d) and 10/H (0, the baseline, deliberately excluded).
PAPER_GRID = (2.5, 5.0, 7.5, 10.0, 12.5, 15.0, 17.5)
FAMILIES = ("plain", "denoise-0.5", "denoise-1.0", "wni", "large-encoder")
REGULARIZED = ("denoise-0.5", "denoise-1.0", "wni")
MAX_WORKERS = 1024  # processes of a local executor (or CPUs of a local Ray)


@dataclass(frozen=True)
class Job:
    """One training run of a sweep: a model family at one regularization strength and seed.

    Attributes:
        family: ``plain``, ``denoise-0.5``, ``denoise-1.0``, ``wni`` or ``large-encoder``.
        dataset: a dataset's name or ``.npz`` path.
        k: importance samples of the training bound.
        m: its Monte Carlo repeats.
        strength: sigma * sqrt(d) for denoising, 10 / H for WNI (Table 7's units); 0 for none.
        seed: the run's seed.
        budget: ``smoke``, ``quick`` or ``paper``.
        track_test_examples: test examples whose bound is logged during training (Figure 4).
        iterations: overrides the budget's iterations (None: the budget's).
        architecture: a preset of [`ARCHITECTURES`][airvae.config.ARCHITECTURES] (None: the
            dataset's).
    """

    family: str
    dataset: str
    k: int = 1
    m: int = 1
    strength: float = 0.0  # sigma*sqrt(d) for denoising, 10/H for WNI, 0 for unregularized families
    seed: int = 0
    budget: str = "quick"
    track_test_examples: int = 0
    iterations: int | None = None
    architecture: str | None = None  # a preset of config.ARCHITECTURES; None: the dataset's own

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"invalid family = {self.family!r}: allowed {', '.join(FAMILIES)}")
        if (self.family in REGULARIZED) != (self.strength > 0):
            raise ValueError(f"family {self.family!r} with strength {self.strength}: regularized families "
                             "need a strength > 0, unregularized ones 0")

    @property
    def name(self) -> str:
        """The job's name and run folder, ``DATASET/kK-mM/FAMILY[-STRENGTH]/seedS``."""
        dataset = Path(self.dataset).stem
        strength = f"-{self.strength:g}" if self.strength else ""
        return f"{dataset}/k{self.k}-m{self.m}/{self.family}{strength}/seed{self.seed}"

    def run_dir(self, root: str | Path) -> Path:
        """The job's run directory in the results folder ``root``."""
        return Path(root) / "runs" / self.name

    def run_config(self, dataset, data_dir: str | None = None, device: str = "auto") -> RunConfig:
        """The run's configuration on ``dataset`` (an [`airvae.data.Dataset`][]: its dimension,
        image shape and kind of values)."""
        alpha = float(self.family.split("-")[1]) if self.family.startswith("denoise") else 1.0
        regularizer = Regularizer.from_paper(
            dataset.dim, sigma_sqrt_d=self.strength if self.family.startswith("denoise") else 0.0,
            ten_over_h=self.strength if self.family == "wni" else 0.0, alpha=alpha)
        return resolve_run_config(
            self.dataset, x_dim=dataset.dim, image_shape=dataset.image_shape, levels=dataset.levels,
            budget=self.budget, architecture="mnist-large" if self.family == "large-encoder" else self.architecture,
            regularizer=regularizer, k=self.k, m=self.m, seed=self.seed, iterations=self.iterations,
            track_test_examples=self.track_test_examples or None, data_dir=data_dir, device=device)


@dataclass(frozen=True)
class Task:
    """A unit of work for an executor: train ``job`` and/or evaluate it (picklable for processes and
    Ray).

    Attributes:
        job: the run.
        root: the results folder the run directory lies in.
        data_dir: where the datasets' files are.
        device: the device the task runs on.
        evaluation: [`EvaluationSettings`][airvae.evaluation.EvaluationSettings] fields of the
            evaluation after training (None: none).
        tracking: the run's tracking sinks (None: the run's own choice).
        extra_evaluation: the fields of a second evaluation (``--estimators``; None: none).
    """

    job: Job
    root: str
    data_dir: str | None = None
    device: str = "auto"
    evaluation: dict | None = None  # EvaluationSettings fields; None: train only
    tracking: TrackingSettings | None = None  # tracking sinks (--log); None: the run's own choice
    extra_evaluation: dict | None = None  # a second evaluation after ``evaluation`` (e.g. AIS), same task

    @property
    def run_dir(self) -> Path:
        """The job's run directory."""
        return self.job.run_dir(self.root)


def finished_summary(run_dir: Path) -> dict | None:
    """The run's summary if it says the run is finished; None otherwise (absent, unreadable, or
    unfinished: training then resumes it, and tells finished from unfinished by its checkpoint)."""

    try:
        summary = read_json(run_dir / SUMMARY) if (run_dir / SUMMARY).exists() else None
    except RunError:
        return None
    return summary if isinstance(summary, dict) and summary.get("status") in FINISHED else None


def execute(task: Task) -> dict:
    """Train (or resume, or skip if finished) and optionally evaluate one job. Never raises: a
    failure is returned with ``status`` "failed" and written to ``error.json`` in the run
    directory; a run that another process is writing is skipped with ``status`` "locked"."""

    started = time.perf_counter()
    run_dir = task.run_dir
    out: dict[str, Any] = {"job": asdict(task.job), "name": task.job.name, "run_dir": str(run_dir)}
    try:
        summary = finished_summary(run_dir)
        out["trained"] = summary is None
        if summary is None:
            dataset = load_dataset(task.job.dataset, data_dir=task.data_dir, progress=False)
            cfg = task.job.run_config(dataset, task.data_dir, task.device)
            result = train(cfg, run_dir, resume=True, progress=False, dataset=dataset, tracking=task.tracking)
            if result.status == "interrupted":
                raise KeyboardInterrupt
            summary = read_json(run_dir / SUMMARY)
        out["summary"] = summary
        if task.evaluation is not None:

            settings = EvaluationSettings(**{**task.evaluation, "device": task.device})
            out["evaluation"] = _strip_values(evaluate_run(run_dir, settings, progress=False))
            if task.extra_evaluation is not None:
                settings = EvaluationSettings(**{**task.extra_evaluation, "device": task.device})
                out["extra_evaluation"] = _strip_values(evaluate_run(run_dir, settings, progress=False))
        (run_dir / ERROR).unlink(missing_ok=True)
        out["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except RunLocked as error:  # someone else is writing it: theirs to finish, not a failure of the run
        out.update(status="locked", error=str(error))
    except Exception as error:  # recorded, never propagated: one bad run must not stop a sweep
        out.update(status="failed", error=f"{type(error).__name__}: {error}")
        try:
            _record_failure(run_dir, {"error": out["error"], "traceback": traceback.format_exc()})
        except Exception:  # noqa: BLE001 - the failure is in `out` either way (e.g. a full disk, a file there)
            pass
    out["seconds"] = time.perf_counter() - started
    return out


def _record_failure(run_dir: Path, error: dict) -> None:
    """``RUN/error.json``, in a folder that is airvae's (a run, or new: then marked as airvae's first,
    so that rerunning the sweep may use it); never in a folder that is someone else's."""

    try:
        state = run_dir_state(run_dir)
    except RunError:
        return  # a link, a file or a foreign folder: the failure is reported, nothing is written there
    if state == "new" and not (run_dir / MARKER).exists():
        write_marker(run_dir, None)
    write_json(run_dir / ERROR, error)


def _strip_values(result: dict) -> dict:
    """Evaluation results without per-example arrays (those stay in the run directory)."""
    if isinstance(result, dict):
        return {key: _strip_values(value) for key, value in result.items() if key != "values"}
    return result


class LocalExecutor:
    """Runs tasks on this machine: in this process (``workers=1``) or in worker processes, each
    limited to its share of the cores (more threads than cores halves PyTorch's throughput).

    Args:
        workers: worker processes (1: this process).
    """

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise ValueError(f"invalid workers = {workers}: allowed an integer >= 1")
        self.workers = workers

    def map(self, fn: Callable[[Task], dict], tasks: list[Task]) -> Iterable[dict]:
        """Run ``fn`` (normally [`execute`][airvae.sweep.execute]) on every task; yields the results as they
        come.
        """
        if self.workers == 1:
            yield from map(fn, tasks)
            return
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        with ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads, os.getpid())) as pool:
            futures = [pool.submit(_run_in_worker, fn, task, os.getpid()) for task in tasks]
            for future in as_completed(futures):
                yield future.result()


def _run_in_worker(fn: Callable[[Task], dict], task: Task, parent: int) -> dict:
    try:
        return fn(task)
    finally:
        if os.getppid() != parent:  # the sweep died (see _stop_with_parent): nobody to report to
            os._exit(0)


def _init_worker(threads: int, parent: int) -> None:
    _stop_with_parent(parent)
    _limit_threads(threads)


def _limit_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def _stop_with_parent(parent: int) -> None:
    """Linux: have the kernel send this worker SIGTERM when the sweep process dies, even by SIGKILL,
    so no orphan keeps training; training turns SIGTERM into a checkpoint and a clean stop, which
    the rerun of the sweep resumes."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not glibc/musl: keep the old behaviour
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class RayExecutor:
    """Runs each task as a Ray task with its CPU/GPU resources, on a local Ray instance or the
    cluster at ``address`` (``pip install 'airvae[ray]'``).

    Args:
        address: the Ray cluster (None: a local instance).
        cpus_per_task: CPUs each task asks for (and its torch threads).
        gpus_per_task: GPUs each task asks for.
        num_cpus: the CPUs of a local instance (None: Ray's default).
    """

    def __init__(self, address: str | None = None, cpus_per_task: float = 1, gpus_per_task: float = 0,
                 num_cpus: int | None = None):
        try:
            import ray
        except ImportError as error:
            raise RuntimeError("the Ray executor needs Ray: pip install 'airvae[ray]' (or pip install ray)") from error
        self.ray, self.cpus, self.gpus = ray, cpus_per_task, gpus_per_task
        if not ray.is_initialized():
            kwargs: dict[str, Any] = (
                {"address": address} if address else {"num_cpus": num_cpus, "include_dashboard": False})
            if os.environ.get(COMPILE_ENV):  # workers, possibly on other machines, compile too
                kwargs["runtime_env"] = {"env_vars": {COMPILE_ENV: os.environ[COMPILE_ENV]}}
            ray.init(ignore_reinit_error=True, log_to_driver=False, **kwargs)

    def map(self, fn: Callable[[Task], dict], tasks: list[Task]) -> Iterable[dict]:
        """Run ``fn`` (normally [`execute`][airvae.sweep.execute]) on every task; yields the results as they
        come.
        """
        remote = self.ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(_ray_entry)
        pending = [remote.remote(fn, task, max(1, int(self.cpus))) for task in tasks]
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            yield self.ray.get(done[0])

    def shutdown(self) -> None:
        """Shut Ray down."""
        self.ray.shutdown()


def _ray_entry(fn, task: Task, threads: int) -> dict:
    _limit_threads(threads)
    return fn(task)


class StackedExecutor:
    """Trains the runs of a sweep that share an architecture, k, m and schedule as stacked groups
    ([`airvae.stacked`][]: one vmapped model per group, in this process, on one device), then
    hands every task to ``fn`` as the other executors do: finished runs are skipped there, so only
    evaluations (and the training of any run a group could not take) happen per task.

    A group is as large as the device's memory allows (``airvae.resources.largest_group``);
    larger sets of runs are split. A run another process is writing is left out of its group
    (``fn`` reports it as locked); a group that fails leaves its runs to ``fn``, which trains them
    one by one from whatever checkpoints the group wrote (the formats are the same)."""

    def __init__(self):
        # (dataset, data_dir) -> Dataset, loaded once for grouping and training
        self._datasets: dict[tuple[str, str | None], Dataset] = {}

    def map(self, fn: Callable[[Task], dict], tasks: list[Task]) -> Iterable[dict]:
        """Train the groups, evaluate the trained runs as groups, then run ``fn`` on every task (which skips
        what the groups finished); yields the results.
        """
        trained = self.train_groups(tasks)
        self.evaluate_groups(tasks)
        for task in tasks:
            result = fn(task)
            if task.job.name in trained:
                result["trained"] = True
            yield result

    def groups(self, tasks: list[Task]) -> list[list[tuple[Task, RunConfig]]]:
        """The unfinished, unlocked tasks, grouped as they will train."""

        datasets = self._datasets
        pending: dict[tuple[tuple[str, str | None], str], list[tuple[Task, RunConfig]]] = {}
        for task in tasks:
            if finished_summary(task.run_dir) is not None:
                continue
            source = (task.job.dataset, task.data_dir)
            try:
                check_unlocked(task.run_dir)
                if source not in datasets:
                    datasets[source] = load_dataset(task.job.dataset, data_dir=task.data_dir, progress=False)
                cfg = task.job.run_config(datasets[source], task.data_dir, task.device)
            except Exception:  # noqa: BLE001 - locked by another process, or failing: fn reports it per task
                continue
            pending.setdefault((source, group_key(cfg)), []).append((task, cfg))
        groups = []
        for (source, _), members in pending.items():
            cfg, dataset = members[0][1], datasets[source]
            rows = len(dataset.train) + len(dataset.valid) + len(dataset.test)  # at most these on the device
            size = largest_group(partial(training_memory, cfg, rows), resolve_device(cfg.device),
                                 len(members))
            groups += [members[i:i + size] for i in range(0, len(members), size)]
        return groups

    def train_groups(self, tasks: list[Task]) -> set[str]:
        """Train every group; returns the names of the jobs trained to the end here."""

        trained = set()
        for members in self.groups(tasks):
            task0 = members[0][0]
            dataset = self._datasets[(task0.job.dataset, task0.data_dir)]
            try:
                results = train_group([Member(cfg, task.run_dir, task.tracking) for task, cfg in members], dataset,
                                      progress=False)
            except KeyboardInterrupt:
                raise
            except Exception as error:  # noqa: BLE001 - the runs are retried one by one by fn
                warnings.warn(f"a stacked group of {len(members)} runs failed ({type(error).__name__}: {error}); "
                              "training its runs one by one instead", RuntimeWarning, stacklevel=2)
                continue
            if any(result.status == "interrupted" for result in results):
                raise KeyboardInterrupt
            trained |= {task.job.name for (task, _), result in zip(members, results, strict=True)
                        if result.status in FINISHED}
        return trained


    def evaluate_groups(self, tasks: list[Task]) -> None:
        """Evaluate the trained runs of ``tasks`` that share an architecture as stacked groups
        ([`airvae.stacked.evaluate_group`][]), caching each run's result where ``fn`` (through
        evaluate_run) finds it. A group that cannot be batched is left to ``fn``."""

        pending: dict[tuple[str, str], tuple[EvaluationSettings, list[Path]]] = {}
        for task in tasks:
            if task.evaluation is None or finished_summary(task.run_dir) is None:
                continue
            try:
                settings = EvaluationSettings(**{**task.evaluation, "device": task.device})
                if not set(settings.estimators) <= set(STACKED_ESTIMATORS) or stored_evaluation(task.run_dir,
                                                                                                   settings):
                    continue
                cfg = load_config(task.run_dir)
            except Exception:  # noqa: BLE001 - a damaged run is fn's to report
                continue
            if not isinstance(cfg, RunConfig):  # a model of a researcher's own (no sweep job): never stacked
                continue
            key = (json.dumps(settings.to_dict(), sort_keys=True), evaluation_key(cfg, settings))
            pending.setdefault(key, (settings, []))[1].append(task.run_dir)
        for settings, run_dirs in pending.values():
            cfg = load_config(run_dirs[0])
            assert isinstance(cfg, RunConfig)  # as it was when grouped
            size = largest_group(partial(evaluation_memory, cfg, settings, settings.max_examples or 10**5),
                                 resolve_device(settings.device), len(run_dirs))
            for i in range(0, len(run_dirs), size):
                try:
                    evaluate_group(run_dirs[i:i + size], settings, progress=False)
                except KeyboardInterrupt:
                    raise
                except Exception as error:  # noqa: BLE001 - fn evaluates them one by one
                    warnings.warn(f"a stacked evaluation of {len(run_dirs[i:i + size])} runs failed "
                                  f"({type(error).__name__}: {error}); evaluating them one by one instead",
                                  RuntimeWarning, stacklevel=2)


class AutoExecutor:
    """``--executor auto``: stacked groups on a GPU; on a CPU, whichever its own measurement on this
    machine says is faster for the sweep at hand: ``workers`` processes of one run each, or stacked
    groups ([`airvae.stacked.step_rates`][] on the largest group). Decided once, on the first tasks
    it is given (a sweep's training), and said on stderr.

    Args:
        workers: worker processes for the local choice.
        device: the device the runs train on.
    """

    def __init__(self, workers: int = 1, device: str = "auto"):
        self.workers, self.device = workers, device
        self.choice: str | None = None
        self.reason = ""

    def choose(self, tasks: list[Task]):
        """The executor for ``tasks`` (and why, in ``choice`` and ``reason``)."""

        stacked = StackedExecutor()
        if resolve_device(self.device).type == "cuda":
            self.choice, self.reason = "stacked", "a GPU is present"
            return stacked
        groups = stacked.groups(tasks)
        largest = max(groups, key=len) if groups else []
        if len(largest) < 2:
            self.choice, self.reason = "local", "no two runs to stack"
            return LocalExecutor(self.workers)
        cfgs = [cfg for _, cfg in largest]
        dataset = stacked._datasets[(largest[0][0].job.dataset, largest[0][0].data_dir)]
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        group_rate, single_rate = step_rates(cfgs, dataset, resolve_device(self.device), threads_alone=threads)
        stacked_runs, local_runs = group_rate * len(cfgs), single_rate * self.workers
        self.choice = "stacked" if stacked_runs > local_runs else "local"
        self.reason = (f"measured here: {len(cfgs)} runs stacked {stacked_runs:.0f} run-steps/s, "
                       f"{self.workers} worker(s) of one run {local_runs:.0f} run-steps/s")
        return stacked if self.choice == "stacked" else LocalExecutor(self.workers)

    def map(self, fn: Callable[[Task], dict], tasks: list[Task]) -> Iterable[dict]:
        """Run ``fn`` (normally [`execute`][airvae.sweep.execute]) on every task; yields the results as they
        come.
        """
        if self.choice is None:  # decided once, on the first batch of tasks (the training of a sweep)
            self.executor = self.choose(tasks)
            print(f"airvae: executor auto -> {self.choice} ({self.reason})", file=sys.stderr)
        yield from self.executor.map(fn, tasks)


def make_executor(name: str, workers: int = 1, address: str | None = None, gpus_per_task: float = 0,
                  device: str = "auto"):
    """The executor ``--executor name`` asks for.

    Args:
        name: ``auto``, ``local``, ``ray`` or ``stacked``.
        workers: worker processes (``local``, ``auto``; a local Ray instance's CPUs).
        address: the Ray cluster (``ray``; None: a local instance).
        gpus_per_task: GPUs each Ray task asks for.
        device: the device (``auto``).

    Returns:
        (LocalExecutor | RayExecutor | StackedExecutor | AutoExecutor): The executor.

    Raises:
        ValueError: an unknown name or an invalid setting.
    """

    check_int("workers", workers, 1, MAX_WORKERS)
    if not (is_real(gpus_per_task) and 0 <= gpus_per_task < math.inf):
        raise ValueError(f"invalid gpus_per_task = {gpus_per_task!r}: allowed a finite number >= 0")
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(address=address, gpus_per_task=gpus_per_task,
                           num_cpus=None if address else max(workers, 1))
    if name == "stacked":
        return StackedExecutor()
    if name == "auto":
        return AutoExecutor(workers, device)
    raise ValueError(f"invalid executor = {name!r}: allowed auto, local, ray, stacked")


def run_tasks(tasks: list[Task], executor, log_path: Path | None = None, progress: bool = True,
              desc: str = "runs") -> list[dict]:
    """Run tasks through an executor; each result is appended to ``log_path`` (JSON lines) as it
    arrives, so an interrupted sweep leaves a record of what finished.

    Args:
        tasks: the tasks.
        executor (LocalExecutor | RayExecutor | StackedExecutor | AutoExecutor): runs them.
        log_path: the JSON-lines log (None: none).
        progress: show a progress bar.
        desc: its label.

    Returns:
        Every task's result, in the order they finished.
    """
    results = []
    bar = tqdm(total=len(tasks), desc=desc, unit="run", disable=not progress)
    failed = 0
    try:
        for result in executor.map(execute, tasks):
            results.append(result)
            failed += result["status"] != "ok"  # failed, or locked by another process
            if log_path is not None:

                real_folder(log_path.parent)
                append_line(log_path, json.dumps({k: v for k, v in result.items() if k != "evaluation"}))
            bar.set_postfix(failed=failed)
            bar.update(1)
    finally:
        bar.close()
    return results


def validation_score(result: dict) -> float:
    """The selection criterion: the run's best validation log-likelihood estimate (never test)."""
    value = (result.get("summary") or {}).get("best_val_log_likelihood")
    return -math.inf if value is None or result.get("status") != "ok" else float(value)


def select_strengths(results: list[dict]) -> dict[tuple, float]:
    """Regularization strength per (dataset, family, k, m) maximizing the validation estimate
    averaged over seeds, as the paper tunes sigma and H (Table 7). Only validation numbers are
    read: the test split plays no part in selection.

    The choice does not depend on the order of ``results`` (runs finish in any order): the mean is
    summed exactly (``math.fsum``), and a tie, as when a cap H never binds, goes to the weaker
    strength."""
    by_strength: dict[tuple, dict[float, list[float]]] = {}
    for result in results:
        job = result["job"]
        group = (job["dataset"], job["family"], job["k"], job["m"])
        by_strength.setdefault(group, {}).setdefault(job["strength"], []).append(validation_score(result))
    return {group: max(sorted(scores), key=lambda s: math.fsum(scores[s]) / len(scores[s]))
            for group, scores in by_strength.items()}
