"""Reading ``.npz`` files safely, for airvae's caches, the packed source files and users' datasets
alike: like ``np.load`` without pickles, and every member checked against the limits below from its
zip entry and ``.npy`` header before any array data is read, so a corrupt header or a zip bomb is
refused instead of filling memory."""
from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Collection
from pathlib import Path
from typing import IO

import numpy as np
from numpy.lib import format as npy_format

from .dataset import DatasetError

# What reading a file as .npz (or a converter reading a source file) may raise besides DatasetError;
# callers turn these into a DatasetError that names the file.
READ_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error)

# What one array of an .npz may make airvae allocate, checked from the zip directory and the .npy
# header before any array data is read (a user's file could otherwise exhaust memory from a few MB).
# Every split is held in memory whole and converted to float32: a few GiB is already more than a
# typical machine can train on (4 GiB: 1.3 million 28x28 float32 images).
MAX_ARRAY_BYTES = 4 << 30
# Real image data deflates far less (measured: binarized MNIST as float64 63:1, Lake's 105x105
# OMNIGLOT strokes as float64 179:1), while zeros deflate ~1030:1 and bzip2/lzma bombs by millions.
MAX_COMPRESSION_RATIO = 400
# Members that decompress to less than this are harmless whatever their ratio (a constant toy split).
RATIO_CHECKED_ABOVE = 64 << 20


def read_npz(path: Path, names: Collection[str], optional: Collection[str] = (), *, file: IO[bytes] | None = None,
             advice: str = "") -> dict[str, np.ndarray]:
    """The arrays ``names`` (all required) and those of ``optional`` present in the .npz at ``path``
    (or the open ``file``), like ``np.load`` without pickles; every member is checked against the
    limits above from its zip entry and .npy header before any member's data is read. A problem of
    the file is a DatasetError naming it; OS and zip errors propagate for the caller to phrase."""
    with zipfile.ZipFile(file if file is not None else path) as z:
        # As np.load names them: the member "train.npy" is the array "train".
        members = {info.filename.removesuffix(".npy"): info for info in z.infolist()}
        missing = [n for n in names if n not in members]
        if missing:
            held = ", ".join(members) or "nothing"
            raise DatasetError(f"{path} lacks {', '.join(missing)} (it holds {held}){advice}")
        wanted = [n for n in (*names, *optional) if n in members]
        for n in wanted:
            _check_member(path, z, members[n])
        return {n: _read_member(z, members[n]) for n in wanted}


def _check_member(path: Path, z: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Refuse a member whose compression ratio or declared array size is beyond the limits above, or
    that is not a .npy file at all, from its zip entry and the first bytes of its header only."""
    where = f"{path}: member {info.filename!r}"
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > RATIO_CHECKED_ABOVE and ratio > MAX_COMPRESSION_RATIO:
        raise DatasetError(
            f"{where} decompresses to {_size(info.file_size)} from {_size(info.compress_size)} ({ratio:.0f}:1, "
            f"above the {MAX_COMPRESSION_RATIO}:1 that real image data stays under), as a zip bomb does; "
            f"if the data are genuine, save them uncompressed with np.savez")
    with z.open(info) as fp:
        shape, dtype = _npy_header(where, fp)
    declared = math.prod(shape) * dtype.itemsize
    if declared > MAX_ARRAY_BYTES:
        raise DatasetError(
            f"{where} declares a {shape} {dtype} array ({_size(declared)}), more than the "
            f"{_size(MAX_ARRAY_BYTES)} airvae loads per array; store fewer examples or a smaller dtype "
            f"(uint8 for grey levels, bool for binary data)")
    if declared > info.file_size:  # zipfile never decompresses more than file_size bytes
        raise DatasetError(
            f"{where} declares a {shape} {dtype} array ({_size(declared)}) but holds only "
            f"{_size(info.file_size)}; the file is truncated or corrupt: save it again")


def _npy_header(where: str, fp: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the header of the .npy file ``fp``, reading nothing of its data."""
    try:
        version = npy_format.read_magic(fp)
        if version not in ((1, 0), (2, 0)):  # 3.0 only adds non-Latin-1 field names of structured arrays
            raise ValueError(f".npy format version {version[0]}.{version[1]} holds no plain numeric array")
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _, dtype = read_header(fp)
    except ValueError as e:
        raise DatasetError(f"{where} is not a numpy array (.npy) file ({' '.join(str(e).split())}); save the "
                           f"arrays with np.savez") from e
    return shape, dtype


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with z.open(info) as fp:
        return npy_format.read_array(fp, allow_pickle=False)


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
