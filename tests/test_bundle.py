"""`airvae bundle`: one archive of a reproduction that holds no pickle, reads back on another machine
(report, evaluate, airvae.load) once the original folder is gone, and is never extracted unchecked."""

import hashlib
import io
import json
import shutil
import stat
import warnings
import zipfile
from functools import partial
from pathlib import Path

import pytest
import torch

import airvae
import airvae.sweep
from airvae import bundle
from airvae.cli import main
from airvae.runs import check_clearable, load_trained_model
from test_safety import one_error_line, write_npz

RUN = "runs/tiny/k1-m1/denoise-0.5-5/seed0"
# The reproduction's own test evaluation (EVALUATION_BUDGETS["smoke"]).
SMOKE_EVALUATION = ["--estimators", "bound,iwae,iwsvi,gap", "--max-examples", "32", "--k", "16", "--svi-k", "16",
                    "--svi-l", "2", "--svi-steps", "5", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory):
    """Table 1 at the smoke budget on 16-dimensional data, with small networks (seconds, not minutes)."""
    root = tmp_path_factory.mktemp("bundle")
    data, out = write_npz(root / "tiny.npz"), root / "results"
    small = partial(airvae.sweep.resolve_run_config, encoder="d8", decoder="d8", z_dim=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(airvae.sweep, "resolve_run_config", small)
        patch.setenv("AIRVAE_CACHE_DIR", str(root / "cache"))
        assert main(["reproduce", "table1", "--dataset", str(data), "--budget", "smoke", "--grid", "5", "--out",
                     str(out), "--no-progress", "--device", "cpu"]) == 0
    return out


def test_a_bundle_round_trips_after_the_folder_is_deleted(reproduction, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(reproduction, results)
    archive = tmp_path / "shared.zip"
    assert main(["bundle", str(results), "--out", str(archive)]) == 0
    assert str(archive) in capsys.readouterr().out
    assert main(["report", str(results)]) == 0
    from_folder = capsys.readouterr().out
    assert main(["evaluate", str(results / RUN), *SMOKE_EVALUATION]) == 0
    evaluated = capsys.readouterr().out
    best = load_trained_model(results / RUN)[1].state_dict()
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    shutil.rmtree(results)  # the colleague has the archive only

    assert main(["report", str(archive)]) == 0
    assert capsys.readouterr().out == from_folder and "## Claims" in from_folder
    assert main(["evaluate", f"{archive}/{RUN}", *SMOKE_EVALUATION]) == 0
    assert capsys.readouterr().out == evaluated  # the reproduction's own evaluation, found in the bundle
    assert main(["evaluate", f"{archive}/{RUN}", "--estimators", "iwae", "--k", "8", "--max-examples", "8",
                 "--no-progress", "--device", "cpu"]) == 0  # computed anew, from the bundle's weights
    assert "IWAE-8" in capsys.readouterr().out
    model = airvae.load(f"{archive}/{RUN}")
    assert not model.training and model.state_dict().keys() == best.keys()
    assert all(torch.equal(model.state_dict()[name], best[name]) for name in best)
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == sha  # only ever read
    extracted = Path(bundle.extract(archive))
    assert extracted.name == sha and len(list(extracted.glob(f"{RUN}/evaluations/*.json"))) == 2
    check_clearable(extracted / RUN)  # every entry is one airvae writes (safetensors, plots): still a run


def test_a_bundle_of_one_run_loads_in_one_line(reproduction, tmp_path, capsys):
    archive = tmp_path / "run.zip"
    assert main(["bundle", str(reproduction / RUN), "--out", str(archive)]) == 0
    model = airvae.load(archive)
    reference = airvae.load(reproduction / RUN)  # from the run directory: best.pt, weights-only
    assert all(torch.equal(model.state_dict()[n], t) for n, t in reference.state_dict().items())
    assert main(["bundle", str(reproduction / RUN), "--out", str(archive)]) == 2  # never overwritten
    assert "already exists" in one_error_line(capsys)
    with pytest.raises(airvae.runs.RunError, match="holds 4 runs; load one of them"):
        airvae.load(_bundle_of(reproduction, tmp_path))


def _bundle_of(results: Path, tmp_path: Path) -> Path:
    archive = tmp_path / "all.zip"
    if not archive.exists():
        assert main(["bundle", str(results), "--out", str(archive)]) == 0
    return archive


def test_no_file_in_a_bundle_is_a_pickle_or_a_torch_checkpoint(reproduction, tmp_path):
    archive = _bundle_of(reproduction, tmp_path)
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        assert {"REPORT.md", "table1.md", "table1.csv", "manifest.json", "airvae-bundle.json"} <= set(names)
        assert sum(name.endswith("best.safetensors") for name in names) == 4
        assert not any(name.endswith((".pt", ".lock", "tracking.json", "sweep.jsonl")) for name in names)
        for name in names:  # each member is what its name says, parsed as such: none is a pickle
            data = z.read(name)
            assert not zipfile.is_zipfile(io.BytesIO(data)), name  # torch.save writes zip archives
            if name.endswith(".json"):
                json.loads(data.decode("utf-8"))
            elif name.endswith(".jsonl"):
                [json.loads(line) for line in data.decode("utf-8").splitlines()]
            elif name.endswith(".png"):
                assert data[:8] == b"\x89PNG\r\n\x1a\n", name
            elif name.endswith((".md", ".csv")):
                data.decode("utf-8")  # a pickle starts with byte 0x80, which no UTF-8 text does
            else:
                assert name.endswith(".safetensors"), name
                # 8-byte header length, a JSON header, then exactly the tensors' bytes it describes
                size = int.from_bytes(data[:8], "little")
                header = json.loads(data[8:8 + size])
                ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
                assert len(data) == 8 + size + max(ends), name
                assert header["__metadata__"]["format"] == "airvae-best-1"
    config = json.loads(zipfile.ZipFile(archive).read(f"{RUN}/config.json"))
    assert config["data_dir"] is None  # a path of this machine, meaningless elsewhere


def hostile(tmp_path: Path, name: str, data: bytes = b"{}", mode: int = stat.S_IFREG | 0o644) -> Path:
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is asked to write
        z.writestr("airvae-bundle.json", json.dumps({"airvae_bundle": 1}))
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        z.writestr(info, data)
    return archive


@pytest.mark.parametrize("name, mode, why", [
    ("../escaped.json", stat.S_IFREG | 0o644, "path traversal"),
    ("runs/../../escaped.json", stat.S_IFREG | 0o644, "path traversal"),
    ("/tmp/absolute.json", stat.S_IFREG | 0o644, "absolute path"),
    ("runs/link.json", stat.S_IFLNK | 0o777, "symbolic link"),
    ("runs/x/checkpoints/best.pt", stat.S_IFREG | 0o644, "not a kind of file a bundle holds"),
    ("airvae-bundle.json", stat.S_IFREG | 0o644, "appears twice"),
])
def test_a_hostile_bundle_is_refused_in_one_line_and_nothing_is_extracted(tmp_path, monkeypatch, capsys, name, mode,
                                                                         why):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AIRVAE_CACHE_DIR", str(cache))
    archive = hostile(tmp_path, name, b"/etc/passwd" if stat.S_ISLNK(mode) else b"{}", mode)
    for argv in (["report", str(archive)], ["evaluate", f"{archive}/runs/x", "--no-progress"]):
        assert main(argv) == 2
        err = one_error_line(capsys)
        assert "refused" in err and why in err and str(archive) in err
    assert not list(cache.rglob("*")) and not (tmp_path.parent / "escaped.json").exists()
    with pytest.raises(airvae.runs.RunError, match=why):
        airvae.load(archive)


def test_size_limits_are_enforced_before_and_while_extracting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AIRVAE_CACHE_DIR", str(tmp_path / "cache"))
    archive = hostile(tmp_path, "REPORT.md", b"x" * 5000)
    monkeypatch.setattr(bundle, "MAX_BYTES", 1000)
    assert main(["report", str(archive)]) == 2
    assert "more than 1,000 bytes" in one_error_line(capsys)
    # A header that understates its size (a zip bomb) is caught by counting what decompresses.
    monkeypatch.setattr(bundle, "_checked_members", lambda z, path: z.infolist())
    assert main(["report", str(archive)]) == 2
    assert "decompresses to more than 1,000 bytes" in one_error_line(capsys)
    assert not list((tmp_path / "cache" / "bundles").iterdir())  # the partial extraction was removed
