"""Datasets: the binarized images of Shu et al. (2018) (MNIST, OMNIGLOT, Caltech 101
Silhouettes), one bundled grey-level set (scikit-learn's digits), and users' own ``.npz`` files.

Loading the three binarized datasets works like torchvision's datasets: on first use the source
files are taken from a local folder or downloaded from their canonical public URL, verified by
checksum, converted once to a compact cache and read from that cache afterwards. (``digits`` is read
from the package itself, and a user's ``.npz`` from its path: below.)

Resolution order for MNIST, OMNIGLOT and Caltech (``load_dataset("mnist")``):

1. the converted cache ``<cache_dir>/<key>.npz`` (``cache_dir`` argument, else
   ``$AIRVAE_CACHE_DIR``, else ``~/.cache/airvae``);
2. source files in ``data_dir`` (argument, else ``$AIRVAE_DATA_DIR``), looked up in
   the folder itself, in its ``originals/`` subfolder and in ``<cache_dir>/raw``;
3. a download into ``<cache_dir>/raw`` (only if ``download=True``).

Offline machines: put the files in a folder and pass ``data_dir`` (``--data-dir DIR``
on the command line) or set ``AIRVAE_DATA_DIR``. ``download=False`` never touches the
network.

The cache holds ``np.packbits(x, axis=-1)`` of each split (``train``, ``valid``,
``test``), the int ``dim`` and a one-line ``origin``; it is written atomically and never through a
symbolic link (a link at the cache folder, its ``raw/`` or a file only costs a warning and a reconversion).

The splits of these three are ``(N, 784)`` uint8 in {0, 1}: row-major 28x28 images
(``x.reshape(-1, 28, 28)`` is upright, except OMNIGLOT from chardata.mat, which keeps
the IWAE pixel order used by published code), 1 = foreground (ink / object). Other data need not
be binary nor 28x28: ``digits`` holds 8x8 images of 17 grey levels, and a user's file binary data,
grey levels or real values, as flat vectors or images of any ``(C, H, W)`` (see the last paragraph).

Dataset-specific conventions:

* **MNIST**: Larochelle & Murray's static binarization, 50000/10000/10000, rows in
  the order of the original ``.amat`` files. Accepted as the Toronto text files
  ``binarized_mnist_{train,valid,test}.amat``, the same data as MATLAB v5 files
  ``binarized_mnist_{train,valid,test}.mat`` (variable ``X``) or the converted
  ``binarized_mnist.npz``.
* **Caltech 101 Silhouettes** (28x28, split1, 4100/2264/2307): Marlin's files store
  1 = background and column-major pixels. We convert to the usual VAE convention,
  1 = object and row-major: ``img = 1 - x.reshape(-1, 28, 28).transpose(0, 2, 1)``.
  (For a fully connected Bernoulli VAE both are reparametrisations; the likelihood
  achievable is unchanged.)
* **OMNIGLOT**: Burda et al.'s ``chardata.mat`` (IWAE repository; verified by its git
  blob id because no sha256 of it is published). Grey values ``p`` (float32) are
  binarized statically as in rebar: ``rng = RandomState(5)``; ``train_pool =
  rng.rand(24345, 784) < p_train``, then ``test = rng.rand(8070, 784) < p_test``
  (the same stream; identical to ``np.random.seed(5)`` + ``np.random.rand``); then
  ``perm = RandomState(123).permutation(24345)`` on the pool, last 1345 rows =
  valid, first 23000 = train. If chardata.mat cannot be found the rebuilt
  ``omniglot_28x28_from_lake_DEVIATION.npz`` is used (23000/1345/8115); its
  ``Dataset.deviation`` says why its numbers are not comparable with the paper.
  The two variants have different cache files so they never mix.

**digits** (bundled, no download): the 1797 8x8 images of 17 grey levels (0..16) that
scikit-learn ships as ``sklearn/datasets/data/digits.csv.gz`` (a copy of the test set of UCI's
"Optical Recognition of Handwritten Digits", Alpaydin & Kaynak 1998, CC BY 4.0; provenance and
checksum in ``airvae/bundled/README.md``). Fixed split: ``RandomState(0).permutation(1797)``, the
first 1197 rows train, the next 300 valid, the last 300 test. Values ``x / 16``, ``levels=17``,
``image_shape=(1, 8, 8)``.

A user's own ``.npz`` (arrays ``train``, ``valid``, ``test``, each ``(N, D)`` or images
``(N, C, H, W)``) is loaded by passing its path (a regular file; links to one are followed); it is
validated but not cached. Before any array data is read, each member's size declared by its ``.npy``
header and its compression ratio are checked against ``MAX_ARRAY_BYTES`` and ``MAX_COMPRESSION_RATIO``,
so a corrupt header or a zip bomb is refused instead of filling memory. Single-channel images are
stored as ``(N, 1, H, W)`` (an ``(N, H, W)`` array is refused). Its values say what they
are: 0/1 (any dtype) are binary; other integers (any integer dtype) are 8-bit grey levels 0..255
(values outside are refused), given to models as ``x / 255``; other floats are real-valued, given as
they are (NaN and infinities are refused).
An optional integer entry ``levels`` (2..256) declares integer data on ``levels`` grey levels
``0..levels-1`` instead (given as ``x / (levels - 1)``).

Whatever the source, every :class:`Dataset` holds its splits as ``(N, D)`` arrays of the rows models
see, images flattened row-major: uint8 0/1 for binary data, float32 otherwise (grey levels on the
grid ``i / (levels - 1)``, real values as given); ``levels`` (2, the grid size, or None for
real-valued) and ``image_shape`` (``(C, H, W)``, or None for flat vectors) say how to read them.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import math
import os
import stat
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.lib import format as npy_format

from .files import TEMPORARY_TAG, RunError, atomic_write_bytes, real_folder

__all__ = [
    "CACHE_DIR_ENV",
    "DATASETS",
    "DATA_DIR_ENV",
    "Dataset",
    "DatasetError",
    "check_dataset_name",
    "load_dataset",
]

DATASETS: tuple[str, ...] = ("mnist", "omniglot", "caltech", "digits")
DATA_DIR_ENV = "AIRVAE_DATA_DIR"
CACHE_DIR_ENV = "AIRVAE_CACHE_DIR"
SPLITS = ("train", "valid", "test")
_PIXELS = 784  # all three datasets are 28x28
_CACHE_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error)

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
_HOW_TO_PROVIDE = (
    f"Put the files in a folder (or its originals/ subfolder) and pass --data-dir DIR "
    f"(data_dir=DIR in Python) or set {DATA_DIR_ENV}=DIR."
)
_NEED = ("arrays 'train', 'valid', 'test', each (N, D) or (N, C, H, W), e.g. "
         "np.savez(path, train=x_train, valid=x_valid, test=x_test)")  # what a user's .npz must hold


class DatasetError(ValueError):
    """A data problem the user can fix; the message says which file, what and how."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is ambiguous
class Dataset:
    """Three splits of examples, one row each (images flattened row-major), plus what their values
    are and where they came from.

    ``levels`` = 2: binary, uint8 0/1 (the paper's data); an integer L > 2: grey levels, float32 on
    the grid ``i / (L - 1)``; None: real-valued float32. ``image_shape`` ``(C, H, W)``: the rows are
    images (None: flat vectors)."""

    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    source: str
    deviation: str | None = None
    levels: int | None = 2
    image_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        dtype = np.uint8 if self.levels == 2 else np.float32
        for s in SPLITS:
            x = getattr(self, s)
            if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype != dtype:
                raise DatasetError(f"{self.name}: split {s!r} must be a 2-D {np.dtype(dtype).name} array")
            if x.shape[0] == 0:
                raise DatasetError(f"{self.name}: split {s!r} is empty; every split needs at least one example")
        if len({getattr(self, s).shape[1] for s in SPLITS}) != 1:
            raise DatasetError(f"{self.name}: splits have different dimensions")
        if self.dim == 0:
            raise DatasetError(f"{self.name}: examples have 0 values; each needs at least one")
        if self.image_shape is not None and math.prod(self.image_shape) != self.dim:
            raise DatasetError(f"{self.name}: image_shape {self.image_shape} does not hold {self.dim} values")

    @property
    def kind(self) -> str:
        """``binary``, ``N levels`` or ``real-valued``."""
        return "binary" if self.levels == 2 else "real-valued" if self.levels is None else f"{self.levels} levels"

    @property
    def dim(self) -> int:
        return int(self.train.shape[1])

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)


def evenly_spaced(total: int, n: int | None) -> np.ndarray:
    """Indices of ``min(n, total)`` examples spread evenly over a split (all of it for ``n=None``),
    never just its first rows: MNIST's test file is sorted by digit (its first 500 are all zeros)."""
    if n is None or n >= total:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, n).round().astype(np.int64))


def dataset_digest(dataset) -> str:
    """sha256 of the three splits' contents (not of the files they came from), for any object with
    ``train``, ``valid`` and ``test`` arrays: runs record it so that resuming on other data is caught."""
    h = hashlib.sha256()
    for s in SPLITS:
        x = np.ascontiguousarray(getattr(dataset, s))
        h.update(f"{s}:{x.shape}:{x.dtype};".encode())
        h.update(memoryview(x).cast("B"))
    return h.hexdigest()


# --------------------------------------------------------------------------- registry

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class _Variant:
    """One accepted set of source files for a dataset and how to turn it into splits."""

    key: str  # cache file stem; equal for variants that give identical arrays
    files: dict[str, str]  # file name -> "sha256:<hex>" or "gitblob:<hex>"
    read: Callable[[list[Path], "_Variant"], Arrays]
    sizes: tuple[int, int, int]  # expected rows of train, valid, test
    label: str  # shown in "file missing" messages
    provenance: str  # ends up in Dataset.source
    url: str | None = None  # base URL the files can be downloaded from (None: no public copy)
    transform: Callable[[np.ndarray], np.ndarray] | None = None  # applied after validation
    deviation: str | None = None


@dataclass(frozen=True)
class _Spec:
    name: str
    variants: tuple[_Variant, ...]  # in order of preference


def _read_packed_npz(paths: list[Path], v: _Variant) -> Arrays:
    d = _read_npz(paths[0], SPLITS)
    return tuple(np.unpackbits(d[s], axis=-1, count=_PIXELS) for s in SPLITS)


def _read_mat(paths: list[Path], v: _Variant, names: tuple[str, str, str]) -> Arrays:
    # One file per split (MNIST, variable X each) or one file with three variables
    # (Caltech); `i % len(paths)` covers both.
    from scipy.io import loadmat

    return tuple(
        loadmat(paths[i % len(paths)], variable_names=[n])[n] for i, n in enumerate(names)
    )


def _read_amat(paths: list[Path], v: _Variant) -> Arrays:
    # Text: one image per line, 784 '0'/'1' separated by spaces. Keeping only the
    # digit bytes is ~100x faster than np.loadtxt and ignores \r\n or extra spaces.
    out = []
    for p in paths:
        buf = np.fromfile(p, dtype=np.uint8)
        digits = buf[(buf == ord("0")) | (buf == ord("1"))] - ord("0")
        if digits.size % _PIXELS:
            raise DatasetError(f"{p}: {digits.size} digits is not a whole number of 784-pixel rows")
        out.append(digits.reshape(-1, _PIXELS))
    return tuple(out)


def _read_chardata(paths: list[Path], v: _Variant) -> Arrays:
    from scipy.io import loadmat

    m = loadmat(paths[0], variable_names=["data", "testdata"])

    def rows(x: np.ndarray) -> np.ndarray:
        # Stored as (784, N) columns; this is the IWAE/rebar pixel order (float32 p,
        # as rebar uses, so the binarization below reproduces theirs exactly).
        x = np.asarray(x, dtype=np.float32).T
        return x.reshape(-1, 28, 28).reshape(-1, _PIXELS, order="F")

    pool, test = rows(m["data"]), rows(m["testdata"])
    n_train, n_valid, n_test = v.sizes
    if pool.shape[0] != n_train + n_valid or test.shape[0] != n_test:
        raise DatasetError(
            f"{paths[0]}: has {pool.shape[0]} training and {test.shape[0]} test images, "
            f"expected {n_train + n_valid} and {n_test}"
        )
    if not (0 <= pool.min() and pool.max() <= 1 and 0 <= test.min() and test.max() <= 1):
        raise DatasetError(f"{paths[0]}: grey values outside [0, 1]")
    # Static binarization with rebar's seeds. A private RandomState gives the same
    # stream as np.random.seed(5) without touching the caller's global RNG.
    rng = np.random.RandomState(5)
    pool = (rng.rand(*pool.shape) < pool).astype(np.uint8)
    test = (rng.rand(*test.shape) < test).astype(np.uint8)
    pool = pool[np.random.RandomState(123).permutation(pool.shape[0])]
    return pool[:n_train], pool[n_train:], test


def _caltech_to_vae(x: np.ndarray) -> np.ndarray:
    # Marlin's files: 1 = background, column-major. Flip and transpose to 1 = object,
    # row-major (the VampPrior / Sylvester-flow convention).
    img = 1 - x.reshape(-1, 28, 28).transpose(0, 2, 1)
    return np.ascontiguousarray(img.reshape(-1, _PIXELS))


_MNIST_SIZES = (50000, 10000, 10000)
_MNIST_PROV = (
    "static binarized MNIST of Larochelle & Murray (2011), 50000/10000/10000, "
    "row order of the original .amat files, row-major, 1 = ink"
)
_CALTECH_SIZES = (4100, 2264, 2307)
_CALTECH_PROV = (
    "Caltech 101 Silhouettes 28x28 split1 (Marlin et al. 2010), 4100/2264/2307; stored "
    "1 = background, column-major, converted to 1 = object, row-major"
)
_CHARDATA_PROV = (
    "OMNIGLOT chardata.mat of Burda et al. (IWAE), statically binarized with "
    "RandomState(5) and split with RandomState(123).permutation as in rebar, 23000/1345/8070"
)
OMNIGLOT_DEVIATION = (
    "OMNIGLOT rebuilt from Lake et al.'s raw 105x105 images (downsampled to 28x28 and "
    "binarized with rebar's seeds), not Burda's chardata.mat used in the paper; the test "
    "set has 8115 images instead of 8070, so log-likelihoods are not comparable with "
    "published OMNIGLOT results (put chardata.mat in the data directory to use the "
    "paper's data)."
)

_SPECS: dict[str, _Spec] = {
    "mnist": _Spec("mnist", (
        _Variant(
            "mnist", {"binarized_mnist.npz":
                      "sha256:50de2c8299a5a297789293ab2c30f6fc3cb8c359a15e5e88d5501aa18ebb8fa5"},
            _read_packed_npz, _MNIST_SIZES, "converted, packed bits", _MNIST_PROV),
        _Variant(
            "mnist", {
                "binarized_mnist_train.mat":
                    "sha256:79a0312c7389d855cfc97e3812de3998417c5829d8a51543b56a90a91252ae7e",
                "binarized_mnist_valid.mat":
                    "sha256:7436afc856959075c7787025bb8a4ba2b520b9230ee39667c66aa7dd2819dd68",
                "binarized_mnist_test.mat":
                    "sha256:5bc30222e1e7896cbccd1e1db6b28540cc1230f4d2d5473841a5f6cc54be8d38"},
            lambda p, v: _read_mat(p, v, ("X", "X", "X")), _MNIST_SIZES,
            "MATLAB v5, variable X", _MNIST_PROV),
        _Variant(
            "mnist", {  # sha256 as recorded by tensorflow_datasets for the Toronto files
                "binarized_mnist_train.amat":
                    "sha256:ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
                "binarized_mnist_valid.amat":
                    "sha256:1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
                "binarized_mnist_test.amat":
                    "sha256:e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c"},
            _read_amat, _MNIST_SIZES, "Larochelle's text files, downloadable", _MNIST_PROV,
            url="http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"),
    )),
    "omniglot": _Spec("omniglot", (
        _Variant(
            "omniglot_chardata",
            {"chardata.mat": "gitblob:016a3536ffe5e1d38e42563a18d7a78bfaf643ec"},
            _read_chardata, (23000, 1345, 8070),
            "Burda's IWAE file, the paper's data, preferred, downloadable", _CHARDATA_PROV,
            url="https://github.com/yburda/iwae/raw/master/datasets/OMNIGLOT/"),
        _Variant(
            "omniglot_lake_DEVIATION",
            {"omniglot_28x28_from_lake_DEVIATION.npz":
             "sha256:630b4ec5e707680c51aef93b50f02fae84a69a3f21ce2e7ae7b87560c4812284"},
            _read_packed_npz, (23000, 1345, 8115),
            "rebuilt from Lake's images, NOT the paper's data, no public download",
            "OMNIGLOT rebuilt from Lake et al.'s raw images (shared/data MANIFEST section 3), "
            "23000/1345/8115, DEVIATION from the paper's chardata.mat",
            deviation=OMNIGLOT_DEVIATION),
    )),
    "caltech": _Spec("caltech", (
        _Variant(
            "caltech", {"caltech101_silhouettes_28.npz":
                        "sha256:21c5b447860459553bd11c60028d42b2d38a9ce2cda502834a715efc7d0308bf"},
            _read_packed_npz, _CALTECH_SIZES, "converted, packed bits, stored convention",
            _CALTECH_PROV, transform=_caltech_to_vae),
        _Variant(
            "caltech", {"caltech101_silhouettes_28_split1.mat":
                        "sha256:eb6735e8d84b1850fabc5590124aab1755e90c9fd28123585324398405e1e42a"},
            lambda p, v: _read_mat(p, v, ("train_data", "val_data", "test_data")),
            _CALTECH_SIZES, "Marlin's MATLAB file, downloadable", _CALTECH_PROV,
            url="https://people.cs.umass.edu/~marlin/data/", transform=_caltech_to_vae),
    )),
}
assert tuple(_SPECS) + ("digits",) == DATASETS


DIGITS_FILE = "digits.csv.gz"
DIGITS_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"  # as in scikit-learn 1.9.1
DIGITS_SIZES = (1197, 300, 300)
DIGITS_PROVENANCE = (
    "scikit-learn's digits (8x8, 17 grey levels, 1797 images; the test set of UCI's Optical Recognition of "
    "Handwritten Digits, Alpaydin & Kaynak 1998, CC BY 4.0), bundled with airvae; split 1197/300/300 by "
    "RandomState(0).permutation(1797); values x/16")


def load_digits() -> Dataset:
    """The bundled grey-level dataset (module docstring): verified by sha256, split as documented."""
    with resources.as_file(resources.files("airvae").joinpath("bundled", DIGITS_FILE)) as path:
        _verify(path, f"sha256:{DIGITS_SHA256}")
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # 64 pixels, then the label (unused)
    pixels = table[np.random.RandomState(0).permutation(len(table)), :64].astype(np.float32) / 16
    ends = np.cumsum(DIGITS_SIZES)
    return Dataset("digits", pixels[:ends[0]], pixels[ends[0]:ends[1]], pixels[ends[1]:], source=DIGITS_PROVENANCE,
                   levels=17, image_shape=(1, 8, 8))


# --------------------------------------------------------------------------- helpers

def _digest(path: Path, kind: str) -> str:
    # "gitblob" is what `git hash-object` prints: sha1 over a header plus the content.
    if kind == "sha256":
        h = hashlib.sha256()
    elif kind == "gitblob":
        h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    else:
        raise ValueError(f"unknown checksum kind {kind!r}")
    with open(path, "rb") as f:
        return hashed(h, f).hexdigest()


def hashed(h, f):
    """``h`` (a hashlib object) updated with what is left to read of the binary file ``f``, in 1 MiB blocks."""
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h


def _verify(path: Path, expected: str) -> None:
    kind, want = expected.split(":", 1)
    got = _digest(path, kind)
    if got != want:
        what = "git blob id" if kind == "gitblob" else kind
        raise DatasetError(
            f"checksum mismatch for {path}: expected {what} {want}, got {got}. The file is "
            f"corrupt, truncated or a different version; delete it and download or copy it "
            f"again from a good source."
        )


def _is_binary(x: np.ndarray) -> bool:
    if x.size == 0 or x.dtype == np.bool_:
        return True
    if x.dtype.kind == "u":
        return bool(x.max() <= 1)  # fast path for the usual uint8 data
    return bool(((x == 0) | (x == 1)).all())  # NaN and fractions fail here


def _check_splits(arrays, sizes, dim: int, where: str) -> Arrays:
    out = []
    for s, x, n in zip(SPLITS, arrays, sizes):
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise DatasetError(f"{where}: split {s!r} has non-numeric dtype {x.dtype}")
        if x.ndim != 2 or x.shape[1] != dim or (n is not None and x.shape[0] != n):
            want = f"({n if n is not None else 'N'}, {dim})"
            raise DatasetError(
                f"{where}: split {s!r} has shape {x.shape}, expected {want}. "
                f"Is it the right file? Images must be flattened to one row each."
            )
        if not _is_binary(x):
            raise DatasetError(
                f"{where}: split {s!r} contains values other than 0 and 1. Binarize the "
                f"data first (and unpack np.packbits output with np.unpackbits)."
            )
        out.append(x.astype(np.uint8, copy=False))
    return tuple(out)


def _read_cache(path: Path, v: _Variant) -> tuple[Arrays, str]:
    try:
        d = _read_npz(path, ("dim", *SPLITS), optional=("origin",))
        if int(d["dim"]) != _PIXELS:
            raise ValueError(f"dim is {int(d['dim'])}, expected {_PIXELS}")
        arrays = []
        for s, n in zip(SPLITS, v.sizes):
            packed = d[s]
            if packed.dtype != np.uint8 or packed.shape != (n, (_PIXELS + 7) // 8):
                raise ValueError(f"split {s!r} has packed shape {packed.shape}")
            arrays.append(np.unpackbits(packed, axis=-1, count=_PIXELS))
        origin = str(d["origin"]) if "origin" in d else v.provenance
    except _CACHE_ERRORS as e:
        raise DatasetError(
            f"cache file {path} is corrupt or incompatible ({type(e).__name__}: {e}). "
            f"Delete it and load again; it will be rebuilt from the source files."
        ) from e
    return tuple(arrays), origin


def _write_cache(path: Path, arrays: Arrays, origin: str) -> None:
    # The packed splits are small (MNIST's: 7 MB), so the .npz is built in memory and written by
    # airvae's one write path: atomic (a crash or a concurrent reader never sees a partial cache) and
    # never through a symbolic link, neither at the file nor at the cache folder.
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, dim=np.int64(_PIXELS), origin=np.str_(origin),
        **{s: np.packbits(x, axis=-1) for s, x in zip(SPLITS, arrays)},
    )
    try:
        atomic_write_bytes(path, buffer.getvalue(), root=path.parent)
    except (RunError, OSError) as e:
        warnings.warn(
            f"could not write the dataset cache {path} ({_reason(e)}); the data is returned but will "
            f"be converted again next time. Pass cache_dir or set {CACHE_DIR_ENV} to a "
            f"writable folder.",
            stacklevel=3,
        )


def _reason(error: BaseException) -> str:
    """Why a write failed, without the advice of a run's error message (the OS error when there is one)."""
    return str(error.__cause__ if isinstance(error.__cause__, OSError) else error)


def _download(url: str, dest: Path, expected: str, progress: bool) -> Path:
    # Streamed into a new temporary file (mkstemp creates it, so a link planted at its name is never
    # followed) and renamed onto dest only once its checksum matches: the rename replaces whatever
    # entry dest is instead of writing through it, and nothing of a failed download stays behind.
    tmp = None
    try:
        try:
            fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}{TEMPORARY_TAG}")
            tmp = Path(name)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide a shared cache from colleagues
                _fetch(url, f, dest.name, progress)
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
            raise DatasetError(f"download of {url} failed ({type(e).__name__}: {e})") from e
        try:
            _verify(tmp, expected)
        except DatasetError as e:
            raise DatasetError(f"downloaded {url} but it was deleted: {e}") from e
        os.replace(tmp, dest)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # already renamed, unless the download failed
    return dest


def _fetch(url: str, f, desc: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    with urllib.request.urlopen(url, timeout=60) as r:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=desc, disable=not progress) as bar:
            for chunk in iter(lambda: r.read(1 << 16), b""):
                f.write(chunk)
                bar.update(len(chunk))


def _raw_dir(cache_dir: Path) -> Path:
    raw = cache_dir / "raw"
    try:
        real_folder(raw, root=cache_dir)  # created if missing; refused if it or the cache folder is a link
        if os.access(raw, os.W_OK):
            return raw
        reason = "not writable"
    except (RunError, OSError) as e:
        reason = _reason(e)
    tmp = Path(tempfile.mkdtemp(prefix="airvae-download-"))
    warnings.warn(f"cannot download into {raw} ({reason}); downloading into {tmp} instead", stacklevel=4)
    return tmp


def _convert(spec: _Spec, v: _Variant, paths: list[Path], cache: Path) -> Dataset:
    for p, expected in zip(paths, v.files.values()):
        _verify(p, expected)
    where = ", ".join(map(str, paths))
    try:
        arrays = v.read(paths, v)
    except DatasetError:
        raise
    except (*_CACHE_ERRORS, NotImplementedError) as e:
        # The checksum matched, so this is an environment problem (e.g. an old scipy).
        raise DatasetError(f"could not read {where} ({type(e).__name__}: {e})") from e
    arrays = _check_splits(arrays, v.sizes, _PIXELS, where)
    if v.transform is not None:
        arrays = tuple(v.transform(x) for x in arrays)
    origin = f"{where}: {v.provenance}"
    _write_cache(cache, arrays, origin)
    return Dataset(spec.name, *arrays, source=origin, deviation=v.deviation)


def _missing_message(spec: _Spec, cache_dir: Path, dirs: list[Path], partial: list[str],
                     download: bool, failures: list[str]) -> str:
    lines = [f"{spec.name}: no usable data found. Looked for the converted cache in "
             f"{cache_dir} and for one of these file sets in "
             f"{', '.join(map(str, dirs))}:"]
    lines += [f"  - {', '.join(v.files)}  ({v.label})" for v in spec.variants]
    lines += partial
    lines.append(_HOW_TO_PROVIDE)
    if not download:
        lines.append("Downloading was disabled (download=False).")
    else:
        lines += failures
        lines.append(
            f"Offline machines cannot download: use --data-dir DIR or {DATA_DIR_ENV}=DIR "
            f"pointing to a folder with the files above."
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- public

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """airvae's cache folder (datasets, extracted bundles): ``cache_dir``, else ``$AIRVAE_CACHE_DIR``,
    else ``~/.cache/airvae``."""
    return Path(cache_dir or os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "airvae").expanduser()


def _load_named(spec: _Spec, data_dir, cache_dir, download: bool, progress: bool) -> Dataset:
    cache_dir = cache_root(cache_dir)
    dirs: list[Path] = []
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        if not d.is_dir():
            raise DatasetError(
                f"data directory {d} (from data_dir/--data-dir or {DATA_DIR_ENV}) does not "
                f"exist or is not a directory."
            )
        dirs += [d, d / "originals"]
    dirs.append(cache_dir / "raw")  # earlier downloads whose conversion did not finish

    # (1) cache, (2) local files: variant by variant, so a preferred variant wins.
    partial = []
    for v in spec.variants:
        cache = cache_dir / f"{v.key}.npz"
        if cache.is_file():
            arrays, origin = _read_cache(cache, v)
            return Dataset(spec.name, *arrays, source=f"{cache} (cache of {origin})", deviation=v.deviation)
        found = {n: next((d / n for d in dirs if (d / n).is_file()), None) for n in v.files}
        if all(found.values()):
            return _convert(spec, v, list(found.values()), cache)
        if any(found.values()):
            missing = [n for n, p in found.items() if p is None]
            partial.append(f"Found only part of a set; missing: {', '.join(missing)}.")

    # (3) download the variants that have a public URL.
    failures = []
    if download:
        for v in (v for v in spec.variants if v.url):
            try:
                raw = _raw_dir(cache_dir)
                paths = [_download(v.url + n, raw / n, h, progress) for n, h in v.files.items()]
            except DatasetError as e:
                failures.append(str(e))
                continue
            return _convert(spec, v, paths, cache_dir / f"{v.key}.npz")
    raise DatasetError(_missing_message(spec, cache_dir, dirs, partial, download, failures))


def _load_user_npz(path: Path) -> Dataset:
    try:
        with _open_regular_file(path) as f:
            if not zipfile.is_zipfile(f):
                raise DatasetError(f"{path} is not an .npz archive (it is not a zip file); a dataset .npz "
                                   f"needs {_NEED}")
            d = _read_npz(path, SPLITS, optional=("levels",), file=f, advice=f"; a dataset .npz needs {_NEED}")
    except DatasetError:  # a ValueError too; must not be re-wrapped below
        raise
    except (*_CACHE_ERRORS, RuntimeError) as e:  # RuntimeError: zipfile's encrypted or unsupported members
        raise DatasetError(f"could not read {path} as .npz ({type(e).__name__}: {e}); "
                           f"it needs {_NEED}") from e
    arrays, levels = [d[s] for s in SPLITS], d.get("levels")
    event = arrays[0].shape[1:]
    if len(event) not in (1, 3):
        raise DatasetError(f"{path}: split 'train' has shape {arrays[0].shape}; need {_NEED} "
                           "(single-channel images (N, H, W) as x[:, None])")
    for s, x in zip(SPLITS, arrays):
        if x.dtype.kind not in "biuf":
            raise DatasetError(f"{path}: split {s!r} has non-numeric dtype {x.dtype}")
        if x.shape[1:] != event:
            raise DatasetError(f"{path}: split {s!r} has shape {x.shape}, expected (N, {', '.join(map(str, event))}) "
                               "like 'train'")
    rows = [x.reshape(len(x), math.prod(event)) for x in arrays]
    image_shape = tuple(int(n) for n in event) if len(event) == 3 else None
    levels = _levels(path, rows, levels)
    if levels == 2:
        rows = [x.astype(np.uint8, copy=False) for x in rows]
    elif levels:  # grey levels 0..levels-1 scaled into [0, 1]
        rows = [(x / np.float32(levels - 1)).astype(np.float32, copy=False) for x in rows]
    else:
        with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
            rows = [x.astype(np.float32, copy=False) for x in rows]
        for s, x in zip(SPLITS, rows):
            if not np.isfinite(x).all():  # finite as float64, beyond float32's range (|x| > 3.4e38)
                raise DatasetError(f"{path}: split {s!r} has values too large for float32 (above 3.4e38); "
                                   "rescale the data")
    return Dataset(path.stem, *rows, source=f"{path}: user-supplied dataset", levels=levels, image_shape=image_shape)


def _levels(path: Path, rows: list[np.ndarray], declared) -> int | None:
    """The kind of values of a user's splits (module docstring): 2 (binary), the number of grey
    levels, or None (real-valued); raises DatasetError for values that are none of these."""
    if declared is not None:
        ok = declared.ndim == 0 and declared.dtype.kind in "iu" and 2 <= int(declared) <= 256
        if not ok:
            raise DatasetError(f"{path}: 'levels' must be one integer from 2 to 256 (the data are integers "
                               f"0..levels-1), got {declared!r}")
        levels = int(declared)
        for s, x in zip(SPLITS, rows):
            if x.size and not (np.all(x == np.round(x)) and x.min() >= 0 and x.max() <= levels - 1):
                raise DatasetError(f"{path}: split {s!r} has values outside the integers 0..{levels - 1} that "
                                   f"'levels' = {levels} declares")
        return levels
    if all(_is_binary(x) for x in rows):
        return 2
    if all(x.dtype.kind in "biu" for x in rows):
        low, high = min(int(x.min()) for x in rows if x.size), max(int(x.max()) for x in rows if x.size)
        if low < 0 or high > 255:
            raise DatasetError(f"{path}: integer values from {low} to {high}; integers are read as 8-bit grey levels "
                               "0..255. Store real-valued data as floats, or declare the grid with a 'levels' entry")
        return 256
    for s, x in zip(SPLITS, rows):
        if not np.isfinite(x).all():
            raise DatasetError(f"{path}: split {s!r} contains NaN or infinite values; remove or replace them")
    return None


def load_dataset(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, download: bool = True,
                 progress: bool = True) -> Dataset:
    """Load a named dataset (``"mnist"``, ``"omniglot"``, ``"caltech"``, the bundled ``"digits"``) or
    a user ``.npz``.

    See the module docstring for the resolution order (cache, ``data_dir``, download).
    Raises :class:`DatasetError` with instructions for every data problem.
    """
    text = os.fspath(name_or_path)
    if text.lower() == "digits":
        return load_digits()
    if text.lower() in _SPECS:
        return _load_named(_SPECS[text.lower()], data_dir, cache_dir, download, progress)
    path = Path(text).expanduser()
    if path.suffix == ".npz":
        return _load_user_npz(path)
    raise _not_a_dataset(text, path)


def check_dataset_name(name_or_path: str | os.PathLike) -> None:
    """Refuse, without reading any data, what :func:`load_dataset` would refuse from the name alone: an
    unknown name, or an ``.npz`` path that does not exist or is not a regular file. Commands call it
    before long work starts."""
    text = os.fspath(name_or_path)
    if text.lower() in DATASETS:
        return
    path = Path(text).expanduser()
    if path.suffix != ".npz":
        raise _not_a_dataset(text, path)
    try:
        mode = os.stat(path).st_mode  # follows links: a link to a regular file is fine
    except FileNotFoundError:
        raise _missing_file(path) from None
    except OSError as e:
        raise DatasetError(f"cannot use dataset file {path} ({e.strerror}); check its permissions") from e
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)


def _not_a_dataset(text: str, path: Path) -> DatasetError:
    if path.is_file():
        return DatasetError(f"{path}: only .npz files are supported for user datasets")
    return DatasetError(f"unknown dataset {text!r}: use one of {', '.join(DATASETS)} or the path of an "
                        f".npz file with arrays train, valid, test")


# --------------------------------------------------------------------------- reading .npz files safely

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


def _open_regular_file(path: Path):
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


def _read_npz(path: Path, names, optional=(), *, file=None, advice: str = "") -> dict[str, np.ndarray]:
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


def _npy_header(where: str, fp) -> tuple[tuple[int, ...], np.dtype]:
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


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
