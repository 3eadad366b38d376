"""The paper's Tables 1-4 and Figures 1, 2, 4, regenerated at any budget, each beside the paper's
own numbers, with a REPORT.md saying which claims the run supports.

``reproduce`` plans a sweep, runs it (train; select the regularization strength on validation;
evaluate on test), and calls ``render``; ``render`` (``airvae report``) rebuilds every table and
figure from the run directories alone.
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

from .runs import LOCK, RunError, RunLock, check_unlocked, read_json, read_metrics, write_json
from .sweep import PAPER_GRID, REGULARIZED, Job, Task, run_tasks, select_strengths

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


TARGETS = {
    "table1": Target(ks=(1,)),
    "table2": Target(ks=(8,)),
    "table3": Target(ks=(64,)),
    "table4": Target(ks=(1, 8, 64), families=("large-encoder",) + TABLE_FAMILIES, datasets=("mnist",)),
    "figure1": Target(ks=(1,), evaluate_all=True),
    "figure2": Target(ks=(1, 8, 64), evaluate_all=True),
    "figure4": Target(ks=(1, 8), families=("plain", "denoise-1.0"), ms=(1, 8), track_test=True),
}

# Evaluation effort per budget (EvaluationSettings fields). "paper" is appendix C exactly.
EVALUATION_BUDGETS = {
    "smoke": dict(k_iwae=16, svi_k=16, svi_l=2, svi_steps=5, max_examples=32),
    "quick": dict(k_iwae=500, svi_k=500, svi_l=8, svi_steps=200, max_examples=500),
    "paper": dict(k_iwae=5000, svi_k=5000, svi_l=8, svi_steps=3000, max_examples=None),
}
# Strengths swept per budget; quick spans the range Table 7 selected (2.5-15) with two points.
GRIDS = {"smoke": (5.0,), "quick": (5.0, 10.0), "paper": PAPER_GRID}
TRACKED_TEST_EXAMPLES = {"smoke": 32, "quick": 500, "paper": 2000}


def paper_tables() -> dict:
    return json.loads(resources.files("airvae").joinpath("paper_results/paper_tables.json").read_text())


# A reproduction larger than this is almost certainly a typo (--seeds 1e6): refused before planning.
MAX_PLANNED_RUNS = 10_000


def plan(target: str, datasets: list[str], budget: str, seeds: int, grid: tuple[float, ...] | None = None) -> list[Job]:
    """The training jobs of a reproduction."""
    spec = TARGETS[target]
    grid = tuple(grid or GRIDS[budget])
    per_seed = len(datasets) * len(spec.ks) * len(spec.ms) * sum(
        len(grid) if family in REGULARIZED and target != "figure4" else 1 for family in spec.families)
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
                        strengths = (0.0,)
                    elif target == "figure4":  # the paper's validated strength, not a sweep
                        strengths = (table7[family][str(min(k, 64))].get(dataset, 5.0),)
                    else:
                        strengths = grid
                    for strength in strengths:
                        for seed in range(seeds):
                            jobs.append(Job(family, dataset, k, m, strength, seed, budget,
                                            TRACKED_TEST_EXAMPLES[budget] if spec.track_test else 0))
    return jobs


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
        check_training_inputs(job.run_config(dataset.dim, data_dir, device), dataset)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"--out {out_dir} is a file; choose a folder")
    if not out_dir.is_dir():
        return
    if any(p.name != LOCK for p in out_dir.iterdir()) and not (out_dir / "manifest.json").exists():
        raise RunError(f"--out {out_dir} is not empty and holds no airvae reproduction (manifest.json); "
                       "choose a new or empty folder")
    check_unlocked(out_dir)  # refused at once while another reproduction writes here


def reproduce(target: str, datasets: list[str], budget: str, seeds: int, executor, out_dir: Path, *,
              grid: tuple[float, ...] | None = None, data_dir: str | None = None, device: str = "auto",
              progress: bool = True) -> list[dict]:
    """Train, select on validation, evaluate on test, render. Idempotent: re-running skips
    finished work and resumes interrupted runs. Everything is checked before anything is written,
    and the output folder is locked against a second reproduction. Returns the results of the
    runs that did not finish (status "failed" or "locked"), each with its ``name`` and ``error``."""
    if target not in TARGETS:
        raise ValueError(f"invalid target = {target!r}: allowed {', '.join(TARGETS)}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    jobs = plan(target, datasets, budget, seeds, grid)
    check_jobs(jobs, data_dir, device)
    spec = TARGETS[target]
    evaluation = None
    if not spec.track_test:
        evaluation = dict(EVALUATION_BUDGETS[budget], split="test", estimators=("bound", "iwsvi", "gap"))
    manifest = {"target": target, "datasets": datasets, "budget": budget, "seeds": seeds,
                "grid": list(grid or GRIDS[budget]), "evaluation": evaluation, "jobs": [asdict(j) for j in jobs]}
    with RunLock(out_dir):
        write_json(out_dir / "manifest.json", manifest)
        log = out_dir / "sweep.jsonl"
        make = lambda job, ev=None: Task(job, str(out_dir), data_dir, device, ev)  # noqa: E731
        if spec.evaluate_all:
            results = run_tasks([make(job, evaluation) for job in jobs], executor, log, progress, "train+evaluate")
        else:
            results = run_tasks([make(job) for job in jobs], executor, log, progress, "train")
            if evaluation is not None:
                chosen = select_strengths(results)
                selected = [job for job in jobs if chosen[(job.dataset, job.family, job.k, job.m)] == job.strength]
                trained_ok = {r["name"] for r in results if r["status"] == "ok"}
                results += run_tasks([make(job, evaluation) for job in selected if job.name in trained_ok],
                                     executor, log, progress, "evaluate (test)")
        render(out_dir)
    return [r for r in results if r["status"] != "ok"]


# ----------------------------------------------------------------------------------------------
# Rendering: everything below reads run directories only.


def _collect(out_dir: Path) -> tuple[dict, list[dict]]:
    from .evaluation import EvaluationSettings, stored_evaluation

    manifest = read_json(out_dir / "manifest.json")
    rows = []
    for job_fields in manifest["jobs"]:
        job = Job(**job_fields)
        run_dir = out_dir / "runs" / job.name
        summary_path = run_dir / "summary.json"
        summary = read_json(summary_path) if summary_path.exists() else {}
        row = {"job": job, "run_dir": run_dir, "summary": summary, "evaluation": None,
               "failed": (run_dir / "error.json").exists()}
        if manifest["evaluation"] and summary.get("status") in ("completed", "early-stopped"):
            settings = EvaluationSettings(**manifest["evaluation"])
            row["evaluation"] = stored_evaluation(run_dir, settings)
        metrics = run_dir / "metrics.jsonl"
        row["metrics"] = read_metrics(metrics)
        rows.append(row)
    return manifest, rows


def _metric(evaluation: dict | None, name: str) -> float | None:
    """Positive-nats view used by the paper: -ln p(x), Delta_inf, -L_k."""
    if not evaluation:
        return None
    estimates = evaluation["estimates"]
    if name == "neg_log_likelihood" and "iwsvi" in estimates:
        return -estimates["iwsvi"]["mean"]
    if name == "inference_gap" and "gap" in estimates:
        return estimates["gap"]["mean"]
    if name == "neg_bound" and "bound" in estimates:
        return -estimates["bound"]["mean"]
    return None


def _mean_se(values: list[float]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.fmean(values), se


def _fmt(cell: tuple[float, float] | None) -> str:
    if cell is None:
        return "n/a"
    mean, se = cell
    return f"{mean:.2f}" if math.isnan(se) else f"{mean:.2f} ± {se:.2f}"


def _label(family: str, k: int) -> str:
    return FAMILY_LABELS[family].format(base="VAE" if k == 1 else "IWAE")


def _selected_rows(manifest: dict, rows: list[dict]) -> list[dict]:
    trained = [{"job": asdict(r["job"]), "status": "ok" if r["summary"] else "failed", "summary": r["summary"]}
               for r in rows]
    chosen = select_strengths(trained)
    return [r for r in rows if chosen[(r["job"].dataset, r["job"].family, r["job"].k, r["job"].m)] == r["job"].strength]


def render_table(manifest: dict, rows: list[dict]) -> tuple[str, list[list], dict]:
    """Markdown, CSV rows and the cell values: ours (mean ± SE over seeds) beside the paper's."""
    target = manifest["target"]
    paper = paper_tables()[target]
    metrics = ("neg_log_likelihood", "inference_gap", "neg_bound")
    selected = _selected_rows(manifest, rows)
    cells: dict = {}
    for r in selected:
        job = r["job"]
        column = job.dataset if target != "table4" else f"k={job.k}"
        key = (job.family, job.k if target != "table4" else 0, column)
        for metric in metrics:
            cells.setdefault(key + (metric,), []).append(_metric(r["evaluation"], metric))
    columns = manifest["datasets"] if target != "table4" else [f"k={k}" for k in TARGETS[target].ks]
    k_table = TARGETS[target].ks[0]
    header = ["model", "strength"] + [f"{c}: {name}" for c in columns for name in ("-ln p(x)", "Δinf", "-L_k")]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv_rows = [["model", "strength", "column", "metric", "ours_mean", "ours_se", "paper_mean", "paper_se", "n_seeds"]]
    values = {}
    for family in TARGETS[target].families:
        strengths = sorted({r["job"].strength for r in selected if r["job"].family == family})
        line = [_label(family, k_table if target != "table4" else 8), ", ".join(f"{s:g}" for s in strengths) or "-"]
        for column in columns:
            paper_key = column if target != "table4" else column.split("=")[1]
            paper_cell = paper["rows"].get(family, {}).get(paper_key, {})
            for metric in metrics:
                k_key = k_table if target != "table4" else 0
                ours = _mean_se(cells.get((family, k_key, column, metric), []))
                theirs = paper_cell.get(metric)
                values[(family, column, metric)] = ours
                line.append(f"{_fmt(ours)} (paper {theirs[0]:.2f} ± {theirs[1]:.2f})" if theirs else _fmt(ours))
                n = len([v for v in cells.get((family, k_key, column, metric), []) if v is not None])
                csv_rows.append([family, ";".join(f"{s:g}" for s in strengths), column, metric,
                                 *(ours if ours else ("", "")), *(theirs if theirs else ("", "")), n])
        md.append("| " + " | ".join(line) + " |")
    return "\n".join(md), csv_rows, values


def render(out_dir: str | Path) -> Path:
    """Rebuild the tables, figures and REPORT.md of a reproduction directory from its runs."""
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
    deviations = {r["summary"].get("data_deviation") for r in rows if r["summary"].get("data_deviation")}
    report += [f"**Data deviation:** {d}" for d in deviations] + ([""] if deviations else [])
    if manifest["evaluation"]:
        ev = manifest["evaluation"]
        report += [f"Test evaluation: IW-SVI with k={ev['svi_k']}, l={ev['svi_l']}, T={ev['svi_steps']} "
                   f"(paper: k=5000, l=8, T=3000) on {ev['max_examples'] or 'all'} test examples; "
                   "strengths selected on the validation estimate only.", ""]
    if target.startswith("table"):
        md, csv_rows, values = render_table(manifest, rows)
        (out_dir / f"{target}.md").write_text(md + "\n")
        buffer = io.StringIO()
        csv.writer(buffer).writerows(csv_rows)
        (out_dir / f"{target}.csv").write_text(buffer.getvalue())
        report += ["## Table (ours, mean ± SE over seeds, beside the paper's)", "", md, "", "## Claims", ""]
        report += _table_claims(target, manifest, values)
    else:
        from .figures import FIGURES

        path, claims = FIGURES[target](manifest, rows, out_dir)
        report += [f"![{target}]({path.name})", "", "## Claims", ""] + claims
    if failed:
        report += ["", "## Failed runs", ""] + [f"- `{r['job'].name}`: see `{r['run_dir'] / 'error.json'}`" for r in failed]
    (out_dir / "REPORT.md").write_text("\n".join(report) + "\n")
    return out_dir


def verdict(improvement: tuple[float, float] | None, other_se: float = 0.0) -> str:
    """'supports' if the improvement exceeds twice its standard error, 'contradicts' if it is
    below minus that, otherwise 'inconclusive'."""
    if improvement is None:
        return "cannot tell (missing numbers)"
    diff, se = improvement
    se = math.hypot(0 if math.isnan(se) else se, other_se)
    if se == 0:
        return "supports" if diff > 0 else "contradicts"
    return "supports" if diff > 2 * se else "contradicts" if diff < -2 * se else "inconclusive"


def _difference(a, b):
    if a is None or b is None:
        return None
    se = math.hypot(0 if math.isnan(a[1]) else a[1], 0 if math.isnan(b[1]) else b[1])
    return a[0] - b[0], se


def _table_claims(target: str, manifest: dict, values: dict) -> list[str]:
    lines = []
    columns = manifest["datasets"] if target != "table4" else [f"k={k}" for k in TARGETS[target].ks]
    for column in columns:
        base = values.get(("plain", column, "neg_log_likelihood"))
        for family in ("denoise-0.5", "denoise-1.0", "wni"):
            ours = values.get((family, column, "neg_log_likelihood"))
            gain = _difference(base, ours)
            text = "n/a" if gain is None else f"{gain[0]:+.2f} ± {gain[1]:.2f} nats"
            lines.append(f"- {column}, {family}: AIR improves test log-likelihood over the baseline "
                         f"(paper: yes) — gain {text}: **{verdict(gain)}**")
            gap_gain = _difference(values.get(("plain", column, "inference_gap")),
                                   values.get((family, column, "inference_gap")))
            gtext = "n/a" if gap_gain is None else f"{gap_gain[0]:+.2f} ± {gap_gain[1]:.2f} nats"
            lines.append(f"- {column}, {family}: AIR reduces the test inference gap — reduction {gtext}: "
                         f"**{verdict(gap_gain)}**")
        if target == "table4":
            large = _difference(values.get(("large-encoder", column, "neg_log_likelihood")), base)
            text = "n/a" if large is None else f"{large[0]:+.2f} ± {large[1]:.2f} nats"
            lines.append(f"- {column}: a larger encoder hurts test log-likelihood (paper: by over 1 nat) — "
                         f"loss {text}: **{verdict(large)}**")
    lines += ["", "A verdict needs the difference to exceed twice its standard error; at small budgets most "
              "differences are inside the noise, which is an honest 'inconclusive', not a failure to reproduce."]
    return lines
