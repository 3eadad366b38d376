"""The README's conv VAE, written outside airvae, runs exactly as printed and then through every
estimator: the protocol needs no airvae class, conv decoders and images work everywhere."""

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

from airvae.estimators import (
    ais_log_likelihood,
    amortized_bound,
    bdmc,
    inference_gap,
    iw_svi_log_likelihood,
    iwae_log_likelihood,
    simulate,
)
from airvae.evaluation import EvaluationSettings, evaluate_model, format_table

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The first Python block after the README's protocol heading."""
    text = README.read_text()
    section = text[text.index("### Any VAE: the estimators' protocol"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def trained():
    namespace: dict = {}
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(readme_example(), str(README), "exec"), namespace)
    return {**namespace, "printed": printed.getvalue()}


def test_the_readme_example_trains_and_reports_iw_svi(trained):
    model, result = trained["model"], trained["result"]
    assert not any(cls.__module__.startswith("airvae") for cls in type(model).__mro__)  # no airvae base class
    assert result.values.shape == (32,) and torch.isfinite(result.values).all()
    assert result.dims == 64 and result.bits_per_dim == pytest.approx(-result.mean / (64 * 0.6931471805599453))
    # Training through the conv WNI encoder and the discretized likelihood works: far below the
    # log2(17) = 4.09 bits/dim of a uniform guess over the 17 grey levels, and no probability above 1.
    assert 0 < result.bits_per_dim < 3.0
    assert f"{result.bits_per_dim:.3f} bits/dim" in trained["printed"]


def test_the_readme_model_runs_through_every_estimator(trained):
    model, images = trained["model"], trained["images"]
    x = images[:6]
    iwae = iwae_log_likelihood(model, x, 16)
    bound = amortized_bound(model, x, 4, repeats=2)
    svi = iw_svi_log_likelihood(model, x, k=16, l=2, steps=5)
    ais = ais_log_likelihood(model, x, num_intermediate=5, chains=2, leapfrog_steps=2)
    gap = inference_gap(svi, bound)
    x_sim, z_sim = simulate(model, 4)
    assert x_sim.shape == (4, 1, 8, 8) and z_sim.shape == (4, 16)
    model.likelihood.validate(x_sim)  # simulated data lie on the 17-level grid
    lower, upper = bdmc(model, x_sim, z_sim, num_intermediate=5, chains=2, leapfrog_steps=2)
    for est in (iwae, bound, svi, ais, gap, lower, upper):
        assert torch.isfinite(est.values).all(), est.name
    assert (iwae.values < 0).all() and (svi.values < 0).all() and (ais.values < 0).all()
    settings = EvaluationSettings(estimators=("bound", "iwae", "iwsvi", "ais", "bdmc"), k_iwae=16, svi_k=16, svi_l=2,
                                  svi_steps=5, ais_intermediate=5, ais_chains=2, ais_leapfrog=2, bdmc_examples=3,
                                  bound_repeats=2, device="cpu")
    out = evaluate_model(model, x, settings, bound_k=1)
    assert set(out) == {"bound", "iwae", "iwsvi", "ais", "gap", "bdmc_lower", "bdmc_upper", "bdmc_iwsvi"}
    assert out["bdmc_lower"].values.shape == (3,) and out["bdmc_iwsvi"].values.shape == (3,)
    assert "bits/dim" in format_table(out) and "BDMC" in format_table(out)
