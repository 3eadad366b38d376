"""Reproductions end to end at the smoke budget, with the local executor and with Ray; the paper's
own findings per cell and the claims REPORT.md builds from them."""

import json
import math
import re
from dataclasses import asdict

import pytest

from airvae.cli import main
from airvae.report import render
from airvae.reproduce import plan
from airvae.targets import EVALUATION_BUDGETS, paper_tables


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


def test_mnist_validation_split_is_labelled_a_deviation(tmp_path):
    manifest = {"target": "table1", "datasets": ["mnist"], "budget": "smoke", "seeds": 1, "grid": [5.0],
                "evaluation": dict(EVALUATION_BUDGETS["smoke"], split="test", estimators=["bound", "iwsvi", "gap"]),
                "study": None, "jobs": [asdict(j) for j in plan("table1", ["mnist"], "smoke", 1)]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    report = (render(tmp_path) / "REPORT.md").read_text()  # no run has finished: numbers are n/a
    assert "- MNIST's validation set is Larochelle & Murray's fixed file split" in report
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
    # a smoke reproduction checks plumbing: numbers and intervals, but not one verdict
    assert "## Claims" in report and "**No verdicts: the `smoke` budget checks plumbing" in report
    assert not re.search(r"(?m)^  - .*: \*\*(supports|contradicts|inconclusive|holds here|does not hold here)\*\*$",
                         report)
    assert report.count("**no verdict (the smoke budget cannot test it)**") == 3 * (2 * 2 + 1)
    assert "paper: +0.50 nats (−ln p(x) 108.64 ± 0.19 for DVAE (alpha=0.5) vs 109.14 ± 0.28; ± as printed)" in report
    assert "Larochelle" not in report
    assert "IW-SVI (k=16, l=2, T=5)" in report and "IWAE-16 (encoder q)" in report  # both estimators judged
    assert "![claims](claims.png)" in report and (out / "claims.png").stat().st_size > 10_000  # the claims, drawn
    assert "), the paper's +0.50 " in report  # where the paper's size lies against our IW-SVI interval
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
    judged = re.findall(r"(- caltech, .*?): paper.*\n(?:  - .*\n)*?  - AIS \(T=5, 2 chains\): [-+][0-9.]+ \[[-+][0-9.]+, "
                        r"[-+][0-9.]+\] nats \(2 seeds\)", report)
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
        # one model: the caption's three findings are observed, never judged
        assert report.count(" direction as the paper") + report.count("opposite direction to the paper") == 3
        assert "observations, not verdicts" in report
        # IW-SVI with T = 0 scores the encoder's q: it is IWAE-16 with the same seed.
        start, iwae = data["iwsvi_over_steps"][0], {p["k"]: p["mean"] for p in data["iwae"]}
        assert (start["steps"], start["k"]) == (0, 16) and math.isclose(start["mean"], iwae[16], rel_tol=1e-9)
        stamp = (out / "figure3-caltech" / "figure3.json").stat().st_mtime_ns
        assert main(args) == 0  # idempotent: the study is not run again
        assert (out / "figure3-caltech" / "figure3.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("folder", ["grey-conv-digits-quick", "table1-caltech-paper"])
def test_report_rebuilds_a_committed_results_folder_exactly(tmp_path, folder):
    """results/ holds reproductions without weights: their stored evaluations still count, and
    `airvae report` rebuilds the committed REPORT.md from the files alone (so every number in it comes
    from the committed files and today's code)."""
    import shutil
    from pathlib import Path

    committed = Path(__file__).resolve().parents[1] / "results" / folder
    if not committed.exists():
        pytest.skip("no committed results folder")
    copy = tmp_path / committed.name
    shutil.copytree(committed, copy)
    assert not list(copy.rglob("*.pt")) and not list(copy.rglob("*.safetensors"))
    assert main(["report", str(copy)]) == 0
    assert (copy / "REPORT.md").read_text() == (committed / "REPORT.md").read_text()


def test_paper_strengths_stopped_mid_evaluation_resume_and_a_copy_without_weights_counts_as_finished(
        tmp_path, data_dir, monkeypatch):
    """`--strengths paper` trains Table 7's strength only and evaluates each run in its own task; a stop in
    the middle of an evaluation (Ctrl-C, SIGTERM) loses at most its part in progress, and a results folder
    committed without its checkpoints is finished work: nothing is trained or evaluated again."""
    import shutil

    import airvae.evaluation as evaluation
    import airvae.train as training
    from airvae.targets import paper_strength

    out = tmp_path / "out"
    args = ["reproduce", "table1", "--dataset", "caltech", "--budget", "smoke", "--strengths", "paper", "--seeds", "1",
            "--estimators", "ais", "--data-dir", data_dir, "--no-progress", "--device", "cpu", "--executor", "local"]
    real, calls = evaluation._evaluate_in_parts, []

    def stopped(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # inside the second run's first evaluation
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "_evaluate_in_parts", stopped)
        assert main(args + ["--out", str(out)]) == 130
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["strengths"] == "paper" and manifest["grid"] == []
    assert {(j["family"], j["strength"]) for j in manifest["jobs"]} == {
        ("plain", 0.0), *((f, paper_strength(f, 1, "caltech")) for f in ("denoise-0.5", "denoise-1.0", "wni"))}
    first = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert [r["status"] for r in first] == ["ok"]  # the first run, trained and evaluated twice (IW-SVI, AIS)
    assert not list(out.rglob(f"*{'.airvae-tmp-'}*"))  # nothing half-written

    assert main(args + ["--out", str(out)]) == 0
    second = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()][len(first):]
    assert len(second) == 4 + 4 and all(r["status"] == "ok" for r in second)  # train+evaluate, then the AIS pass
    assert not any(r["trained"] for r in second if r["name"] == first[0]["name"])
    for run in out.glob("runs/caltech/k1-m1/*/seed0"):
        assert len(list((run / "evaluations").glob("*.json"))) == 2  # the table's and AIS

    committed = tmp_path / "committed"
    shutil.copytree(out, committed, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "_evaluate_in_parts", lambda *a, **k: pytest.fail("evaluated again"))
        patch.setattr(training, "train", lambda *a, **k: pytest.fail("trained again"))
        assert main(args + ["--out", str(committed)]) == 0
    assert (committed / "REPORT.md").read_text() == (out / "REPORT.md").read_text()
