"""Results to share: ``airvae bundle DIR`` packs a reproduction's folder (or one run directory) into
one zip archive that holds no pickle; ``airvae report BUNDLE``, ``airvae evaluate BUNDLE/RUN`` and
:func:`load` read it on another machine.

What a bundle holds: ``airvae-bundle.json`` (what it is), the reproduction's ``manifest.json``,
``REPORT.md``, tables, figures and studies, and per run its marker, ``config.json`` (with its
machine-specific ``data_dir`` cleared), ``metrics.jsonl``, ``summary.json``, ``error.json``,
``evaluations/``, ``plots/`` and ``checkpoints/best.safetensors`` (the best weights; no
``last.pt``, no tracking files). Only JSON, JSON lines, Markdown, CSV, PNG and safetensors.

Opening one never trusts it: members are checked before anything is extracted (no absolute path,
no ``..``, no link or other special file, no encrypted entry, deflate or none as compression, no
duplicate, only the kinds of file above, at most :data:`MAX_FILES` files and :data:`MAX_BYTES` bytes
by the headers' sizes, which no entry decompresses beyond: a header that understates a size fails
the entry's checksum). The
extraction lives in ``$AIRVAE_CACHE_DIR/bundles/<sha256 of the archive>/`` (default
``~/.cache/airvae``); the archive is only ever read, and what ``evaluate`` and ``report`` compute
from it is written into that folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import time
import zipfile
from functools import partial
from pathlib import Path, PurePosixPath

from .runs import (_RUN_FOLDERS, BEST, BEST_WEIGHTS, CHECKPOINTS, CONFIG, ERROR, MARKER, METRICS, SUMMARY,
                   TENSORBOARD, RunError, RunLock, _stream_digest, best_weights_safetensors, load_config, read_json,
                   write_error)

BUNDLE_MARKER = "airvae-bundle.json"
BUNDLE_FORMAT = 1
SUFFIXES = (".json", ".jsonl", ".md", ".csv", ".png", ".safetensors")  # everything a bundle may hold
MAX_FILES = 100_000
MAX_BYTES = 8 << 30  # uncompressed: a paper-budget reproduction with every run's weights is well below
# A run's entries that a bundle shares, by the run directory's own layout (airvae.runs); config.json
# and the best weights are added apart, the lock, tracking files and last.pt never.
_SHARED_FILES = (MARKER, METRICS, SUMMARY, ERROR)
_SHARED_FOLDERS = {folder: names for folder, names in _RUN_FOLDERS.items() if folder not in (CHECKPOINTS, TENSORBOARD)}
_RESULTS_SUFFIXES = (".md", ".csv", ".json", ".png")  # a reproduction's own files (not sweep.jsonl: a local log)


# ----------------------------------------------------------------------------------------------
# Writing


def write_bundle(results_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Pack a reproduction's folder (``manifest.json``; its report is rebuilt first, as
    ``airvae report`` does) or a single run directory into ``out`` (default: ``DIR.zip`` beside
    it). The folder and its runs are locked while the report is rebuilt and the files are read:
    refused while another process writes any of them. ``out`` is never overwritten; everything is
    checked (``out``, the locks, every run's config) before anything is written."""
    from . import __version__

    results_dir = Path(results_dir)
    if not results_dir.is_dir() or results_dir.is_symlink():
        raise RunError(f"{results_dir} is not a folder: bundle a reproduction's folder or a run directory")
    out = Path(out) if out is not None else results_dir.resolve().parent / f"{results_dir.resolve().name}.zip"
    _check_out(out)
    if (results_dir / "manifest.json").is_file():
        from .sweep import Job

        kind = "reproduction"
        runs = {f"runs/{job.name}/": job.run_dir(results_dir)
                for job in (Job(**job) for job in read_json(results_dir / "manifest.json")["jobs"])}
        runs = {prefix: run_dir for prefix, run_dir in runs.items() if run_dir.is_dir() and not run_dir.is_symlink()}
    elif (results_dir / CONFIG).is_file():
        kind, runs = "run", {"": results_dir}
    else:
        raise RunError(f"{results_dir} is neither a reproduction (manifest.json) nor an airvae run directory")
    with contextlib.ExitStack() as held:
        for folder in dict.fromkeys([results_dir, *runs.values()]):  # render draws plots into the runs: lock them too
            held.enter_context(RunLock(folder))
        configs = {prefix: _shared_config(run_dir) for prefix, run_dir in runs.items()}
        archive = held.enter_context(_NewFile(out))
        files = []
        if kind == "reproduction":
            from .report import render

            render(results_dir)
            files = _results_files(results_dir)
        for prefix, run_dir in runs.items():
            files += _run_files(run_dir, prefix, configs[prefix])
        files.append((BUNDLE_MARKER, json.dumps({"airvae_bundle": BUNDLE_FORMAT, "kind": kind,
                                                 "source": results_dir.name, "airvae_version": __version__,
                                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                                                indent=2).encode(), time.time()))
        archive.write(files)
    return out


def _check_out(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise RunError(f"{out} already exists; delete it or choose another --out")
    existing = next(folder for folder in out.parents if folder.exists())
    if not existing.is_dir():
        raise RunError(f"--out {out}: {existing} is a file, not a folder; choose another --out")


class _NewFile:
    """The archive, written into a temporary file beside ``out`` (created on entering, so an
    unwritable ``out`` is refused before anything else is written) and published by a hard link,
    which, unlike a rename, fails if ``out`` appeared meanwhile: never overwritten, never torn."""

    def __init__(self, out: Path):
        self.out, self.tmp = out, None

    def __enter__(self) -> "_NewFile":
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(dir=self.out.parent, prefix=f".{self.out.name}.")
            os.close(fd)
        except OSError as error:
            raise write_error(self.out, error) from error
        return self

    def write(self, files: list) -> None:
        """``files``: (archive name, bytes or a function giving them, modification time)."""
        try:
            with open(self.tmp, "wb") as f:
                with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as archive:
                    for name, data, mtime in sorted(files, key=lambda entry: entry[0]):
                        info = zipfile.ZipInfo(name, time.localtime(max(mtime, 315532800))[:6])  # zip dates: 1980+
                        info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, (stat.S_IFREG | 0o644) << 16
                        archive.writestr(info, data() if callable(data) else data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(self.tmp, 0o644)  # mkstemp's 0600 would keep the archive unreadable to colleagues
            os.link(self.tmp, self.out)
        except FileExistsError as error:
            raise RunError(f"{self.out} already exists (written by another process meanwhile); it was left as it "
                           "is: delete it or choose another --out") from error
        except OSError as error:
            raise write_error(self.out, error) from error

    def __exit__(self, *exc) -> None:
        Path(self.tmp).unlink(missing_ok=True)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:  # not to be told as a failure to write the archive
        raise RunError(f"could not read {path}: {error.strerror or error}") from error


def _shared_config(run_dir: Path) -> bytes | None:
    """A run's ``config.json`` as a bundle holds it (None: the run has none, e.g. it failed before
    writing it): validated, with its ``data_dir`` cleared (a folder of this machine means nothing
    elsewhere)."""
    if not (run_dir / CONFIG).exists():
        return None
    return (json.dumps(load_config(run_dir).replace(data_dir=None).to_json(), indent=2) + "\n").encode()


def _results_files(results_dir: Path) -> list:
    """A reproduction's own files (tables, REPORT.md, figures, studies), runs/ aside."""
    files = []
    for path in sorted(results_dir.rglob("*")):
        relative = path.relative_to(results_dir)
        if relative.parts[0] == "runs" or any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and not path.is_symlink() and path.suffix in _RESULTS_SUFFIXES:
            files.append((relative.as_posix(), partial(_read, path), path.stat().st_mtime))
    return files


def _run_files(run_dir: Path, prefix: str, config: bytes | None) -> list:
    """A run's shareable files as (archive name, bytes or a function giving them, mtime): ``config``
    (:func:`_shared_config`) and the best checkpoint as safetensors (a run from a bundle: its
    safetensors as they are). Links are never followed; files airvae does not write are left out."""
    files = []

    def add(name: str, path: Path, data=None):
        if path.is_file() and not path.is_symlink():
            files.append((prefix + name, partial(_read, path) if data is None else data, path.stat().st_mtime))

    for name in _SHARED_FILES:
        add(name, run_dir / name)
    if config is not None:
        add(CONFIG, run_dir / CONFIG, config)
    for folder, names in _SHARED_FOLDERS.items():
        if (run_dir / folder).is_dir() and not (run_dir / folder).is_symlink():
            for path in sorted((run_dir / folder).iterdir()):
                if names.fullmatch(path.name) and not path.name.startswith("."):
                    add(f"{folder}/{path.name}", path)
    if (run_dir / BEST).exists():
        add(BEST_WEIGHTS, run_dir / BEST, partial(best_weights_safetensors, run_dir))  # converted when written
    else:
        add(BEST_WEIGHTS, run_dir / BEST_WEIGHTS)
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
        runs = _runs_in(root)
        raise RunError(f"{archive} holds no folder {inner}; its runs are {', '.join(runs[:3]) or 'none'}"
                       f"{', ...' if len(runs) > 3 else ''}")
    return target


def _runs_in(folder: Path) -> list[str]:
    """The run directories below ``folder`` (each holds a config.json), relative to it."""
    return sorted(path.parent.relative_to(folder).as_posix() for path in folder.rglob(CONFIG))


def extract(archive: str | os.PathLike) -> Path:
    """The folder holding a bundle's files: ``$AIRVAE_CACHE_DIR/bundles/<sha256 of the archive>/``,
    extracted on first use after every member is checked (module docstring); a refused archive
    extracts nothing and raises :class:`airvae.runs.RunError` saying why."""
    from .data import cache_root

    archive = Path(archive)
    root = cache_root() / "bundles"
    try:
        with open(archive, "rb") as f:  # one open file, hashed then read: what is extracted is what was hashed
            target = root / _stream_digest(f)
            if target.is_dir():
                return target
            f.seek(0)
            _extract_into(zipfile.ZipFile(f), archive, root, target)
    except zipfile.BadZipFile as error:
        raise RunError(f"bundle {archive} is not a readable zip archive ({error}); nothing was extracted") from error
    except OSError as error:
        raise RunError(f"could not extract bundle {archive} into {root}: {error.strerror or error}") from error
    return target


def _extract_into(bundle: zipfile.ZipFile, archive: Path, root: Path, target: Path) -> None:
    """Check every member, extract into a temporary folder beside ``target``, then rename it there."""
    with bundle:
        members = _checked_members(bundle, archive)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name[:16]}-"))
        try:
            _extract_members(bundle, members, tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # not another process extracting the same bundle meanwhile
                    raise
                shutil.rmtree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


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
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # zipfile bounds each deflate read's output; bzip2 and LZMA reads are not bounded
            raise _refuse(archive, f"entry {name!r} is compressed with method {info.compress_type}, not deflate")
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


def _extract_members(bundle: zipfile.ZipFile, members: list[zipfile.ZipInfo], folder: Path) -> None:
    """Write each checked member below ``folder`` and give it the archive's modification time
    (``airvae report`` tells stale plots by comparing times). No member decompresses to more than
    its header's size, which :func:`_checked_members` counted: zipfile stops there, and a header
    that understates the size fails the entry's CRC check (BadZipFile)."""
    for info in members:
        path = folder.joinpath(*info.filename.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with bundle.open(info) as source, open(path, "xb") as target:  # "x": never through something existing
            shutil.copyfileobj(source, target, 1 << 20)
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
        runs = _runs_in(folder)
        raise RunError(f"{path} holds {len(runs)} runs; load one of them: {Path(path) / runs[0]}"
                       if runs else f"{path} holds no run")
    return load_trained_model(folder, which=which, device=device)[1]
