"""Figures 1-4 of the paper, drawn from the run directories of a reproduction. Each figure function
returns the images it wrote and its claims (REPORT.md lines), judged by [`airvae.verdicts`][]' rule:
strengths are selected on validation, as for the tables, and compared by seed."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from .claims import (
    ClaimLine,
    by_seed,
    claim,
    compare,
    estimator_labels,
    estimators_present,
    mean_se,
    metric,
    selected_rows,
)
from .drawing import pyplot
from .files import read_json, save_figure
from .targets import figure3_dir, model_label, paper_tables

COLORS = {"plain": "black", "denoise-0.5": "tab:blue", "denoise-1.0": "tab:orange", "wni": "tab:green"}
AIR = ("denoise-0.5", "denoise-1.0", "wni")


def _runs(rows, dataset, family, k, strength=None):
    return [r for r in rows if (r["job"].dataset, r["job"].family, r["job"].k) == (dataset, family, k)
            and (strength is None or r["job"].strength == strength)]


def _log_likelihood(row, estimator="iwsvi"):
    value = metric(row["evaluation"], "neg_log_likelihood", estimator)
    return None if value is None else -value


def _test_log_likelihood(rows, dataset, family, k, strength, estimator="iwsvi"):
    return mean_se([_log_likelihood(r, estimator) for r in _runs(rows, dataset, family, k, strength)])


def _selected_strength(manifest, rows, dataset, family, k):
    chosen = [r["job"].strength for r in selected_rows(manifest, rows)
              if (r["job"].dataset, r["job"].family, r["job"].k) == (dataset, family, k)]
    return chosen[0] if chosen else None


def figure1(manifest, rows, out_dir: Path):
    """Test log-likelihood vs regularization strength, k = 1 (the paper's Figure 1)."""
    return _strength_figure(manifest, rows, out_dir, ks=(1,), relative=False, name="figure1")


def figure2(manifest, rows, out_dir: Path):
    """The same relative to the unregularized IWAE-k baseline for k = 1, 8, 64 (Figure 2)."""
    return _strength_figure(manifest, rows, out_dir, ks=(1, 8, 64), relative=True, name="figure2")


def _strength_figure(manifest, rows, out_dir, ks, relative, name):
    plt = pyplot()
    datasets, grid = manifest["datasets"], manifest["grid"]
    panels = [(d, f) for d in datasets for f in AIR] if relative else [(d, None) for d in datasets]
    ncols = len(AIR) if relative else len(datasets)
    nrows = len(datasets) if relative else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    quotes = paper_tables()["quotes"]
    claims = [f"The paper: \"{quotes[name]}\"", ""]
    for i, (dataset, family) in enumerate(panels):
        ax = axes.flat[i]
        for k in ks:
            base = _test_log_likelihood(rows, dataset, "plain", k, 0.0)
            for fam in ([family] if family else AIR):
                points = [(s, _test_log_likelihood(rows, dataset, fam, k, s)) for s in grid]
                points = [(s, c) for s, c in points if c is not None]
                if not points:
                    continue
                xs = [s for s, _ in points]
                ys = [c[0] - (base[0] if relative and base else 0.0) for _, c in points]
                errs = [0 if math.isnan(c[1]) else c[1] for _, c in points]
                label = f"k={k}" if relative else model_label(fam, k)
                ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label,
                            color=None if relative else COLORS[fam])
                claims += _selected_strength_claim(manifest, rows, dataset, fam, k)
            if base is not None and not relative:
                ax.axhline(base[0], color="black", linestyle="--", label=f"{model_label('plain', k)} baseline")
        if relative:
            ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"{dataset}" + (f" — {model_label(family, 8).replace('IWAE', 'IWAE-k')}" if family else ""))
        ax.set_xlabel("regularization strength (σ√d or 10/H)")
        ax.set_ylabel("test ln p(x) − baseline (nats)" if relative else "test ln p(x) (nats)")
        ax.grid(alpha=0.3)
        _legend_or_empty(ax)
    if relative:
        claims += ["", f"The paper (caption): \"{quotes['figure2_caption']}\"", ""]
        claims += _robustness_claims(manifest, rows, datasets, grid)
    fig.suptitle(f"{name}: test log-likelihood (IW-SVI) vs AIR strength, budget {manifest['budget']}; "
                 "error bars: standard error over seeds")
    fig.tight_layout()
    path = save_figure(fig, out_dir / f"{name}.png", out_dir)
    plt.close(fig)
    return [path], claims


def _selected_strength_claim(manifest, rows, dataset, family, k):
    """At the strength selected on validation, the regularized model beats the baseline on test:
    paired by seed, under each estimator the runs hold."""
    strength = _selected_strength(manifest, rows, dataset, family, k)
    if strength is None:
        return []
    intervals = {}
    for estimator in estimators_present(rows):
        ours = by_seed(_runs(rows, dataset, family, k, strength), lambda r, e=estimator: _log_likelihood(r, e))
        base = by_seed(_runs(rows, dataset, "plain", k, 0.0), lambda r, e=estimator: _log_likelihood(r, e))
        intervals[estimator] = compare(ours, base)
    return claim(f"{dataset}, {model_label(family, k)} at the strength selected on validation ({strength:g}) "
                 f"improves test log-likelihood over {model_label('plain', k)}",
                 "improves (our reading of its figures; its text gives 0.5 ~ 1.0 nats at a well-chosen strength)", 1,
                 intervals, estimator_labels(rows), manifest["budget"])


def _robustness_claims(manifest, rows, datasets, grid):
    """Figure 2's claim in numbers: per seed, the loss at the strongest strength relative to the
    strength selected on validation; it should be smaller at the largest k than at the smallest."""
    lines = []
    strongest = max(grid) if grid else None
    for dataset in datasets:
        for family in AIR:
            ks = [k for k in (1, 8, 64) if _selected_strength(manifest, rows, dataset, family, k) is not None]
            if len(ks) < 2 or strongest is None:
                continue
            losses = {}
            for k in (ks[0], ks[-1]):
                chosen = by_seed(_runs(rows, dataset, family, k, _selected_strength(manifest, rows, dataset, family, k)),
                                 _log_likelihood)
                high = by_seed(_runs(rows, dataset, family, k, strongest), _log_likelihood)
                losses[k] = {s: c - h for s in set(chosen) & set(high)
                             if (c := chosen[s]) is not None and (h := high[s]) is not None}
            interval = compare(losses[ks[0]], losses[ks[-1]])
            lines += claim(f"{dataset}, {model_label(family, 8).replace('IWAE', 'IWAE-k')}: at the strongest "
                           f"strength ({strongest:g}) k={ks[-1]} loses less test log-likelihood than k={ks[0]}, "
                           "each against its strength selected on validation",
                           "yes (caption above)", 1, {"iwsvi": interval}, estimator_labels(rows), manifest["budget"],
                           {"iwsvi": f"loss at k={ks[0]} − loss at k={ks[-1]}"})
    return lines


def _drop_from_peak(row) -> float | None:
    """How far a run's test bound fell from its peak by the end of training (nats; Figure 4)."""
    bounds = [p["test_bound"] for p in row["metrics"] or [] if "test_bound" in p]
    return max(bounds) - bounds[-1] if bounds else None


def figure4(manifest, rows, out_dir: Path):
    """Test amortized bound during training, VAE vs DVAE, as k and m vary (Figure 4)."""
    plt = pyplot()
    settings = sorted({(r["job"].k, r["job"].m) for r in rows})
    datasets = manifest["datasets"]
    fig, axes = plt.subplots(len(datasets), len(settings), figsize=(3.6 * len(settings), 3.2 * len(datasets)),
                             squeeze=False)
    quote = paper_tables()["quotes"]["figure4"]
    claims = [f"The paper (caption): \"{quote}\"", ""]
    for i, dataset in enumerate(datasets):
        for j, (k, m) in enumerate(settings):
            ax = axes[i][j]
            for family in ("plain", "denoise-1.0"):
                runs = [r for r in rows if (r["job"].dataset, r["job"].family, r["job"].k, r["job"].m)
                        == (dataset, family, k, m) and r["metrics"]]
                for n, r in enumerate(runs):
                    points = [(p["step"], p["test_bound"]) for p in r["metrics"] if "test_bound" in p]
                    if points:
                        ax.plot(*zip(*points, strict=True), color=COLORS[family], alpha=0.8,
                                label=model_label(family, k) if n == 0 else None)
            ax.set_title(f"{dataset}, k={k}, m={m}")
            ax.set_xlabel("training step")
            ax.set_ylabel("test L_k (nats)")
            ax.grid(alpha=0.3)
            _legend_or_empty(ax)
        for k in sorted({k for k, _ in settings}):
            m = max(m for kk, m in settings if kk == k)
            seeds = {family: by_seed([r for r in rows if (r["job"].dataset, r["job"].family, r["job"].k, r["job"].m)
                                      == (dataset, family, k, m)], _drop_from_peak)
                     for family in ("plain", "denoise-1.0")}
            claims += claim(f"{dataset}, k={k}, m={m}: {model_label('plain', k)}'s test bound falls further from its "
                            f"peak by the end of training than {model_label('denoise-1.0', k)}'s",
                            "yes (caption above)", 1, {"bound": compare(seeds["plain"], seeds["denoise-1.0"])},
                            {"bound": "test L_k during training"}, manifest["budget"],
                            {"bound": "VAE's drop − DVAE's drop, nats"})
    fig.suptitle(f"figure4: test amortized bound during training, budget {manifest['budget']}")
    fig.tight_layout()
    path = save_figure(fig, out_dir / "figure4.png", out_dir)
    plt.close(fig)
    return [path], claims


def figure3(manifest, rows, out_dir: Path):
    """IW-SVI vs IWAE-k on each dataset's VAE (appendix C), drawn from the ``figure3.json`` that
    [`run_study`][airvae.iwsvi_study.run_study] writes into ``figure3-DATASET/``. One model per dataset: its comparisons have no noise estimate across
    models, so they are described, not judged."""
    quotes = paper_tables()["quotes"]
    paths = []
    claims = [f"The paper (caption): \"{quotes['figure3']}\" and \"{quotes['figure3a']}\"", ""]
    for dataset in manifest["datasets"]:
        folder = figure3_dir(out_dir, dataset)
        if not (folder / "figure3.json").exists():
            claims.append(f"- {dataset}: no Figure 3 (its VAE run has not finished)")
            continue
        data = read_json(folder / "figure3.json")
        paths.append(draw_figure3(data, folder / "figure3.png"))
        claims += figure3_claims(dataset, data)
    claims += ["", "Each line compares means over the same test examples of one model (common random numbers). With "
               "one model there is no noise estimate across models, so these are observations, not verdicts."]
    return paths, claims


def figure3_claims(dataset: str, data: dict) -> list[str]:
    """The caption's findings, observed on ``iwsvi_vs_iwae_study``'s output (directions, no verdicts)."""
    iwae = {p["k"]: p["mean"] for p in data["iwae"]}
    fitted = {p["k"]: p["mean"] for p in data["iwsvi_over_k"]}
    over_steps = {p["steps"]: p["mean"] for p in data["iwsvi_over_steps"]}
    same = lambda ok: "same direction as the paper" if ok else "opposite direction to the paper"  # noqa: E731
    margins = {k: fitted[k] - iwae[k] for k in iwae}
    lines = [f"- {dataset}: IW-SVI (T={data['fixed_steps']}) − IWAE-k at each k (Fig. 3b: IW-SVI above): "
             f"{', '.join(f'k={k}: {d:+.2f}' for k, d in margins.items())} nats: "
             f"{same(all(d > 0 for d in margins.values()))}"]
    k_max, fitted_steps = max(iwae), [t for t in over_steps if t > 0]
    if fitted_steps:
        t = min(fitted_steps, key=lambda t: abs(t - 100))  # the caption compares with T = 100
        diff = over_steps[t] - iwae[k_max]
        lines.append(f"- {dataset}: IW-SVI (k={data['svi_k']}, l={data.get('l')}, T={t}) − IWAE-{k_max} (Fig. 3a: "
                     f"IW-SVI above): {diff:+.2f} nats: {same(diff > 0)}")
        gain = over_steps[max(fitted_steps)] - over_steps[0]
        lines.append(f"- {dataset}: IW-SVI at T={max(fitted_steps)} − at T=0 (Fig. 3c: more steps help): "
                     f"{gain:+.2f} nats: {same(gain > 0)}")
    return lines


def draw_figure3(data: dict, path: Path) -> Path:
    """The paper's Figure 3 from [`iwsvi_vs_iwae_study`][airvae.iwsvi_study.iwsvi_vs_iwae_study]'s data, as a PNG at ``path``:
    (a) estimate against wall time, (b) IWAE-k and IW-SVI over k, (c) IW-SVI over T."""
    plt = pyplot()
    # No error bars: the stderr over examples (kept in figure3.json) is dominated by how much
    # ln p(x) varies between examples, which is common to every curve and hides their differences.
    def series(ax, points, xkey, label, marker):
        ax.plot([p[xkey] for p in points], [p["mean"] for p in points], marker=marker, label=label)

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    series(a, data["iwae"], "seconds", "IWAE-k (k varies)", "o")
    series(a, data["iwsvi_over_steps"], "seconds", f"IW-SVI k={data['svi_k']}, l={data['l']} (T varies)", "s")
    a.set_xscale("log")
    a.set_xlabel("wall time (s)")
    a.set_title("(a) estimate vs computation time")
    series(b, data["iwae"], "k", "IWAE-k", "o")
    series(b, data["iwsvi_over_k"], "k", f"IW-SVI (T={data['fixed_steps']})", "s")
    b.set_xscale("log")
    b.set_xlabel("importance samples k")
    b.set_title("(b) IWAE-k vs IW-SVI over k")
    series(c, data["iwsvi_over_steps"], "steps", f"IW-SVI (k={data['svi_k']})", "s")
    c.set_xscale("symlog", linthresh=1.0)
    c.set_xlabel("gradient steps T")
    c.set_title("(c) IW-SVI over T")
    for ax in (a, b, c):
        ax.set_ylabel(f"mean ln p(x) estimate (nats, n={data['n']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, path.parent)
    plt.close(fig)
    return path



VERDICT_COLORS = {"supports": "tab:green", "holds here": "tab:green", "contradicts": "tab:red",
                  "does not hold here": "tab:red", "inconclusive": "tab:grey"}


def draw_claims(lines: list[ClaimLine], path: Path) -> Path:
    """A table's claims as a PNG at ``path``, one panel per claim: each estimator's mean difference over
    seeds (positive = the claim's direction) with its 95% t interval, coloured by verdict (black: no
    verdict yet), zero as a line, and the paper's difference as a red diamond on the row of its own
    estimator. Each panel has its own scale: the gap moves by nats where ln p(x) moves by tenths."""
    plt = pyplot()
    statements = list(dict.fromkeys(line.statement for line in lines))
    columns = min(3, len(statements))
    rows = math.ceil(len(statements) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 0.5 + 1.9 * rows), squeeze=False)
    for ax, statement in zip(axes.flat, statements, strict=False):
        mine = [line for line in lines if line.statement == statement]
        for y, line in enumerate(reversed(mine)):
            color = VERDICT_COLORS.get(line.verdict, "black")
            if line.interval is not None:
                interval = line.interval
                if not math.isnan(interval.se):
                    ax.plot([interval.low, interval.high], [y, y], color=color, linewidth=2)
                ax.plot([interval.mean], [y], "o", color=color, markersize=5)
                ax.plot(list(interval.differences), [y] * len(interval.differences), "|", color=color, markersize=8)
            if line.paper_size is not None:
                ax.plot([line.paper_size], [y], "D", color="tab:red", markerfacecolor="none", markersize=7)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(mine)), [line.estimator.split(" (")[0] for line in reversed(mine)], fontsize=8)
        ax.set_ylim(-0.7, len(mine) - 0.3)
        ax.set_title("\n".join(textwrap.wrap(statement, 52)), fontsize=8)
        ax.set_xlabel("difference (nats; > 0: the claim's direction)", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(statements):]:
        ax.axis("off")
    fig.suptitle("Claims: mean over seeds (dot), 95% t interval (bar), each seed (ticks), the paper's "
                 "difference (red diamond); green supports, red contradicts, grey inconclusive, black no "
                 "verdict yet", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, path.parent)
    plt.close(fig)
    return path


FIGURES = {"figure1": figure1, "figure2": figure2, "figure3": figure3, "figure4": figure4}


def _legend_or_empty(ax) -> None:
    """A legend, or a note that the panel has nothing yet (runs not finished or not evaluated)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no evaluated runs yet", ha="center", va="center", transform=ax.transAxes, color="grey")
