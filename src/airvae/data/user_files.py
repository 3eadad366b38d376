"""Users' own ``.npz`` datasets: the checks that the path is a regular file, the validation of the
arrays ``train``, ``valid`` and ``test``, and the detection of what their values are (binary, grey
levels or real-valued; [`airvae.data`][]'s docstring). Such a file is read (safely, by
``airvae.data.npz.read_npz``) but never cached."""
from __future__ import annotations

import math
import os
import stat
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .dataset import SPLITS, Dataset, DatasetError, is_binary
from .npz import READ_ERRORS, read_npz
from .sources import DATASETS

_NEED = ("arrays 'train', 'valid', 'test', each (N, D) or (N, C, H, W), e.g. "
         "np.savez(path, train=x_train, valid=x_valid, test=x_test)")  # what a user's .npz must hold


def load_user_npz(path: Path) -> Dataset:
    """The user's dataset in the .npz at ``path``, validated; every problem is a DatasetError naming the file."""
    try:
        with _open_regular_file(path) as f:
            if not zipfile.is_zipfile(f):
                raise DatasetError(f"{path} is not an .npz archive (it is not a zip file); a dataset .npz "
                                   f"needs {_NEED}")
            d = read_npz(path, SPLITS, optional=("levels",), file=f, advice=f"; a dataset .npz needs {_NEED}")
    except DatasetError:  # a ValueError too; must not be re-wrapped below
        raise
    except (*READ_ERRORS, RuntimeError) as e:  # RuntimeError: zipfile's encrypted or unsupported members
        raise DatasetError(f"could not read {path} as .npz ({type(e).__name__}: {e}); "
                           f"it needs {_NEED}") from e
    arrays, declared = [d[s] for s in SPLITS], d.get("levels")
    event = arrays[0].shape[1:]
    if len(event) not in (1, 3):
        raise DatasetError(f"{path}: split 'train' has shape {arrays[0].shape}; need {_NEED} "
                           "(single-channel images (N, H, W) as x[:, None])")
    for s, x in zip(SPLITS, arrays, strict=True):
        if x.dtype.kind not in "biuf":
            raise DatasetError(f"{path}: split {s!r} has non-numeric dtype {x.dtype}")
        if x.shape[1:] != event:
            raise DatasetError(f"{path}: split {s!r} has shape {x.shape}, expected (N, {', '.join(map(str, event))}) "
                               "like 'train'")
    rows = [x.reshape(len(x), math.prod(event)) for x in arrays]
    image_shape = (int(event[0]), int(event[1]), int(event[2])) if len(event) == 3 else None
    levels = _levels(path, rows, declared)
    if levels == 2:
        rows = [x.astype(np.uint8, copy=False) for x in rows]
    elif levels:  # grey levels 0..levels-1 scaled into [0, 1]
        rows = [(x / np.float32(levels - 1)).astype(np.float32, copy=False) for x in rows]
    else:
        with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
            rows = [x.astype(np.float32, copy=False) for x in rows]
        for s, x in zip(SPLITS, rows, strict=True):
            if not np.isfinite(x).all():  # finite as float64, beyond float32's range (|x| > 3.4e38)
                raise DatasetError(f"{path}: split {s!r} has values too large for float32 (above 3.4e38); "
                                   "rescale the data")
    train, valid, test = rows
    return Dataset(path.stem, train, valid, test, source=f"{path}: user-supplied dataset", levels=levels,
                   image_shape=image_shape)


def _levels(path: Path, rows: list[np.ndarray], declared: np.ndarray | None) -> int | None:
    """The kind of values of a user's splits ([`airvae.data`][]'s docstring): 2 (binary), the number of grey
    levels, or None (real-valued); raises DatasetError for values that are none of these."""
    if declared is not None:
        ok = declared.ndim == 0 and declared.dtype.kind in "iu" and 2 <= int(declared) <= 256
        if not ok:
            raise DatasetError(f"{path}: 'levels' must be one integer from 2 to 256 (the data are integers "
                               f"0..levels-1), got {declared!r}")
        levels = int(declared)
        for s, x in zip(SPLITS, rows, strict=True):
            if x.size and not (np.all(x == np.round(x)) and x.min() >= 0 and x.max() <= levels - 1):
                raise DatasetError(f"{path}: split {s!r} has values outside the integers 0..{levels - 1} that "
                                   f"'levels' = {levels} declares")
        return levels
    if all(is_binary(x) for x in rows):
        return 2
    if all(x.dtype.kind in "biu" for x in rows):
        low, high = min(int(x.min()) for x in rows if x.size), max(int(x.max()) for x in rows if x.size)
        if low < 0 or high > 255:
            raise DatasetError(f"{path}: integer values from {low} to {high}; integers are read as 8-bit grey levels "
                               "0..255. Store real-valued data as floats, or declare the grid with a 'levels' entry")
        return 256
    for s, x in zip(SPLITS, rows, strict=True):
        if not np.isfinite(x).all():
            raise DatasetError(f"{path}: split {s!r} contains NaN or infinite values; remove or replace them")
    return None


def check_user_file(path: Path) -> None:
    """Refuse, without reading it, a dataset path that does not exist or is not a regular file (links
    followed)."""
    try:
        mode = os.stat(path).st_mode  # follows links: a link to a regular file is fine
    except FileNotFoundError:
        raise _missing_file(path) from None
    except OSError as e:
        raise DatasetError(f"cannot use dataset file {path} ({e.strerror}); check its permissions") from e
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)


def _missing_file(path: Path) -> DatasetError:
    what = "is a symbolic link to a file that does not exist" if path.is_symlink() else "does not exist"
    return DatasetError(f"dataset file {path} {what}. Pass the path of an existing .npz or one of "
                        f"{', '.join(DATASETS)}.")


def _not_regular(path: Path, mode: int) -> DatasetError:
    kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    if path.is_symlink():
        kind = f"a symbolic link to {kind}"
    return DatasetError(f"dataset file {path} is not a regular file (it is {kind}); pass the path of an .npz "
                        f"file with {_NEED}")


def _open_regular_file(path: Path) -> BinaryIO:
    """``path`` opened for binary reading, refused unless it is a regular file (links followed): a FIFO
    would block the read forever, /dev/zero never ends, a folder has nothing to read. The check is
    on the opened file itself, so nothing can be swapped in between check and read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # opening a FIFO must not block
    except FileNotFoundError:
        raise _missing_file(path) from None
    except OSError as e:
        raise DatasetError(f"cannot open dataset file {path} ({e.strerror}); check its permissions") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, mode)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")

