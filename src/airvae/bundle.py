"""Results to share: ``airvae bundle DIR`` packs a reproduction's folder (or one run directory) into
one zip archive that holds no pickle; ``airvae report BUNDLE``, ``airvae evaluate BUNDLE/RUN`` and
:func:`load` read it on another machine.

What a bundle holds: ``airvae-bundle.json`` (what it is), the reproduction's ``manifest.json``,
``REPORT.md``, tables, figures and studies, and per run its marker, ``config.json`` (with its
machine-specific ``data_dir`` cleared), ``metrics.jsonl``, ``summary.json``, ``error.json``,
``evaluations/``, ``plots/`` and ``checkpoints/best.safetensors`` (the best weights; no
``last.pt``, no tracking files). Only JSON, JSON lines, Markdown, CSV, PNG and safetensors.

Opening one never trusts it: members are checked before anything is extracted (no absolute path,
no ``..``, no link or other special file, no duplicate, only the kinds of file above, at most
:data:`MAX_FILES` files and :data:`MAX_BYTES` bytes, counted while decompressing too). The
extraction lives in ``$AIRVAE_CACHE_DIR/bundles/<sha256 of the archive>/`` (default
``~/.cache/airvae``); the archive is only ever read, and what ``evaluate`` and ``report`` compute
from it is written into that folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import zipfile
from functools import partial
from pathlib import Path, PurePosixPath

from .runs import (BEST, BEST_WEIGHTS, CONFIG, ERROR, EVALUATIONS, MARKER, METRICS, SUMMARY, RunError,
                   best_weights_safetensors, check_unlocked, load_config, read_json)

BUNDLE_MARKER = "airvae-bundle.json"
BUNDLE_FORMAT = 1
SUFFIXES = (".json", ".jsonl", ".md", ".csv", ".png", ".safetensors")  # everything a bundle may hold
MAX_FILES = 100_000
MAX_BYTES = 8 << 30  # uncompressed: a paper-budget reproduction with every run's weights is well below
_RUN_FILES = (MARKER, METRICS, SUMMARY, ERROR)
_RUN_FOLDERS = {EVALUATIONS: (".json",), "plots": (".png", ".json")}
_RESULTS_SUFFIXES = (".md", ".csv", ".json", ".png")  # a reproduction's own files (not sweep.jsonl: a local log)


# ----------------------------------------------------------------------------------------------
# Writing


def write_bundle(results_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Pack a reproduction's folder (``manifest.json``; its report is rebuilt first, as
    ``airvae report`` does) or a single run directory into ``out`` (default: ``DIR.zip`` beside
    it). Refused while another process writes the folder, or if ``out`` exists."""
    from . import __version__

    results_dir = Path(results_dir)
    if not results_dir.is_dir() or results_dir.is_symlink():
        raise RunError(f"{results_dir} is not a folder: bundle a reproduction's folder or a run directory")
    out = Path(out) if out is not None else results_dir.resolve().parent / f"{results_dir.resolve().name}.zip"
    if out.exists() or out.is_symlink():
        raise RunError(f"{out} already exists; delete it or choose another --out")
    check_unlocked(results_dir)
    if (results_dir / "manifest.json").is_file():
        from .reproduce import render
        from .sweep import Job

        render(results_dir)
        kind = "reproduction"
        files = _results_files(results_dir)
        for name in (Job(**job).name for job in read_json(results_dir / "manifest.json")["jobs"]):
            run_dir = results_dir / "runs" / name
            if run_dir.is_dir() and not run_dir.is_symlink():
                check_unlocked(run_dir)
                files += _run_files(run_dir, f"runs/{name}/")
    elif (results_dir / CONFIG).is_file():
        load_config(results_dir)  # a damaged or foreign config is named here
        kind, files = "run", _run_files(results_dir, "")
    else:
        raise RunError(f"{results_dir} is neither a reproduction (manifest.json) nor an airvae run directory")
    files.append((BUNDLE_MARKER, json.dumps({"airvae_bundle": BUNDLE_FORMAT, "kind": kind, "source": results_dir.name,
                                             "airvae_version": __version__,
                                             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2).encode(),
                  time.time()))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data, mtime in sorted(files, key=lambda entry: entry[0]):
                info = zipfile.ZipInfo(name, time.localtime(max(mtime, 315532800))[:6])  # zip dates start in 1980
                info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, (stat.S_IFREG | 0o644) << 16
                archive.writestr(info, data() if callable(data) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _results_files(results_dir: Path) -> list:
    """A reproduction's own files (tables, REPORT.md, figures, studies), runs/ aside."""
    files = []
    for path in sorted(results_dir.rglob("*")):
        relative = path.relative_to(results_dir)
        if relative.parts[0] == "runs" or any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and not path.is_symlink() and path.suffix in _RESULTS_SUFFIXES:
            files.append((relative.as_posix(), path.read_bytes, path.stat().st_mtime))
    return files


def _run_files(run_dir: Path, prefix: str) -> list:
    """A run's shareable files as (archive name, bytes or a function giving them, mtime); the best
    checkpoint as safetensors. Links are never followed; files airvae does not write are left out."""
    files = []

    def add(name: str, path: Path, data=None):
        if path.is_file() and not path.is_symlink():
            files.append((prefix + name, path.read_bytes if data is None else data, path.stat().st_mtime))

    for name in _RUN_FILES:
        add(name, run_dir / name)
    config = {**read_json(run_dir / CONFIG), "data_dir": None}  # a folder of this machine means nothing there
    add(CONFIG, run_dir / CONFIG, json.dumps(config, indent=2).encode() + b"\n")
    for folder, suffixes in _RUN_FOLDERS.items():
        if (run_dir / folder).is_dir() and not (run_dir / folder).is_symlink():
            for path in sorted((run_dir / folder).iterdir()):
                if path.suffix in suffixes and not path.name.startswith("."):
                    add(f"{folder}/{path.name}", path)
    add(BEST_WEIGHTS, run_dir / BEST, partial(best_weights_safetensors, run_dir))  # converted when written
    return files


# ----------------------------------------------------------------------------------------------
# Reading


def is_bundle(path: Path) -> bool:
    """A zip archive with an ``airvae-bundle.json`` at its root."""
    try:
        with zipfile.ZipFile(path) as archive:
            return BUNDLE_MARKER in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def resolve(path: str | os.PathLike) -> Path:
    """The folder a command works on: an existing folder as it is; a bundle, or a path inside one
    (``results.zip/runs/caltech/k1-m1/plain/seed0``), as that folder of the bundle's extraction
    (:func:`extract`); anything else unchanged, for the caller to report."""
    path = Path(path)
    if path.is_dir():
        return path
    archive = next((p for p in (path, *path.parents) if p.is_file()), None)
    if archive is None:
        return path
    if not is_bundle(archive):
        if archive != path and zipfile.is_zipfile(archive):
            raise RunError(f"{path}: {archive} is a zip archive but not an airvae bundle ({BUNDLE_MARKER} is missing)")
        return path
    inner = PurePosixPath(path.relative_to(archive).as_posix())
    if ".." in inner.parts:
        raise RunError(f"{path}: a path inside a bundle cannot contain '..'")
    root = extract(archive)
    target = root.joinpath(*inner.parts)
    if not target.is_dir():
        runs = sorted(p.parent.relative_to(root).as_posix() for p in root.rglob(CONFIG))
        raise RunError(f"{archive} holds no folder {inner}; its runs are {', '.join(runs[:3]) or 'none'}"
                       f"{', ...' if len(runs) > 3 else ''}")
    return target


def extract(archive: str | os.PathLike) -> Path:
    """The folder holding a bundle's files: ``$AIRVAE_CACHE_DIR/bundles/<sha256 of the archive>/``,
    extracted on first use after every member is checked (module docstring); a refused archive
    extracts nothing and raises :class:`airvae.runs.RunError` saying why."""
    from .data import CACHE_DIR_ENV

    archive = Path(archive)
    with open(archive, "rb") as f:
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        root = Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "airvae").expanduser() / "bundles"
        target = root / digest.hexdigest()
        if target.is_dir():
            return target
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as bundle:
                members = _checked_members(bundle, archive)
                root.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{digest.hexdigest()[:16]}-"))
                try:
                    _extract_members(bundle, members, tmp, archive)
                    try:
                        os.rename(tmp, target)
                    except OSError:
                        if not target.is_dir():  # not another process extracting the same bundle meanwhile
                            raise
                        shutil.rmtree(tmp)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
        except zipfile.BadZipFile as error:
            raise RunError(f"bundle {archive} is not a readable zip archive ({error})") from error
        except OSError as error:
            raise RunError(f"could not extract bundle {archive} into {root}: {error.strerror or error}") from error
    return target


def _refuse(archive: Path, why: str) -> RunError:
    return RunError(f"bundle {archive} refused: {why}; nothing was extracted (an archive airvae wrote never "
                    "holds this: do not use it)")


def _checked_members(bundle: zipfile.ZipFile, archive: Path) -> list[zipfile.ZipInfo]:
    members, seen, total = [], set(), 0
    infos = bundle.infolist()
    if len(infos) > MAX_FILES:
        raise _refuse(archive, f"it holds {len(infos)} entries, more than {MAX_FILES}")
    for info in infos:
        name = info.filename
        kind = stat.S_IFMT(info.external_attr >> 16)
        parts = name.rstrip("/").split("/")
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            raise _refuse(archive, f"entry {name!r} has an absolute path")
        if "\\" in name or "\0" in name or any(part in ("", ".", "..") for part in parts):
            raise _refuse(archive, f"entry {name!r} escapes the bundle's folder (path traversal) or is malformed")
        if kind == stat.S_IFLNK:
            raise _refuse(archive, f"entry {name!r} is a symbolic link")
        if info.is_dir():
            if kind not in (0, stat.S_IFDIR):
                raise _refuse(archive, f"entry {name!r} is a special file")
            continue
        if kind not in (0, stat.S_IFREG):
            raise _refuse(archive, f"entry {name!r} is a special file")
        if info.flag_bits & 0x1:
            raise _refuse(archive, f"entry {name!r} is encrypted")
        if PurePosixPath(name).suffix not in SUFFIXES:
            raise _refuse(archive, f"entry {name!r} is not a kind of file a bundle holds ({', '.join(SUFFIXES)})")
        if name in seen:
            raise _refuse(archive, f"entry {name!r} appears twice")
        seen.add(name)
        total += info.file_size
        if total > MAX_BYTES:
            raise _refuse(archive, f"its files add up to more than {MAX_BYTES:,} bytes")
        members.append(info)
    if BUNDLE_MARKER not in seen:
        raise _refuse(archive, f"it has no {BUNDLE_MARKER}: it is not an airvae bundle")
    return members


def _extract_members(bundle: zipfile.ZipFile, members: list[zipfile.ZipInfo], folder: Path, archive: Path) -> None:
    """Write each checked member below ``folder``, counting the bytes really decompressed (a header
    may lie about sizes), and give it the archive's modification time: ``airvae report`` tells
    stale plots by comparing times."""
    written = 0
    for info in members:
        path = folder.joinpath(*info.filename.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with bundle.open(info) as source, open(path, "xb") as target:  # "x": never through something existing
            for block in iter(lambda: source.read(1 << 20), b""):
                written += len(block)
                if written > MAX_BYTES:
                    raise _refuse(archive, f"it decompresses to more than {MAX_BYTES:,} bytes")
                target.write(block)
        stamp = time.mktime(info.date_time + (0, 0, -1))
        os.utime(path, (stamp, stamp))


def load(path: str | os.PathLike, which: str = "best", device: str = "cpu"):
    """The trained model of a run directory, of a run inside a bundle (``BUNDLE/RUN``), or of a
    bundle of one run: ``model = airvae.load("runs/caltech/VAE-seed0")``. In eval mode, on
    ``device``. Weights come from ``best.pt`` (loaded weights-only) or a bundle's safetensors;
    ``which="last"`` takes ``last.pt`` of a run directory."""
    from .runs import load_trained_model

    folder = resolve(path)
    if folder != Path(path) and not (folder / CONFIG).exists():
        runs = sorted(p.parent.relative_to(folder).as_posix() for p in folder.rglob(CONFIG))
        raise RunError(f"{path} holds {len(runs)} runs; load one of them: {Path(path) / runs[0]}"
                       if runs else f"{path} holds no run")
    load_config(folder)  # a clear error for a folder that is not a run
    return load_trained_model(folder, which=which, device=device)[1]
