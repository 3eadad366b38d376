"""Writing a bundle: a reproduction (or a run) packed into one zip archive of JSON, Markdown, PNG
and safetensors weights, with no pickle, while its folders are locked against writers."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from .._version import __version__
from ..files import TEMPORARY_TAG, RunError, RunIOError, read_json, real_folder, refuse_links_under, write_error
from ..locks import LOCK, RunLock, check_unlocked
from ..manifest import manifest_jobs
from ..report import render
from ..runs import BEST, BEST_WEIGHTS, CONFIG, best_weights_safetensors, load_config
from .limits import BUNDLE_FORMAT, BUNDLE_MARKER, MANIFEST, RESULTS_SUFFIXES, SHARED_FILES, SHARED_FOLDERS

# ----------------------------------------------------------------------------------------------
# Writing


def write_bundle(results_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
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
    refuse_links_under(results_dir)  # before the locks are written: no lock file, and no file packed, through a link
    with contextlib.ExitStack() as held:
        # render draws plots into the runs: lock them too
        locked = [held.enter_context(_reading(folder)) for folder in dict.fromkeys([results_dir, *runs.values()])]
        configs = {prefix: _shared_config(run_dir) for prefix, run_dir in runs.items()}
        archive = held.enter_context(_NewFile(out))
        files = []
        if kind == "reproduction":

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


# A file of the archive: its name, its bytes (or a function giving them, called when it is written), its mtime.
_Entry = tuple[str, bytes | Callable[[], bytes], float]


@contextlib.contextmanager
def _reading(folder: Path) -> Iterator[bool]:
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

    def __init__(self, out: Path) -> None:
        self.out = out
        self.tmp: str | None = None  # the temporary file, made by __enter__

    def __enter__(self) -> _NewFile:
        folder = self.out.parent
        real_folder(folder, _nearest_existing(folder))  # creates what is missing, refusing links on the way
        try:
            fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.out.name}{TEMPORARY_TAG}")
            os.close(fd)
        except OSError as error:
            raise write_error(self.out, error) from error
        return self

    def write(self, files: list[_Entry]) -> None:
        """``files``: (archive name, bytes or a function giving them, modification time)."""
        assert self.tmp is not None, "write inside `with _NewFile(out)`"
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

    def __exit__(self, *exc: Any) -> None:
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


def _results_files(results_dir: Path) -> list[_Entry]:
    """A reproduction's own files (tables, REPORT.md, figures, studies), runs/ aside."""
    files: list[_Entry] = []
    for path in sorted(results_dir.rglob("*")):
        relative = path.relative_to(results_dir)
        if relative.parts[0] == "runs" or any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and not path.is_symlink() and path.suffix in RESULTS_SUFFIXES:
            files.append((relative.as_posix(), partial(_read, path), path.stat().st_mtime))
    return files


def _run_files(run_dir: Path, prefix: str, config: bytes | None, out: Path) -> list[_Entry]:
    """A run's shareable files as (archive name, bytes or a function giving them, mtime): ``config``
    (``_shared_config``) and the best checkpoint as safetensors (a run from a bundle: its
    safetensors as they are). Links are never followed; files airvae does not write are left out."""
    files: list[_Entry] = []

    def add(name: str, path: Path, data: bytes | Callable[[], bytes] | None = None) -> None:
        if path.is_file() and not path.is_symlink():
            files.append((prefix + name, partial(_read, path) if data is None else data, path.stat().st_mtime))

    for name in SHARED_FILES:
        add(name, run_dir / name)
    if config is not None:
        add(CONFIG, run_dir / CONFIG, config)
    for folder, names in SHARED_FOLDERS.items():
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


