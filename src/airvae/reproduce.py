"""Plan and run a reproduction of the paper's Tables 1-4 and Figures 1-4 (or a question it leaves
open) at any budget: train every run, select the regularization strength on validation (or take
Table 7's), evaluate on test, run Figure 3's study, then render the folder ([`airvae.report.render`][]:
``airvae report`` rebuilds it from the run directories alone). What the targets and budgets are:
[`airvae.targets`][].
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .config import ConfigError
from .data import load_dataset
from .evaluation import EvaluationSettings
from .files import RunError, check_writable, read_json, refuse_links_under, write_json
from .iwsvi_study import run_study
from .locks import LOCK, RunLock, check_unlocked
from .report import render
from .sweep import REGULARIZED, Job, Task, finished_summary, run_tasks, select_strengths
from .targets import (
    AIS_BUDGETS,
    EVALUATION_BUDGETS,
    FIGURE3_STUDIES,
    STRENGTHS,
    TARGETS,
    TRACKED_TEST_EXAMPLES,
    figure3_dir,
    paper_strength,
    paper_tables,
    swept_strengths,
)
from .tracking import TrackingSettings
from .train import check_training_inputs

# A reproduction larger than this is almost certainly a typo (--seeds 1e6): refused before planning.
MAX_PLANNED_RUNS = 10_000


def plan(target: str, datasets: list[str], budget: str, seeds: int, grid: tuple[float, ...] | None = None,
         strengths: str = "grid") -> list[Job]:
    """The training jobs of a reproduction.

    Args:
        target: a key of [`TARGETS`][airvae.targets.TARGETS] (``table1``, ``figure2``, ...).
        datasets: the datasets (``mnist``, ``omniglot``, ``caltech``; some targets are defined on
            fewer).
        budget: ``smoke``, ``quick`` or ``paper``.
        seeds: seeds per configuration.
        grid: the regularization strengths to sweep (default: the target's for the budget,
            [`swept_strengths`][airvae.targets.swept_strengths]).
        strengths: ``"grid"`` trains every regularized family at each strength of the grid (selected
            on validation afterwards); ``"paper"`` only at the strength Table 7 reports the paper
            selected ([`paper_strength`][airvae.targets.paper_strength]), nothing reselected here.

    Returns:
        (list[Job]): The runs, as [`airvae.sweep.Job`][]s.

    Raises:
        ValueError: a contradictory or unknown setting, a dataset the target does not cover, or too
            many runs.
    """
    spec = TARGETS[target]
    if strengths not in STRENGTHS:
        raise ValueError(f"invalid strengths = {strengths!r}: allowed {', '.join(STRENGTHS)}")
    if strengths == "paper" and grid is not None:
        raise ValueError("--grid and --strengths paper contradict each other: the paper's strengths are one per "
                         "model; drop --grid, or use --strengths grid")
    if strengths == "paper" and (spec.evaluate_all or spec.study or target == "figure4"):
        raise ValueError(f"invalid strengths = 'paper' for {target}: it sweeps strengths (figures 1-2) or has none "
                         "to choose; allowed with table1-4")
    grid = swept_strengths(target, budget, grid)
    per_seed = len(datasets) * len(spec.ks) * len(spec.ms) * sum(
        len(grid) if family in REGULARIZED and target != "figure4" and strengths == "grid" else 1
        for family in spec.families)
    if per_seed * seeds > MAX_PLANNED_RUNS:
        raise ValueError(f"invalid seeds = {seeds}: {target} would train {per_seed * seeds:,} runs "
                         f"({per_seed} per seed); allowed at most {MAX_PLANNED_RUNS:,}")
    table7 = paper_tables()["table7"]["selected"]
    jobs = []
    for dataset in datasets:
        if spec.datasets and dataset not in spec.datasets:
            raise ValueError(f"{target} is defined on {', '.join(spec.datasets)} only, not {dataset!r}")
        for k in spec.ks:
            for m in spec.ms:
                for family in spec.families:
                    chosen: tuple[float, ...]
                    if family not in REGULARIZED:
                        chosen = (0.0,)
                    elif target == "figure4":  # the paper's validated strength, not a sweep
                        chosen = (table7[family][str(min(k, 64))].get(dataset, 5.0),)
                    elif strengths == "paper":
                        chosen = (paper_strength(family, k, dataset),)
                    else:
                        chosen = grid
                    for strength in chosen:
                        for seed in range(seeds):
                            jobs.append(Job(family, dataset, k, m, strength, seed, budget,
                                            TRACKED_TEST_EXAMPLES[budget] if spec.track_test else 0,
                                            architecture=spec.architecture))
    return jobs


def check_jobs(jobs: list[Job], data_dir: str | None, device: str) -> None:
    """Every job's configuration against its data, device and memory, before anything is written:
    a sweep that cannot run is refused whole instead of failing run by run."""

    datasets = {}
    for job in jobs:
        if job.dataset not in datasets:
            datasets[job.dataset] = load_dataset(job.dataset, data_dir=data_dir, progress=False)
        dataset = datasets[job.dataset]
        try:
            cfg = job.run_config(dataset, data_dir, device)
        except ConfigError as error:  # a strength of --grid that this dataset's dimension cannot take
            if job.strength and ("sigma_sqrt_d" in str(error) or "ten_over_h" in str(error)):
                raise ConfigError(f"invalid --grid strength {job.strength:g} for {job.family} on {job.dataset}: "
                                  f"{str(error).split(': ', 1)[-1]}") from None
            raise
        check_training_inputs(cfg, dataset)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.is_symlink():
        raise RunError(f"--out {out_dir} is a symbolic link; airvae never writes through links: pass the real path")
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"--out {out_dir} is a file; choose a folder")
    if out_dir.is_dir():
        if any(p.name != LOCK for p in out_dir.iterdir()) and not (out_dir / "manifest.json").exists():
            raise RunError(f"--out {out_dir} is not empty and holds no airvae reproduction (manifest.json); "
                           "choose a new or empty folder")
        try:
            refuse_links_under(out_dir)  # a reproduction of airvae's: nothing in it may be a link
        except RunError as error:
            raise RunError(f"--out: {error}") from None
        check_unlocked(out_dir)  # refused at once while another reproduction writes here
    check_writable(out_dir)  # before hours of training, not at the first write


def extra_evaluation(target: str, budget: str, estimators: tuple[str, ...]) -> dict | None:
    """The second test evaluation that ``--estimators`` asks for (e.g. ``ais``, ``bdmc``), on the same
    examples as the target's own, with the budget's AIS effort ([`AIS_BUDGETS`][airvae.targets.AIS_BUDGETS]);
    None for none.
    Its estimators sit beside the target's in the report ([`airvae.report.merged_evaluation`][])."""

    if not estimators:
        return None
    spec = TARGETS[target]
    if spec.study or spec.track_test:
        raise ValueError(f"invalid estimators = {','.join(estimators)!r}: {target} has no test evaluation to add "
                         "them to (allowed with table1-4, figure1, figure2 and grey-conv)")
    extra = dict(EVALUATION_BUDGETS[budget], split="test", estimators=tuple(estimators), **AIS_BUDGETS[budget])
    EvaluationSettings(**extra)  # validated before any work
    return extra


def reproduce(target: str, datasets: list[str], budget: str, seeds: int, executor, out_dir: Path, *,
              grid: tuple[float, ...] | None = None, data_dir: str | None = None, device: str = "auto",
              progress: bool = True, tracking: TrackingSettings | None = None,
              estimators: tuple[str, ...] = (), strengths: str = "grid") -> list[dict]:
    """Train, select on validation, evaluate on test, render: ``airvae reproduce``.

    Idempotent: re-running skips finished work and resumes interrupted runs. Everything is checked
    before anything is written, and the output folder is locked against a second reproduction.
    Runs are started seed by seed: the first whole seed is done first.

    Args:
        target: a key of [`TARGETS`][airvae.targets.TARGETS].
        datasets: the datasets.
        budget: ``smoke``, ``quick`` or ``paper``.
        seeds: seeds per configuration (verdicts need at least
            [`MIN_SEEDS`][airvae.verdicts.MIN_SEEDS]).
        executor (LocalExecutor | RayExecutor | StackedExecutor | AutoExecutor): runs the tasks
            ([`make_executor`][airvae.sweep.make_executor]).
        out_dir: the reproduction's folder (runs, manifest, report).
        grid: the strengths to sweep (default: the target's for the budget).
        data_dir: where the datasets' files are (offline machines).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        progress: show progress bars.
        tracking: the runs' sinks besides metrics.jsonl ([`airvae.tracking.TrackingSettings`][]);
            None keeps each run's own choice.
        estimators: estimators (e.g. ``("ais",)``) run on the evaluated models in a second evaluation
            ([`extra_evaluation`][airvae.reproduce.extra_evaluation]).
        strengths: ``"grid"`` sweeps and selects on validation; ``"paper"`` trains Table 7's
            strengths only ([`plan`][airvae.reproduce.plan]): nothing is selected, and each run is
            trained and evaluated in one task, so runs finish (and can be committed) one by one.

    Returns:
        The results of the runs that did not finish (status ``"failed"`` or ``"locked"``), each with
        its ``name`` and ``error``; empty when all did.
    """
    if target not in TARGETS:
        raise ValueError(f"invalid target = {target!r}: allowed {', '.join(TARGETS)}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    jobs = plan(target, datasets, budget, seeds, grid, strengths)
    extra = extra_evaluation(target, budget, estimators)
    check_jobs(jobs, data_dir, device)
    spec = TARGETS[target]
    evaluation = study = None
    if spec.study:
        study = FIGURE3_STUDIES[budget]
    elif not spec.track_test:
        # IW-SVI and AIS score the generative model, IWAE-k the encoder with it: the report judges each claim
        # under both kinds (IWAE-k costs ~10% of IW-SVI).
        evaluation = dict(EVALUATION_BUDGETS[budget], split="test", estimators=("bound", "iwae", "iwsvi", "gap"))
    manifest = {"target": target, "datasets": datasets, "budget": budget, "seeds": seeds, "strengths": strengths,
                "grid": list(swept_strengths(target, budget, grid)) if strengths == "grid" else [],
                "evaluation": evaluation, "study": study, "jobs": [asdict(j) for j in jobs]}
    if extra is not None:
        manifest["extra_evaluation"] = extra
    with RunLock(out_dir):
        write_json(out_dir / "manifest.json", manifest)
        log = out_dir / "sweep.jsonl"
        make = lambda job, ev=None, then=None: Task(job, str(out_dir), data_dir, device, ev, tracking, then)  # noqa: E731
        jobs = sorted(jobs, key=lambda job: job.seed)  # stable: seed 0 of every model first
        if spec.evaluate_all or (strengths == "paper" and evaluation is not None):
            # nothing to select: each run is trained and evaluated (``extra`` too) in one task
            results = run_tasks([make(job, evaluation, extra) for job in jobs], executor, log, progress,
                                "train+evaluate")
            ok = {r["name"] for r in results if r["status"] == "ok"}
            evaluated = [job for job in jobs if job.name in ok]
        else:
            results = run_tasks([make(job) for job in jobs], executor, log, progress, "train")
            evaluated = []
            if evaluation is not None:
                chosen = select_strengths(results)
                ok = {r["name"] for r in results if r["status"] == "ok"}
                evaluated = [job for job in jobs if chosen[(job.dataset, job.family, job.k, job.m)] == job.strength
                             and job.name in ok]
                results += run_tasks([make(job, evaluation) for job in evaluated], executor, log, progress,
                                     "evaluate (test)")
        if extra is not None:
            ok = {r["name"] for r in results if r["status"] == "ok" and "evaluation" in r}
            results += run_tasks([make(job, extra) for job in evaluated if job.name in ok], executor, log, progress,
                                 f"evaluate (test, {', '.join(estimators)})")
        if study is not None:
            _run_figure3(out_dir, jobs, study, device, progress)
        render(out_dir)
    return [r for r in results if r["status"] != "ok"]


def _run_figure3(out_dir: Path, jobs: list[Job], study: dict, device: str, progress: bool) -> None:
    """Figure 3 on the seed-0 VAE of each dataset, in this process; skipped when the folder already
    holds it with the same settings."""


    for job in jobs:
        run_dir, folder = job.run_dir(out_dir), figure3_dir(out_dir, job.dataset)
        if job.seed != 0 or finished_summary(run_dir) is None:
            continue
        settings = folder / "study.json"
        if (folder / "figure3.json").exists() and settings.exists() and \
                read_json(settings) == json.loads(json.dumps(study)):
            continue
        run_study(run_dir, split="test", device=device, out_dir=folder, progress=progress, **study)
        write_json(settings, study)
