"""Estimators (IWAE-k, IW-SVI, AIS, the inference gap) and the evaluation layer.

Accuracy is judged against the exact ln p(x) of a 2-d latent model (tests/ground_truth.py), with
one-sided Monte Carlo allowances: an estimator above the truth beyond its noise fails.
"""

import hashlib
import json
import math
import types

import pytest
import torch
from ground_truth import exact_log_marginal, tiny_data, tiny_model

from airvae.config import Architecture, RunConfig
from airvae.estimators import (
    Estimate,
    ais_log_likelihood,
    amortized_bound,
    bdmc,
    fit_iw_svi,
    inference_gap,
    iw_svi_log_likelihood,
    iwae_given_q,
    iwae_log_likelihood,
    resolve_device,
    simulate,
)
from airvae.evaluation import EvaluationSettings, evaluate_model, evaluate_run, format_table, stored_evaluation
from airvae.iwsvi_study import iwsvi_vs_iwae_study


@pytest.fixture(scope="module")
def case():
    model = tiny_model()
    x = tiny_data(model, n=6)
    return model, x, exact_log_marginal(model, x)


class DecodeCounter:
    """Counts latents passed through the decoder (a forward pre-hook: z is [..., z_dim])."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.decoder.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.count += args[0].shape[:-1].numel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def snapshot(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# IWAE-k: chunking and sample counts


@pytest.mark.parametrize("k", [1, 5, 7, 64])
def test_chunked_and_unchunked_iwae_agree(case, k):
    model, x, _ = case
    reference = iwae_log_likelihood(model, x, k, seed=3, chunk_samples=10**6).values
    for chunk in (1, 2, 3, 5, 6, 64, 100):  # incl. k not divisible by the chunk, several examples per chunk
        values = iwae_log_likelihood(model, x, k, seed=3, chunk_samples=chunk).values
        assert torch.allclose(values, reference, atol=1e-5, rtol=0), (k, chunk)
    other = iwae_log_likelihood(model, x, k, seed=4).values
    assert k == 1 or not torch.allclose(other, reference, atol=1e-3)  # the seed matters


@pytest.mark.parametrize("k,chunk", [(1, 4), (7, 3), (7, 7), (10, 4), (5, 100)])
def test_iwae_decodes_exactly_k_samples_per_example(case, k, chunk):
    model, x, _ = case
    for n in (1, x.shape[0]):
        with DecodeCounter(model) as counter:
            iwae_log_likelihood(model, x[:n], k, chunk_samples=chunk)
        assert counter.count == n * k
    with DecodeCounter(model) as counter:
        amortized_bound(model, x, k, repeats=3, chunk_samples=chunk)
    assert counter.count == 3 * x.shape[0] * k


def test_iw_svi_decodes_l_per_step_then_exactly_k(case):
    model, x, _ = case
    with DecodeCounter(model) as counter:
        iw_svi_log_likelihood(model, x, k=13, l=3, steps=4, chunk_samples=5, chunk_examples=4)
    assert counter.count == x.shape[0] * (4 * 3 + 13)


def test_amortized_bound_with_one_repeat_is_iwae_k(case):
    model, x, _ = case
    assert torch.equal(amortized_bound(model, x, 6, seed=2).values, iwae_log_likelihood(model, x, 6, seed=2).values)


# ----------------------------------------------------------------------------------------------
# Accuracy against the exact ln p(x)


def test_iwae_5000_is_below_exact_and_close(case):
    model, x, exact = case
    n, repeats = x.shape[0], 10
    values = iwae_log_likelihood(model, x.repeat(repeats, 1), 5000).values.view(repeats, n)
    mean, se = values.mean(0), values.std(0) / math.sqrt(repeats)
    assert (mean <= exact + 4 * se + 1e-6).all()
    assert ((exact - mean) < 0.05).all()


def test_iw_svi_is_below_exact_and_within_005_nats(case):
    model, x, exact = case
    n, repeats = x.shape[0], 20
    mean_q, std_q = fit_iw_svi(model, x, l=8, steps=300, seed=0)
    # Score the fitted q many times (independent draws) to know its Monte Carlo error.
    values = iwae_given_q(model, x.repeat(repeats, 1), mean_q.repeat(repeats, 1), std_q.repeat(repeats, 1),
                          5000, seed=1).view(repeats, n)
    mean, se = values.mean(0), values.std(0) / math.sqrt(repeats)
    assert (mean <= exact + 4 * se + 1e-6).all(), ((mean - exact).tolist(), se.tolist())
    assert ((exact - mean) < 0.05).all(), (exact - mean).tolist()
    # The public one-call estimator fits the same q (same seed) and scores it once.
    est = iw_svi_log_likelihood(model, x, k=5000, l=8, steps=300, seed=0)
    assert est.settings == {"k": 5000, "l": 8, "steps": 300, "lr": est.settings["lr"],
                            "lr_decay": est.settings["lr_decay"], "seed": 0}
    assert abs((exact - est.values).mean().item()) < 0.05


def test_iw_svi_beats_the_amortized_q(case):
    """With k = l = 1, IW-SVI is SVI on the ELBO (eq. 6): it must close part of the amortization gap."""
    model, x, exact = case
    repeats = 300
    amortized = amortized_bound(model, x, 1, repeats=repeats, seed=1).values
    mean_q, std_q = fit_iw_svi(model, x, l=1, steps=300, seed=0)
    svi = iwae_given_q(model, x, mean_q, std_q, 1, repeats=repeats, seed=1)
    assert (svi - amortized).mean() > 0.1
    assert (svi < exact).all()  # the ELBO of any q stays below ln p(x)


def test_iw_svi_with_zero_steps_is_iwae_k(case):
    model, x, _ = case
    assert torch.equal(iw_svi_log_likelihood(model, x, k=50, steps=0, seed=7).values,
                       iwae_log_likelihood(model, x, 50, seed=7).values)


def test_iw_svi_does_not_depend_on_chunking(case):
    model, x, _ = case
    a = iw_svi_log_likelihood(model, x, k=64, l=4, steps=40, chunk_examples=100, chunk_samples=10**6).values
    b = iw_svi_log_likelihood(model, x, k=64, l=4, steps=40, chunk_examples=2, chunk_samples=7).values
    assert torch.allclose(a, b, atol=1e-4, rtol=0)


def test_ais_is_within_005_nats_of_exact(case):
    model, x, exact = case
    n, repeats = x.shape[0], 4
    est = ais_log_likelihood(model, x.repeat(repeats, 1), num_intermediate=500, chains=64, seed=0)
    values = est.values.view(repeats, n)
    mean, se = values.mean(0), values.std(0) / math.sqrt(repeats)
    err = exact - mean
    assert (err.abs() < 0.05).all(), err.tolist()
    assert abs(err.mean()) < 0.02
    # Unbiased for p(x), so not above ln p(x) beyond noise (0.01: a 4-replicate stderr is itself noisy).
    assert (mean <= exact + 4 * se + 0.01).all()
    assert 0.4 < est.settings["mean_acceptance"] < 0.95  # the step-size adaptation works


def test_ais_with_few_annealing_steps_is_worse_and_below(case):
    """Two annealing steps are barely better than prior sampling: far below ln p(x), never above."""
    model, x, exact = case
    est = ais_log_likelihood(model, x, num_intermediate=2, chains=4, leapfrog_steps=2, tuning_chains=0, seed=0)
    assert (exact - est.values).mean() > 0.2


# ----------------------------------------------------------------------------------------------
# The model is never changed


@pytest.mark.parametrize("estimator", ["iwsvi", "ais"])
def test_estimators_leave_the_model_bit_identical(estimator):
    model = tiny_model().train()  # in training mode, parameters requiring grad: as the trainer leaves it
    x = tiny_data(model, n=4)
    before = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    if estimator == "iwsvi":
        iw_svi_log_likelihood(model, x, k=16, l=4, steps=20, lr=0.05)
    else:
        ais_log_likelihood(model, x, num_intermediate=10, chains=4, leapfrog_steps=3)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags and all(flags)
    assert model.training


def test_iw_svi_works_under_no_grad(case):
    model, x, _ = case
    reference = iw_svi_log_likelihood(model, x, k=32, steps=10).values
    with torch.no_grad():
        assert torch.equal(iw_svi_log_likelihood(model, x, k=32, steps=10).values, reference)


# ----------------------------------------------------------------------------------------------
# Inference gap and the evaluation layer


def test_inference_gap_is_the_difference_and_checks_shapes():
    ll = Estimate("iwsvi", torch.tensor([-1.0, -2.0], dtype=torch.float64), seconds=1.0)
    bound = Estimate("bound", torch.tensor([-3.0, -2.5], dtype=torch.float64), seconds=2.0)
    gap = inference_gap(ll, bound)
    assert gap.values.tolist() == [2.0, 0.5] and gap.seconds == 3.0
    with pytest.raises(ValueError, match="same examples"):
        inference_gap(ll, Estimate("bound", torch.zeros(3, dtype=torch.float64)))


def test_a_positive_gap_is_positive_in_bits_per_dim_and_the_log_likelihoods_are_unchanged():
    """A gap is a difference of log-likelihoods: gap / (dims ln 2) bits/dim, positive for a positive gap."""
    dims = 784
    ll = Estimate("iwsvi", torch.tensor([-90.0, -100.0], dtype=torch.float64), dims=dims)
    bound = Estimate("bound", torch.tensor([-96.01, -106.01], dtype=torch.float64), dims=dims)
    gap = inference_gap(ll, bound)
    assert gap.mean == pytest.approx(6.01)
    assert gap.bits_per_dim == pytest.approx(6.01 / (dims * math.log(2)), rel=1e-12) and gap.bits_per_dim > 0
    assert ll.bits_per_dim == pytest.approx(95.0 / (dims * math.log(2)), rel=1e-12)  # -mean / (dims ln 2) as before
    assert bound.bits_per_dim == pytest.approx(101.01 / (dims * math.log(2)), rel=1e-12)
    stored = gap.to_dict()
    assert Estimate.from_dict(stored).bits_per_dim == pytest.approx(gap.bits_per_dim, rel=1e-15)
    # an evaluation file written before gaps said so: a "gap" is read as a difference all the same
    older = {key: value for key, value in stored.items() if key != "difference"}
    assert Estimate.from_dict(older).bits_per_dim == pytest.approx(gap.bits_per_dim, rel=1e-15)
    assert "difference" not in ll.to_dict()  # the other estimates' records are unchanged


def small_settings(**changes):
    base = dict(estimators=("bound", "iwsvi", "iwae"), k_iwae=64, svi_k=64, svi_l=4, svi_steps=30,
                bound_repeats=3, device="cpu")
    return EvaluationSettings(**{**base, **changes})


def test_evaluate_model_gap_is_iwsvi_minus_bound(case):
    model, x, _ = case
    settings = small_settings(max_examples=5)
    assert settings.estimators == ("bound", "iwae", "iwsvi", "gap")  # gap added, canonical order
    out = evaluate_model(model, x, settings, bound_k=2)
    assert set(out) == {"bound", "iwae", "iwsvi", "gap"}
    assert all(est.values.shape == (5,) and est.values.dtype == torch.float64 for est in out.values())
    assert torch.equal(out["gap"].values, out["iwsvi"].values - out["bound"].values)
    assert out["bound"].settings["k"] == 2 and out["bound"].settings["repeats"] == 3
    assert (out["gap"].values > 0).mean(dtype=torch.float64) > 0.5  # the optimized q beats the encoder's
    with pytest.raises(ValueError, match="bound_k"):
        evaluate_model(model, x, settings)


@pytest.mark.parametrize("field,value", [
    ("estimators", ("bound", "elbo")), ("estimators", ()), ("estimators", ("gap", "bound")),
    ("split", "validation"), ("k_iwae", 0), ("svi_k", 2.5), ("svi_l", 0), ("svi_steps", -1),
    ("svi_lr", 0.0), ("svi_lr", float("nan")), ("svi_lr_decay", 1.5), ("ais_intermediate", 0),
    ("ais_chains", 0), ("ais_schedule", "cosine"), ("chunk_samples", 0), ("seed", -1),
    ("device", "gpu"), ("max_examples", 0), ("bound_k", 0), ("bound_repeats", True), ("bdmc_examples", 0),
])
def test_settings_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"invalid {field} ="):
        EvaluationSettings(**{field: value})


def test_settings_hash_ignores_execution_details_only():
    a = EvaluationSettings(device="cpu", chunk_samples=100)
    assert a.short_hash() == EvaluationSettings(device="auto").short_hash()
    assert a.short_hash() != EvaluationSettings(svi_steps=10).short_hash()
    assert EvaluationSettings.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def test_format_table_shows_the_numbers_in_the_papers_signs(case):
    model, x, _ = case
    out = evaluate_model(model, x, small_settings(), bound_k=1)
    table = format_table(out)
    for name in ("iwsvi", "bound", "iwae"):
        assert f"{-out[name].mean:.2f}" in table and f"± {out[name].stderr:.2f}" in table
    assert f"{out['gap'].mean:.2f}" in table
    assert "-ln p(x)" in table and "Δinf" in table and "-L_1(x)" in table
    assert len(table.splitlines()) == 2 + 4


def fake_run(monkeypatch, tmp_path, model, x):
    """A run directory whose loading (config, weights, data: not under test here) evaluation gets from stand-ins."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "best.pt").write_bytes(b"weights v1")
    calls = {"load": 0}

    cfg = RunConfig(dataset="tiny", architecture=Architecture("d16", "d16", 2), x_dim=12, k=2)
    trained = model

    def load_trained_model_with_digest(path, which="best", device=None, model=None):
        calls["load"] += 1
        return cfg, trained, hashlib.sha256((run_dir / "checkpoints" / "best.pt").read_bytes()).hexdigest()

    def load_dataset(name, data_dir=None, **kwargs):
        data = x.to(torch.uint8).numpy()
        return types.SimpleNamespace(split=lambda s: data, deviation="synthetic stand-in", dim=data.shape[1])

    import airvae.evaluation as evaluation

    monkeypatch.setattr(evaluation, "load_config", lambda path: cfg)
    monkeypatch.setattr(evaluation, "load_trained_model_with_digest", load_trained_model_with_digest)
    monkeypatch.setattr(evaluation, "read_marker", lambda path: None)  # from before markers: no recorded digest
    monkeypatch.setattr(evaluation, "load_dataset", load_dataset)
    monkeypatch.setattr(evaluation, "dataset_digest", lambda dataset: "d" * 64)
    return run_dir, calls


def test_evaluate_run_writes_and_reuses_its_result(monkeypatch, tmp_path, case):
    model, x, _ = case
    run_dir, calls = fake_run(monkeypatch, tmp_path, model, x)
    settings = small_settings(max_examples=4)
    result = evaluate_run(run_dir, settings, progress=False)
    path = run_dir / "evaluations" / f"test-{settings.short_hash()}.json"
    assert path.exists() and calls["load"] == 1
    stored = json.loads(path.read_text())
    assert stored == json.loads(json.dumps(result))
    assert stored["dataset"] == "tiny" and stored["deviation"] == "synthetic stand-in" and stored["n"] == 4
    assert stored["bound_k"] == 2 and len(stored["estimates"]["iwsvi"]["values"]) == 4
    gap = stored["estimates"]["gap"]
    assert gap["values"] == pytest.approx([a - b for a, b in zip(stored["estimates"]["iwsvi"]["values"],
                                                                  stored["estimates"]["bound"]["values"], strict=True)])
    assert not list((run_dir / "evaluations").glob("*.tmp"))
    # Same settings (device differs: not part of the key): served from disk without loading the model.
    assert evaluate_run(run_dir, small_settings(max_examples=4, device="auto"), progress=False) == stored
    assert calls["load"] == 1 and stored_evaluation(run_dir, settings) == stored
    evaluate_run(run_dir, settings, recompute=True, progress=False)
    assert calls["load"] == 2
    evaluate_run(run_dir, small_settings(max_examples=3), progress=False)  # other settings: another file
    assert calls["load"] == 3 and len(list((run_dir / "evaluations").glob("test-*.json"))) == 2
    # A new best checkpoint makes the cached result stale.
    (run_dir / "checkpoints" / "best.pt").write_bytes(b"weights v2")
    assert stored_evaluation(run_dir, settings) is None
    evaluate_run(run_dir, settings, progress=False)
    assert calls["load"] == 4
    assert "synthetic stand-in" in format_table(stored)



def test_an_interrupted_evaluation_resumes_after_its_last_saved_part_with_the_values_of_one_pass(
        monkeypatch, tmp_path, case):
    """evaluate_run saves every part_examples examples; stopped in the middle, it computes only the parts
    not saved, and the joined record equals one pass over all the examples (each example has its own
    random streams), AIS's averaged acceptance rate included. Stale parts (another checkpoint) are not used."""
    import airvae.evaluation as evaluation

    model, x, _ = case
    run_dir, calls = fake_run(monkeypatch, tmp_path, model, x)
    settings = small_settings(estimators=("bound", "iwsvi", "iwae", "ais"), ais_intermediate=8, ais_chains=2,
                              part_examples=2)
    one_pass = evaluate_model(model, x, settings, bound_k=2)
    real_estimate, started, stops = evaluation._estimate, [], []

    def estimate(model, x, settings, names, bound_k, progress, first_index=0, done=None):
        if names and first_index == 4 and not stops:
            stops.append(first_index)
            raise KeyboardInterrupt  # as Ctrl-C, or the machine going away, in the third part
        if names:
            started.append(first_index)
        return real_estimate(model, x, settings, names, bound_k, progress, first_index, done)

    monkeypatch.setattr(evaluation, "_estimate", estimate)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run_dir, settings, progress=False)
    saved = json.loads(evaluation.partial_path(run_dir, settings).read_text())
    assert [(part["start"], part["stop"]) for part in saved["parts"]] == [(0, 2), (2, 4)]
    assert not evaluation.evaluation_path(run_dir, settings).exists()
    started.clear()
    result = evaluate_run(run_dir, settings, progress=False)
    assert started[0] == 4 and 0 not in started and 2 not in started  # only the part not saved
    assert not evaluation.partial_path(run_dir, settings).exists()
    for name, whole in one_pass.items():
        joined = result["estimates"][name]
        assert torch.allclose(torch.tensor(joined["values"], dtype=torch.float64), whole.values, atol=1e-5, rtol=0)
        assert joined["name"] == whole.name and joined["n"] == len(x)
    assert result["estimates"]["ais"]["settings"]["mean_acceptance"] == pytest.approx(
        one_pass["ais"].settings["mean_acceptance"], abs=1e-6)
    assert result["seconds"] >= sum(part["seconds"] for part in saved["parts"])
    # Parts that do not follow one another from the first example are computed again, not joined.
    evaluation.partial_path(run_dir, settings).write_text(json.dumps({**saved, "parts": saved["parts"][1:]}))
    started.clear()
    evaluation.evaluation_path(run_dir, settings).unlink()
    evaluate_run(run_dir, settings, progress=False)
    assert started[:3] == [0, 2, 4]
    # Parts saved from another checkpoint are computed again, not joined.
    evaluation.partial_path(run_dir, settings).write_text(json.dumps(saved))
    (run_dir / "checkpoints" / "best.pt").write_bytes(b"weights v2")
    started.clear()
    evaluate_run(run_dir, settings, progress=False)
    assert started[:3] == [0, 2, 4]


def test_joined_estimates_keep_their_settings_and_refuse_parts_of_another_estimator():
    a = Estimate("ais", torch.tensor([1.0, 2.0], dtype=torch.float64), {"chains": 2, "mean_acceptance": 0.5}, 1.0)
    b = Estimate("ais", torch.tensor([3.0], dtype=torch.float64), {"chains": 2, "mean_acceptance": 0.8}, 2.0)
    joined = Estimate.concat([a, b])
    assert joined.values.tolist() == [1.0, 2.0, 3.0] and joined.seconds == 3.0
    assert joined.settings == {"chains": 2, "mean_acceptance": pytest.approx(0.6)}  # over the 3 examples
    with pytest.raises(ValueError, match="share their estimator and settings"):
        Estimate.concat([a, Estimate("ais", b.values, {"chains": 4, "mean_acceptance": 0.8})])
    with pytest.raises(ValueError, match="no parts"):
        Estimate.concat([])
    with pytest.raises(ValueError, match="first_index must not be negative"):
        iwae_log_likelihood(tiny_model(), torch.zeros(1, 12), 4, first_index=-1)

def test_study_writes_figure_and_data(tmp_path, case):
    model, x, _ = case
    from airvae.figures import draw_figure3

    data = iwsvi_vs_iwae_study(model, x[:3], ks=(1, 8), steps_list=(0, 5), fixed_steps=5, svi_k=8, l=2,
                               out_dir=tmp_path)
    assert draw_figure3(data, tmp_path / "figure3.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "figure3.json").read_text())
    assert [p["k"] for p in saved["iwae"]] == [1, 8] and [p["steps"] for p in saved["iwsvi_over_steps"]] == [0, 5]
    assert [p["k"] for p in saved["iwsvi_over_k"]] == [1, 8]
    # T = 0 scores the encoder's q: IW-SVI(k=8, T=0) is IWAE-8 with the same seed.
    assert saved["iwsvi_over_steps"][0]["mean"] == pytest.approx(saved["iwae"][1]["mean"], abs=1e-12)
    assert all(p["seconds"] > 0 for p in saved["iwae"] + saved["iwsvi_over_steps"] + saved["iwsvi_over_k"])
    assert data["iwsvi_over_k"][1]["mean"] == saved["iwsvi_over_k"][1]["mean"]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_sums_stay_float64_except_on_mps_which_has_none():
    from airvae.devices import accumulator_dtype

    assert accumulator_dtype(torch.device("cpu")) == accumulator_dtype(torch.device("cuda:0")) == torch.float64
    assert accumulator_dtype(torch.device("mps")) == torch.float32


# ----------------------------------------------------------------------------------------------
# BDMC, simulation, the model protocol


def test_bdmc_sandwich_on_the_2d_model(case):
    """Against quadrature on a Bernoulli model: lower <= ln p(x) <= upper on average over simulated
    examples (one-sided Monte Carlo allowances), narrowing from 3 to 100 annealing steps."""
    model = case[0]
    x, z = simulate(model, 24, seed=2)
    exact = exact_log_marginal(model, x)
    widths = []
    for steps in (3, 100):
        lower, upper = bdmc(model, x, z, num_intermediate=steps, chains=4, leapfrog_steps=5)
        below, above = exact - lower.values, upper.values - exact
        assert below.mean() > -3 * below.std() / math.sqrt(24) and above.mean() > -3 * above.std() / math.sqrt(24)
        widths.append((upper.values - lower.values).mean().item())
    assert widths[0] > 1.0 and widths[1] < widths[0] / 4, widths


def test_bdmc_lower_is_ais_and_nothing_depends_on_chunking(case):
    model = case[0]
    x, z = simulate(model, 5, seed=1)
    x_chunked, z_chunked = simulate(model, 7, seed=1, chunk_examples=2)
    assert torch.equal(x_chunked[:5], x) and torch.equal(z_chunked[:5], z)  # example i's own stream
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    kwargs = dict(num_intermediate=6, chains=3, leapfrog_steps=2, seed=4)
    lower, upper = bdmc(model, x, z, **kwargs)
    assert torch.equal(lower.values, ais_log_likelihood(model, x, **kwargs).values)
    lower_1, upper_1 = bdmc(model, x, z, chunk_examples=2, **kwargs)
    torch.testing.assert_close(lower_1.values, lower.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(upper_1.values, upper.values, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one latent per example"):
        bdmc(model, x, z[:3], **kwargs)


def test_estimators_name_what_a_model_lacks():
    class NoLikelihood(torch.nn.Module):
        decoder = None

        def encode(self, x):
            return x, x

    with pytest.raises(TypeError, match="missing likelihood.*LatentVariableModel"):
        iwae_log_likelihood(NoLikelihood(), torch.zeros(2, 3), 4)


def test_evaluate_model_adds_bdmc_on_simulated_examples(case):
    model, x, _ = case
    settings = small_settings(estimators=("iwsvi", "bdmc"), bdmc_examples=3, ais_intermediate=4, ais_chains=2,
                              ais_leapfrog=2)
    out = evaluate_model(model, x, settings)
    assert set(out) == {"iwsvi", "bdmc_lower", "bdmc_upper", "bdmc_iwsvi"}
    assert out["iwsvi"].values.shape == (6,) and all(out[k].values.shape == (3,) for k in out if k != "iwsvi")
    table = format_table(out)
    assert "BDMC forward AIS" in table and "BDMC reverse AIS" in table and "simulated" in table
    # bits/dim = nats / (dims ln 2), beside the nats
    assert f"{-out['iwsvi'].mean / (12 * math.log(2)):.4f}" in table


def test_every_registered_estimator_knows_its_cost_memory_and_single_model_call(case):
    """The registry is the one list of estimators an evaluation may choose (in canonical order, each
    after what it needs): each has a meaning, a cost within a factor 2 of the latents it really
    decodes, a memory estimate by named part, and a single-model call adding its own estimates,
    which is what evaluate_model runs."""
    from airvae.estimators import REGISTRY, Estimator
    from airvae.estimators.registry import Footprint
    from airvae.evaluation import ESTIMATORS

    model, x, _ = case
    assert ESTIMATORS == tuple(REGISTRY) == ("bound", "iwae", "iwsvi", "ais", "gap", "bdmc")
    settings = small_settings(estimators=ESTIMATORS, k_iwae=8, svi_k=8, svi_steps=3, ais_intermediate=3,
                              ais_chains=2, ais_leapfrog=2, bdmc_examples=2)
    footprint = Footprint(z_dim=2, row=40, training_k=2, iwae=lambda k, n, chunk: 4 * k * min(n, chunk), float_bytes=4)
    n, done = x.shape[0], {}
    for name, estimator in REGISTRY.items():
        assert isinstance(estimator, Estimator) and estimator.name == name and estimator.meaning
        assert set(estimator.needs) <= set(done)
        parts = estimator.memory(footprint, settings, n)
        assert all(isinstance(b, int) and b > 0 for b in parts.values()) and bool(parts) == (not estimator.needs)
        cost = estimator.cost(settings, n, 2)
        with DecodeCounter(model) as decoded:
            added = estimator.single(model, x, settings, bound_k=2, progress=False, done=done)
        assert decoded.count / 2 <= cost <= 2 * decoded.count, (name, cost, decoded.count)
        assert added and all(key == name or key.startswith(f"{name}_") for key in added)
        assert all(isinstance(e, Estimate) and e.values.dtype == torch.float64 for e in added.values())
        done.update(added)
    assert done.keys() == evaluate_model(model, x, settings, bound_k=2).keys()


def test_settings_keep_their_cache_key_unless_bdmc_is_chosen():
    assert "bdmc_examples" not in EvaluationSettings().identity()  # choosing other estimators keeps their key
    chosen = EvaluationSettings(estimators=("bdmc",))
    assert chosen.identity()["bdmc_examples"] == 100
    assert chosen.short_hash() != EvaluationSettings(estimators=("bdmc",), bdmc_examples=50).short_hash()


# ----------------------------------------------------------------------------------------------
# IW-SVI scores with draws independent of those it optimized on (else its estimate is optimistic)


def test_iw_svi_scores_its_fitted_q_with_the_scoring_stream_not_the_optimizations_draws(case, monkeypatch):
    """IW-SVI = IWAE-k of the fitted q on each example's scoring stream (stream 0), computed here by
    hand; never the draws of the optimization stream, which the fitted q is tuned to (optimistic)."""
    from airvae.estimators import STREAM_SCORE, STREAM_SVI, amortized, example_generator, iwsvi

    model, x, _ = case
    k, samples, steps, seed = 13, 3, 20, 5
    draws = {"fit": [], "score": []}  # every eps [n, b, z] the estimator decodes, by phase
    real = amortized.log_weights_from_noise

    def spy(model, xb, mean, std, eps):
        draws["fit" if torch.is_grad_enabled() else "score"].append(eps.detach().clone())
        return real(model, xb, mean, std, eps)

    with monkeypatch.context() as patch:
        for module in (amortized, iwsvi):  # the scoring's and the fit's one path to the log weights
            patch.setattr(module, "log_weights_from_noise", spy)
        est = iw_svi_log_likelihood(model, x, k=k, l=samples, steps=steps, seed=seed).values
    assert len(draws["fit"]) == steps and draws["score"], "the spy missed the optimization or the scoring"
    mean_q, std_q = fit_iw_svi(model, x, l=samples, steps=steps, seed=seed)
    z_dim = mean_q.shape[-1]

    def scored_with(stream):  # IWAE-k of the fitted q, example i's k draws: the first randn(k, z) of a stream
        out = []
        for i in range(x.shape[0]):
            eps = torch.randn(k, z_dim, generator=example_generator(seed, i, torch.device("cpu"), stream))
            log_w = real(model, x[i:i + 1], mean_q[i:i + 1], std_q[i:i + 1], eps[:, None, :])[:, 0]
            out.append(torch.logsumexp(log_w.double(), 0) - math.log(k))
        return torch.stack(out)

    with torch.no_grad():
        honest, reused = scored_with(STREAM_SCORE), scored_with(STREAM_SVI)
    assert not torch.allclose(honest, reused, atol=1e-3), "the scoring and optimization streams coincide"
    assert torch.allclose(est, honest, atol=1e-4, rtol=0), (
        f"IW-SVI is not IWAE-{k} of its fitted q on the scoring stream (STREAM_SCORE): "
        f"{est.tolist()} != {honest.tolist()}"
        + (" - it equals the score on the optimization stream's draws (STREAM_SVI): optimistically biased"
           if torch.allclose(est, reused, atol=1e-4, rtol=0) else ""))
    # and directly: no latent draw of the scoring is one the optimization used on that example
    fit = torch.cat(draws["fit"]).transpose(0, 1)  # [b, steps * samples, z]
    score = torch.cat(draws["score"]).transpose(0, 1)  # [b, k, z]
    assert score.shape[:2] == (x.shape[0], k)
    shared = [(i, j) for i in range(x.shape[0]) for j in range(k) if (fit[i] == score[i, j]).all(-1).any()]
    assert not shared, f"IW-SVI scored with draws it optimized on (example, draw): {shared[:5]}"
