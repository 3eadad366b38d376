"""A reproduction's REPORT.md, tables (Markdown and CSV), figures and plots, rebuilt from its run
directories alone (``airvae report``): what was run and how it departs from the paper, each of the
paper's numbers beside ours, and every claim judged by [`airvae.verdicts`][]' rule."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .claims import (
    METRICS,
    ClaimLine,
    ais_beside_iwsvi,
    baseline_against_paper,
    by_seed,
    claim,
    claims_preamble,
    compare,
    compute_line,
    deviations,
    estimator_labels,
    estimators_present,
    fmt,
    mean_se,
    metric,
    paper_improvement,
    paper_text,
    seeds_note,
    selected_rows,
    sign,
    suspect_estimates,
    verdict_scope,
)
from .evaluation import EvaluationSettings, current_evaluations, evaluation_path
from .figures import FIGURES as PAPER_FIGURES
from .figures import draw_claims
from .files import read_json, read_metrics, refuse_links_under, write_text
from .manifest import manifest_jobs
from .plots import FIGURES as RUN_FIGURES
from .plots import PLOTS_DIR, plot_run
from .questions import QUESTIONS
from .runs import BEST, FINISHED, read_marker
from .runs import METRICS as METRICS_FILE
from .sweep import REGULARIZED, Job
from .targets import TARGETS, model_label, paper_tables


def collect(out_dir: Path) -> tuple[dict, list[dict]]:
    """A reproduction's manifest and its runs as rows.

    Args:
        out_dir: the reproduction's folder.

    Returns:
        ``(manifest, rows)``: one row per planned run, a dict with its ``job``
        ([`airvae.sweep.Job`][]), ``run_dir``, ``summary``, ``config``, ``failed``, ``metrics`` and
        ``evaluation`` ([`merged_evaluation`][airvae.report.merged_evaluation]; None until it is
        finished and evaluated), and for a finished run ``evaluation_seconds`` and ``devices``, the time
        and devices of its current evaluations: the rows [`airvae.claims`][] reads.
    """

    manifest = read_json(out_dir / "manifest.json")
    jobs = manifest_jobs(manifest, out_dir / "manifest.json",  # its fields name the folders read and written below
                         "restore the manifest airvae reproduce wrote, or rerun that command")
    rows = []
    for job in jobs:
        run_dir = job.run_dir(out_dir)
        summary_path, config_path = run_dir / "summary.json", run_dir / "config.json"
        summary = read_json(summary_path) if summary_path.exists() else {}
        row = {"job": job, "run_dir": run_dir, "summary": summary, "evaluation": None,
               "config": read_json(config_path) if config_path.exists() else {},
               "failed": (run_dir / "error.json").exists()}
        if summary.get("status") in FINISHED:
            current = current_evaluations(run_dir)  # read once: for the run's cost and its merged evaluation
            row["evaluation_seconds"] = sum(record.get("seconds") or 0.0 for _, record in current)
            row["devices"] = {record["device"] for _, record in current if record.get("device")}
            # when the run was created and when its evaluations were written: the reproduction's clock time
            row["span"] = ((read_marker(run_dir) or {}).get("created"), [record.get("created") for _, record in current])
            if manifest["evaluation"]:
                row["evaluation"] = merged_evaluation(run_dir, EvaluationSettings(**manifest["evaluation"]), current)
        row["metrics"] = read_metrics(run_dir / METRICS_FILE)
        rows.append(row)
    return manifest, rows


def merged_evaluation(run_dir: Path, settings: EvaluationSettings,
                      current: list[tuple[Path, dict[str, Any]]] | None = None) -> dict | None:
    """The reproduction's evaluation of a run, plus the estimators of every other current evaluation of
    the same split (e.g. AIS on 200 of the test examples that IW-SVI covers whole, or AIS added later
    with ``airvae evaluate``). Each estimate carries ``examples`` = (size of the split, max_examples),
    which lines up per-example values where two estimates are compared ([`airvae.claims.metric`][]).
    ``current``: the run's [`current_evaluations`][airvae.evaluation.current_evaluations], when the
    caller has read them already."""

    if current is None:
        current = current_evaluations(run_dir)  # the reproduction's own among them, if it is current
    own = evaluation_path(run_dir, settings)
    merged = next((stored for path, stored in current if path == own and stored["identity"] == settings.identity()),
                  None)
    if merged is None:
        return None
    n_split = merged.get("n_split")

    def tagged(record: dict) -> dict:
        examples = (record.get("n_split"), record["settings"].get("max_examples"))
        return {name: dict(estimate, examples=examples) for name, estimate in record.get("estimates", {}).items()}

    merged = dict(merged, estimates=tagged(merged))
    # estimators of other evaluations of the same split, those on the most examples first
    others = sorted((other for _, other in current if other["settings"].get("split") == settings.split
                     and other.get("n_split") == n_split), key=lambda other: -int(other.get("n") or 0))
    for other in others:
        for name, estimate in tagged(other).items():
            merged["estimates"].setdefault(name, estimate)
    return merged


def columns(manifest: dict) -> list[str]:
    target = manifest["target"]
    return manifest["datasets"] if target != "table4" else [f"k={k}" for k in TARGETS[target].ks]


def column_of(target: str, job: Job) -> str:
    """A table's column: the dataset (Table 4: ``k=K``, MNIST only)."""
    return job.dataset if target != "table4" else f"k={job.k}"


def paper_column(column: str) -> str:
    return column.split("=")[1] if column.startswith("k=") else column


def _k_of(target: str, column: str) -> int:
    return int(paper_column(column)) if target == "table4" else TARGETS[target].ks[0]


def cell_values(manifest: dict, rows: list[dict], estimators: list[str]) -> dict:
    """``(family, column, metric, estimator) -> (mean, SE over seeds)`` of the runs selected on validation;
    a column is a dataset (Table 4: ``k=K``)."""
    per_seed: dict = {}
    for r in selected_rows(manifest, rows):
        column = column_of(manifest["target"], r["job"])
        for estimator in estimators:
            for name in METRICS:
                per_seed.setdefault((r["job"].family, column, name, estimator), []).append(
                    metric(r["evaluation"], name, estimator))
    return {key: mean_se(values) for key, values in per_seed.items()}


def seed_counts(manifest: dict, rows: list[dict]) -> dict:
    """``(family, column, metric) -> seeds`` whose selected run has the metric (by IW-SVI): a cell's
    count while a reproduction is partway."""
    counts: dict = {}
    for r in selected_rows(manifest, rows):
        for name in METRICS:
            if metric(r["evaluation"], name) is not None:
                key = (r["job"].family, column_of(manifest["target"], r["job"]), name)
                counts[key] = counts.get(key, 0) + 1
    return counts


def render_table(manifest: dict, rows: list[dict]) -> tuple[str, list[list]]:
    """Markdown and CSV rows of the table, by IW-SVI (the paper's estimator): ours (mean ± standard error
    over seeds) beside the paper's (value ± as printed)."""
    target = manifest["target"]
    paper = paper_tables()[target]
    selected = selected_rows(manifest, rows)
    values = cell_values(manifest, rows, ["iwsvi"])
    counts = seed_counts(manifest, rows)
    cols = columns(manifest)
    header = ["model", "strength"] + [f"{c}: {name}" for c in cols for name in ("-ln p(x)", "Δinf", "-L_k")]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv_rows = [["model", "strength", "column", "metric", "ours_mean", "ours_se_over_seeds", "paper_value",
                 "paper_plus_minus_as_printed", "n_seeds"]]
    for family in TARGETS[target].families:
        strengths = sorted({r["job"].strength for r in selected if r["job"].family == family})
        line = [model_label(family, _k_of(target, cols[0]) if target != "table4" else 8),
                ", ".join(f"{s:g}" for s in strengths) or "-"]
        for column in cols:
            paper_cell = paper["rows"].get(family, {}).get(paper_column(column), {})
            for name in METRICS:
                ours = values.get((family, column, name, "iwsvi"))
                theirs = paper_cell.get(name)
                n = counts.get((family, column, name), 0)
                ours_text = fmt(ours) + (seeds_note(n, manifest["seeds"]) if ours else "")
                line.append(f"{ours_text} (paper {theirs[0]:.2f} ± {theirs[1]:.2f})" if theirs else ours_text)
                csv_rows.append([family, ";".join(f"{s:g}" for s in strengths), column, name,
                                 *(ours if ours else ("", "")), *(theirs if theirs else ("", "")), n])
        md.append("| " + " | ".join(line) + " |")
    return "\n".join(md), csv_rows


def table_claims(manifest: dict, rows: list[dict], estimators: list[str], labels: dict[str, str],
                 into: list[ClaimLine] | None = None) -> list[str]:
    """Every claim of a table: each AIR row against the unregularized row of its column on test
    log-likelihood, the inference gap and the amortized bound (Table 4: also the large encoder, and
    its caption's "by over 1 nat" per k), paired by seed, judged under each estimator.

    Args:
        manifest: the reproduction's manifest.
        rows: its runs ([`collect`][airvae.report.collect]).
        estimators: the log-likelihood estimators to judge under
            ([`airvae.claims.estimators_present`][]).
        labels: estimator -> its label in the report
            ([`airvae.claims.estimator_labels`][]).
        into: if given, each claim's lines are appended to it, for the claims' figure.

    Returns:
        REPORT.md lines.
    """
    target, budget = manifest["target"], manifest["budget"]
    selected = selected_rows(manifest, rows)
    quote = paper_tables()["quotes"].get(target)
    lines = [f"The paper (on this table): \"{quote}\"", ""] if quote else []
    bound_label = {"bound": "L_k (encoder q)"}

    for column in columns(manifest):
        pcol, k = paper_column(column), _k_of(target, column)
        base = model_label("plain", k)

        def seeds(family, name, estimator, column=column):
            runs = [r for r in selected if r["job"].family == family and column_of(target, r["job"]) == column]
            return by_seed(runs, lambda r: metric(r["evaluation"], name, estimator))

        for family in REGULARIZED:
            who = f"{column}, {model_label(family, k)}"
            for name, statement in (("neg_log_likelihood", f"{who} improves test log-likelihood over {base}"),
                                    ("inference_gap", f"{who} reduces the test inference gap of {base}"),
                                    ("neg_bound", f"{who} improves the test amortized bound L_{k} over {base}")):
                per = ["bound"] if name == "neg_bound" else estimators
                intervals = {e: compare(seeds("plain", name, e if e != "bound" else "iwsvi"),
                                        seeds(family, name, e if e != "bound" else "iwsvi")) for e in per}
                size = paper_improvement(target, family, "plain", pcol, name)
                lines += claim(statement, paper_text(target, family, "plain", pcol, name, k), sign(size), intervals,
                               {**labels, **bound_label}, budget, paper_size=size, into=into)
        if target == "table4":
            large = model_label("large-encoder", k)
            hurt = {e: compare(seeds("large-encoder", "neg_log_likelihood", e), seeds("plain", "neg_log_likelihood", e))
                    for e in estimators}
            lines += claim(f"{column}, a larger encoder ({large}) hurts test log-likelihood against {base}",
                           paper_text(target, "plain", "large-encoder", pcol, "neg_log_likelihood", k),
                           sign(paper_improvement(target, "plain", "large-encoder", pcol, "neg_log_likelihood")),
                           hurt, labels, budget, into=into)
            for family in ("plain",) + REGULARIZED:
                loss = paper_improvement(target, family, "large-encoder", pcol, "neg_log_likelihood")
                assert loss is not None  # Table 4 prints every row the large encoder is compared with
                over = {}
                for e in estimators:
                    a = seeds("large-encoder", "neg_log_likelihood", e)
                    shifted = {s: None if v is None else v - 1.0 for s, v in a.items()}
                    over[e] = compare(shifted, seeds(family, "neg_log_likelihood", e))
                lines += claim(f"{column}, {large} is worse than {model_label(family, k)} by over 1 nat (the "
                               "caption's words, judged per row)",
                               f"{loss:.2f} nats worse, {'over' if loss > 1 else 'not over'} 1 nat",
                               sign(loss - 1.0), over, labels, budget,
                               {e: "difference − 1 nat" for e in estimators}, into=into)
    return lines


def check_reproduction(out_dir: str | Path) -> Path:
    """``out_dir`` if it holds a reproduction (its manifest.json); a one-line error otherwise."""
    out_dir = Path(out_dir)
    if not (out_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{out_dir} has no manifest.json: it is not a directory written by "
                                "`airvae reproduce`")
    return out_dir


def render(out_dir: str | Path) -> Path:
    """Rebuild the tables, figures, plots and REPORT.md of a reproduction directory from its runs
    (``airvae report``).

    Args:
        out_dir: the reproduction's folder (it holds ``manifest.json``).

    Returns:
        The folder.

    Raises:
        FileNotFoundError: ``out_dir`` holds no reproduction.
    """

    out_dir = check_reproduction(out_dir)
    refuse_links_under(out_dir)  # nothing below is written through a link: reports, tables, figures, run plots
    manifest, rows = collect(out_dir)
    target = manifest["target"]
    failed = [r for r in rows if r["failed"]]
    finished = [r for r in rows if r["summary"].get("status") in FINISHED]
    strengths = ("Table 7's strengths (`--strengths paper`)" if manifest.get("strengths") == "paper"
                 else f"regularization grid: {manifest['grid']}")
    report = [f"# {target} at the `{manifest['budget']}` budget", "",
              f"Datasets: {', '.join(manifest['datasets'])}; seeds: {manifest['seeds']}; {strengths}; "
              f"runs: {len(rows)} ({len(finished)} finished, {len(failed)} failed, "
              f"{len(rows) - len(finished) - len(failed)} not finished).", ""]
    report += compute_line(rows)
    report += verdict_scope(manifest, rows)
    departures = deviations(manifest, rows)
    if departures:
        report += ["## Deviations from the paper's protocol", ""] + [f"- {d}" for d in departures] + [""]
    report += _evaluation_lines(manifest, rows)
    report += suspect_estimates(selected_rows(manifest, rows))
    estimators, labels = estimators_present(rows), estimator_labels(rows)
    if target in QUESTIONS:
        paths, lines = QUESTIONS[target](manifest, rows, out_dir)
        report += [f"![{path.stem}]({path.relative_to(out_dir).as_posix()})" for path in paths] + [""] + lines
    elif target.startswith("table"):
        md, csv_rows = render_table(manifest, rows)
        write_text(out_dir / f"{target}.md", md + "\n", out_dir)
        buffer = io.StringIO()
        csv.writer(buffer).writerows(csv_rows)
        write_text(out_dir / f"{target}.csv", buffer.getvalue(), out_dir)
        report += ["## Table", "", "Ours by IW-SVI: mean ± standard error over seeds. The paper's: value ± as "
                   "printed (the paper does not say what its ± values are).", "", md, ""]
        report += baseline_against_paper(target, cell_values(manifest, rows, ["iwsvi"]),
                                         [paper_column(c) for c in columns(manifest)] if target != "table4" else [],
                                         TARGETS[target].ks[0], seed_counts(manifest, rows), manifest["seeds"])
        report += ais_beside_iwsvi(selected_rows(manifest, rows))
        report += ["## Claims", ""]
        report += claims_preamble(labels, estimators, manifest["budget"])
        drawn: list[ClaimLine] = []
        report += table_claims(manifest, rows, estimators, labels, into=drawn)
        if any(line.interval is not None for line in drawn):
            draw_claims(drawn, out_dir / "claims.png")
            report += ["", "Each claim's intervals, drawn (the paper's difference as a diamond beside its own "
                       "estimator's interval):", "", "![claims](claims.png)", ""]
    else:

        paths, claims = PAPER_FIGURES[target](manifest, rows, out_dir)
        report += [f"![{path.stem}]({path.relative_to(out_dir).as_posix()})" for path in paths]
        report += ["", "## Claims", ""]
        if manifest["evaluation"]:
            report += claims_preamble(labels, estimators, manifest["budget"])
        report += claims
    report += bdmc_section(rows)
    report += ["", *plots_section(out_dir, manifest, rows)]
    if failed:
        report += ["", "## Failed runs", ""] + [f"- `{r['job'].name}`: see `runs/{r['job'].name}/error.json`"
                                                 for r in failed]  # relative: the same report from a bundle
    write_text(out_dir / "REPORT.md", "\n".join(report) + "\n", out_dir)
    return out_dir


def _evaluation_lines(manifest: dict, rows: list[dict]) -> list[str]:
    lines = []
    if manifest["evaluation"]:
        ev = manifest["evaluation"]
        iwae = f" and IWAE-{ev['k_iwae']} with the encoder" if "iwae" in ev["estimators"] else ""
        # how many examples there really were
        done: dict[str, Any] = next((r["evaluation"] for r in rows if r["evaluation"]), {})
        n, n_split = done.get("n"), done.get("n_split")
        if n is not None and n == n_split:
            examples = f"all {n} test examples"
        elif n is not None:
            examples = f"{n} of the {n_split} test examples, spread evenly"
        else:
            examples = (f"{ev['max_examples']} test examples, spread evenly" if ev["max_examples"]
                        else "all test examples")
        chosen = ("strengths as the paper selected them (Table 7)" if manifest.get("strengths") == "paper"
                  else "strengths selected on the validation estimate only")
        lines += [f"Test evaluation: IW-SVI with k={ev['svi_k']}, l={ev['svi_l']}, T={ev['svi_steps']} "
                  f"(paper: k=5000, l=8, T=3000){iwae} on {examples}; {chosen}.", ""]
    if manifest.get("study"):
        st = manifest["study"]
        lines += [f"Figure 3 on the seed-0 VAE of each dataset, {st['max_examples'] or 'all'} test examples: IWAE-k "
                  f"for k in {st['ks']}; IW-SVI (k={st['svi_k']}, l={st['l']}) for T in {st['steps_list']}; "
                  f"IW-SVI (T={st['fixed_steps']}) for each k (paper: k up to 100000, T up to 3000, T = 3000).", ""]
    if manifest.get("extra_evaluation"):
        ev = manifest["extra_evaluation"]
        where = (f"{ev['max_examples']} of the test examples, spread evenly" if ev.get("max_examples")
                 else "the same test examples")
        lines += [f"Also on the evaluated models, on {where}: {', '.join(ev['estimators'])} "
                  f"(AIS/BDMC: {ev.get('ais_intermediate', 500)} intermediate distributions, "
                  f"{ev.get('ais_chains', 16)} chains; BDMC on {ev.get('bdmc_examples', 100)} examples simulated "
                  "from each model).", ""]
    return lines


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


def plots_section(out_dir: Path, manifest: dict, rows: list[dict]) -> list[str]:
    """``airvae plot`` of the lowest seed of every configuration selected on validation (redrawn only
    when its metrics or best checkpoint changed), linked from a table."""

    shown: dict = {}
    for r in selected_rows(manifest, rows):
        job = r["job"]
        key = (job.dataset, job.family, job.k, job.m)
        if r["summary"] and (key not in shown or job.seed < shown[key]["job"].seed):
            shown[key] = r
    if not shown:
        return []
    lines = ["## Plots of the selected runs", "",
             "Lowest seed of each configuration selected on validation (`airvae plot RUN` draws any run).", "",
             "| run | " + " | ".join(RUN_FIGURES) + " |", "|---|" + "---|" * len(RUN_FIGURES)]
    for r in shown.values():
        plots_dir = r["run_dir"] / PLOTS_DIR
        inputs = [r["run_dir"] / name for name in (METRICS_FILE, BEST)]
        marker = plots_dir / "curves.json"
        if not marker.exists() or any(p.exists() and p.stat().st_mtime > marker.stat().st_mtime for p in inputs):
            plot_run(r["run_dir"], device="cpu")
        cells = [f"[png]({(plots_dir / f'{name}.png').relative_to(out_dir).as_posix()})"
                 if (plots_dir / f"{name}.png").exists() else "–" for name in RUN_FIGURES]
        lines.append(f"| `{r['job'].name}` | " + " | ".join(cells) + " |")
    return lines
