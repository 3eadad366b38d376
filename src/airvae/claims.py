"""From a reproduction's runs to judged claims: per-run metrics under each log-likelihood estimator,
per-seed paired comparisons ([`airvae.verdicts`][]' rule), the paper's finding for the same cell
beside ours, estimates that cannot be right, and every way the budget departs from appendix E.

A *row* is one run of a reproduction as [`airvae.report.collect`][] reads it: ``job``
([`airvae.sweep.Job`][]), ``run_dir``, ``summary``, ``config`` (its config.json, or {}),
``metrics`` and ``evaluation`` (the test evaluation with every estimator merged in, or None).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from .config import BUDGETS, PAPER_SCHEDULES
from .data import evenly_spaced
from .runs import FINISHED
from .sweep import PAPER_GRID, select_strengths
from .targets import TARGETS, model_label, paper_tables
from .verdicts import CONTRADICTS, SUPPORTS, Interval, decide, paired_differences, paired_interval

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
# Appendix C and E's evaluation and early stopping (what deviations are measured against).
PAPER_EVALUATION = {"svi_k": 5000, "svi_l": 8, "svi_steps": 3000, "k_iwae": 5000, "val_k": 5000}


# ----------------------------------------------------------------------------------------------
# One run's numbers


def examples_of(estimate: dict) -> tuple[int, int | None] | None:
    """``(size of the split, max_examples)`` an estimate was computed on (set when evaluations are merged:
    [`airvae.report.merged_evaluation`][]); None when unknown (then it is the evaluation's own examples)."""
    return estimate.get("examples")


def _aligned(a: dict, b: dict) -> list[tuple[float, float]] | None:
    """Per-example pairs (a, b) over the examples ``a`` was computed on (all of them also in ``b``);
    None when the two cannot be aligned (no per-example values, or other examples)."""
    ea, eb = examples_of(a), examples_of(b)
    if ea == eb and a.get("n") == b.get("n") and "values" in a and "values" in b:
        return list(zip(a["values"], b["values"], strict=True))
    if ea is None or eb is None or ea[0] != eb[0] or "values" not in a or "values" not in b:
        return None
    where = {int(i): j for j, i in enumerate(evenly_spaced(eb[0], eb[1]))}
    indices = evenly_spaced(ea[0], ea[1])
    if not all(int(i) in where for i in indices):
        return None
    return [(va, b["values"][where[int(i)]]) for va, i in zip(a["values"], indices, strict=True)]


def metric(evaluation: dict | None, name: str, estimator: str = "iwsvi") -> float | None:
    """A run's number in the paper's positive-nats view.

    Args:
        evaluation: the run's evaluation record (None: not evaluated).
        name: ``neg_log_likelihood`` (-ln p(x) by ``estimator``), ``inference_gap`` (ln p(x) - L_k on
            the estimator's own examples) or ``neg_bound`` (-L_k).
        estimator: ``iwsvi``, ``iwae`` or ``ais``.

    Returns:
        The number, in nats; None when the evaluation lacks it.
    """
    estimates = (evaluation or {}).get("estimates") or {}
    bound = estimates.get("bound")
    if name == "neg_bound":
        return None if bound is None else -bound["mean"]
    estimate = estimates.get(estimator)
    if estimate is None:
        return None
    if name == "neg_log_likelihood":
        return -estimate["mean"]
    if bound is None:
        return None
    if examples_of(estimate) == examples_of(bound) and estimate.get("n") == bound.get("n"):
        return estimate["mean"] - bound["mean"]
    pairs = _aligned(estimate, bound)
    return None if not pairs else statistics.fmean(a - b for a, b in pairs)


def estimators_present(rows: list[dict]) -> list[str]:
    """The log-likelihood estimators any run's evaluation holds, in canonical order (IW-SVI if none)."""
    held = {name for r in rows for name in ((r.get("evaluation") or {}).get("estimates") or {})}
    return [e for e in ESTIMATOR_MEANINGS if e in held] or ["iwsvi"]


def estimator_labels(rows: list[dict]) -> dict[str, str]:
    """Short labels with the settings, e.g. ``IW-SVI (k=500, l=8, T=200)``, ``IWAE-500 (encoder q)``,
    and the examples when an estimator covers fewer than the evaluation (``AIS (...) on 200 of 2307``)."""
    labels = {"iwsvi": "IW-SVI", "iwae": "IWAE-k (encoder q)", "ais": "AIS"}
    for r in rows:
        evaluation = r.get("evaluation") or {}
        for name, est in (evaluation.get("estimates") or {}).items():
            s = est.get("settings", {})
            subset = ""
            if est.get("n") is not None and evaluation.get("n_split") and est["n"] < evaluation["n_split"] \
                    and est["n"] != evaluation.get("n"):
                subset = f" on {est['n']} of the {evaluation['n_split']} test examples"
            if name == "iwsvi":
                labels[name] = f"IW-SVI (k={s.get('k')}, l={s.get('l')}, T={s.get('steps')})"
            elif name == "iwae":
                labels[name] = f"IWAE-{s.get('k')} (encoder q)"
            elif name == "ais":
                labels[name] = f"AIS (T={s.get('num_intermediate')}, {s.get('chains')} chains){subset}"
    return labels


def mean_se(values: Sequence[float | None]) -> tuple[float, float] | None:
    """Mean and standard error over seeds (NaN error for one seed); None for none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    se = statistics.stdev(finite) / math.sqrt(len(finite)) if len(finite) > 1 else float("nan")
    return statistics.fmean(finite), se


def fmt(cell: tuple[float, float] | None, digits: int = 2) -> str:
    if cell is None:
        return "n/a"
    mean, se = cell
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def selected_rows(manifest: dict, rows: list[dict]) -> list[dict]:
    """The runs at the strength selected on validation per (dataset, family, k, m), as the sweep
    selects ([`airvae.sweep.select_strengths`][]); only finished runs compete."""
    trained = [{"job": asdict(r["job"]), "summary": r["summary"],
                "status": "ok" if r["summary"].get("status") in FINISHED else "failed"} for r in rows]
    chosen = select_strengths(trained)
    return [r for r in rows if chosen[(r["job"].dataset, r["job"].family, r["job"].k, r["job"].m)] == r["job"].strength]


def by_seed(rows: list[dict], value) -> dict[int, float | None]:
    """``{seed: value(row)}`` of rows that share everything but the seed."""
    return {r["job"].seed: value(r) for r in rows}


def compare(better: Mapping[int, float | None], worse: Mapping[int, float | None]) -> Interval | None:
    """The paired interval of ``better[seed] - worse[seed]`` over the seeds both have."""
    return paired_interval(paired_differences(better, worse))


# ----------------------------------------------------------------------------------------------
# Claims in REPORT.md


def claims_preamble(labels: dict[str, str], estimators: list[str], budget: str | None = None) -> list[str]:
    """What each estimator measures and how a verdict is reached (REPORT.md, above the claims)."""
    lines = ["Each claim is judged under every log-likelihood estimator this folder holds:", ""]
    lines += [f"- **{labels[e]}** {ESTIMATOR_MEANINGS[e]}." for e in estimators]
    lines += ["", "Differences are oriented so that **positive = the regularized (or claimed-better) model is "
              "better**, paired by seed (runs of one seed share initialization, minibatch order and training "
              "draws) and computed on the same test examples; each is given as the mean over seeds with its 95% "
              "t interval (n_seeds − 1 degrees of freedom). The rule (docs/decision-rule.md): **supports** = the "
              "interval lies on the side of zero the paper's own difference lies on, **contradicts** = on the "
              "other side, **inconclusive** = it contains zero; where the paper has no number, the statement "
              "itself is judged (**holds here** / **does not hold here**). A verdict needs 3 or more seeds and a "
              "budget that can test the claim; under no true effect it errs 5% of the time per claim. Beside "
              "the intervals by the paper's own estimators (IW-SVI, and the encoder's L_k), the report also says "
              "where the paper's difference lies: **inside** the interval (our seeds are compatible with its "
              "size) or **above**/**below** it (they exclude that size, with the same 5% error if it is the true "
              "one; the paper's own uncertainty, which it does not define, is left out). Δinf = "
              "ln p(x) − L_k takes ln p(x) from each estimator and L_k from the encoder. Where estimators "
              "disagree, the report says so and picks none: they answer different questions.", ""]
    return lines


def judged(interval: Interval | None, paper_sign: int, budget: str | None) -> str:
    """The rule's word for ``interval``, against the paper's sign for the cell.

    Args:
        interval: oriented: positive = the statement's direction.
        paper_sign: +1 the paper found the statement's direction, -1 the opposite, 0 the paper has no
            number (the statement itself is then judged: "holds here" or "does not hold here").
        budget: the runs' budget.

    Returns:
        [`decide`][airvae.verdicts.decide]'s word, oriented to the paper's finding.
    """
    if interval is not None and paper_sign < 0:
        interval = Interval(-interval.mean, interval.se, -interval.high, -interval.low, interval.n,
                            tuple(-d for d in interval.differences))
    word = decide(interval, budget)
    if paper_sign == 0:
        word = {SUPPORTS: "holds here", CONTRADICTS: "does not hold here"}.get(word, word)
    return word


@dataclass(frozen=True)
class ClaimLine:
    """One estimator's line of a claim, as [`claim`][airvae.claims.claim] writes it: what the claims'
    figure draws ([`airvae.figures.draw_claims`][])."""

    statement: str
    estimator: str  # its label in the report
    interval: Interval | None
    paper_size: float | None  # the paper's difference, where this estimator is the paper's; else None
    verdict: str


def claim(statement: str, paper_text: str, paper_sign: int, intervals: dict, labels: dict[str, str],
          budget: str | None, details: dict[str, str] | None = None, paper_size: float | None = None,
          into: list[ClaimLine] | None = None) -> list[str]:
    """One claim: the statement with the paper's finding for the cell (``paper_text``, its sign
    ``paper_sign``: see [`judged`][airvae.claims.judged]), then per estimator our paired interval and the verdict, and a
    flag when one estimator supports the paper where another contradicts it. With ``paper_size`` (the
    paper's difference, oriented as the intervals), the intervals of the estimators the paper used
    (``PAPERS_ESTIMATORS``) also say whether the paper's size lies inside them ([`size_against`][airvae.claims.size_against]).
    Each estimator's line is also appended to ``into``, if given."""
    lines = [f"- {statement}: paper: {paper_text}"]
    verdicts = {}
    for estimator, interval in intervals.items():
        verdicts[estimator] = judged(interval, paper_sign, budget)
        text = "n/a" if interval is None else interval.text()
        papers = paper_size if estimator in PAPERS_ESTIMATORS else None
        if papers is not None:
            text += size_against(interval, papers)
        if into is not None:
            into.append(ClaimLine(statement, labels[estimator], interval, papers, verdicts[estimator]))
        extra = f" ({details[estimator]})" if details and estimator in details else ""
        lines.append(f"  - {labels[estimator]}: {text}{extra}: **{verdicts[estimator]}**")
    words = set(verdicts.values())
    if ({SUPPORTS, CONTRADICTS} <= words) or ({"holds here", "does not hold here"} <= words):
        split = ", ".join(f"{labels[e]} {v}" for e, v in verdicts.items())
        lines.append(f"  - ⚠ **estimators disagree** ({split}): they measure different things (above); "
                     "the report does not pick one.")
    return lines


# The estimators behind the paper's numbers: IW-SVI for ln p(x) and the gap, the encoder's bound for L_k.
PAPERS_ESTIMATORS = ("iwsvi", "bound")


def size_against(interval: Interval | None, paper_size: float) -> str:
    """``, the paper's +0.50 above it``: where the paper's difference lies against our interval (from two
    seeds). Outside it, our seeds exclude the paper's size at the interval's level (the same 5% error
    under a true difference of that size as the verdict's under none, ignoring the paper's own
    uncertainty, which it does not define); inside it, they are compatible with it."""
    if interval is None or math.isnan(interval.se):
        return ""
    where = "above" if paper_size > interval.high else "below" if paper_size < interval.low else "inside"
    return f", the paper's {paper_size:+.2f} {where} it"


def sign(value: float | None) -> int:
    return 0 if value is None or value == 0 else (1 if value > 0 else -1)


def paper_cell(target: str, family: str, column: str, metric_name: str) -> tuple[float, float] | None:
    """The paper's printed (value, ±) for a cell; None where it has none."""
    cell = paper_tables()[target]["rows"].get(family, {}).get(column, {}).get(metric_name)
    return tuple(cell) if cell else None


def paper_improvement(target: str, family: str, base: str, column: str, metric_name: str) -> float | None:
    """How much better the paper's ``family`` row is than its ``base`` row in a column, in nats
    (positive = ``family`` better: lower -ln p(x), smaller gap, lower -L_k); None without numbers."""
    a, b = paper_cell(target, family, column, metric_name), paper_cell(target, base, column, metric_name)
    return None if a is None or b is None else round(b[0] - a[0], 2)


def paper_text(target: str, family: str, base: str, column: str, metric_name: str, k: int) -> str:
    """``+0.50 nats (108.64 ± 0.19 vs 109.14 ± 0.28, ± as printed)`` or why there is no number."""
    a, b = paper_cell(target, family, column, metric_name), paper_cell(target, base, column, metric_name)
    if a is None or b is None:
        return "no published number for this cell"
    names = {"neg_log_likelihood": "−ln p(x)", "inference_gap": "Δinf", "neg_bound": "−L_k"}
    return (f"{b[0] - a[0]:+.2f} nats ({names[metric_name]} {a[0]:.2f} ± {a[1]:.2f} for {model_label(family, k)} "
            f"vs {b[0]:.2f} ± {b[1]:.2f}; ± as printed)")


# ----------------------------------------------------------------------------------------------
# What the report must say besides the claims


def suspect_estimates(rows: list[dict]) -> list[str]:
    """REPORT.md lines naming estimates that cannot be right for a converged estimator: a negative
    mean inference gap (IW-SVI, which starts from the encoder's q, below the amortized bound L_k)
    and AIS below IW-SVI by more than twice the standard error of their paired per-example
    difference (both are stochastic lower bounds: the lower one is the less converged)."""
    lines = []
    for r in rows:
        estimates = (r.get("evaluation") or {}).get("estimates") or {}
        gap = estimates.get("gap")
        if gap is not None and gap["mean"] < 0:
            lines.append(f"- `{r['job'].name}`: mean inference gap {gap['mean']:+.2f} nats (IW-SVI below the "
                         "amortized bound L_k): IW-SVI has not converged; evaluate with more steps "
                         "(`airvae evaluate RUN --svi-steps ...`, appendix C uses 3000).")
        ais, svi = estimates.get("ais"), estimates.get("iwsvi")
        pairs = _aligned(ais, svi) if ais is not None and svi is not None else None
        if pairs and len(pairs) > 1:
            diffs = [a - b for a, b in pairs]
            mean, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
            if mean + 2 * se < 0:
                lines.append(f"- `{r['job'].name}`: AIS is {-mean:.2f} ± {se:.2f} nats below IW-SVI on the same "
                             f"{len(pairs)} examples: AIS has not converged; rerun it with more intermediate "
                             "distributions (`--ais-intermediate`) or chains (`--ais-chains`).")
    if lines:
        lines = ["## ⚠ Estimates that cannot be right", "",
                 "These numbers are reported below as computed, but they come from an estimator that has not "
                 "converged; claims resting on them are not trustworthy until they are recomputed:", ""] + lines + [""]
    return lines


def ais_beside_iwsvi(rows: list[dict]) -> list[str]:
    """REPORT.md lines: per model (over seeds), AIS minus IW-SVI on the examples AIS was run on,
    paired per example within each run. Both are stochastic lower bounds on ln p(x): where AIS is
    higher, IW-SVI falls short of ln p(x) by at least that much (its slack), which bounds how far
    an IW-SVI difference between two models can be trusted."""
    per_model: dict = {}
    for r in rows:
        estimates = (r.get("evaluation") or {}).get("estimates") or {}
        if "ais" not in estimates or "iwsvi" not in estimates:
            continue
        pairs = _aligned(estimates["ais"], estimates["iwsvi"])
        if pairs:
            key = (r["job"].dataset, r["job"].family, r["job"].k, r["job"].strength)
            per_model.setdefault(key, {})[r["job"].seed] = (statistics.fmean(a - b for a, b in pairs), len(pairs))
    if not per_model:
        return []
    lines = ["## AIS beside IW-SVI on the same test examples", "",
             "AIS − IW-SVI in nats, per example of the examples AIS was run on, averaged per run; mean over "
             "seeds with its 95% t interval. Both are lower bounds on ln p(x) up to their noise: a positive "
             "difference is IW-SVI's slack there, at least.", "",
             "| model | strength | AIS − IW-SVI (nats) | examples | seeds |", "|---|---|---|---|---|"]
    for (dataset, family, k, strength), seeds in sorted(per_model.items()):
        interval = paired_interval([d for d, _ in seeds.values()])
        n = next(iter(seeds.values()))[1]
        text = "n/a" if interval is None else interval.text(unit="")
        lines.append(f"| {dataset}, {model_label(family, k)} | {strength:g} | {text} | {n} | {len(seeds)} |")
    return lines + [""]


def seeds_note(n: int, seeds: int) -> str:
    """`` [2 of 3 seeds]`` beside a cell that holds fewer seeds than its reproduction asks for (one that
    is partway); nothing once it holds them all."""
    return f" [{n} of {seeds} seeds]" if n < seeds else ""


def baseline_against_paper(target: str, values: dict, columns: list[str], k: int, counts: dict | None = None,
                           seeds: int = 0) -> list[str]:
    """REPORT.md lines: our unregularized model against the paper's, cell by cell (ours: mean ± SE over
    seeds, with ``counts[(family, column, metric)]`` of ``seeds`` where fewer; the paper's ± as printed)."""
    lines = []
    names = {"neg_log_likelihood": "−ln p(x)", "inference_gap": "Δinf", "neg_bound": "−L_k"}
    for column in columns:
        cells = []
        for name, label in names.items():
            ours, theirs = values.get(("plain", column, name, "iwsvi")), paper_cell(target, "plain", column, name)
            if ours and theirs:
                note = seeds_note((counts or {}).get(("plain", column, name), seeds), seeds)
                cells.append(f"{label} {fmt(ours)}{note} against the paper's {theirs[0]:.2f} ± {theirs[1]:.2f} "
                             f"({_nats(theirs[0] - ours[0])})")
        if cells:
            lines.append(f"- {column}, {model_label('plain', k)}: " + "; ".join(cells) + ".")
    if lines:
        lines = ["## Our baseline against the paper's", "", "Lower is better for each (positive nats); by IW-SVI.",
                 ""] + lines + [""]
    return lines


def _nats(better: float) -> str:
    return f"ours {abs(better):.2f} nats {'better' if better > 0 else 'worse'}"


def _stored_config(rows: list[dict], dataset: str) -> dict:
    return next((r.get("config") or {} for r in rows if r["job"].dataset == dataset and r.get("config")), {})


def deviations(manifest: dict, rows: list[dict]) -> list[str]:
    """Every way this reproduction departs from the paper's protocol (appendix C and E), and the
    choices the paper leaves unstated that this budget makes, read from the runs' stored configs
    and the manifest; one sentence each."""
    budget = manifest["budget"]
    out = []
    for dataset in manifest["datasets"]:
        cfg = _stored_config(rows, dataset)
        paper = PAPER_SCHEDULES.get(dataset)
        if not cfg or paper is None or dataset not in ("mnist", "omniglot", "caltech"):
            continue
        if cfg["iterations"] != paper.iterations:
            out.append(f"{dataset}: {cfg['iterations']:,} training iterations, "
                       f"{cfg['iterations'] / paper.iterations:.1%} of the paper's {paper.iterations:,}.")
        if not math.isclose(cfg["lr"], paper.lr):
            out.append(f"{dataset}: initial learning rate {cfg['lr']:g}, {cfg['lr'] / paper.lr:g}x the paper's "
                       f"{paper.lr:g} (Table 6).")
        if cfg["batch_size"] != paper.batch_size:
            out.append(f"{dataset}: batch size {cfg['batch_size']} (paper: {paper.batch_size}).")
        examples = "the whole validation set" if cfg.get("val_examples") is None else \
            f"{cfg['val_examples']} validation examples"
        stop = (f", stopping after {cfg['patience']} validations without a new best" if cfg.get("patience")
                else ", training to the end and keeping the best")
        early = f"early stopping on IWAE-{cfg['val_k']} over {examples} every {cfg['val_every']:,} steps{stop}"
        if cfg["val_k"] != PAPER_EVALUATION["val_k"] or cfg.get("val_examples") is not None:
            out.append(f"{dataset}: {early} (paper: IWAE-5000 on the validation set).")
        else:
            out.append(f"{dataset}: {early}; the paper does not say how often it validated or when it stopped.")
    evaluation = manifest.get("evaluation") or {}
    if evaluation:
        svi = (evaluation.get("svi_k"), evaluation.get("svi_l"), evaluation.get("svi_steps"))
        if svi != (PAPER_EVALUATION["svi_k"], PAPER_EVALUATION["svi_l"], PAPER_EVALUATION["svi_steps"]):
            out.append(f"Test log-likelihood by IW-SVI with k={svi[0]}, l={svi[1]}, T={svi[2]} (appendix C: k=5000, "
                       "l=8, T=3000).")
        if "iwae" in evaluation.get("estimators", ()) and evaluation.get("k_iwae") != PAPER_EVALUATION["k_iwae"]:
            out.append(f"IWAE-{evaluation['k_iwae']} with the encoder instead of the IWAE-5000 that appendix C "
                       "compares with.")
        done = next((r["evaluation"] for r in rows if (r.get("evaluation") or {}).get("n") is not None), None)
        n, n_split = (done["n"], done.get("n_split")) if done else (evaluation.get("max_examples"), None)
        if n is not None and n != n_split:
            out.append(f"Test numbers on {n} {'of the ' + str(n_split) + ' ' if n_split else ''}test examples, spread "
                       "evenly over the split, not all of it.")
    extra = manifest.get("extra_evaluation") or {}
    if "ais" in extra.get("estimators", ()):
        where = f"{extra['max_examples']} test examples spread evenly" if extra.get("max_examples") else \
            "the same test examples"
        out.append(f"Not in the paper: AIS ({extra.get('ais_intermediate', 500)} intermediate distributions, "
                   f"{extra.get('ais_chains', 16)} chains) on {where}, beside IW-SVI.")
    target = TARGETS[manifest["target"]]
    if manifest.get("strengths") == "paper":
        out.append("Regularization strengths are the ones the paper selected (Table 7), not reselected on our "
                   "validation set.")
    elif tuple(manifest.get("grid") or ()) != PAPER_GRID and not target.study and manifest["target"] != "figure4" \
            and manifest["target"] in ("table1", "table2", "table3", "table4", "figure1", "figure2"):
        out.append(f"Strengths selected on validation from {manifest['grid']}, not Table 7's grid "
                   f"{list(PAPER_GRID)}.")
    for r in rows:
        deviation = (r.get("summary") or {}).get("data_deviation")
        if deviation and deviation not in out:
            out.append(deviation)
    if "mnist" in manifest["datasets"]:
        out.append(MNIST_SPLIT_DEVIATION)
    if budget in BUDGETS and not BUDGETS[budget].judged:
        out.insert(0, f"The {budget} budget checks that every step runs; its models barely train.")
    return out


def compute_spent(rows: list[dict]) -> tuple[float, float]:
    """Seconds of training and of evaluation that the rows' runs took, summed over runs (so over
    processes): each run's ``summary.json`` and its current evaluation records (``evaluation_seconds``
    of a row from [`airvae.report.collect`][], else its merged evaluation's own)."""
    training = sum((r["summary"] or {}).get("seconds") or 0.0 for r in rows)
    evaluation = sum(r.get("evaluation_seconds", (r.get("evaluation") or {}).get("seconds") or 0.0) for r in rows)
    return training, evaluation


def compute_line(rows: list[dict]) -> list[str]:
    """The time the finished runs took, from their own records, with the devices they ran on: what a
    reader needs to plan a rerun (the README's wall times come from this line)."""
    done = [r for r in rows if (r["summary"] or {}).get("status") in FINISHED]
    if not done:
        return []
    per_run = [compute_spent([r]) for r in done]
    training, evaluation = sum(t for t, _ in per_run), sum(e for _, e in per_run)
    devices = sorted({str(d) for r in done for d in r.get("devices", ())}) or ["not recorded"]

    def spread(values: list[float]) -> str:
        low, high = min(values) / 60, max(values) / 60
        return f"{low:.0f} min" if round(low) == round(high) else f"{low:.0f}-{high:.0f} min"

    return [f"Compute: the {len(done)} finished run{'s' if len(done) != 1 else ''} took {training / 3600:.1f} h of "
            f"training and {evaluation / 3600:.1f} h of evaluation, summed over runs (a run: training "
            f"{spread([t for t, _ in per_run])}, evaluation {spread([e for _, e in per_run])}; evaluated on "
            f"{', '.join(devices)}), from the `seconds` of each run's summary.json and evaluation records."
            + _clock_time([r.get("span") for r in done]), ""]


def _clock_time(spans: list) -> str:
    """The sentence giving the wall-clock time from the first run's creation (its marker) to the
    last evaluation written, when every finished run records both (``span``: its marker's time and
    its evaluations' times); else nothing."""
    if not all(span and span[1] for span in spans):  # a finished run without an evaluation's time
        return ""
    try:
        began = min(datetime.strptime(created, _STAMP) for created, _ in spans)
        ended = max(datetime.strptime(stamp, _STAMP) for _, evaluated in spans for stamp in evaluated)
    except (TypeError, ValueError):  # a run without a marker's or an evaluation's time
        return ""
    utc = timezone.utc
    return (f" On the clock: {(ended - began).total_seconds() / 3600:.1f} h from the first run's creation "
            f"({began.astimezone(utc):%Y-%m-%d %H:%M} UTC) to the last evaluation written "
            f"({ended.astimezone(utc):%Y-%m-%d %H:%M} UTC), stops and restarts included.")


_STAMP = "%Y-%m-%dT%H:%M:%S%z"  # airvae-run.json's and the evaluation records' "created"


def verdict_scope(manifest: dict, rows: list[dict]) -> list[str]:
    """The paragraph at the top of REPORT.md that says whether this reproduction can give verdicts
    at all, and if not what one would take (seeds, budget, time measured on these runs)."""
    budget, seeds = manifest["budget"], manifest["seeds"]
    if budget in BUDGETS and not BUDGETS[budget].judged:
        return [f"**No verdicts: the `{budget}` budget checks plumbing, not the paper.** Its numbers are printed "
                "so that every step can be seen to run; they say nothing about the claims.", ""]
    lines = []
    if budget != "paper" and manifest["target"].startswith(("table", "figure")):
        lines.append(f"**Verdicts at the `{budget}` budget** judge whether AIR helps models trained with the "
                     "departures from the paper listed under *Deviations*: they test the claims at this budget, "
                     "not at the paper's protocol.")
    if seeds < 3:
        seconds = sum(compute_spent(rows))
        cost = (f" These {len(rows)} runs took {seconds / 60:.0f} min of training and test evaluation in all "
                f"(about {seconds / 60 / seeds:.0f} min a seed, summed over processes)" if seconds else "")
        lines.append(f"**No verdicts: {seeds} seed{'s' if seeds != 1 else ''}.** A verdict needs 3 or more seeds "
                     f"(a t interval over seeds); rerun with `--seeds 3` (seeds 0-{seeds - 1} are kept and not "
                     f"retrained).{cost}.")
    return lines + ([""] if lines else [])
