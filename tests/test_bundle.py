"""`airvae bundle`: one archive of a reproduction that holds no pickle, reads back on another machine
(report, evaluate, airvae.load) once the original folder is gone, and is never extracted unchecked."""

import hashlib
import io
import json
import os
import shutil
import stat
import struct
import tempfile
import warnings
import zipfile
from functools import partial
from pathlib import Path

import pytest
import torch
from test_safety import one_error_line, write_npz

import airvae
import airvae.report
import airvae.sweep
from airvae import bundle
from airvae.bundle import limits, read, write
from airvae.cli import main
from airvae.files import RunLocked
from airvae.locks import RunLock
from airvae.runs import BEST_WEIGHTS, check_clearable, load_trained_model

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
    from_folder, where = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    assert where == f"plots and REPORT.md in {results}"
    assert main(["evaluate", str(results / RUN), *SMOKE_EVALUATION]) == 0
    evaluated = capsys.readouterr().out
    best = load_trained_model(results / RUN)[1].state_dict()
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    shutil.rmtree(results)  # the colleague has the archive only

    assert main(["report", str(archive)]) == 0
    report, where = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    assert report == from_folder and "## Claims" in from_folder
    extraction = Path(where.removeprefix("plots and REPORT.md in "))  # the last line says where the plots are
    assert where.startswith("plots and REPORT.md in ") and extraction == Path(bundle.extract(archive))
    assert (extraction / "REPORT.md").is_file() and list(extraction.glob("runs/**/plots/*.png"))
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


@pytest.fixture(scope="module")
def bundled(reproduction, tmp_path_factory) -> Path:
    """The whole reproduction as one bundle (built once)."""
    archive = tmp_path_factory.mktemp("bundled") / "all.zip"
    assert main(["bundle", str(reproduction), "--out", str(archive)]) == 0
    return archive


def test_a_bundle_of_one_run_loads_in_one_line(reproduction, bundled, tmp_path, capsys):
    archive = tmp_path / "run.zip"
    assert main(["bundle", str(reproduction / RUN), "--out", str(archive)]) == 0
    model = airvae.load(archive)
    reference = airvae.load(reproduction / RUN)  # from the run directory: best.pt, weights-only
    assert all(torch.equal(model.state_dict()[n], t) for n, t in reference.state_dict().items())
    assert main(["bundle", str(reproduction / RUN), "--out", str(archive)]) == 2  # never overwritten
    assert "already exists" in one_error_line(capsys)
    with pytest.raises(airvae.files.RunError, match="holds 4 runs; load one of them"):
        airvae.load(bundled)


def test_no_file_in_a_bundle_is_a_pickle_or_a_torch_checkpoint(bundled):
    with zipfile.ZipFile(bundled) as z:
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
    config = json.loads(zipfile.ZipFile(bundled).read(f"{RUN}/config.json"))
    assert config["data_dir"] is None  # a path of this machine, meaningless elsewhere


FAILED = "runs/tiny/k1-m1/denoise-1.0-5/seed0"


def test_a_reproduction_with_a_failed_run_is_bundled_and_a_damaged_config_is_named_first(reproduction, tmp_path,
                                                                                          capsys):
    results, archive = tmp_path / "results", tmp_path / "shared.zip"
    shutil.copytree(reproduction, results)
    shutil.rmtree(results / FAILED)  # a run that failed before writing its config: error.json only
    (results / FAILED).mkdir()
    (results / FAILED / "error.json").write_text(json.dumps({"error": "RuntimeError: it broke"}))
    assert main(["bundle", str(results), "--out", str(archive)]) == 0
    names = zipfile.ZipFile(archive).namelist()
    assert f"{FAILED}/error.json" in names and not [n for n in names if n.startswith(f"{FAILED}/config")]
    capsys.readouterr()
    assert main(["report", str(results)]) == 0
    from_folder = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)[0]  # less where its plots are
    assert main(["report", str(archive)]) == 0
    assert capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)[0] == from_folder
    assert f"`{FAILED[5:]}`: see" in from_folder

    (results / RUN / "config.json").write_text("[1, 2]")  # valid JSON, not a configuration
    report = (results / "REPORT.md").stat().st_mtime_ns
    assert main(["bundle", str(results), "--out", str(tmp_path / "again.zip")]) == 2
    assert f"{results / RUN / 'config.json'} holds list, not a run configuration" in one_error_line(capsys)
    assert not (tmp_path / "again.zip").exists() and (results / "REPORT.md").stat().st_mtime_ns == report


def test_bundle_holds_the_locks_while_it_renders_and_packs(reproduction, tmp_path, monkeypatch, capsys):

    results = tmp_path / "results"
    shutil.copytree(reproduction, results)

    def held(directory: Path) -> bool:
        try:
            RunLock(directory).acquire().release()
        except RunLocked:
            return True
        return False

    seen = []
    render, weights = write.render, write.best_weights_safetensors
    monkeypatch.setattr(write, "render", lambda out: seen.append(held(out) and held(out / RUN))
                        or render(out))
    monkeypatch.setattr(write, "best_weights_safetensors", lambda run: seen.append(held(results) and held(run))
                        or weights(run))
    assert main(["bundle", str(results), "--out", str(tmp_path / "shared.zip")]) == 0
    assert seen == [True] * 5  # rendering, then packing each run's weights
    # A run another process writes: refused before anything is written (REPORT.md included).
    report = (results / "REPORT.md").stat().st_mtime_ns
    with RunLock(results / FAILED):
        assert main(["bundle", str(results), "--out", str(tmp_path / "again.zip")]) == 2
    assert "being written by another airvae process" in one_error_line(capsys)
    assert not (tmp_path / "again.zip").exists() and (results / "REPORT.md").stat().st_mtime_ns == report


def test_an_out_path_that_cannot_be_written_is_named_and_never_overwritten(reproduction, tmp_path, monkeypatch,
                                                                           capsys):
    results = tmp_path / "results"
    shutil.copytree(reproduction, results)
    report = (results / "REPORT.md").stat().st_mtime_ns
    (tmp_path / "tiny.npz").write_bytes(b"data")
    for out, named in ((tmp_path / "tiny.npz" / "x.zip", f"{tmp_path / 'tiny.npz'} is a file, not a folder"),
                       (Path("/proc/x.zip"), "could not write /proc/x.zip")):
        assert main(["bundle", str(results), "--out", str(out)]) == 2
        assert named in one_error_line(capsys)
    assert (results / "REPORT.md").stat().st_mtime_ns == report  # refused before anything was written
    # An --out that appears while the bundle is written (another process) is left as it is.
    out, weights = tmp_path / "shared.zip", write.best_weights_safetensors

    def meanwhile(run_dir):
        if not out.exists():
            out.write_bytes(b"theirs")
        return weights(run_dir)

    monkeypatch.setattr(write, "best_weights_safetensors", meanwhile)
    assert main(["bundle", str(results), "--out", str(out)]) == 2
    assert f"{out} already exists" in one_error_line(capsys)
    assert out.read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["results", "shared.zip",
                                                                                            "tiny.npz"]


def test_an_extracted_bundle_bundles_again_with_its_weights(reproduction, tmp_path):
    first, second = tmp_path / "run.zip", tmp_path / "again.zip"
    assert main(["bundle", str(reproduction / RUN), "--out", str(first)]) == 0
    assert main(["bundle", str(bundle.extract(first)), "--out", str(second)]) == 0
    assert zipfile.ZipFile(second).read(BEST_WEIGHTS) == zipfile.ZipFile(first).read(BEST_WEIGHTS)
    reference = airvae.load(reproduction / RUN)
    assert all(torch.equal(airvae.load(second).state_dict()[n], t) for n, t in reference.state_dict().items())


def hostile(tmp_path: Path, name: str, data: bytes = b"{}", mode: int = stat.S_IFREG | 0o644, *,
            encrypted: bool = False, marker: bool = True, copies: int = 1,
            compression: int = zipfile.ZIP_STORED) -> Path:
    """A zip archive airvae never writes: a marker, then ``copies`` entries ``name`` (``{tmp}`` in it is
    ``tmp_path``)."""
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is asked to write
        if marker:
            z.writestr("airvae-bundle.json", json.dumps({"airvae_bundle": 1}))
        for copy in range(copies):
            info = zipfile.ZipInfo(name.format(tmp=tmp_path, copy=copy))
            info.external_attr, info.compress_type = mode << 16, compression
            z.writestr(info, data)
    if encrypted:  # zipfile writes no flags it was given: set bit 0 in the last entry's two headers
        raw = bytearray(archive.read_bytes())
        for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            at = raw.rfind(signature) + offset
            struct.pack_into("<H", raw, at, struct.unpack_from("<H", raw, at)[0] | 0x1)
        archive.write_bytes(bytes(raw))
    return archive


REGULAR = stat.S_IFREG | 0o644


@pytest.mark.parametrize("name, mode, options, why", [
    ("../escaped.json", REGULAR, {}, "path traversal"),
    ("runs/../../../escaped.json", REGULAR, {}, "path traversal"),
    ("runs\\..\\..\\..\\escaped.json", REGULAR, {}, "path traversal"),
    ("{tmp}/escaped.json", REGULAR, {}, "absolute path"),
    ("\\escaped.json", REGULAR, {}, "absolute path"),
    ("C:escaped.json", REGULAR, {}, "absolute path"),
    ("C:\\escaped.json", REGULAR, {}, "absolute path"),
    ("runs/link.json", stat.S_IFLNK | 0o777, {}, "symbolic link"),
    ("runs/fifo.json", stat.S_IFIFO | 0o644, {}, "special file"),
    ("runs/tty.json", stat.S_IFCHR | 0o644, {}, "special file"),
    ("runs/disk.json", stat.S_IFBLK | 0o644, {}, "special file"),
    ("runs/x/checkpoints/best.pt", REGULAR, {}, "not a kind of file a bundle holds"),
    ("airvae-bundle.json", REGULAR, {}, "appears twice"),
    ("REPORT.md", REGULAR, {"encrypted": True}, "is encrypted"),
    ("REPORT.md", REGULAR, {"compression": zipfile.ZIP_BZIP2}, "compressed with method 12, not deflate"),
    ("REPORT.md", REGULAR, {"compression": zipfile.ZIP_LZMA}, "compressed with method 14, not deflate"),
    ("runs/{copy}.json", REGULAR, {"copies": 3}, "it holds 4 entries, more than 3"),
])
def test_a_hostile_bundle_is_refused_in_one_line_and_nothing_is_extracted(tmp_path, monkeypatch, capsys, name, mode,
                                                                         options, why):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AIRVAE_CACHE_DIR", str(cache))
    monkeypatch.setattr(read, "MAX_FILES", 3)  # where the limit is read
    archive = hostile(tmp_path, name, b"/etc/passwd" if stat.S_ISLNK(mode) else b"{}", mode, **options)
    for argv in (["report", str(archive)], ["evaluate", f"{archive}/runs/x", "--no-progress"]):
        assert main(argv) == 2
        err = one_error_line(capsys)
        assert "refused" in err and why in err and str(archive) in err
    with pytest.raises(airvae.files.RunError, match=why):
        airvae.load(archive)
    # Extracted as named, an escaping entry would land in the cache's folders, at an absolute path under
    # tmp_path, or (backslashes) as one odd file name: nowhere is there such a file.
    assert not list(cache.rglob("*")) and not list(tmp_path.rglob("*escaped*"))


def test_a_zip_archive_without_the_marker_is_no_bundle(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AIRVAE_CACHE_DIR", str(tmp_path / "cache"))
    archive = hostile(tmp_path, "runs/x/config.json", marker=False)
    assert main(["evaluate", f"{archive}/runs/x", "--no-progress"]) == 2
    assert "is a zip archive but not an airvae bundle (airvae-bundle.json is missing)" in one_error_line(capsys)
    with pytest.raises(airvae.files.RunError, match="refused: it has no airvae-bundle.json"):
        bundle.extract(archive)  # called directly, the same check
    assert not list((tmp_path / "cache").rglob("*"))


def test_size_limits_are_enforced_before_and_while_extracting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AIRVAE_CACHE_DIR", str(tmp_path / "cache"))
    archive = hostile(tmp_path, "REPORT.md", b"x" * 5000)
    monkeypatch.setattr(read, "MAX_BYTES", 1000)
    assert main(["report", str(archive)]) == 2
    assert "more than 1,000 bytes" in one_error_line(capsys)
    # A header that understates its size (a zip bomb): the counted sizes pass, and decompression stops at
    # the stated size, so the entry fails its checksum.
    raw = bytearray(archive.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size, both headers
        struct.pack_into("<I", raw, raw.rfind(signature) + offset, 100)
    archive.write_bytes(bytes(raw))
    assert main(["report", str(archive)]) == 2
    assert "Bad CRC-32 for file 'REPORT.md'" in one_error_line(capsys)
    assert not list((tmp_path / "cache" / "bundles").iterdir())  # the partial extraction was removed


def test_a_text_entry_larger_than_any_airvae_writes_is_refused(tmp_path, monkeypatch, capsys):
    """JSON, JSON lines, Markdown and CSV are read whole into memory: each is capped on its own, not
    only by the bundle's total (an 80 MB archive could otherwise hold an 8 GB metrics.jsonl)."""
    monkeypatch.setenv("AIRVAE_CACHE_DIR", str(tmp_path / "cache"))
    archive = hostile(tmp_path, "runs/x/metrics.jsonl", b"{}\n" * 400)
    monkeypatch.setattr(read, "MAX_TEXT_BYTES", 1000)
    assert main(["report", str(archive)]) == 2
    assert "bytes of text, more than 1,000" in one_error_line(capsys)
    assert not list((tmp_path / "cache").rglob("*"))


# ----------------------------------------------------------------------------------------------
# A bundle's manifest is checked before it names a path


def recrafted(source: Path, out: Path, manifest=None, members: dict | None = None) -> Path:
    """``source`` (a bundle airvae wrote) copied as ``out``, its manifest.json passed through ``manifest``
    (a function changing the parsed JSON in place) and the entries in ``members`` replaced (bytes)."""
    members = dict(members or {})
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for info in original.infolist():
            data = members.pop(info.filename, None) or original.read(info)
            if info.filename == "manifest.json" and manifest is not None:
                parsed = json.loads(data)
                manifest(parsed)
                data = json.dumps(parsed).encode()
            z.writestr(info, data)
        for name, data in members.items():
            z.writestr(name, data)
    return out


def test_a_manifest_naming_a_run_outside_the_bundle_is_refused(reproduction, bundled, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AIRVAE_CACHE_DIR", str(cache))
    victim = cache / "bundles" / "victim"  # a run beside the extraction, which the manifest points at
    shutil.copytree(reproduction / RUN, victim)
    shutil.rmtree(victim / "plots")
    escape = "0/" + "../" * 6 + "victim"  # from runs/tiny/k1-m1/plain/seed0 up to the cache's bundles/
    archive = recrafted(bundled, tmp_path / "crafted.zip", lambda m: m["jobs"][0].update(seed=escape))
    assert main(["report", str(archive)]) == 2
    err = one_error_line(capsys)
    assert str(archive) in err and "invalid seed" in err and "manifest.json" in err
    assert not (victim / "plots").exists()  # nothing was drawn into it
    with pytest.raises(airvae.files.RunError, match="invalid seed"):
        bundle.extract(archive)


def test_an_extracted_manifest_is_checked_on_every_use(bundled, tmp_path, monkeypatch, capsys):
    """An extraction that changed after it was checked (or an older airvae's): its manifest is checked
    again, and a run folder that leads elsewhere through a link is refused."""
    monkeypatch.setenv("AIRVAE_CACHE_DIR", str(tmp_path / "cache"))
    extracted = bundle.extract(bundled)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(extracted / "runs" / "tiny", elsewhere)
    (extracted / "runs" / "tiny").symlink_to(elsewhere)
    before = {path: path.stat().st_mtime_ns for path in elsewhere.rglob("*")}
    assert main(["report", str(bundled)]) == 2
    err = one_error_line(capsys)
    assert f"bundle {bundled} refused" in err and "runs/tiny/k1-m1/plain/seed0 leads outside" in err, err
    assert {path: path.stat().st_mtime_ns for path in elsewhere.rglob("*")} == before  # nothing written there
    (extracted / "runs" / "tiny").unlink()
    shutil.move(elsewhere, extracted / "runs" / "tiny")
    manifest = json.loads((extracted / "manifest.json").read_text())
    manifest["jobs"][0]["seed"] = "0/../../../../../../x"
    (extracted / "manifest.json").write_text(json.dumps(manifest))
    assert main(["report", str(bundled)]) == 2
    assert "invalid seed" in one_error_line(capsys)


def test_a_manifest_anywhere_in_a_bundle_is_checked_before_extracting(bundled, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AIRVAE_CACHE_DIR", str(tmp_path / "cache"))
    manifest = json.loads(zipfile.ZipFile(bundled).read("manifest.json"))
    manifest["jobs"][0]["seed"] = "0/../../../../../../x"
    archive = recrafted(bundled, tmp_path / "crafted.zip", members={"runs/nested/manifest.json":
                                                                     json.dumps(manifest).encode()})
    assert main(["report", f"{archive}/runs/nested"]) == 2  # would read runs/nested's manifest
    err = one_error_line(capsys)
    assert "refused: runs/nested/manifest.json: jobs[0]: invalid seed" in err, err
    assert not list((tmp_path / "cache").rglob("*.json"))


def _drop(key):
    return lambda manifest: manifest.pop(key)


def _job(**fields):
    return lambda manifest: manifest["jobs"][0].update(fields)


@pytest.mark.parametrize("edit, why", [
    (_drop("jobs"), "'jobs' is missing"),
    (lambda m: m.update(jobs={"family": "plain"}), "invalid jobs"),
    (lambda m: m.update(jobs=[]), "invalid jobs"),
    (lambda m: m.update(target="table9"), "invalid target = 'table9'"),
    (lambda m: m.update(target=["table1"]), "invalid target = ['table1']"),
    (lambda m: m.update(datasets=["../../elsewhere.npz/x"]), "invalid dataset"),
    (lambda m: m.update(budget="huge"), "invalid budget = 'huge'"),
    (lambda m: m.update(seeds="3"), "invalid seeds = '3'"),
    (lambda m: m.update(grid=["5"]), "invalid grid"),
    (lambda m: m["evaluation"].update(bogus=1), "evaluation: unknown evaluation settings bogus"),
    (lambda m: m["evaluation"].update(k_iwae=-1), "invalid k_iwae = -1"),
    (_job(seed="0"), "invalid seed = '0'"),
    (_job(seed=-1), "invalid seed = -1"),
    (_job(seed=2**40), "invalid seed = 1099511627776"),
    (_job(k=0), "invalid k = 0"),
    (_job(m=1.5), "invalid m = 1.5"),
    (_job(strength=float("nan")), "invalid strength = nan"),
    (_job(strength="0"), "invalid strength = '0'"),
    (_job(family="evil"), "invalid family = 'evil'"),
    (_job(dataset="../../x"), "invalid dataset = '../../x'"),
    (_job(dataset="/data/..npz"), "invalid dataset = '/data/..npz'"),  # its stem "." would name a folder
    (_job(budget=None), "invalid budget = None"),
    (_job(architecture="../x"), "invalid architecture = '../x'"),
    (_job(iterations=0), "invalid iterations = 0"),
    (_job(surprise=1), "unknown field"),
    (_job(strength=5.0), "regularized families need a strength > 0"),  # plain at a strength: sweep.Job's own check
    (lambda m: m["jobs"][0].pop("family"), "jobs[0]: 'family' is missing"),
    (lambda m: m["jobs"].__setitem__(0, "plain"), "jobs[0]"),
])
def test_a_bundle_with_an_invalid_manifest_is_refused_in_one_line(bundled, tmp_path, monkeypatch, capsys, edit, why):
    monkeypatch.setenv("AIRVAE_CACHE_DIR", str(tmp_path / "cache"))
    archive = recrafted(bundled, tmp_path / "crafted.zip", edit)
    assert main(["report", str(archive)]) == 2
    err = one_error_line(capsys)
    assert f"bundle {archive}" in err and "manifest.json" in err and why in err, err
    assert not (tmp_path / "cache" / "bundles").exists() or not list((tmp_path / "cache" / "bundles").iterdir())


def test_a_manifest_that_is_not_a_json_object_is_refused(bundled, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AIRVAE_CACHE_DIR", str(tmp_path / "cache"))
    for data, why in ((b"[1, 2]", "a JSON object"), (b"{not json", "not valid JSON")):
        archive = recrafted(bundled, tmp_path / "crafted.zip", members={"manifest.json": data})
        assert main(["report", str(archive)]) == 2
        err = one_error_line(capsys)
        assert f"bundle {archive}" in err and why in err, err


def test_a_local_reproduction_with_an_invalid_manifest_is_not_bundled(reproduction, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(reproduction, results)
    manifest = json.loads((results / "manifest.json").read_text())
    del manifest["jobs"]
    (results / "manifest.json").write_text(json.dumps(manifest))
    assert main(["bundle", str(results), "--out", str(tmp_path / "shared.zip")]) == 2
    assert f"{results / 'manifest.json'}: 'jobs' is missing" in one_error_line(capsys)
    assert not (tmp_path / "shared.zip").exists()


def test_best_weights_without_the_model_entry_are_named_in_one_line(reproduction, bundled, tmp_path, monkeypatch,
                                                                    capsys):
    run = tmp_path / "run"
    shutil.copytree(reproduction / RUN, run)
    torch.save({"step": 3, "weights": {}}, run / "checkpoints" / "best.pt")  # no "model" entry
    out = tmp_path / "run.zip"
    assert main(["bundle", str(run), "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert f"{run / 'checkpoints' / 'best.pt'} holds no 'model' entry" in err and str(out) in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # Read back: weights that are not the run's model are named too.
    from safetensors.torch import save

    monkeypatch.setenv("AIRVAE_CACHE_DIR", str(tmp_path / "cache"))
    archive = recrafted(bundled, tmp_path / "crafted.zip", members={f"{RUN}/{BEST_WEIGHTS}": save({})})
    assert main(["evaluate", f"{archive}/{RUN}", "--estimators", "iwae", "--k", "8", "--max-examples", "8",
                 "--no-progress", "--device", "cpu"]) == 2
    assert "does not match the model" in one_error_line(capsys)


# ----------------------------------------------------------------------------------------------
# Writes never go through links


def test_an_out_folder_that_is_a_link_is_refused(reproduction, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    for out in (tmp_path / "link" / "run.zip", tmp_path / "link" / "new" / "run.zip"):
        assert main(["bundle", str(reproduction / RUN), "--out", str(out)]) == 2
        assert f"{tmp_path / 'link'} is a symbolic link" in one_error_line(capsys)
    assert not list(elsewhere.iterdir())
    # A missing folder is created, each level checked; the temporary file carries airvae's tag.
    seen = []
    link = os.link
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "link", lambda source, target: seen.append(Path(source).name) or link(source, target))
        out = tmp_path / "new" / "deeper" / "run.zip"
        assert main(["bundle", str(reproduction / RUN), "--out", str(out)]) == 0
    assert zipfile.ZipFile(out).testzip() is None and out.stat().st_mode & 0o777 == 0o644
    assert len(seen) == 1 and seen[0].startswith(".run.zip.airvae-tmp-")
    assert sorted(p.name for p in out.parent.iterdir()) == ["run.zip"]


def test_a_source_holding_a_link_is_refused_before_any_lock_is_written(reproduction, tmp_path, capsys):
    """A reproduction whose runs/ folder leads elsewhere through a link: refused at once, with no
    lock file written into (and no file packed from) the folder it leads to."""
    source = tmp_path / "results"
    shutil.copytree(reproduction, source, ignore=shutil.ignore_patterns(".lock"))
    elsewhere = tmp_path / "elsewhere"
    shutil.move(source / "runs", elsewhere)
    (source / "runs").symlink_to(elsewhere, target_is_directory=True)
    before = sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*"))
    assert main(["bundle", str(source), "--out", str(tmp_path / "all.zip")]) == 2
    assert "runs" in (err := one_error_line(capsys)) and "symbolic link" in err, err
    assert sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*")) == before, "written through the link"
    assert not (tmp_path / "all.zip").exists()


@pytest.mark.parametrize("dataset", ["/", "..", "", "../.npz"])
def test_report_refuses_a_manifest_whose_runs_would_lie_elsewhere(reproduction, tmp_path, capsys, dataset):
    """``airvae report`` checks a folder's manifest field by field, as bundles are checked, before
    its jobs name the run folders it reads and draws plots into."""
    source = tmp_path / "results"
    shutil.copytree(reproduction, source, ignore=shutil.ignore_patterns(".lock"))
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["jobs"][0]["dataset"] = dataset
    (source / "manifest.json").write_text(json.dumps(manifest))
    report = (source / "REPORT.md").read_bytes()
    assert main(["report", str(source)]) == 2
    assert "jobs[0]" in (err := one_error_line(capsys)) and "dataset" in err, err
    assert (source / "REPORT.md").read_bytes() == report


def test_an_extraction_never_goes_through_a_link(bundled, tmp_path, monkeypatch, capsys):
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    monkeypatch.setenv("AIRVAE_CACHE_DIR", str(cache))
    elsewhere.mkdir()
    cache.mkdir()
    (cache / "bundles").symlink_to(elsewhere)  # the cache's bundles folder is a link
    assert main(["report", str(bundled)]) == 2
    assert f"{cache / 'bundles'} is a symbolic link" in one_error_line(capsys)
    assert not list(elsewhere.iterdir())
    (cache / "bundles").unlink()
    (cache / "bundles").mkdir()
    digest = hashlib.sha256(bundled.read_bytes()).hexdigest()
    (cache / "bundles" / digest).symlink_to(elsewhere)  # the extraction's own folder is a link
    assert main(["report", str(bundled)]) == 2
    assert f"{cache / 'bundles' / digest} is a symbolic link" in one_error_line(capsys)
    assert not list(elsewhere.iterdir())
    (cache / "bundles" / digest).unlink()
    # Extracted through a temporary folder with airvae's tag, every file synced before it is published.
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or fsync(fd))
    mkdtemp = tempfile.mkdtemp
    made = []
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(mkdtemp(**kw)) or made[-1])
    assert bundle.extract(bundled) == cache / "bundles" / digest
    assert len(made) == 1 and Path(made[0]).name.startswith(f".{digest[:16]}.airvae-tmp-")
    assert len(synced) >= len(zipfile.ZipFile(bundled).namelist())
    assert sorted(p.name for p in (cache / "bundles").iterdir()) == [digest]


# ----------------------------------------------------------------------------------------------
# Zip bombs


def bomb(tmp_path: Path, sizes: list[int]) -> Path:
    """A bundle of zeros: deflate packs them about 1000 to 1."""
    archive = tmp_path / f"bomb-{len(sizes)}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("airvae-bundle.json", json.dumps({"airvae_bundle": 1}))
        for number, size in enumerate(sizes):
            z.writestr(f"runs/x/evaluations/{number}.json", b"0" * size)
    return archive


def test_a_zip_bomb_is_refused_by_its_compression_ratio_before_extracting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AIRVAE_CACHE_DIR", str(tmp_path / "cache"))
    for archive, why in ((bomb(tmp_path, [limits.RATIO_FLOOR * 2]), "runs/x/evaluations/0.json' expands"),
                         (bomb(tmp_path, [limits.RATIO_FLOOR // 8] * 16), "its files expand")):
        assert main(["report", str(archive)]) == 2
        err = one_error_line(capsys)
        assert "refused" in err and why in err and f"more than {bundle.MAX_RATIO} times" in err, err
        assert not list((tmp_path / "cache").rglob("*"))
    # A central directory that overstates the compressed size (to pass the ratio) is refused as well.
    archive = bomb(tmp_path, [limits.RATIO_FLOOR * 2])
    raw = bytearray(archive.read_bytes())
    at = raw.rfind(b"PK\x01\x02") + 20  # the last entry's compressed size in the central directory
    struct.pack_into("<I", raw, at, limits.RATIO_FLOOR * 2)
    archive.write_bytes(bytes(raw))
    assert main(["report", str(archive)]) == 2
    err = one_error_line(capsys)
    assert "refused" in err and "runs/x/evaluations/0.json" in err and "overlaps" in err, err
    assert not list((tmp_path / "cache").rglob("*"))


# ----------------------------------------------------------------------------------------------
# A read-only source is bundled


def _read_only(patch: pytest.MonkeyPatch) -> None:
    """Lock files cannot be created, as on a read-only file system; reading them still works."""
    import errno

    from airvae.files import write_error

    open_lock = airvae.locks._open_lock

    def refused(path, write):
        if write:
            error = OSError(errno.EROFS, "Read-only file system")
            raise write_error(Path(path), error) from error
        return open_lock(path, write)

    patch.setattr(airvae.locks, "_open_lock", refused)


def test_a_read_only_source_is_bundled_without_its_lock(reproduction, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    shutil.copytree(reproduction, results)
    report = (results / "REPORT.md").stat().st_mtime_ns
    rendered = []
    monkeypatch.setattr(airvae.report, "render", lambda out: rendered.append(out))
    with pytest.MonkeyPatch.context() as patch:
        _read_only(patch)
        assert main(["bundle", str(results / RUN), "--out", str(tmp_path / "run.zip")]) == 0
        assert main(["bundle", str(results), "--out", str(tmp_path / "all.zip")]) == 0
    assert not rendered and (results / "REPORT.md").stat().st_mtime_ns == report  # written as it is, not rebuilt
    assert "REPORT.md" in zipfile.ZipFile(tmp_path / "all.zip").namelist()
    # Another process writing a run: still refused.
    with RunLock(results / FAILED), pytest.MonkeyPatch.context() as patch:
        _read_only(patch)
        assert main(["bundle", str(results), "--out", str(tmp_path / "again.zip")]) == 2
    assert "being written by another airvae process" in one_error_line(capsys)
    assert not (tmp_path / "again.zip").exists()
    # Any other failure to create the lock is still an error.
    import errno

    def full(path, write):
        raise airvae.files.write_error(Path(path), OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(airvae.locks, "_open_lock", full)
    assert main(["bundle", str(results / RUN), "--out", str(tmp_path / "full.zip")]) == 2
    assert "No space left on device" in one_error_line(capsys)


def test_a_folder_without_write_permission_is_bundled(reproduction, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into folders without write permission")
    run = tmp_path / "run"
    shutil.copytree(reproduction / RUN, run)
    (run / ".lock").unlink(missing_ok=True)
    run.chmod(0o555)
    try:
        assert main(["bundle", str(run), "--out", str(tmp_path / "run.zip")]) == 0
    finally:
        run.chmod(0o755)
    assert BEST_WEIGHTS in zipfile.ZipFile(tmp_path / "run.zip").namelist()
