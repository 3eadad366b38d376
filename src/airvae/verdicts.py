"""The one decision rule behind every verdict airvae's reports give (docs/decision-rule.md).

- The unit of replication is the **seed**. Runs of one seed share their initialization (of the
  parts they share), minibatch order and training draws, so two models are compared **paired**:
  per seed, the difference of their means over the same test examples.
- Across seeds, the mean of those per-seed differences gets a two-sided **t interval** with
  n_seeds - 1 degrees of freedom at [`LEVEL`][airvae.verdicts.LEVEL] (95%).
- A **verdict** needs at least [`MIN_SEEDS`][airvae.verdicts.MIN_SEEDS] seeds and a budget that can test the claim
  ([`budget_judges`][airvae.verdicts.budget_judges]): the interval above zero is the claim's direction, below zero the
  opposite, across zero no decision. Under a true null the rule errs in either direction with
  probability 1 - LEVEL in all (2.5% each way): ``tests/test_verdicts.py`` measures it, and the
  rate at which it finds an effect of known size, on simulated seeds.

Fewer seeds, or a budget that cannot test the claim, still get the estimate and (from two seeds)
its interval, but no verdict.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

from .config import BUDGETS

LEVEL = 0.95
MIN_SEEDS = 3
SUPPORTS, CONTRADICTS, INCONCLUSIVE = "supports", "contradicts", "inconclusive"


@dataclass(frozen=True)
class Interval:
    """The mean of per-seed differences, its standard error and t interval (NaN below two seeds).

    Attributes:
        mean: the mean difference.
        se: its standard error over seeds.
        low: the interval's lower end, at [`LEVEL`][airvae.verdicts.LEVEL].
        high: its upper end.
        n: the seeds.
        differences: the per-seed differences.
    """

    mean: float
    se: float
    low: float
    high: float
    n: int
    differences: tuple[float, ...] = ()

    def text(self, digits: int = 2, unit: str = " nats") -> str:
        """``+0.51 [+0.12, +0.90] nats (3 seeds)``; one seed: the value alone."""
        seeds = f"{self.n} seed{'s' if self.n != 1 else ''}"
        if math.isnan(self.se):
            return f"{self.mean:+.{digits}f}{unit} ({seeds})"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]{unit} ({seeds})"


@cache
def t_quantile(n: int, level: float = LEVEL) -> float:
    """The two-sided t critical value for ``n`` seeds (n - 1 degrees of freedom)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, n - 1))


def paired_interval(differences: Sequence[float | None], level: float = LEVEL) -> Interval | None:
    """The interval of per-seed paired differences.

    Args:
        differences: one per seed; None values (a seed missing from either side) and non-finite ones
            are dropped.
        level: the interval's confidence level.

    Returns:
        The interval; None when no seed has a number.
    """
    values = tuple(float(d) for d in differences if d is not None and math.isfinite(d))
    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan, math.nan, 1, values)
    se = statistics.stdev(values) / math.sqrt(len(values))
    half = t_quantile(len(values), level) * se
    return Interval(mean, se, mean - half, mean + half, len(values), values)


def paired_differences(a: Mapping[int, float | None], b: Mapping[int, float | None]) -> list[float]:
    """``a[seed] - b[seed]`` for every seed both hold a number for (``{seed: value or None}``)."""
    return [va - vb for s in sorted(set(a) & set(b)) if (va := a[s]) is not None and (vb := b[s]) is not None]


def budget_judges(budget: str | None) -> bool:
    """Whether runs at ``budget`` can test a paper's claim: ``smoke`` checks plumbing only (its
    models barely train), so it never gets a verdict; ``quick`` and ``paper`` do (quick's are
    labelled with what the budget changes: [`airvae.claims.deviations`][])."""

    return budget in BUDGETS and BUDGETS[budget].judged


def decide(interval: Interval | None, budget: str | None = None) -> str:
    """The rule: ``supports`` when the interval lies above zero (the claim's direction is positive by
    construction: the caller orients the differences), ``contradicts`` below zero, ``inconclusive``
    across it; otherwise why there is no verdict.

    Args:
        interval: the paired interval of the claim's differences (None: numbers are missing).
        budget: the runs' budget, if known: one that cannot test claims gets no verdict
            ([`budget_judges`][airvae.verdicts.budget_judges]).

    Returns:
        ``"supports"``, ``"contradicts"``, ``"inconclusive"``, or ``"no verdict (why)"``.
    """
    if interval is None:
        return "no verdict (missing numbers)"
    if budget is not None and not budget_judges(budget):
        return f"no verdict (the {budget} budget cannot test it)"
    if interval.n < MIN_SEEDS:
        return f"no verdict ({interval.n} seed{'s' if interval.n != 1 else ''}: a verdict needs {MIN_SEEDS} or more)"
    if interval.low > 0:
        return SUPPORTS
    if interval.high < 0:
        return CONTRADICTS
    return INCONCLUSIVE


def is_verdict(word: str) -> bool:
    """Whether ``word`` is one of the rule's three verdicts (not a "no verdict")."""
    return word in (SUPPORTS, CONTRADICTS, INCONCLUSIVE)
