"""Questions the paper leaves open, measured with the machinery of its tables (``airvae reproduce``:
train a grid, select the strength on validation, evaluate on test) and reported with paired
differences instead of the paper's numbers.

``grey-conv``: do DVAE (eq. 13, alpha = 1) and WNI (eq. 17/18, conv filters capped per output
channel) improve the test bits/dim of a *conv* VAE with a discretized-logistic likelihood on
grey-level images? The paper only trains MLPs with Bernoulli likelihoods on binary images.

Runs of the same seed share their initial decoder, minibatch order and training draws, so the
comparison is paired by seed and judged by [`airvae.verdicts`][]' rule, like the paper's claims.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

from .claims import ESTIMATOR_MEANINGS, estimator_labels, estimators_present, fmt, mean_se, selected_rows
from .drawing import pyplot
from .files import save_figure
from .likelihoods import bits_per_dim
from .targets import model_label
from .verdicts import CONTRADICTS, INCONCLUSIVE, SUPPORTS, Interval, decide, paired_interval

FAMILIES = ("plain", "denoise-1.0", "wni")
WORDS = {SUPPORTS: "improves", CONTRADICTS: "worsens", INCONCLUSIVE: "no detectable difference (interval contains 0)"}


def bits_per_dim_of(evaluation: dict | None, estimator: str) -> float | None:
    """Test bits/dim of a run's evaluation under ``estimator`` (None if it lacks it)."""
    estimate = ((evaluation or {}).get("estimates") or {}).get(estimator)
    if not estimate or not estimate.get("dims"):
        return None
    return float(bits_per_dim(estimate["mean"], estimate["dims"]))


def question_verdict(differences: list[float], budget: str | None) -> tuple[Interval | None, str]:
    """The paired interval of per-seed differences (positive = the regularizer helps) and the rule's
    answer in this question's words."""
    interval = paired_interval(differences)
    word = decide(interval, budget)
    return interval, WORDS.get(word, word)


def _strength_text(family: str, strength: float, dims: int | None) -> str:
    if family == "plain":
        return "–"
    if family == "wni":
        return f"10/H = {strength:g} (H = {10 / strength:.3g})"
    sigma = f", σ = {strength / math.sqrt(dims):.3g}" if dims else ""
    return f"σ√d = {strength:g}{sigma}"


def grey_conv(manifest: dict, rows: list[dict], out_dir: Path) -> tuple[list[Path], list[str]]:
    """REPORT.md lines and a figure for the ``grey-conv`` question (module docstring)."""
    plt = pyplot()
    estimators = [e for e in estimators_present(rows) if e in ("iwsvi", "ais")] or ["iwsvi"]
    labels = estimator_labels(rows)
    selected = selected_rows(manifest, rows)
    lines = ["## Do DVAE and WNI improve a conv VAE on grey-level images?", "",
             "Not a claim of the paper, which trains MLPs with Bernoulli likelihoods on binary images: measured "
             "here. Strength selected on validation (mean over seeds of each run's best validation IWAE-k "
             "estimate); test bits/dim of the selected runs by each log-likelihood estimator:", ""]
    lines += [f"- **{labels[e]}** {ESTIMATOR_MEANINGS[e]}." for e in estimators]
    lines += ["", "Differences are paired by seed (same initial weights, minibatches and training draws): "
              "baseline bits/dim − regularized bits/dim, so **positive = the regularizer helps**; mean ± SE over "
              "seeds and the 95% t interval, judged by the rule of every claim airvae reports "
              "(docs/decision-rule.md: 3 or more seeds, a budget that can test it).",
              ""]
    fig, axes = plt.subplots(1, len(manifest["datasets"]), figsize=(5.5 * len(manifest["datasets"]), 3.8),
                             squeeze=False)
    for ax, dataset in zip(axes[0], manifest["datasets"], strict=True):
        lines += _dataset_section(manifest, rows, selected, dataset, estimators, labels, ax)
    fig.tight_layout()
    path = save_figure(fig, out_dir / "grey-conv.png", out_dir)
    plt.close(fig)
    return [path], lines


def _dataset_section(manifest, rows, selected, dataset, estimators, labels, ax) -> list[str]:
    mine = [r for r in selected if r["job"].dataset == dataset]
    by_family = {f: {r["job"].seed: r for r in mine if r["job"].family == f} for f in FAMILIES}
    dims = next((e["dims"] for r in mine for e in ((r["evaluation"] or {}).get("estimates") or {}).values()
                 if e.get("dims")), None)
    lines = [f"### {dataset}", "",
             "| model | strength (selected) | " + " | ".join(f"test bits/dim, {labels[e]}" for e in estimators)
             + " | test bits/dim, IWAE-k (encoder q) | Δinf (nats) | seeds |",
             "|---|---|" + "---|" * len(estimators) + "---|---|---|"]
    for family, runs in by_family.items():
        if not runs:
            continue
        strength = next(iter(runs.values()))["job"].strength
        cells = []
        for estimator in estimators + ["iwae"]:
            values = [v for r in runs.values() if (v := bits_per_dim_of(r["evaluation"], estimator)) is not None]
            cells.append(fmt(mean_se(values), 4))
        gaps = [((r["evaluation"] or {}).get("estimates") or {}).get("gap", {}).get("mean") for r in runs.values()]
        cells.append(fmt(mean_se(gaps)))
        lines.append(f"| {model_label(family, 1)} | {_strength_text(family, strength, dims)} | " + " | ".join(cells)
                     + f" | {len(runs)} |")
    lines += ["", "Paired differences, baseline − regularized (positive = the regularized model is better: "
              "fewer bits/dim, or a smaller inference gap):", ""]
    measures: list[tuple[str, Callable[[dict | None], float | None], int]]
    measures = [(f"test bits/dim, {labels[e]}", partial(bits_per_dim_of, estimator=e), 4) for e in estimators]
    measures += [(f"test bits/dim, {labels['iwae']} (the encoder's estimate, not p(x)'s)",
                  lambda ev: bits_per_dim_of(ev, "iwae"), 4),
                 ("Δinf in nats (the inference gap AIR aims to shrink)",
                  lambda ev: ((ev or {}).get("estimates") or {}).get("gap", {}).get("mean"), 2)]
    for family in FAMILIES[1:]:
        for name, value, digits in measures:
            per_seed = [(value(base["evaluation"]), value(by_family[family][seed]["evaluation"]))
                        for seed, base in sorted(by_family["plain"].items()) if seed in by_family[family]]
            differences = [b - r for b, r in per_seed if b is not None and r is not None]
            result, word = question_verdict(differences, manifest["budget"])
            seeds = ", ".join(f"{d:+.{digits}f}" for d in differences)
            if result is None:
                numbers = "n/a"
            elif result.n < 2:
                numbers = f"{result.mean:+.{digits}f} (one seed)"
            else:
                numbers = (f"{result.mean:+.{digits}f} ± {result.se:.{digits}f} (95% interval [{result.low:+.{digits}f}, "
                           f"{result.high:+.{digits}f}]; per seed {seeds})")
            lines.append(f"- {model_label(family, 1)} vs {model_label('plain', 1)}, {name}: {numbers}: **{word}**")
    lines += ["", "Validation (selection): mean over seeds of each run's best validation IWAE-k estimate (nats):", "",
              "| model | strength | validation ln p(x) | seeds |", "|---|---|---|---|"]
    for family in FAMILIES:
        for strength in sorted({r["job"].strength for r in rows if (r["job"].dataset, r["job"].family)
                                == (dataset, family)}):
            values = [r["summary"]["best_val_log_likelihood"] for r in rows
                      if (r["job"].dataset, r["job"].family, r["job"].strength) == (dataset, family, strength)
                      and r["summary"].get("best_val_log_likelihood") is not None]
            chosen = " (selected)" if any(r["job"].family == family and r["job"].strength == strength
                                          for r in mine) and family != "plain" else ""
            lines.append(f"| {model_label(family, 1)} | {_strength_text(family, strength, dims)}{chosen} | "
                         f"{fmt(mean_se(values))} | {len(values)} |")
    still_improving = [r for r in mine if r["summary"].get("best_step") == r["summary"].get("steps")]
    lines += ["", f"Regime: {len(still_improving)} of {len(mine)} selected runs had their best validation estimate "
              "at their last step (still improving when training stopped, so not overfitting, the regime AIR "
              "targets); the others stopped improving earlier and were evaluated at their best step.", ""]
    _draw(ax, dataset, by_family, estimators[0], labels)
    return lines


def _draw(ax, dataset: str, by_family: dict, estimator: str, labels: dict) -> None:
    """Test bits/dim per model, one line per seed: the pairing the differences use."""
    families = [f for f in FAMILIES if by_family[f]]
    seeds = sorted({seed for runs in by_family.values() for seed in runs})
    for seed in seeds:
        points = [(i, bits_per_dim_of(by_family[f][seed]["evaluation"], estimator)) for i, f in enumerate(families)
                  if seed in by_family[f]]
        points = [(i, v) for i, v in points if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", alpha=0.8, label=f"seed {seed}")
    ax.set_xticks(range(len(families)), [model_label(f, 1) for f in families])
    ax.set_ylabel(f"test bits/dim ({labels[estimator]})")
    ax.set_title(f"{dataset}: conv VAE, selected strengths", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


QUESTIONS = {"grey-conv": grey_conv}
