"""How airvae writes and reads its own files, in one place: every write is atomic (a temporary file
with a name no user picks, fsync, rename) and never goes through a symbolic link, neither at the
file nor at any folder between it and the run, reproduction or output folder it belongs to; every
failure is one [`RunError`][airvae.files.RunError] that names the file and what to do."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# A temporary file of atomic_write_bytes: "." + the target's name + TEMPORARY_TAG + mkstemp's 8 random
# characters; a name no user picks, removed only inside folders that airvae's marker proves are runs.
TEMPORARY_TAG = ".airvae-tmp-"
TEMPORARY = re.compile(r"\.(?P<target>.+)" + re.escape(TEMPORARY_TAG) + r"[a-z0-9_]{8}")


class _Hasher(Protocol):
    """What hashed() needs of a hashlib object."""

    def update(self, data: bytes, /) -> None: ...


H = TypeVar("H", bound=_Hasher)


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (missing, incomplete, foreign, locked, corrupt)."""


class RunLocked(RunError):
    """Another process is writing this run directory."""


class RunIOError(RunError):
    """Writing a run's file failed (disk full, permissions, ...)."""


class LinkRefused(RunError):
    """airvae was asked to write through a symbolic link."""


def _refuse_link(path: Path) -> None:
    raise LinkRefused(f"{path} is a symbolic link; airvae never writes through links: remove the link, or choose "
                      "another folder")


def real_folder(folder: Path, root: Path | None = None) -> Path:
    """Make sure ``folder`` exists as a real folder, creating what is missing, with no symbolic link
    on the way from ``root`` (the run, reproduction or output folder it lies in; default: ``folder``
    itself) down to it. Returns ``folder``; a link or a file in the way is a [`RunError`][airvae.files.RunError]."""
    folder = Path(folder)
    root = folder if root is None else Path(root)
    try:
        inner = folder.relative_to(root).parts
    except ValueError:  # not inside root: check the folder alone
        root, inner = folder, ()
    current = root
    for part in (None,) + inner:
        current = current if part is None else current / part
        if current.is_symlink():
            _refuse_link(current)
        if not current.exists():
            try:
                current.mkdir(parents=part is None)
            except FileExistsError:
                pass
            except OSError as error:
                raise write_error(current, error) from error
            if current.is_symlink():  # appeared meanwhile
                _refuse_link(current)
        if not current.is_dir():
            raise RunIOError(f"could not write into {current}: it is a file, not a folder; move it away or choose "
                             "another folder")
    return folder


def atomic_write_bytes(path: Path, data: bytes, root: Path | None = None) -> None:
    """The one way airvae writes a file: a temporary file in the same folder (a name no user picks),
    fsync, then a rename over the target, so a crash never leaves a half-written file; and never
    through a symbolic link: neither the file nor any folder from ``root`` (the run, reproduction or
    output folder it belongs to; default: its own folder) down to it may be a link. An OS error
    (disk full, permissions) becomes a [`RunError`][airvae.files.RunError] naming the file."""
    path = Path(path)
    real_folder(path.parent, root)
    if path.is_symlink():
        _refuse_link(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMPORARY_TAG}")
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would keep shared results unreadable to colleagues
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces the directory entry: even a link created meanwhile is not followed
    except OSError as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise write_error(path, error) from error
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(folder: Path, root: Path | None = None) -> Path:
    """Fail now, with the message a write would give, if files could not be written into ``folder``
    (a link on the way from ``root``, a file in its place, no permission, a read-only file system):
    long work checks this before it starts instead of failing at its end. Creates nothing: a
    missing folder is judged by the nearest folder above it that exists."""
    folder = Path(folder)
    root = folder if root is None else Path(root)
    try:
        inner = folder.relative_to(root).parts
    except ValueError:
        root, inner = folder, ()
    current, probe = root, None
    for part in (None,) + inner:
        current = current if part is None else current / part
        if current.is_symlink():
            _refuse_link(current)
        if current.exists():
            if not current.is_dir():
                raise RunIOError(f"could not write into {current}: it is a file, not a folder; move it away or "
                                 "choose another folder")
            probe = current
        else:
            break
    if probe is None:  # not even root exists: the nearest folder above it that does
        probe = next((p for p in root.parents if p.exists()), Path("."))
        if probe.is_symlink():
            _refuse_link(probe)
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=f".probe{TEMPORARY_TAG}")
    except OSError as error:
        raise write_error(folder, error) from error
    os.close(fd)
    os.unlink(tmp)
    return folder


def links_under(folder: Path) -> list[Path]:
    """Every symbolic link inside ``folder`` (links are listed, never followed)."""
    found = []
    for top, dirs, files in os.walk(folder):  # os.walk does not descend into linked folders
        found += [Path(top) / name for name in dirs + files if (Path(top) / name).is_symlink()]
    return sorted(found)


def refuse_links_under(folder: Path) -> None:
    """A [`LinkRefused`][airvae.files.LinkRefused] naming the links in ``folder``, if it holds any: a folder
    airvae writes
    into (a reproduction: its run folders, plots, reports) must be free of them."""
    if Path(folder).is_symlink():
        _refuse_link(Path(folder))
    links = links_under(folder) if Path(folder).is_dir() else []
    if links:
        shown = ", ".join(str(p.relative_to(folder)) for p in links[:3]) + (", ..." if len(links) > 3 else "")
        raise LinkRefused(f"{folder} holds symbolic links ({shown}); airvae never writes through links: replace them "
                          "with the files they point to, or choose another folder")


def write_text(path: Path, text: str, root: Path | None = None) -> None:
    """[`atomic_write_bytes`][airvae.files.atomic_write_bytes] of UTF-8 text."""
    atomic_write_bytes(Path(path), text.encode(), root)


def write_error(path: Path, error: OSError) -> RunIOError:
    """The one-line message for a failed write: which file, why, and what to do."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some disk space"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the folder writable or choose another one"
    else:
        fix = "check the file system"
    return RunIOError(f"could not write {path}: {error.strerror or error}; {fix}, then run the command again")


def open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags)``, refused (a RunError) unless it opened a regular file: opened
    non-blocking, so that a named pipe put there opens at once (or fails) instead of hanging, and
    checked on the opened file itself, then made blocking again. The open's own OSError propagates."""
    try:
        fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError as error:
        if error.errno == errno.ENXIO:  # a named pipe nobody reads, opened for writing
            raise RunError(f"{path} is not a regular file (a pipe); remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunError(f"{path} is not a regular file (a pipe, a device or a folder); remove it")
    os.set_blocking(fd, True)
    return fd


def append_line(path: Path, line: str) -> None:
    """Append one line (metrics.jsonl), never through a link; an OS error names the file."""
    try:
        fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0))
    except OSError as error:
        if error.errno == errno.ELOOP:
            _refuse_link(Path(path))
        raise write_error(Path(path), error) from error
    try:
        with os.fdopen(fd, "a") as f:
            f.write(line + "\n")
    except OSError as error:
        raise write_error(Path(path), error) from error


def write_json(path: Path, obj: Any, root: Path | None = None) -> None:
    """``obj`` as indented JSON, by [`atomic_write_bytes`][airvae.files.atomic_write_bytes]."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode(), root)


def save_figure(fig: Figure, path: Path, root: Path | None = None, dpi: int = 120) -> Path:
    """A matplotlib figure as PNG, written by [`atomic_write_bytes`][airvae.files.atomic_write_bytes]."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(Path(path), buffer.getvalue(), root)
    return Path(path)


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing, torn or garbage file is a RunError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise RunError(f"{path} does not exist") from error
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:  # RecursionError: nested too deep
        raise RunError(f"{path} is unreadable or not valid JSON ({error}); it was damaged outside airvae "
                       "(airvae writes it atomically): restore it from a copy") from error


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A torn *last* line (a crash in the middle of an append) is
    dropped; damage anywhere else is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a metrics record")
        except (ValueError, RecursionError) as error:
            if number == len(lines):
                break  # torn by a crash during the append: the step will be logged again
            raise RunError(f"{path}, line {number} is damaged ({error}); delete that line or restore the "
                           "file from a copy") from error
        records.append(record)
    return records


def write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite a metrics.jsonl with ``records``, one JSON line each, atomically."""
    atomic_write_bytes(Path(path), "".join(json.dumps(r) + "\n" for r in records).encode())


def hashed(h: H, f: IO[bytes]) -> H:
    """``h`` (a hashlib object) updated with what is left to read of the binary file ``f``, in 1 MiB blocks."""
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h
