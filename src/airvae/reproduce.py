"""The paper's Tables 1-4 and Figures 1-4, regenerated at any budget, each beside the paper's own
numbers, with a REPORT.md saying, claim by claim and under each log-likelihood estimator the folder
holds, whether the run supports what the paper found; and questions the paper leaves open, measured
the same way (:mod:`airvae.questions`).

``reproduce`` plans a sweep, runs it (train; select the regularization strength on validation;
evaluate on test; Figure 3's study), and calls ``render``; ``render`` (``airvae report``) rebuilds
every table, figure, plot and REPORT.md from the run directories alone.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from .runs import BEST, FINISHED, LOCK, METRICS as METRICS_FILE, RunError, RunLock, check_unlocked, read_json
from .runs import read_metrics, write_json
from .sweep import PAPER_GRID, REGULARIZED, Job, Task, run_tasks, select_strengths
from .tracking import TrackingSettings

TABLE_FAMILIES = ("plain", "denoise-0.5", "denoise-1.0", "wni")
FAMILY_LABELS = {"plain": "{base}", "denoise-0.5": "D{base} (alpha=0.5)", "denoise-1.0": "D{base} (alpha=1.0)",
                 "wni": "WNI-{base}", "large-encoder": "{base} (Large Encoder)"}


@dataclass(frozen=True)
class Target:
    ks: tuple[int, ...]
    families: tuple[str, ...] = TABLE_FAMILIES
    ms: tuple[int, ...] = (1,)
    datasets: tuple[str, ...] | None = None  # None: any
    evaluate_all: bool = False  # figures evaluate every strength on test (an ablation, not a selection)
    track_test: bool = False
    study: bool = False  # Figure 3: IW-SVI vs IWAE-k on the seed-0 model of each dataset, no test table
    architecture: str | None = None  # a preset of config.ARCHITECTURES for every run; None: each dataset's own
    default_dataset: str = "caltech"
    grids: dict | None = None  # budget -> strengths, instead of GRIDS


TARGETS = {
    "table1": Target(ks=(1,)),
    "table2": Target(ks=(8,)),
    "table3": Target(ks=(64,)),
    "table4": Target(ks=(1, 8, 64), families=("large-encoder",) + TABLE_FAMILIES, datasets=("mnist",)),
    "figure1": Target(ks=(1,), evaluate_all=True),
    "figure2": Target(ks=(1, 8, 64), evaluate_all=True),
    "figure3": Target(ks=(1,), families=("plain",), study=True),
    "figure4": Target(ks=(1, 8), families=("plain", "denoise-1.0"), ms=(1, 8), track_test=True),
    # Not the paper's: do DVAE and WNI improve a conv VAE on grey-level images (airvae.questions)? Weaker
    # strengths than Table 7's: on 8x8 digits sigma*sqrt(d) = 1 is sigma = 0.125 per pixel, about what
    # sigma*sqrt(d) = 3.5 is on 28x28 MNIST (measured: 2.5 already cost DVAE 4.5 validation nats).
    "grey-conv": Target(ks=(1,), families=("plain", "denoise-1.0", "wni"), architecture="digits",
                        default_dataset="digits",
                        grids={"smoke": (5.0,), "quick": (1.0, 2.5, 5.0), "paper": (0.5, 1.0, 2.5, 5.0, 10.0)}),
}

# Evaluation effort per budget (EvaluationSettings fields). "paper" is appendix C exactly.
EVALUATION_BUDGETS = {
    "smoke": dict(k_iwae=16, svi_k=16, svi_l=2, svi_steps=5, max_examples=32),
    "quick": dict(k_iwae=500, svi_k=500, svi_l=8, svi_steps=200, max_examples=500),
    "paper": dict(k_iwae=5000, svi_k=5000, svi_l=8, svi_steps=3000, max_examples=None),
}
# Figure 3 (appendix C) per budget: evaluation.iwsvi_vs_iwae_study's arguments on the dataset's VAE.
# "paper": k up to 100000, T up to 3000, IW-SVI(T = 3000) over k and IW-SVI(k = 5000) over T, as the
# figure's caption; it does not say how many test examples were used: the whole test set.
FIGURE3_STUDIES = {
    "smoke": dict(ks=(1, 16), steps_list=(0, 5), fixed_steps=5, svi_k=16, l=2, max_examples=16),
    "quick": dict(ks=(1, 10, 100, 1000, 5000), steps_list=(0, 10, 30, 100, 300, 1000), fixed_steps=1000,
                  svi_k=5000, l=8, max_examples=100),
    "paper": dict(ks=(1, 10, 100, 1000, 5000, 10000, 100000), steps_list=(0, 10, 30, 100, 300, 1000, 3000),
                  fixed_steps=3000, svi_k=5000, l=8, max_examples=None),
}
# Strengths swept per budget; quick spans the range Table 7 selected (2.5-15) with two points.
GRIDS = {"smoke": (5.0,), "quick": (5.0, 10.0), "paper": PAPER_GRID}
# AIS (and BDMC) effort per budget, for `--estimators ais,bdmc`: EvaluationSettings fields ("paper": the defaults,
# 500 intermediate distributions, 16 chains, 100 simulated examples). "quick": on the digits conv VAE (60 test
# examples) T=200 with 4 chains came 0.2 nats closer to IW-SVI than T=100 with 8 chains, at the same cost (6-8x
# IW-SVI's at the quick settings); both stayed 0.7-0.8 nats below IW-SVI (measured).
# "paper": AIS on 200 test examples spread evenly over the split (IW-SVI and the bound cover all of it): at
# these settings AIS costs ~2.4 s per Caltech test example on one CPU core (measured), 1.5 h for all 2307.
AIS_BUDGETS = {"smoke": dict(ais_intermediate=10, ais_chains=2, bdmc_examples=4),
               "quick": dict(ais_intermediate=200, ais_chains=4, bdmc_examples=50), "paper": dict(max_examples=200)}
TRACKED_TEST_EXAMPLES = {"smoke": 32, "quick": 500, "paper": 2000}


def paper_tables() -> dict:
    return json.loads(resources.files("airvae").joinpath("paper_results/paper_tables.json").read_text())


# A reproduction larger than this is almost certainly a typo (--seeds 1e6): refused before planning.
MAX_PLANNED_RUNS = 10_000


STRENGTHS = ("grid", "paper")


def paper_strength(family: str, k: int, dataset: str) -> float:
    """The strength Table 7 selected for ``family`` at ``k`` on ``dataset`` (sigma*sqrt(d) or 10/H)."""
    selected = paper_tables()["table7"]["selected"]
    try:
        return float(selected[family][str(k)][dataset])
    except KeyError:
        raise ValueError(f"invalid strengths = 'paper' for {family} at k={k} on {dataset!r}: Table 7 gives strengths "
                         "for k = 1, 8, 64 on mnist, omniglot and caltech only; use --strengths grid") from None


def plan(target: str, datasets: list[str], budget: str, seeds: int, grid: tuple[float, ...] | None = None,
         strengths: str = "grid") -> list[Job]:
    """The training jobs of a reproduction. ``strengths="grid"`` trains every regularized family at
    each strength of the grid (selected on validation afterwards); ``"paper"`` only at the strength
    Table 7 reports the paper selected (:func:`paper_strength`), nothing reselected here."""
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


def swept_strengths(target: str, budget: str, grid: tuple[float, ...] | None = None) -> tuple[float, ...]:
    """The regularization strengths a reproduction sweeps: ``grid`` if given, else the target's own
    for the budget, else :data:`GRIDS`."""
    return tuple(grid or (TARGETS[target].grids or {}).get(budget) or GRIDS[budget])


def check_jobs(jobs: list[Job], data_dir: str | None, device: str) -> None:
    """Every job's configuration against its data, device and memory, before anything is written:
    a sweep that cannot run is refused whole instead of failing run by run."""
    from .data import load_dataset
    from .train import check_training_inputs

    datasets = {}
    for job in jobs:
        if job.dataset not in datasets:
            datasets[job.dataset] = load_dataset(job.dataset, data_dir=data_dir, progress=False)
        dataset = datasets[job.dataset]
        check_training_inputs(job.run_config(dataset, data_dir, device), dataset)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"--out {out_dir} is a file; choose a folder")
    if not out_dir.is_dir():
        return
    if any(p.name != LOCK for p in out_dir.iterdir()) and not (out_dir / "manifest.json").exists():
        raise RunError(f"--out {out_dir} is not empty and holds no airvae reproduction (manifest.json); "
                       "choose a new or empty folder")
    check_unlocked(out_dir)  # refused at once while another reproduction writes here


def extra_evaluation(target: str, budget: str, estimators: tuple[str, ...]) -> dict | None:
    """The second test evaluation that ``--estimators`` asks for (e.g. ``ais``, ``bdmc``), on the same
    examples as the target's own, with the budget's AIS effort (:data:`AIS_BUDGETS`); None for none.
    Its estimators sit beside the target's in the report (:func:`_merged_evaluation`)."""
    from .evaluation import EvaluationSettings

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
    """Train, select on validation, evaluate on test, render. Idempotent: re-running skips
    finished work and resumes interrupted runs. Everything is checked before anything is written,
    and the output folder is locked against a second reproduction. ``tracking``
    (:class:`airvae.tracking.TrackingSettings`): the runs' sinks besides metrics.jsonl; None keeps
    each run's own choice. ``estimators`` (e.g. ``("ais",)``) are run on the evaluated models in a
    second evaluation (:func:`extra_evaluation`). ``strengths`` (:func:`plan`): "grid" sweeps and
    selects on validation, "paper" trains Table 7's strengths only; then nothing is selected, and
    each run is trained and evaluated in one task, so runs finish (and can be committed) one by one.
    Runs are started seed by seed: the first whole seed is done first. Returns the results of the
    runs that did not finish (status "failed" or "locked"), each with its ``name`` and ``error``."""
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


def figure3_dir(out_dir: Path, dataset: str) -> Path:
    return Path(out_dir) / f"figure3-{Path(dataset).stem}"


def _run_figure3(out_dir: Path, jobs: list[Job], study: dict, device: str, progress: bool) -> None:
    """Figure 3 on the seed-0 VAE of each dataset, in this process; skipped when the folder already
    holds it with the same settings."""
    from .evaluation import run_study

    from .sweep import finished_summary

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


# ----------------------------------------------------------------------------------------------
# Rendering: everything below reads run directories only.

METRICS = ("neg_log_likelihood", "inference_gap", "neg_bound")
# The log-likelihood estimators a reproduction can hold (canonical order) and what each one scores.
ESTIMATOR_MEANINGS = {
    "iwsvi": "fits a fresh Gaussian q to each test example (appendix C): scores the generative model p(x) alone",
    "iwae": "importance-samples from the trained encoder: scores encoder and decoder together, so a better "
            "encoder raises it even when p(x) is unchanged",
    "ais": "anneals from the prior to the posterior without the encoder: scores the generative model p(x) alone",
}
MNIST_SPLIT_DEVIATION = (
    "MNIST's validation set is Larochelle & Murray's fixed file split (the 10000 images of "
    "binarized_mnist_valid.amat), not the paper's 10000 random images held out of the 60000 training images "
    "(appendix E); the test set is the same. Early stopping and strength selection see a different validation set.")
def _collect(out_dir: Path) -> tuple[dict, list[dict]]:
    from .evaluation import EvaluationSettings

    manifest = read_json(out_dir / "manifest.json")
    rows = []
    for job_fields in manifest["jobs"]:
        job = Job(**job_fields)
        run_dir = job.run_dir(out_dir)
        summary_path = run_dir / "summary.json"
        summary = read_json(summary_path) if summary_path.exists() else {}
        row = {"job": job, "run_dir": run_dir, "summary": summary, "evaluation": None,
               "failed": (run_dir / "error.json").exists()}
        if manifest["evaluation"] and summary.get("status") in FINISHED:
            row["evaluation"] = _merged_evaluation(run_dir, EvaluationSettings(**manifest["evaluation"]))
        row["metrics"] = read_metrics(run_dir / METRICS_FILE)
        rows.append(row)
    return manifest, rows


def _merged_evaluation(run_dir: Path, settings) -> dict | None:
    """The reproduction's evaluation of a run, plus the estimators of every other current evaluation of
    the same test examples (same split and max_examples), e.g. AIS added with ``airvae evaluate``."""
    from .evaluation import current_evaluations, evaluation_path

    current = current_evaluations(run_dir)  # the reproduction's own among them, if it is current
    own = evaluation_path(run_dir, settings)
    merged = next((stored for path, stored in current if path == own and stored["identity"] == settings.identity()),
                  None)
    if merged is None:
        return None
    merged = dict(merged, estimates=dict(merged["estimates"]))
    for _, other in current:
        if (other["settings"].get("split"), other["settings"].get("max_examples")) == (settings.split,
                                                                                       settings.max_examples):
            for name, estimate in other.get("estimates", {}).items():
                merged["estimates"].setdefault(name, estimate)
    return merged


def _metric(evaluation: dict | None, name: str, estimator: str = "iwsvi") -> float | None:
    """Positive-nats view used by the paper: -ln p(x) and Delta_inf = ln p(x) - L_k with ln p(x) from
    ``estimator`` (iwsvi, iwae or ais), and -L_k."""
    estimates = (evaluation or {}).get("estimates", {})
    bound = estimates["bound"]["mean"] if "bound" in estimates else None
    if name == "neg_bound":
        return None if bound is None else -bound
    if estimator not in estimates:
        return None
    log_likelihood = estimates[estimator]["mean"]
    if name == "neg_log_likelihood":
        return -log_likelihood
    return None if bound is None else log_likelihood - bound  # inference_gap


def estimators_present(rows: list[dict]) -> list[str]:
    """The log-likelihood estimators any run's evaluation holds, in canonical order (IW-SVI if none)."""
    held = {name for r in rows for name in ((r.get("evaluation") or {}).get("estimates") or {})}
    return [e for e in ESTIMATOR_MEANINGS if e in held] or ["iwsvi"]


def estimator_labels(rows: list[dict]) -> dict[str, str]:
    """Short labels with the settings, e.g. ``IW-SVI (k=500, l=8, T=200)``, ``IWAE-500 (encoder q)``."""
    labels = {"iwsvi": "IW-SVI", "iwae": "IWAE-k (encoder q)", "ais": "AIS"}
    for r in rows:
        for name, est in ((r.get("evaluation") or {}).get("estimates") or {}).items():
            s = est.get("settings", {})
            if name == "iwsvi":
                labels[name] = f"IW-SVI (k={s.get('k')}, l={s.get('l')}, T={s.get('steps')})"
            elif name == "iwae":
                labels[name] = f"IWAE-{s.get('k')} (encoder q)"
            elif name == "ais":
                labels[name] = f"AIS (T={s.get('num_intermediate')}, {s.get('chains')} chains)"
    return labels


def _mean_se(values: list[float]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.fmean(values), se


def _fmt(cell: tuple[float, float] | None, digits: int = 2) -> str:
    if cell is None:
        return "n/a"
    mean, se = cell
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def _label(family: str, k: int) -> str:
    return FAMILY_LABELS[family].format(base="VAE" if k == 1 else "IWAE")


def _selected_rows(manifest: dict, rows: list[dict]) -> list[dict]:
    # only finished runs compete, as in the sweep itself (a diverged or running run's best validation does not)
    trained = [{"job": asdict(r["job"]), "summary": r["summary"],
                "status": "ok" if r["summary"].get("status") in FINISHED else "failed"} for r in rows]
    chosen = select_strengths(trained)
    return [r for r in rows if chosen[(r["job"].dataset, r["job"].family, r["job"].k, r["job"].m)] == r["job"].strength]


def _columns(manifest: dict) -> list[str]:
    target = manifest["target"]
    return manifest["datasets"] if target != "table4" else [f"k={k}" for k in TARGETS[target].ks]


def _column_of(target: str, job: Job) -> str:
    """A table's column: the dataset (Table 4: ``k=K``, MNIST only)."""
    return job.dataset if target != "table4" else f"k={job.k}"


def cell_values(manifest: dict, rows: list[dict], estimators: list[str]) -> dict:
    """``(family, column, metric, estimator) -> (mean, SE over seeds)`` of the runs selected on validation;
    a column is a dataset (Table 4: ``k=K``)."""
    per_seed: dict = {}
    for r in _selected_rows(manifest, rows):
        column = _column_of(manifest["target"], r["job"])
        for estimator in estimators:
            for metric in METRICS:
                per_seed.setdefault((r["job"].family, column, metric, estimator), []).append(
                    _metric(r["evaluation"], metric, estimator))
    return {key: _mean_se(values) for key, values in per_seed.items()}


def render_table(manifest: dict, rows: list[dict]) -> tuple[str, list[list]]:
    """Markdown and CSV rows of the table, by IW-SVI (the paper's estimator): ours (mean ± SE over seeds)
    beside the paper's."""
    target = manifest["target"]
    paper = paper_tables()[target]
    selected = _selected_rows(manifest, rows)
    values = cell_values(manifest, rows, ["iwsvi"])
    columns = _columns(manifest)
    k_table = TARGETS[target].ks[0]
    header = ["model", "strength"] + [f"{c}: {name}" for c in columns for name in ("-ln p(x)", "Δinf", "-L_k")]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv_rows = [["model", "strength", "column", "metric", "ours_mean", "ours_se", "paper_mean", "paper_se", "n_seeds"]]
    for family in TARGETS[target].families:
        strengths = sorted({r["job"].strength for r in selected if r["job"].family == family})
        line = [_label(family, k_table if target != "table4" else 8), ", ".join(f"{s:g}" for s in strengths) or "-"]
        for column in columns:
            paper_cell = paper["rows"].get(family, {}).get(_paper_column(column), {})
            for metric in METRICS:
                ours = values.get((family, column, metric, "iwsvi"))
                theirs = paper_cell.get(metric)
                line.append(f"{_fmt(ours)} (paper {theirs[0]:.2f} ± {theirs[1]:.2f})" if theirs else _fmt(ours))
                n = sum(r["job"].family == family and _column_of(target, r["job"]) == column
                        and _metric(r["evaluation"], metric) is not None for r in selected)
                csv_rows.append([family, ";".join(f"{s:g}" for s in strengths), column, metric,
                                 *(ours if ours else ("", "")), *(theirs if theirs else ("", "")), n])
        md.append("| " + " | ".join(line) + " |")
    return "\n".join(md), csv_rows


def _paper_column(column: str) -> str:
    return column.split("=")[1] if column.startswith("k=") else column


def render(out_dir: str | Path) -> Path:
    """Rebuild the tables, figures, plots and REPORT.md of a reproduction directory from its runs."""
    from .questions import QUESTIONS

    out_dir = Path(out_dir)
    if not (out_dir / "manifest.json").exists():
        raise FileNotFoundError(f"{out_dir} has no manifest.json: it is not a directory written by "
                                "`airvae reproduce`")
    manifest, rows = _collect(out_dir)
    target = manifest["target"]
    failed = [r for r in rows if r["failed"]]
    missing = [r for r in rows if not r["summary"]]
    report = [f"# {target} at the `{manifest['budget']}` budget", "",
              f"Datasets: {', '.join(manifest['datasets'])}; seeds: {manifest['seeds']}; "
              f"regularization grid: {manifest['grid']}; runs: {len(rows)} ({len(failed)} failed, "
              f"{len(missing)} not run).", ""]
    deviations = sorted({r["summary"].get("data_deviation") for r in rows if r["summary"].get("data_deviation")})
    if "mnist" in manifest["datasets"]:
        deviations.append(MNIST_SPLIT_DEVIATION)
    report += [f"**Deviation:** {d}" for d in deviations] + ([""] if deviations else [])
    if manifest["evaluation"]:
        ev = manifest["evaluation"]
        iwae = f" and IWAE-{ev['k_iwae']} with the encoder" if "iwae" in ev["estimators"] else ""
        done = next((r["evaluation"] for r in rows if r["evaluation"]), {})  # how many examples there really were
        n, n_split = done.get("n"), done.get("n_split")
        if n is not None and n == n_split:
            examples = f"all {n} test examples"
        elif n is not None:
            examples = f"{n} of the {n_split} test examples, spread evenly"
        else:
            examples = (f"{ev['max_examples']} test examples, spread evenly" if ev["max_examples"]
                        else "all test examples")
        report += [f"Test evaluation: IW-SVI with k={ev['svi_k']}, l={ev['svi_l']}, T={ev['svi_steps']} "
                   f"(paper: k=5000, l=8, T=3000){iwae} on {examples}; strengths selected on the validation "
                   "estimate only.", ""]
    if manifest.get("study"):
        st = manifest["study"]
        report += [f"Figure 3 on the seed-0 VAE of each dataset, {st['max_examples'] or 'all'} test examples: IWAE-k "
                   f"for k in {st['ks']}; IW-SVI (k={st['svi_k']}, l={st['l']}) for T in {st['steps_list']}; "
                   f"IW-SVI (T={st['fixed_steps']}) for each k (paper: k up to 100000, T up to 3000, T = 3000).", ""]
    if manifest.get("extra_evaluation"):
        ev = manifest["extra_evaluation"]
        report += [f"Also on the evaluated models, same test examples: {', '.join(ev['estimators'])} "
                   f"(AIS/BDMC: {ev.get('ais_intermediate', 500)} intermediate distributions, "
                   f"{ev.get('ais_chains', 16)} chains; BDMC on {ev.get('bdmc_examples', 100)} examples simulated "
                   "from each model).", ""]
    estimators, labels = estimators_present(rows), estimator_labels(rows)
    if target in QUESTIONS:
        paths, lines = QUESTIONS[target](manifest, rows, out_dir)
        report += [f"![{path.stem}]({path.relative_to(out_dir).as_posix()})" for path in paths] + [""] + lines
    elif target.startswith("table"):
        md, csv_rows = render_table(manifest, rows)
        (out_dir / f"{target}.md").write_text(md + "\n")
        buffer = io.StringIO()
        csv.writer(buffer).writerows(csv_rows)
        (out_dir / f"{target}.csv").write_text(buffer.getvalue())
        values = cell_values(manifest, rows, estimators)
        report += ["## Table (ours by IW-SVI, mean ± SE over seeds, beside the paper's)", "", md, "", "## Claims", ""]
        report += claims_preamble(labels, estimators)
        report += table_claims(target, _columns(manifest), values, estimators, labels)
    else:
        from .figures import FIGURES

        paths, claims = FIGURES[target](manifest, rows, out_dir)
        report += [f"![{path.stem}]({path.relative_to(out_dir).as_posix()})" for path in paths]
        report += ["", "## Claims", ""]
        if manifest["evaluation"]:
            report += claims_preamble(labels, estimators)
        report += claims
    report += bdmc_section(rows)
    report += ["", *_plots_section(out_dir, manifest, rows)]
    if failed:
        report += ["", "## Failed runs", ""] + [f"- `{r['job'].name}`: see `runs/{r['job'].name}/error.json`"
                                                 for r in failed]  # relative: the same report from a bundle
    (out_dir / "REPORT.md").write_text("\n".join(report) + "\n")
    return out_dir


def bdmc_section(rows: list[dict]) -> list[str]:
    """REPORT.md lines for the BDMC sandwiches the evaluated runs hold (none: no lines): per run, the
    certified interval on its own simulated data, beside IW-SVI there when it was run."""
    held = [r for r in rows if "bdmc_lower" in ((r.get("evaluation") or {}).get("estimates") or {})]
    if not held:
        return []
    lines = ["", "## BDMC: how tight the estimators are on each model's own samples", "",
             "Forward AIS gives a stochastic lower bound and reverse AIS (from the latent that generated each "
             "example) an upper bound on ln p(x) of data simulated from the model; upper − lower bounds the error "
             "of AIS with these settings there, and upper − IW-SVI the slack of IW-SVI. It certifies the "
             "estimators on the model's own samples, not on the test set.", "",
             "| run | −ln p(x) ≥ (upper) | −ln p(x) ≤ (lower) | width (nats) | IW-SVI on the same examples "
             "| n |",
             "|---|---|---|---|---|---|"]
    for r in held:
        estimates = r["evaluation"]["estimates"]
        lower, upper = estimates["bdmc_lower"], estimates["bdmc_upper"]
        svi = estimates.get("bdmc_iwsvi")
        svi_text = "–" if svi is None else f"{-svi['mean']:.2f} (slack ≤ {upper['mean'] - svi['mean']:.2f})"
        lines.append(f"| `{r['job'].name}` | {-upper['mean']:.2f} | {-lower['mean']:.2f} | "
                     f"{upper['mean'] - lower['mean']:.2f} | {svi_text} | {lower.get('n', '')} |")
    return lines


def _plots_section(out_dir: Path, manifest: dict, rows: list[dict]) -> list[str]:
    """``airvae plot`` of the lowest seed of every configuration selected on validation (redrawn only
    when its metrics or best checkpoint changed), linked from a table."""
    from .plots import FIGURES, PLOTS_DIR, plot_run

    shown: dict = {}
    for r in _selected_rows(manifest, rows):
        job = r["job"]
        key = (job.dataset, job.family, job.k, job.m)
        if r["summary"] and (key not in shown or job.seed < shown[key]["job"].seed):
            shown[key] = r
    if not shown:
        return []
    lines = ["## Plots of the selected runs", "",
             "Lowest seed of each configuration selected on validation (`airvae plot RUN` draws any run).", "",
             "| run | " + " | ".join(FIGURES) + " |", "|---|" + "---|" * len(FIGURES)]
    for r in shown.values():
        plots_dir = r["run_dir"] / PLOTS_DIR
        inputs = [r["run_dir"] / name for name in (METRICS_FILE, BEST)]
        marker = plots_dir / "curves.json"
        if not marker.exists() or any(p.exists() and p.stat().st_mtime > marker.stat().st_mtime for p in inputs):
            plot_run(r["run_dir"], device="cpu")
        cells = [f"[png]({(plots_dir / f'{name}.png').relative_to(out_dir).as_posix()})"
                 if (plots_dir / f"{name}.png").exists() else "–" for name in FIGURES]
        lines.append(f"| `{r['job'].name}` | " + " | ".join(cells) + " |")
    return lines


def verdict(improvement: tuple[float, float] | None) -> str:
    """'supports' if the improvement exceeds twice its standard error, 'contradicts' if it is
    below minus that, otherwise 'inconclusive'; with one seed there is no standard error, and no
    verdict (a difference's sign alone says nothing about noise)."""
    if improvement is None:
        return "cannot tell (missing numbers)"
    diff, se = improvement
    if math.isnan(se):  # one seed
        return "cannot tell (one seed: no noise estimate; run --seeds 2 or more)"
    return "supports" if diff > 2 * se else "contradicts" if diff < -2 * se else "inconclusive"


def _difference(a, b):
    """a - b for (mean, standard error) pairs; the error is NaN when either has none (one seed)."""
    if a is None or b is None:
        return None
    return a[0] - b[0], math.hypot(a[1], b[1])


def claims_preamble(labels: dict[str, str], estimators: list[str]) -> list[str]:
    """What each estimator measures and what a verdict means (REPORT.md, above the claims)."""
    return (["Each claim is judged under every log-likelihood estimator this folder holds:", ""]
            + [f"- **{labels[e]}** {ESTIMATOR_MEANINGS[e]}." for e in estimators]
            + ["", "Δinf = ln p(x) − L_k takes ln p(x) from each estimator and L_k from the encoder. A verdict "
               "compares our difference with the paper's finding for that cell: **supports** = the paper's "
               "direction by more than twice its standard error (over seeds), **contradicts** = the opposite "
               "direction by as much, **inconclusive** = within the noise. Where the paper's own difference is "
               "within twice its standard error (**within its noise**: its ± columns do not establish a "
               "direction) or it has no number, the statement itself is judged: **holds here** or **does not "
               "hold here**. Where estimators disagree, the report says so and picks none: they answer "
               "different questions.", ""])


def claim(statement: str, paper_found: bool | None, paper_detail: str, differences: dict,
          labels: dict[str, str], details: dict[str, str] | None = None, paper_clear: bool = True) -> list[str]:
    """One claim in REPORT.md: the statement with the paper's finding for the cell ("paper: yes"/"paper:
    no"), then, per estimator, our difference (positive = the statement holds; mean, SE) and its verdict
    against the paper's finding, and a flag if one estimator supports the paper where another contradicts it.
    ``paper_found=None``: the paper has no number for this cell. ``paper_clear=False``: the paper's own
    difference is within twice its standard errors ("paper: no, within its noise"), so it set no
    direction to support or contradict. In both cases the statement itself is judged ("holds here")."""
    finding = {True: "yes", False: "no", None: "n/a"}[paper_found]
    if not paper_clear:
        finding, paper_found = f"{finding}, within its noise", None
    lines = [f"- {statement}: **paper: {finding}** ({paper_detail})"]
    verdicts = {}
    for estimator, diff in differences.items():
        oriented = diff if diff is None or paper_found is not False else (-diff[0], diff[1])
        verdicts[estimator] = verdict(oriented)
        # without a direction from the paper, the verdict is on the statement itself
        said = verdicts[estimator]
        if paper_found is None:
            said = {"supports": "holds here", "contradicts": "does not hold here"}.get(said, said)
        text = "n/a" if diff is None else f"{diff[0]:+.2f} ± {diff[1]:.2f} nats"
        extra = f" ({details[estimator]})" if details and estimator in details else ""
        lines.append(f"  - {labels[estimator]}: {text}{extra}: **{said}**")
    if {"supports", "contradicts"} <= set(verdicts.values()):
        split = ", ".join(f"{labels[e]} {v}" for e, v in verdicts.items())
        lines.append(f"  - ⚠ **estimators disagree** ({split}): they measure different things (above); "
                     "the report does not pick one.")
    return lines


def table_claims(target: str, columns: list[str], values: dict, estimators: list[str],
                 labels: dict[str, str]) -> list[str]:
    """Every claim of a table, each with the paper's own finding for its cell (paper_tables.json
    ``findings``) and our verdict under each estimator. ``values``: :func:`cell_values`."""
    paper = paper_tables()[target]
    k = TARGETS[target].ks[0] if target != "table4" else 8
    base = _label("plain", k)
    lines = []
    for column in columns:
        paper_column = _paper_column(column)
        published = {family: paper["rows"].get(family, {}).get(paper_column) for family in paper["rows"]}

        def ours(family, metric):
            return {e: _difference(values.get(("plain", column, metric, e)), values.get((family, column, metric, e)))
                    for e in estimators}

        for family in REGULARIZED:
            found = paper["findings"].get(family, {}).get(paper_column)
            name = f"{column}, {_label(family, k)}"
            if found is None:
                ll_detail = gap_detail = "no published number for this cell"
            else:
                ll_detail = (f"−ln p(x) {published[family]['neg_log_likelihood'][0]:.2f} vs "
                             f"{published['plain']['neg_log_likelihood'][0]:.2f}: {_nats(found['log_likelihood_gain'])}"
                             f"{_noise(found, 'log_likelihood')}")
                gap_detail = (f"Δinf {published[family]['inference_gap'][0]:.2f} vs "
                              f"{published['plain']['inference_gap'][0]:.2f}: "
                              f"{_nats(found['inference_gap_reduction'], 'smaller', 'larger')}"
                              f"{_noise(found, 'inference_gap')}")
            lines += claim(f"{name} improves test log-likelihood over {base}",
                           found and found["improves_log_likelihood"], ll_detail, ours(family, "neg_log_likelihood"),
                           labels, paper_clear=not found or found["log_likelihood_difference_clear"])
            lines += claim(f"{name} reduces the test inference gap of {base}",
                           found and found["reduces_inference_gap"], gap_detail, ours(family, "inference_gap"), labels,
                           paper_clear=not found or found["inference_gap_difference_clear"])
        if target == "table4":
            found = paper["findings"]["large-encoder"][paper_column]
            detail = (f"{_nats(-found['log_likelihood_loss'])} than {base}; the caption's \"by over 1 nat\" holds only "
                      f"against the best AIR row, {_label(found['best_air'], k)}: "
                      f"{found['log_likelihood_loss_vs_best_air']:.2f} nats")
            hurt = {e: None if d is None else (-d[0], d[1])
                    for e, d in ours("large-encoder", "neg_log_likelihood").items()}
            lines += claim(f"{column}, a larger encoder ({_label('large-encoder', k)}) hurts test log-likelihood",
                           found["hurts_log_likelihood"], detail, hurt, labels)
    lines += ["", "At small budgets most differences are inside the noise: an honest 'inconclusive', not a failure "
              "to reproduce."]
    return lines


def _noise(found: dict, metric: str) -> str:
    """The paper's own uncertainty when its difference is within twice its combined standard error."""
    if found[f"{metric}_difference_clear"]:
        return ""
    key = "log_likelihood_gain" if metric == "log_likelihood" else "inference_gap_reduction"
    return f"; twice its standard error: {2 * found[key + '_se']:.2f}"


def _nats(value: float, better: str = "better", worse: str = "worse") -> str:
    return f"{abs(value):.2f} nats {better if value > 0 else worse}"
