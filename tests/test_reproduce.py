"""Reproductions end to end at the smoke budget, with the local executor and with Ray; the paper's
own findings per cell and the claims REPORT.md builds from them."""

import json
import math
import re
from dataclasses import asdict

import pytest

from airvae.cli import main
from airvae.reproduce import (EVALUATION_BUDGETS, cell_values, estimator_labels, estimators_present, paper_tables,
                              plan, render, table_claims)
from airvae.sweep import Job

AIR = ("denoise-0.5", "denoise-1.0", "wni")
# The cells where the paper's AIR row does NOT have a smaller inference gap than its baseline row
# (read off Tables 1-3 by hand): (table, family, dataset).
NO_GAP_REDUCTION = {("table1", "denoise-0.5", "omniglot"), ("table1", "denoise-1.0", "omniglot"),
                    ("table2", "wni", "omniglot"), ("table2", "wni", "caltech"),
                    ("table3", "denoise-0.5", "omniglot"), ("table3", "denoise-1.0", "omniglot"),
                    ("table3", "wni", "omniglot")}


def test_paper_tables_are_stored_with_all_cells():
    tables = paper_tables()
    assert tables["table1"]["rows"]["plain"]["mnist"]["neg_log_likelihood"] == [86.93, 0.04]
    assert tables["table3"]["rows"]["wni"]["caltech"]["inference_gap"] == [14.42, 0.20]
    assert tables["table4"]["rows"]["large-encoder"]["64"]["neg_bound"] == [92.61, 0.10]
    assert tables["table7"]["selected"]["denoise-0.5"]["64"]["caltech"] == 15.0
    for name in ("table1", "table2", "table3"):
        for family in ("plain", "denoise-0.5", "denoise-1.0", "wni"):
            for dataset in ("mnist", "omniglot", "caltech"):
                assert len(tables[name]["rows"][family][dataset]) == 3


def test_stored_paper_findings_are_recomputed_from_the_papers_numbers():
    tables = paper_tables()
    for name in ("table1", "table2", "table3", "table4"):
        rows, findings = tables[name]["rows"], tables[name]["findings"]
        for family in AIR:
            for column, found in findings[family].items():
                air, base = rows[family][column], rows["plain"][column]
                gain = base["neg_log_likelihood"][0] - air["neg_log_likelihood"][0]
                reduction = base["inference_gap"][0] - air["inference_gap"][0]
                se = {m: math.hypot(air[m][1], base[m][1]) for m in ("neg_log_likelihood", "inference_gap")}
                assert found == {"log_likelihood_gain": round(gain, 2), "improves_log_likelihood": gain > 0,
                                 "inference_gap_reduction": round(reduction, 2), "reduces_inference_gap": reduction > 0,
                                 "log_likelihood_gain_se": round(se["neg_log_likelihood"], 2),
                                 "inference_gap_reduction_se": round(se["inference_gap"], 2),
                                 "log_likelihood_difference_clear": abs(gain) > 2 * se["neg_log_likelihood"],
                                 "inference_gap_difference_clear": abs(reduction) > 2 * se["inference_gap"]}
    no_reduction = {(name, family, column) for name in ("table1", "table2", "table3")
                    for family, cells in tables[name]["findings"].items() for column, found in cells.items()
                    if not found["reduces_inference_gap"]}
    assert no_reduction == NO_GAP_REDUCTION
    assert all(found["improves_log_likelihood"] for name in ("table1", "table2", "table3", "table4")
               for family in AIR for found in tables[name]["findings"][family].values())
    large = tables["table4"]["findings"]["large-encoder"]
    assert {k: large[k]["log_likelihood_loss"] for k in large} == {"1": 0.50, "8": 0.77, "64": 0.64}
    assert {k: large[k]["log_likelihood_loss_vs_best_air"] for k in large} == {"1": 1.01, "8": 1.20, "64": 1.15}


def _claims(target, values=None, estimators=("iwsvi",)):
    columns = ["mnist", "omniglot", "caltech"] if target != "table4" else ["k=1", "k=8", "k=64"]
    return table_claims(target, columns, values or {}, list(estimators), estimator_labels([]))


def test_claim_verdicts_quote_the_papers_finding_for_each_cell():
    labels = {"DVAE (alpha=0.5)": "denoise-0.5", "DIWAE (alpha=0.5)": "denoise-0.5", "DVAE (alpha=1.0)": "denoise-1.0",
              "DIWAE (alpha=1.0)": "denoise-1.0", "WNI-VAE": "wni", "WNI-IWAE": "wni"}
    seen, tables = {"gap": set(), "ll": set()}, paper_tables()
    for target in ("table1", "table2", "table3"):
        for line in _claims(target):
            match = re.match(r"- (\w+), (.+?) (improves test log-likelihood|reduces the test inference gap) "
                             r".*?: \*\*paper: (yes|no)(, within its noise)?\*\*", line)
            if match:
                dataset, label, what, found, noise = match.groups()
                cell = (target, labels[label], dataset)
                kind = "gap" if "gap" in what else "ll"
                seen[kind].add(cell)
                # a difference within twice the paper's own standard errors established no direction
                finding = tables[target]["findings"][labels[label]][dataset]
                clear = finding["inference_gap_difference_clear" if kind == "gap" else "log_likelihood_difference_clear"]
                # the 7 cells where the paper did not find a gap reduction say so, the others that it did
                assert found == ("no" if kind == "gap" and cell in NO_GAP_REDUCTION else "yes"), line
                assert bool(noise) == (not clear), line  # and whether its own standard errors back that
    assert len(seen["gap"]) == len(seen["ll"]) == 27  # every cell of Tables 1-3 was checked
    caltech_wni = next(line for line in _claims("table2") if line.startswith("- caltech, WNI-IWAE reduces"))
    assert "Δinf 22.18 vs 21.52: 0.66 nats larger" in caltech_wni


def test_table4_states_the_large_encoders_real_loss_per_k():
    lines = [line for line in _claims("table4") if "larger encoder" in line]
    assert len(lines) == 3 and not any("(paper: by over 1 nat)" in line for line in lines)
    for line, loss, best in zip(lines, ("0.50", "0.77", "0.64"), ("1.01", "1.20", "1.15")):
        assert "**paper: yes**" in line and f"{loss} nats worse than IWAE" in line and f"{best} nats" in line


def _evaluated_row(family, strength, seed, bound, iwsvi, iwae):
    """A selected run of Table 2 on Caltech as the report reads it: summary and stored estimates."""
    job = Job(family, "caltech", 8, 1, strength, seed, "smoke")
    estimates = {"bound": {"mean": bound}, "iwsvi": {"mean": iwsvi, "settings": {"k": 500, "l": 8, "steps": 200}},
                 "iwae": {"mean": iwae, "settings": {"k": 500}}}
    return {"job": job, "summary": {"status": "completed", "best_val_log_likelihood": -100.0},
            "evaluation": {"estimates": estimates}}


def test_estimators_that_disagree_are_flagged_and_verdicts_follow_the_paper_direction():
    # Three seeds each, spread +-0.1 nats. DIWAE(0.5) vs IWAE: 1 nat worse by IW-SVI, 1 nat better by IWAE-500.
    # WNI-IWAE: inference gap 2 nats smaller under both (the seeds cancel in it), where the paper found it larger.
    rows = []
    for seed, noise in enumerate((-0.1, 0.0, 0.1)):
        rows += [_evaluated_row("plain", 0.0, seed, bound=-120 + noise, iwsvi=-100 + noise, iwae=-110 + noise),
                 _evaluated_row("denoise-0.5", 5.0, seed, bound=-121 + noise, iwsvi=-101 + noise, iwae=-109 + noise),
                 _evaluated_row("wni", 5.0, seed, bound=-118 + noise, iwsvi=-100 + noise, iwae=-109 + noise)]
    manifest = {"target": "table2", "datasets": ["caltech"]}
    estimators = estimators_present(rows)
    assert estimators == ["iwsvi", "iwae"]
    lines = table_claims("table2", ["caltech"], cell_values(manifest, rows, estimators), estimators,
                         estimator_labels(rows))

    def block(prefix):
        i = next(i for i, line in enumerate(lines) if line.startswith(prefix))
        return lines[i:i + 4]

    ll = block("- caltech, DIWAE (alpha=0.5) improves test log-likelihood")
    assert "**paper: yes**" in ll[0]
    assert ll[1] == "  - IW-SVI (k=500, l=8, T=200): -1.00 ± 0.08 nats: **contradicts**"
    assert ll[2] == "  - IWAE-500 (encoder q): +1.00 ± 0.08 nats: **supports**"
    assert "estimators disagree" in ll[3]
    gap = block("- caltech, WNI-IWAE reduces the test inference gap")
    # the paper's gap was larger, but within twice its own standard errors: it set no direction,
    # so the statement itself is judged
    assert "**paper: no, within its noise**" in gap[0] and "0.66 nats larger" in gap[0]
    assert gap[1].endswith("+2.00 ± 0.00 nats: **holds here**") and gap[2].endswith("**holds here**")
    assert "disagree" not in gap[3]


def test_mnist_validation_split_is_labelled_a_deviation(tmp_path):
    manifest = {"target": "table1", "datasets": ["mnist"], "budget": "smoke", "seeds": 1, "grid": [5.0],
                "evaluation": dict(EVALUATION_BUDGETS["smoke"], split="test", estimators=["bound", "iwsvi", "gap"]),
                "study": None, "jobs": [asdict(j) for j in plan("table1", ["mnist"], "smoke", 1)]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    report = (render(tmp_path) / "REPORT.md").read_text()  # no run has finished: numbers are n/a
    assert "**Deviation:** MNIST's validation set is Larochelle & Murray's fixed file split" in report
    assert "not the paper's 10000 random images held out of the 60000" in report


def test_plans_cover_the_grid_the_baseline_and_the_seeds():
    jobs = plan("table1", ["caltech"], "quick", seeds=2, grid=(2.5, 5.0))
    assert len(jobs) == 2 * (1 + 3 * 2)
    assert {(j.family, j.strength) for j in jobs} >= {("plain", 0.0), ("wni", 5.0), ("denoise-0.5", 2.5)}
    assert {j.k for j in plan("figure2", ["mnist"], "smoke", 1)} == {1, 8, 64}
    with pytest.raises(ValueError, match="mnist"):
        plan("table4", ["caltech"], "smoke", 1)


def _reproduce(tmp_path, data_dir, *extra):
    out = tmp_path / "out"
    code = main(["reproduce", "table1", "--dataset", "caltech", "--budget", "smoke", "--seeds", "2",
                 "--grid", "2.5,5", "--data-dir", data_dir, "--out", str(out), "--no-progress", "--device", "cpu",
                 *extra])
    assert code == 0
    return out


def _check_outputs(out):
    table = (out / "table1.md").read_text()
    assert "(paper 109.14 ± 0.28)" in table  # VAE on Caltech, beside our number
    assert table.count("\n") == 5 + 1  # header, rule, four model rows
    cells = re.findall(r"\| ([0-9.]+ ± [0-9.]+) \(paper", table)
    assert len(cells) == 4 * 3  # every cell has our mean ± SE over the two seeds
    assert (out / "table1.csv").read_text().startswith("model,strength,column,metric")
    report = (out / "REPORT.md").read_text()
    assert "## Claims" in report and re.search(r"\*\*(supports|contradicts|inconclusive)\*\*", report)
    # Caltech: the paper's gap reductions by DVAE are clear; its log-likelihood gains (0.2-0.5 nats) and WNI's
    # gap reduction (0.02 nats) are within twice its own standard errors
    assert report.count("**paper: yes**") == 2 and report.count("**paper: yes, within its noise**") == 4
    assert "Larochelle" not in report
    assert "IW-SVI (k=16, l=2, T=5)" in report and "IWAE-16 (encoder q)" in report  # both estimators judged
    links = re.findall(r"\[png\]\(([^)]+)\)", report)
    assert len(links) == 4 * 4 + 1  # curves, samples, reconstructions, posterior; weight norms for WNI only
    assert all((out / link).exists() for link in links)
    # Test numbers exist only for the runs selected on validation.
    evaluated = {p.parts[-4] for p in out.glob("runs/caltech/k1-m1/*/seed*/evaluations/*.json")}
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["jobs"]) == 2 * 7
    assert len(evaluated) == 4  # one strength per family


def test_smoke_reproduction_with_the_local_executor(tmp_path, data_dir):
    out = _reproduce(tmp_path, data_dir, "--executor", "local", "--workers", "2")
    _check_outputs(out)
    before = (out / "table1.md").read_text()
    (out / "table1.md").unlink()
    assert main(["report", str(out)]) == 0  # rebuilt from the runs, no training
    assert (out / "table1.md").read_text() == before
    log_lines = (out / "sweep.jsonl").read_text().splitlines()
    _reproduce(tmp_path, data_dir, "--executor", "local")  # idempotent: nothing is trained or evaluated again
    again = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()[len(log_lines):]]
    assert again and not any(r["trained"] for r in again)
    # AIS added later to the evaluated VAE and DVAE(0.5) runs, on the same test examples, is judged too.
    for run in {p.parents[1] for p in out.glob("runs/caltech/k1-m1/*/seed*/evaluations/*.json")}:
        if run.parent.name.startswith(("plain", "denoise-0.5")):
            assert main(["evaluate", str(run), "--estimators", "ais", "--max-examples", "32", "--ais-intermediate",
                         "5", "--ais-chains", "2", "--no-progress", "--device", "cpu"]) == 0
    assert main(["report", str(out)]) == 0
    report = (out / "REPORT.md").read_text()
    assert "**AIS (T=5, 2 chains)** anneals from the prior" in report
    judged = re.findall(r"(- caltech, .*?): \*\*paper.*\n(?:  - .*\n)*?  - AIS \(T=5, 2 chains\): [-+][0-9.]+ ± [0-9.]+ nats",
                        report)
    assert [line.split(" improves")[0].split(" reduces")[0] for line in judged] == ["- caltech, DVAE (alpha=0.5)"] * 2


def test_smoke_reproduction_with_ray(tmp_path, data_dir):
    pytest.importorskip("ray")
    import ray

    try:
        out = _reproduce(tmp_path, data_dir, "--executor", "ray", "--workers", "2")
    finally:
        ray.shutdown()
    _check_outputs(out)


@pytest.mark.parametrize("target", ["figure1", "figure3", "figure4"])
def test_smoke_figures(target, tmp_path, data_dir):
    out = tmp_path / target
    args = ["reproduce", target, "--dataset", "caltech", "--budget", "smoke", "--grid", "5",
            "--data-dir", data_dir, "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    png = out / (f"{target}.png" if target != "figure3" else "figure3-caltech/figure3.png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "REPORT.md").read_text()
    assert "## Claims" in report and f"]({png.relative_to(out).as_posix()})" in report
    if target == "figure3":
        data = json.loads((out / "figure3-caltech" / "figure3.json").read_text())
        assert [p["k"] for p in data["iwae"]] == [1, 16] and data["fixed_steps"] == 5 and data["n"] == 16
        assert report.count("**paper: yes**") == 3
        # IW-SVI with T = 0 scores the encoder's q: it is IWAE-16 with the same seed.
        start, iwae = data["iwsvi_over_steps"][0], {p["k"]: p["mean"] for p in data["iwae"]}
        assert (start["steps"], start["k"]) == (0, 16) and math.isclose(start["mean"], iwae[16], rel_tol=1e-9)
        stamp = (out / "figure3-caltech" / "figure3.json").stat().st_mtime_ns
        assert main(args) == 0  # idempotent: the study is not run again
        assert (out / "figure3-caltech" / "figure3.json").stat().st_mtime_ns == stamp


def test_report_rebuilds_a_committed_results_folder_exactly(tmp_path):
    """results/ holds reproductions without weights: their stored evaluations still count, and
    `airvae report` rebuilds the committed REPORT.md from the files alone."""
    import shutil
    from pathlib import Path

    committed = Path(__file__).resolve().parents[1] / "results" / "grey-conv-digits-quick"
    if not committed.exists():
        pytest.skip("no committed results folder")
    copy = tmp_path / committed.name
    shutil.copytree(committed, copy)
    assert not list(copy.rglob("*.pt")) and not list(copy.rglob("*.safetensors"))
    assert main(["report", str(copy)]) == 0
    assert (copy / "REPORT.md").read_text() == (committed / "REPORT.md").read_text()


def test_one_seed_gives_no_verdict_and_equal_numbers_never_contradict():
    from airvae.reproduce import verdict

    assert verdict((-0.10, float("nan"))).startswith("cannot tell (one seed")
    assert verdict((0.0, 0.0)) == "inconclusive"
    assert verdict((0.5, 0.2)) == "supports" and verdict((-0.5, 0.2)) == "contradicts"
    assert verdict((0.3, 0.2)) == "inconclusive"
