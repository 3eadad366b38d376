"""The decision rule behind every verdict (airvae.verdicts), calibrated on simulated reproductions:
with no true effect it must err at most at its nominal 5% (and not far below: a rule that never
decides would pass that half), and an effect of known size must be found at the rate the t test
promises. The simulated seeds share a large seed effect between the two models, as real runs of
one seed do, so only a paired rule reaches the promised power.

The replications go through the report's own code: rows as airvae.report.collect builds them,
judged by airvae.report.table_claims, whose verdict words are parsed back."""

import math
import re

import numpy as np
import pytest
from scipy import stats

from airvae.claims import estimator_labels
from airvae.report import table_claims
from airvae.sweep import Job
from airvae.verdicts import CONTRADICTS, INCONCLUSIVE, MIN_SEEDS, SUPPORTS, decide, paired_interval

SEED_SD = 5.0  # run-to-run spread shared by the models of one seed (initialization, minibatches)
MODEL_SD = 0.3  # what is left for each model alone
VERDICT = re.compile(r"^  - IW-SVI.*: \*\*(.+)\*\*$")


def _rows(rng: np.random.Generator, n_seeds: int, effect: float, budget: str = "paper") -> list[dict]:
    """Table 1 on Caltech: a VAE and a DVAE (alpha = 0.5) per seed; the DVAE's test ln p(x) is ``effect``
    nats higher in expectation. Only these two families exist, so exactly one log-likelihood claim is made."""
    rows = []
    for seed in range(n_seeds):
        shared = rng.normal(-110.0, SEED_SD)
        for family, strength, shift in (("plain", 0.0, 0.0), ("denoise-0.5", 7.5, effect)):
            ll = shared + shift + rng.normal(0.0, MODEL_SD)
            estimates = {"iwsvi": {"mean": ll, "settings": {"k": 5000, "l": 8, "steps": 3000}},
                         "bound": {"mean": ll - 25.0}}
            rows.append({"job": Job(family, "caltech", 1, 1, strength, seed, budget), "evaluation": {"estimates": estimates},
                         "summary": {"status": "completed", "best_val_log_likelihood": -100.0}, "config": {}})
    return rows


def _log_likelihood_verdict(rows: list[dict], budget: str = "paper") -> str:
    manifest = {"target": "table1", "datasets": ["caltech"], "budget": budget}
    lines = table_claims(manifest, rows, ["iwsvi"], estimator_labels(rows))
    start = next(i for i, line in enumerate(lines) if "DVAE (alpha=0.5) improves test log-likelihood" in line)
    return VERDICT.match(lines[start + 1]).group(1)


def _rates(n_seeds: int, effect: float, replications: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    words = [_log_likelihood_verdict(_rows(rng, n_seeds, effect)) for _ in range(replications)]
    return {word: words.count(word) / replications for word in (SUPPORTS, CONTRADICTS, INCONCLUSIVE)}


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_with_no_true_effect_the_rule_errs_at_its_nominal_rate(n_seeds):
    replications = 3000
    rates = _rates(n_seeds, effect=0.0, replications=replications, seed=n_seeds)
    false = rates[SUPPORTS] + rates[CONTRADICTS]
    mc = 3 * math.sqrt(0.05 * 0.95 / replications)  # three Monte Carlo standard errors
    assert 0.05 - mc <= false <= 0.05 + mc, rates
    assert abs(rates[SUPPORTS] - rates[CONTRADICTS]) <= 2 * mc, rates  # 2.5% each way: no bias


@pytest.mark.parametrize("n_seeds,effect", [(3, 0.9), (5, 0.5)])
def test_an_effect_of_known_size_is_found_at_the_promised_rate(n_seeds, effect):
    replications = 2000
    rates = _rates(n_seeds, effect, replications, seed=10 + n_seeds)
    sd = math.sqrt(2) * MODEL_SD  # of a per-seed paired difference: the seed effect cancels
    ncp = effect / (sd / math.sqrt(n_seeds))
    critical = stats.t.ppf(0.975, n_seeds - 1)
    power = stats.nct.sf(critical, n_seeds - 1, ncp)  # the interval lies above zero
    assert 0.4 < power < 0.6  # a size where the rate is informative
    mc = 3 * math.sqrt(power * (1 - power) / replications)
    assert abs(rates[SUPPORTS] - power) <= mc, (rates, power)
    assert rates[CONTRADICTS] < 0.002



def test_when_the_papers_size_is_the_true_one_the_report_excludes_it_at_the_nominal_rate():
    """The report's second reading of an interval: where the paper's difference lies against it. The paper
    has DVAE (alpha 0.5) 0.50 nats better on Caltech; simulated with exactly that effect, the report must
    put the paper's size outside our interval 5% of the time, half of it on each side."""
    replications, where = 3000, []
    rng = np.random.default_rng(7)
    manifest = {"target": "table1", "datasets": ["caltech"], "budget": "paper"}
    for _ in range(replications):
        lines = table_claims(manifest, _rows(rng, 3, 0.50), ["iwsvi"], estimator_labels(_rows(rng, 1, 0.0)))
        start = next(i for i, line in enumerate(lines) if "DVAE (alpha=0.5) improves test log-likelihood" in line)
        where.append(re.search(r"the paper's \+0\.50 (above|inside|below) it", lines[start + 1]).group(1))
    mc = 3 * math.sqrt(0.05 * 0.95 / replications)
    outside = 1 - where.count("inside") / replications
    assert 0.05 - mc <= outside <= 0.05 + mc, outside
    assert abs(where.count("above") - where.count("below")) / replications <= 2 * mc

def test_an_unpaired_rule_would_fail_the_power_test():
    """The seed effect is ten times the model noise: comparing seed means unpaired, a 0.6-nat effect
    with 3 seeds is all but invisible; the paired rule finds it most of the time (previous test)."""
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(500):
        rows = _rows(rng, 3, 0.6)
        a = [r["evaluation"]["estimates"]["iwsvi"]["mean"] for r in rows if r["job"].family != "plain"]
        b = [r["evaluation"]["estimates"]["iwsvi"]["mean"] for r in rows if r["job"].family == "plain"]
        found += stats.ttest_ind(a, b).pvalue < 0.05 and np.mean(a) > np.mean(b)
    assert found / 500 < 0.1


def test_fewer_seeds_than_a_verdict_needs_or_a_smoke_budget_give_estimates_without_verdicts():
    rng = np.random.default_rng(1)
    assert MIN_SEEDS == 3
    for n in (1, 2):
        word = _log_likelihood_verdict(_rows(rng, n, effect=5.0))
        assert word.startswith("no verdict") and f"a verdict needs {MIN_SEEDS}" in word
    assert _log_likelihood_verdict(_rows(rng, 5, 5.0, "smoke"), "smoke").startswith("no verdict (the smoke budget")
    assert _log_likelihood_verdict(_rows(rng, 5, 5.0, "quick"), "quick") == SUPPORTS


def test_interval_matches_the_t_distribution_and_equal_numbers_never_decide():
    interval = paired_interval([0.5, 1.0, 1.5])
    half = stats.t.ppf(0.975, 2) * 0.5 / math.sqrt(3)
    assert math.isclose(interval.mean, 1.0) and math.isclose(interval.high - interval.mean, half)
    assert decide(paired_interval([0.0, 0.0, 0.0])) == INCONCLUSIVE
    assert decide(paired_interval([2.0, None, 2.5, 3.0])) == SUPPORTS  # a seed missing on one side is dropped
    assert math.isnan(paired_interval([2.0]).se) and paired_interval([]) is None
    assert decide(None).startswith("no verdict (missing")
