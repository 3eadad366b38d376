"""An exclusive lock on a directory for the whole life of its one writer (a run, a reproduction):
``flock`` on ``DIR/.lock``, refused at once with the holder's PID, released by the kernel when the
holder dies, even by SIGKILL."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TextIO

from .files import RunError, RunLocked, open_regular, real_folder, write_error

try:
    import fcntl

    _HAS_FLOCK = True
except ImportError:  # Windows: no flock; runs are then not protected against a second writer (README)
    _HAS_FLOCK = False

LOCK = ".lock"


class RunLock:
    """An exclusive lock on a directory for the whole life of a writer: ``flock`` on ``DIR/.lock``;
    use it as a context manager.

    ``acquire`` never waits: when another process holds the lock,
    [`RunLocked`][airvae.files.RunLocked] names its PID. The kernel drops the lock when the holding
    process exits or dies, so a crash never leaves a directory locked. (Two opens of the file, even
    in one process, exclude each other.)

    Args:
        directory: the directory to lock (created if missing, never through a link).
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self._file: TextIO | None = None

    def acquire(self) -> RunLock:
        """Take the lock and write this process's PID into the lock file.

        Raises:
            RunLocked: another process holds it.
        """
        real_folder(self.directory)
        f = _open_lock(self.path, write=True)  # names its own failures
        try:
            _flock(f, self.directory)
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        except OSError as error:  # not "locked" (that is RunLocked): a file system that refuses flock or the write
            f.close()
            raise write_error(self.path, error) from error
        except BaseException:
            f.close()
            raise
        self._file = f
        return self

    def release(self) -> None:
        """Release the lock (closing the file releases the ``flock``)."""
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _open_lock(path: Path, write: bool) -> TextIO:
    """The lock file, never through a link (a ``.lock`` that is a link to someone's file must not
    have a PID written into it)."""
    flags = (os.O_RDWR | os.O_CREAT) if write else os.O_RDONLY
    try:
        fd = open_regular(path, flags | getattr(os, "O_NOFOLLOW", 0))
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise RunError(f"{path} is a symbolic link; airvae never writes through links: remove it") from error
        raise write_error(path, error) from error
    return os.fdopen(fd, "r+" if write else "r")


def _flock(f: TextIO, directory: Path) -> None:
    if not _HAS_FLOCK:
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        f.seek(0)
        holder = f.read().strip() or "unknown"
        raise RunLocked(f"{directory} is being written by another airvae process (PID {holder}); "
                        "wait for it to finish or stop it, then try again") from error


def check_unlocked(directory: Path) -> None:
    """Raise [`RunLocked`][airvae.files.RunLocked] (naming the PID) if another process is writing ``directory``;
    creates and writes nothing."""
    path = Path(directory) / LOCK
    if path.exists() or path.is_symlink():
        with _open_lock(path, write=False) as f:
            _flock(f, Path(directory))
