"""Results to share: ``airvae bundle DIR`` packs a reproduction's folder (or one run directory) into
one zip archive that holds no pickle; ``airvae report BUNDLE``, ``airvae evaluate BUNDLE/RUN`` and
[`load`][airvae.bundle.load] read it on another machine.

What a bundle holds: ``airvae-bundle.json`` (what it is), the reproduction's ``manifest.json``,
``REPORT.md``, tables, figures and studies, and per run its marker, ``config.json`` (with its
machine-specific ``data_dir`` cleared), ``metrics.jsonl``, ``summary.json``, ``error.json``,
``evaluations/``, ``plots/`` and ``checkpoints/best.safetensors`` (the best weights; no
``last.pt``, no tracking files). Only JSON, JSON lines, Markdown, CSV, PNG and safetensors.

Opening one never trusts it: members are checked before anything is extracted (no absolute path,
no ``..``, no link or other special file, no encrypted entry, deflate or none as compression, no
duplicate, only the kinds of file above, at most ``MAX_FILES`` files and ``MAX_BYTES`` bytes
by the headers' sizes, which no entry decompresses beyond: a header that understates a size fails
the entry's checksum; no entry, nor the whole, expanding more than ``MAX_RATIO`` times, and no
compressed data overlapping another entry's: a zip bomb), and so is every ``manifest.json``: each of
its fields by type and range before it names a path ([`manifest_jobs`][airvae.bundle.manifest_jobs]), and
every run folder it names must lie inside the extraction. The extraction lives in
``$AIRVAE_CACHE_DIR/bundles/<sha256 of the archive>/`` (default ``~/.cache/airvae``), written into a temporary
folder, synced, then renamed there, never through a symbolic link; the archive is only ever read, and what
``evaluate`` and ``report`` compute from it is written into that folder.

Bundling only reads its source: a folder that cannot hold a lock file (read-only) is read after
checking that no other process holds its lock, and its report is packed as it is, not rebuilt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
import zipfile
from functools import partial
from pathlib import Path, PurePosixPath

from .files import TEMPORARY_TAG, LinkRefused, RunIOError, real_folder
from .runs import (BEST, BEST_WEIGHTS, CHECKPOINTS, CONFIG, ERROR, LAST, LOCK, MARKER, METRICS, RUN_FOLDERS, SUMMARY,
                   TENSORBOARD, RunError, RunLock, stream_digest, best_weights_safetensors, check_unlocked,
                   load_config, read_json, write_error)

BUNDLE_MARKER = "airvae-bundle.json"
BUNDLE_FORMAT = 1
SUFFIXES = (".json", ".jsonl", ".md", ".csv", ".png", ".safetensors")  # everything a bundle may hold
MAX_FILES = 100_000
MAX_BYTES = 8 << 30  # uncompressed: a paper-budget reproduction with every run's weights is well below
MAX_RATIO = 100  # uncompressed/compressed: deflate packs airvae's files (weights, JSON, PNG) under 10:1, bombs ~1000:1
RATIO_FLOOR = 1 << 20  # files (and totals) below 1 MiB may compress further (a JSON of blanks) but fill no disk
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # parsed in memory: a paper-budget reproduction's manifest is well under 1 MB
MAX_COUNT = 2**32 - 1  # k, m, examples: far beyond any machine's memory; bounded so that run names stay short
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")  # one path component: never "", "." or ".."
# A run's entries that a bundle shares, by the run directory's own layout (airvae.runs); config.json
# and the best weights are added apart, the lock, tracking files and last.pt never.
_SHARED_FILES = (MARKER, METRICS, SUMMARY, ERROR)
_SHARED_FOLDERS = {folder: names for folder, names in RUN_FOLDERS.items() if folder not in (CHECKPOINTS, TENSORBOARD)}
_RESULTS_SUFFIXES = (".md", ".csv", ".json", ".png")  # a reproduction's own files (not sweep.jsonl: a local log)


# ----------------------------------------------------------------------------------------------
# Writing


def write_bundle(results_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Pack a reproduction's folder (``manifest.json``; its report is rebuilt first, as
    ``airvae report`` does) or a single run directory into one zip archive (``airvae bundle DIR``).

    The folder and its runs are locked while the report is rebuilt and the files are read: refused
    while another process writes any of them. A source this process cannot write (no lock file can
    be created) is read after checking that no other process holds its lock, and its report is
    packed as it is. Everything is checked (``out``, the manifest, the locks, every run's config)
    before anything is written.

    Args:
        results_dir: the reproduction's folder, or a run directory.
        out: the archive (default: ``DIR.zip`` beside it); never overwritten.

    Returns:
        The archive's path.
    """
    from ._version import __version__

    results_dir = Path(results_dir)
    if not results_dir.is_dir() or results_dir.is_symlink():
        raise RunError(f"{results_dir} is not a folder: bundle a reproduction's folder or a run directory")
    out = Path(out) if out is not None else results_dir.resolve().parent / f"{results_dir.resolve().name}.zip"
    _check_out(out)
    if (results_dir / MANIFEST).is_file():
        kind = "reproduction"
        jobs = manifest_jobs(read_json(results_dir / MANIFEST), results_dir / MANIFEST,
                             "restore it from a copy (`airvae reproduce` wrote it)")
        runs = {f"runs/{job.name}/": job.run_dir(results_dir) for job in jobs}
        runs = {prefix: run_dir for prefix, run_dir in runs.items() if run_dir.is_dir() and not run_dir.is_symlink()}
    elif (results_dir / CONFIG).is_file():
        kind, runs = "run", {"": results_dir}
    else:
        raise RunError(f"{results_dir} is neither a reproduction (manifest.json) nor an airvae run directory")
    with contextlib.ExitStack() as held:
        # render draws plots into the runs: lock them too
        locked = [held.enter_context(_reading(folder)) for folder in dict.fromkeys([results_dir, *runs.values()])]
        configs = {prefix: _shared_config(run_dir) for prefix, run_dir in runs.items()}
        archive = held.enter_context(_NewFile(out))
        files = []
        if kind == "reproduction":
            from .report import render

            if all(locked):  # a folder airvae may not write keeps its report as it is (the reader rebuilds it)
                render(results_dir)
            files = _results_files(results_dir)
        for prefix, run_dir in runs.items():
            files += _run_files(run_dir, prefix, configs[prefix], out)
        files.append((BUNDLE_MARKER, json.dumps({"airvae_bundle": BUNDLE_FORMAT, "kind": kind,
                                                 "source": results_dir.name, "airvae_version": __version__,
                                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                                                indent=2).encode(), time.time()))
        archive.write(files)
    return out


@contextlib.contextmanager
def _reading(folder: Path):
    """Hold ``folder``'s lock while it is read; yields whether it is held. Reading needs no
    writable source: where the lock file cannot be created (a read-only file system, no
    permission), the folder is read if no other process holds its lock (yields False)."""
    try:
        lock = RunLock(folder).acquire()
    except RunIOError as error:
        cause = error.__cause__
        if not (isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
            raise
        try:
            check_unlocked(folder)
        except RunIOError as unreadable:
            raise RunError(f"{folder} is read-only and its lock file {folder / LOCK} cannot be read "
                           f"({unreadable.__cause__ or unreadable}), so airvae cannot tell whether another process "
                           "writes it; make the lock file readable, or bundle a copy of the folder") from None
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _check_out(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise RunError(f"{out} already exists; delete it or choose another --out")
    existing = next(folder for folder in out.parents if folder.exists())
    if not existing.is_dir():
        raise RunError(f"--out {out}: {existing} is a file, not a folder; choose another --out")


class _NewFile:
    """The archive, written into a temporary file beside ``out`` (created on entering, so an
    unwritable ``out`` is refused before anything else is written; its name carries
    ``airvae.files.TEMPORARY_TAG``, one no user picks) and published by a hard link, which,
    unlike [`airvae.files.atomic_write_bytes`][]' rename, fails if ``out`` appeared meanwhile:
    never overwritten, never torn. Never through a symbolic link: neither ``out`` (the link fails
    on any entry there) nor its folder, nor any folder created for it, may be one."""

    def __init__(self, out: Path):
        self.out, self.tmp = out, None

    def __enter__(self) -> "_NewFile":
        folder = self.out.parent
        real_folder(folder, _nearest_existing(folder))  # creates what is missing, refusing links on the way
        try:
            fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.out.name}{TEMPORARY_TAG}")
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
        if self.tmp is not None:
            Path(self.tmp).unlink(missing_ok=True)


def _nearest_existing(folder: Path) -> Path:
    """``folder``, or the nearest folder above it that exists (a link counts: it is refused)."""
    return next((p for p in (folder, *folder.parents) if p.exists() or p.is_symlink()), Path("."))


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


def _run_files(run_dir: Path, prefix: str, config: bytes | None, out: Path) -> list:
    """A run's shareable files as (archive name, bytes or a function giving them, mtime): ``config``
    (``_shared_config``) and the best checkpoint as safetensors (a run from a bundle: its
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
        add(BEST_WEIGHTS, run_dir / BEST, partial(_best_weights, run_dir, out))  # converted when written
    else:
        add(BEST_WEIGHTS, run_dir / BEST_WEIGHTS)
    return files


def _best_weights(run_dir: Path, out: Path) -> bytes:
    """[`airvae.runs.best_weights_safetensors`][], with a checkpoint that holds no ``model``
    entry of tensors (not written by airvae) named in one line instead of a KeyError."""
    try:
        return best_weights_safetensors(run_dir)
    except (KeyError, TypeError, AttributeError) as error:
        raise RunError(f"could not write {out}: checkpoint {run_dir / BEST} holds no 'model' entry of weights "
                       f"({type(error).__name__}: {error}); it was not written by airvae: delete it and train or "
                       "resume the run again") from error


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
    ([`extract`][airvae.bundle.extract]); anything else unchanged, for the caller to report."""
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
    if not target.is_dir() or target.is_symlink():
        runs = _runs_in(root)
        raise RunError(f"{archive} holds no folder {inner}; its runs are {', '.join(runs[:3]) or 'none'}"
                       f"{', ...' if len(runs) > 3 else ''}")
    if target != root:
        _check_extracted_manifest(target, archive, f"{inner}/{MANIFEST}")  # report BUNDLE/FOLDER reads it
    return target


def _runs_in(folder: Path) -> list[str]:
    """The run directories below ``folder`` (each holds a config.json), relative to it."""
    return sorted(path.parent.relative_to(folder).as_posix() for path in folder.rglob(CONFIG))


def extract(archive: str | os.PathLike) -> Path:
    """The folder holding a bundle's files: ``$AIRVAE_CACHE_DIR/bundles/<sha256 of the archive>/``,
    extracted on first use after every member is checked (module docstring); a refused archive
    extracts nothing and raises [`airvae.runs.RunError`][airvae.files.RunError] saying why. Its manifest is checked
    on every use, so an extraction by an older airvae is checked as well."""
    from .data import cache_root

    archive = Path(archive)
    root = cache_root() / "bundles"
    try:
        with open(archive, "rb") as f:  # one open file, hashed then read: what is extracted is what was hashed
            target = root / stream_digest(f)
            for folder in (root, target):  # what a link points at is never read as the bundle nor written
                if folder.is_symlink():
                    raise LinkRefused(f"{folder} is a symbolic link; airvae never writes through links: remove "
                                      "the link, or choose another cache folder ($AIRVAE_CACHE_DIR)")
            if not target.is_dir():
                f.seek(0)
                _extract_into(zipfile.ZipFile(f), archive, root, target, os.fstat(f.fileno()).st_size)
    except zipfile.BadZipFile as error:
        raise RunError(f"bundle {archive} is not a readable zip archive ({error}); nothing was extracted") from error
    except OSError as error:
        raise RunError(f"could not extract bundle {archive} into {root}: {error.strerror or error}") from error
    _check_extracted_manifest(target, archive, MANIFEST)
    return target


def _extract_into(bundle: zipfile.ZipFile, archive: Path, root: Path, target: Path, size: int) -> None:
    """Check every member and every manifest, extract into a temporary folder beside ``target``
    (a name no user picks), sync it, then rename it there: a crash never leaves a torn extraction
    under the digest's name, which is trusted from then on."""
    with bundle:
        members = _checked_members(bundle, archive, size)
        for info in members:
            if PurePosixPath(info.filename).name == MANIFEST:
                _check_archived_manifest(bundle, info, archive)
        real_folder(root)  # created now that the archive passed, never through a link
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name[:16]}{TEMPORARY_TAG}"))
        try:
            _extract_members(bundle, members, tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir() or target.is_symlink():  # not another process extracting it meanwhile
                    raise
                shutil.rmtree(tmp)
            _sync(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _refuse(archive: Path, why: str) -> RunError:
    return RunError(f"bundle {archive} refused: {why}; nothing was extracted (an archive airvae wrote never "
                    "holds this: do not use it)")


def _checked_members(bundle: zipfile.ZipFile, archive: Path, size: int) -> list[zipfile.ZipInfo]:
    members, seen, total = [], set(), 0
    infos = bundle.infolist()
    if len(infos) > MAX_FILES:
        raise _refuse(archive, f"it holds {len(infos)} entries, more than {MAX_FILES}")
    _check_no_overlap(infos, min(bundle.start_dir, size), archive)
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
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise _refuse(archive, f"entry {name!r} expands from {info.compress_size:,} to {info.file_size:,} bytes, "
                                   f"more than {MAX_RATIO} times (a zip bomb)")
        total += info.file_size
        if total > MAX_BYTES:
            raise _refuse(archive, f"its files add up to more than {MAX_BYTES:,} bytes")
        members.append(info)
    if BUNDLE_MARKER not in seen:
        raise _refuse(archive, f"it has no {BUNDLE_MARKER}: it is not an airvae bundle")
    compressed = sum(info.compress_size for info in members)
    if total > RATIO_FLOOR and total > MAX_RATIO * max(compressed, 1):
        raise _refuse(archive, f"its files expand from {compressed:,} to {total:,} bytes, more than {MAX_RATIO} times "
                               "(a zip bomb)")
    return members


def _check_no_overlap(infos: list[zipfile.ZipInfo], end: int, archive: Path) -> None:
    """Each entry's compressed data must fit between its header and the next entry (or the
    central directory): the compressed sizes the ratios are judged by are then real bytes of the
    archive, and no two entries share data (zip bombs that overlap entries, or overstate a size
    to hide their ratio)."""
    ordered = sorted(infos, key=lambda info: info.header_offset)
    for info, following in zip(ordered, [other.header_offset for other in ordered[1:]] + [end]):
        if info.header_offset + info.compress_size > following:
            raise _refuse(archive, f"entry {info.filename!r} overlaps the next entry or the archive's end (its "
                                   "compressed size is overstated or its data shared: a zip bomb)")


def _extract_members(bundle: zipfile.ZipFile, members: list[zipfile.ZipInfo], folder: Path) -> None:
    """Write each checked member below ``folder`` (a fresh temporary folder), each file synced, and
    give it the archive's modification time (``airvae report`` tells stale plots by comparing
    times). Never through a link: each folder is checked ([`airvae.files.real_folder`][]) and
    each file created anew ("x": fails on anything there, a link included). No member
    decompresses to more than its header's size, which ``_checked_members`` counted: zipfile
    stops there, and a header that understates the size fails the entry's CRC check (BadZipFile)."""
    folders = {folder}  # those checked (and made) so far
    for info in members:
        path = folder.joinpath(*info.filename.split("/"))
        if path.parent not in folders:
            real_folder(path.parent, folder)
            folders.update(p for p in (path.parent, *path.parent.parents) if folder in (p, *p.parents))
        with bundle.open(info) as source, open(path, "xb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
            target.flush()
            os.fsync(target.fileno())
            stamp = time.mktime(info.date_time + (0, 0, -1))
            os.utime(target.fileno() if os.utime in os.supports_fd else path, (stamp, stamp))
    for made in folders:
        _sync(made)  # the entries of each folder too: a crash after the rename keeps every file


def _sync(folder: Path) -> None:
    """fsync a folder's entries (where the system allows opening a folder: not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Manifests: every field checked before it names a path


def manifest_jobs(manifest, where: Path | str, fix: str) -> list:
    """The runs ([`airvae.sweep.Job`][]) of a reproduction's parsed ``manifest.json``, after
    every field is checked by type and range (``_check_manifest``): its fields name the folders
    that ``report``, ``evaluate`` and ``bundle`` read and write. A bad one is a RunError naming
    ``where`` (the file) with ``fix``."""
    from .config import ConfigError

    try:
        return _check_manifest(manifest)
    except ConfigError as error:
        raise RunError(f"{where}: {_said(error)}; {fix}") from None


def _said(error: Exception, limit: int = 500) -> str:
    """An error's message, cut short: a crafted manifest's value could fill the screen."""
    text = str(error)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _check_archived_manifest(bundle: zipfile.ZipFile, info: zipfile.ZipInfo, archive: Path) -> None:
    """A manifest inside an archive, checked before anything is extracted."""
    if info.file_size > MAX_MANIFEST_BYTES:
        raise _refuse(archive, f"{info.filename} holds {info.file_size:,} bytes, more than {MAX_MANIFEST_BYTES:,}")
    try:
        manifest = json.loads(bundle.read(info).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise _refuse(archive, f"{info.filename} is not valid JSON ({type(error).__name__})") from None
    from .config import ConfigError

    try:
        _check_manifest(manifest)
    except ConfigError as error:
        raise _refuse(archive, f"{info.filename}: {_said(error)}") from None


def _check_extracted_manifest(folder: Path, archive: Path, name: str) -> None:
    """The manifest of an extracted folder (``name`` in the bundle), if it has one: its fields, and
    the run folders it names, which must lie inside ``folder`` once resolved."""
    if not (folder / MANIFEST).exists():
        return
    from .targets import figure3_dir

    where, fix = f"bundle {archive} refused: {name}", "an archive airvae wrote never holds this: do not use it"
    manifest = read_json(folder / MANIFEST)
    jobs = manifest_jobs(manifest, where, fix)
    inside = folder.resolve()  # follows links: a folder linked elsewhere is outside
    named = [job.run_dir(folder) for job in jobs] + [figure3_dir(folder, dataset) for dataset in manifest["datasets"]]
    for path in named:
        if not path.resolve().is_relative_to(inside):
            raise RunError(f"{where}: {path.relative_to(folder)} leads outside the bundle's folder {folder}; {fix}")


def _check_manifest(manifest) -> list:
    """Every field a reproduction's manifest holds (airvae.reproduce), by type and range; the jobs
    as [`airvae.sweep.Job`][]. Raises [`airvae.config.ConfigError`][] saying which field."""
    from .config import BUDGETS, MAX_SEED, ConfigError, check_int, require
    from .targets import STRENGTHS, TARGETS

    require(isinstance(manifest, dict), "manifest", type(manifest).__name__, "a JSON object")
    for key in ("target", "datasets", "budget", "seeds", "grid", "evaluation", "jobs"):
        if key not in manifest:
            raise ConfigError(f"{key!r} is missing")
    _check_choice("target", manifest["target"], TARGETS)
    datasets = manifest["datasets"]
    require(isinstance(datasets, list) and datasets, "datasets", datasets, "a non-empty list of dataset names")
    for dataset in datasets:
        _check_dataset(dataset)
    _check_choice("budget", manifest["budget"], BUDGETS)
    check_int("seeds", manifest["seeds"], 1, MAX_SEED + 1)
    if "strengths" in manifest:  # manifests before `--strengths` have none
        _check_choice("strengths", manifest["strengths"], STRENGTHS)
    grid = manifest["grid"]
    require(isinstance(grid, list) and all(_is_finite(v) and v > 0 for v in grid), "grid", grid,
            "a list of finite strengths > 0")
    for key in ("evaluation", "extra_evaluation"):
        _check_evaluation(key, manifest.get(key))
    _check_study(manifest.get("study"))
    jobs = manifest["jobs"]
    require(isinstance(jobs, list) and jobs, "jobs", jobs, "a non-empty list of runs")
    checked = []
    for number, fields in enumerate(jobs):
        try:
            checked.append(_check_job(fields))
        except ValueError as error:  # ConfigError, or sweep.Job's own check
            raise ConfigError(f"jobs[{number}]: {error}") from None
    return checked


def _check_job(fields) -> object:
    """One job of a manifest as a [`airvae.sweep.Job`][]: each field checked here, before
    Job's own checks (family, and its strength) and before [`name`][airvae.sweep.Job.name] makes a path of them."""
    from .config import ARCHITECTURES, BUDGETS, MAX_SEED, ConfigError, check_int, is_real, require
    from .sweep import FAMILIES, Job

    require(isinstance(fields, dict), "run", fields, "a JSON object of a run's fields")
    unknown = sorted(set(fields) - {field.name for field in dataclasses.fields(Job)})
    if unknown:
        raise ConfigError(f"unknown field {', '.join(map(repr, unknown))}")
    for key in ("family", "dataset"):
        if key not in fields:
            raise ConfigError(f"{key!r} is missing")
    _check_choice("family", fields["family"], FAMILIES)
    _check_dataset(fields["dataset"])
    for key in ("k", "m"):
        check_int(key, fields.get(key, 1), 1, MAX_COUNT)
    strength = fields.get("strength", 0.0)
    require(is_real(strength) and math.isfinite(strength) and strength >= 0, "strength", strength,
            "a finite number >= 0")
    check_int("seed", fields.get("seed", 0), 0, MAX_SEED)
    _check_choice("budget", fields.get("budget", "quick"), BUDGETS)
    check_int("track_test_examples", fields.get("track_test_examples", 0), 0, MAX_COUNT)
    if fields.get("iterations") is not None:
        check_int("iterations", fields["iterations"], 1, MAX_COUNT)
    if fields.get("architecture") is not None:
        _check_choice("architecture", fields["architecture"], ARCHITECTURES)
    return Job(**fields)


def _check_choice(name: str, value, allowed) -> None:
    from .config import require

    require(isinstance(value, str) and value in allowed, name, value, ", ".join(allowed))


def _check_dataset(value) -> None:
    """A dataset's name, or the path of its .npz file: what names the runs' folders (the name, or
    the file's stem) must be one plain path component."""
    from .config import require

    named = PurePosixPath(value).stem if isinstance(value, str) and value.endswith(".npz") else value
    require(isinstance(value, str) and "\0" not in value and isinstance(named, str)
            and _PLAIN_NAME.fullmatch(named) is not None, "dataset", value,
            "a dataset name (letters, digits, _ . + -), or the path of a .npz file with such a name")


def _is_finite(value) -> bool:
    from .config import is_real

    return is_real(value) and math.isfinite(value)


def _check_evaluation(key: str, settings) -> None:
    """None, or the fields of [`airvae.evaluation.EvaluationSettings`][], checked by it."""
    from .config import ConfigError
    from .evaluation import EvaluationSettings

    if settings is None:
        return
    if not isinstance(settings, dict):
        raise ConfigError(f"invalid {key} = {settings!r}: allowed null or a JSON object of evaluation settings")
    try:
        EvaluationSettings.from_dict(settings)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{key}: {error}") from None


_STUDY_COUNTS = {"ks": 1, "steps_list": 0}  # Figure 3's study (targets.FIGURE3_STUDIES): lists, by their minimum
_STUDY_INTS = {"fixed_steps": 0, "svi_k": 1, "l": 1}


def _check_study(study) -> None:
    """None, or Figure 3's settings ([`airvae.targets.FIGURE3_STUDIES`][]), by type and range."""
    from .config import ConfigError, check_int, require

    if study is None:
        return
    fields = {*_STUDY_COUNTS, *_STUDY_INTS, "max_examples"}
    require(isinstance(study, dict) and set(study) == fields, "study", study,
            f"null or a JSON object of {', '.join(sorted(fields))}")
    try:
        for key, minimum in _STUDY_COUNTS.items():
            require(isinstance(study[key], list) and study[key], key, study[key], "a non-empty list of integers")
            for value in study[key]:
                check_int(key, value, minimum, MAX_COUNT)
        for key, minimum in _STUDY_INTS.items():
            check_int(key, study[key], minimum, MAX_COUNT)
        if study["max_examples"] is not None:
            check_int("max_examples", study["max_examples"], 1, MAX_COUNT)
    except ConfigError as error:
        raise ConfigError(f"study: {error}") from None


def load(path: str | os.PathLike, which: str = "best", device: str = "cpu", model=None):
    """The trained model of a run directory, of a run inside a bundle (``BUNDLE/RUN``), or of a bundle
    of one run: ``model = airvae.load("runs/caltech/VAE-seed0")``. In eval mode, on ``device``.

    Weights come from ``best.pt`` (loaded weights-only) or a bundle's safetensors: a bundle never
    runs code. A run of your own model ([`airvae.fit.fit`][]) needs ``model``.

    Args:
        path: a run directory, a bundle, or a run inside one (``results.zip/runs/...``).
        which: ``"best"`` (early stopping's model) or ``"last"`` (``last.pt`` of a run directory; a
            bundle holds no ``last.pt``).
        device: where the model is loaded.
        model (torch.nn.Module | None): an untrained instance of your own model to load the weights
            into; None for airvae's own models.

    Returns:
        (torch.nn.Module): The model.

    Raises:
        RunError: no run there, a refused bundle, a missing checkpoint, or weights that do not fit.
    """
    from .runs import load_trained_model

    folder = resolve(path)
    if folder != Path(path) and not (folder / CONFIG).exists():
        runs = _runs_in(folder)
        raise RunError(f"{path} holds {len(runs)} runs; load one of them: {Path(path) / runs[0]}"
                       if runs else f"{path} holds no run")
    if which == "last" and not (folder / LAST).exists() and (folder / BEST_WEIGHTS).exists():
        raise RunError(f"{path} comes from a bundle, which holds the best weights only (no last.pt); "
                       "load which='best'")
    return load_trained_model(folder, which=which, device=device, model=model)[1]
