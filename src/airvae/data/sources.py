"""Where the datasets come from: the registry of the paper's three datasets (the file sets each is
accepted as, their checksums, public download URLs and provenance), the converters from their original
formats to binary splits, and the bundled grey-level digits (module docstring of [`airvae.data`][]).
Nothing here reads or writes the cache or touches the network: ``airvae.data.cache`` does."""
from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..files import hashed
from .dataset import SPLITS, Dataset, DatasetError, is_binary
from .npz import read_npz

DATASETS: tuple[str, ...] = ("mnist", "omniglot", "caltech", "digits")
PIXELS = 784  # all three datasets are 28x28

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def as_splits(arrays: Iterable[np.ndarray]) -> Arrays:
    """Three arrays, those of train, valid and test, as one ``Arrays``."""
    train, valid, test = arrays
    return train, valid, test


@dataclass(frozen=True)
class Variant:
    """One accepted set of source files for a dataset and how to turn it into splits."""

    key: str  # cache file stem; equal for variants that give identical arrays
    files: dict[str, str]  # file name -> "sha256:<hex>" or "gitblob:<hex>"
    read: Callable[[list[Path], Variant], Arrays]
    sizes: tuple[int, int, int]  # expected rows of train, valid, test
    label: str  # shown in "file missing" messages
    provenance: str  # ends up in Dataset.source
    url: str | None = None  # base URL the files can be downloaded from (None: no public copy)
    transform: Callable[[np.ndarray], np.ndarray] | None = None  # applied after validation
    deviation: str | None = None


@dataclass(frozen=True)
class Spec:
    name: str
    variants: tuple[Variant, ...]  # in order of preference


def _read_packed_npz(paths: list[Path], v: Variant) -> Arrays:
    d = read_npz(paths[0], SPLITS)
    return as_splits(np.unpackbits(d[s], axis=-1, count=PIXELS) for s in SPLITS)


def _read_mat(paths: list[Path], v: Variant, names: tuple[str, str, str]) -> Arrays:
    # One file per split (MNIST, variable X each) or one file with three variables
    # (Caltech); `i % len(paths)` covers both.
    from scipy.io import loadmat

    return as_splits(
        loadmat(paths[i % len(paths)], variable_names=[n])[n] for i, n in enumerate(names)
    )


def _read_amat(paths: list[Path], v: Variant) -> Arrays:
    # Text: one image per line, 784 '0'/'1' separated by spaces. Keeping only the
    # digit bytes is ~100x faster than np.loadtxt and ignores \r\n or extra spaces.
    out = []
    for p in paths:
        buf = np.fromfile(p, dtype=np.uint8)
        digits = buf[(buf == ord("0")) | (buf == ord("1"))] - ord("0")
        if digits.size % PIXELS:
            raise DatasetError(f"{p}: {digits.size} digits is not a whole number of 784-pixel rows")
        out.append(digits.reshape(-1, PIXELS))
    return as_splits(out)


def _read_chardata(paths: list[Path], v: Variant) -> Arrays:
    from scipy.io import loadmat

    m = loadmat(paths[0], variable_names=["data", "testdata"])

    def rows(x: np.ndarray) -> np.ndarray:
        # Stored as (784, N) columns; this is the IWAE/rebar pixel order (float32 p,
        # as rebar uses, so the binarization below reproduces theirs exactly).
        x = np.asarray(x, dtype=np.float32).T
        return x.reshape(-1, 28, 28).reshape(-1, PIXELS, order="F")

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
    return np.ascontiguousarray(img.reshape(-1, PIXELS))


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

SPECS: dict[str, Spec] = {
    "mnist": Spec("mnist", (
        Variant(
            "mnist", {"binarized_mnist.npz":
                      "sha256:50de2c8299a5a297789293ab2c30f6fc3cb8c359a15e5e88d5501aa18ebb8fa5"},
            _read_packed_npz, _MNIST_SIZES, "converted, packed bits", _MNIST_PROV),
        Variant(
            "mnist", {
                "binarized_mnist_train.mat":
                    "sha256:79a0312c7389d855cfc97e3812de3998417c5829d8a51543b56a90a91252ae7e",
                "binarized_mnist_valid.mat":
                    "sha256:7436afc856959075c7787025bb8a4ba2b520b9230ee39667c66aa7dd2819dd68",
                "binarized_mnist_test.mat":
                    "sha256:5bc30222e1e7896cbccd1e1db6b28540cc1230f4d2d5473841a5f6cc54be8d38"},
            lambda p, v: _read_mat(p, v, ("X", "X", "X")), _MNIST_SIZES,
            "MATLAB v5, variable X", _MNIST_PROV),
        Variant(
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
    "omniglot": Spec("omniglot", (
        Variant(
            "omniglot_chardata",
            {"chardata.mat": "gitblob:016a3536ffe5e1d38e42563a18d7a78bfaf643ec"},
            _read_chardata, (23000, 1345, 8070),
            "Burda's IWAE file, the paper's data, preferred, downloadable", _CHARDATA_PROV,
            url="https://github.com/yburda/iwae/raw/master/datasets/OMNIGLOT/"),
        Variant(
            "omniglot_lake_DEVIATION",
            {"omniglot_28x28_from_lake_DEVIATION.npz":
             "sha256:630b4ec5e707680c51aef93b50f02fae84a69a3f21ce2e7ae7b87560c4812284"},
            _read_packed_npz, (23000, 1345, 8115),
            "rebuilt from Lake's images, NOT the paper's data, no public download",
            "OMNIGLOT rebuilt from Lake et al.'s raw images (shared/data MANIFEST section 3), "
            "23000/1345/8115, DEVIATION from the paper's chardata.mat",
            deviation=OMNIGLOT_DEVIATION),
    )),
    "caltech": Spec("caltech", (
        Variant(
            "caltech", {"caltech101_silhouettes_28.npz":
                        "sha256:21c5b447860459553bd11c60028d42b2d38a9ce2cda502834a715efc7d0308bf"},
            _read_packed_npz, _CALTECH_SIZES, "converted, packed bits, stored convention",
            _CALTECH_PROV, transform=_caltech_to_vae),
        Variant(
            "caltech", {"caltech101_silhouettes_28_split1.mat":
                        "sha256:eb6735e8d84b1850fabc5590124aab1755e90c9fd28123585324398405e1e42a"},
            lambda p, v: _read_mat(p, v, ("train_data", "val_data", "test_data")),
            _CALTECH_SIZES, "Marlin's MATLAB file, downloadable", _CALTECH_PROV,
            url="https://people.cs.umass.edu/~marlin/data/", transform=_caltech_to_vae),
    )),
}
assert tuple(SPECS) + ("digits",) == DATASETS


DIGITS_FILE = "digits.csv.gz"
DIGITS_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"  # as in scikit-learn 1.9.1
DIGITS_SIZES = (1197, 300, 300)
DIGITS_PROVENANCE = (
    "scikit-learn's digits (8x8, 17 grey levels, 1797 images; the test set of UCI's Optical Recognition of "
    "Handwritten Digits, Alpaydin & Kaynak 1998, CC BY 4.0), bundled with airvae; split 1197/300/300 by "
    "RandomState(0).permutation(1797); values x/16")


def load_digits() -> Dataset:
    """The bundled grey-level dataset ([`airvae.data`][]'s docstring): verified by sha256, split as documented."""
    with resources.as_file(resources.files("airvae") / "bundled" / DIGITS_FILE) as path:
        verify(path, f"sha256:{DIGITS_SHA256}")
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # 64 pixels, then the label (unused)
    pixels = table[np.random.RandomState(0).permutation(len(table)), :64].astype(np.float32) / 16
    ends = np.cumsum(DIGITS_SIZES)
    return Dataset("digits", pixels[:ends[0]], pixels[ends[0]:ends[1]], pixels[ends[1]:], source=DIGITS_PROVENANCE,
                   levels=17, image_shape=(1, 8, 8))


# --------------------------------------------------------------------------- checks of source files

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


def verify(path: Path, expected: str) -> None:
    """Refuse ``path`` unless its checksum is ``expected`` (``sha256:<hex>`` or ``gitblob:<hex>``)."""
    kind, want = expected.split(":", 1)
    got = _digest(path, kind)
    if got != want:
        what = "git blob id" if kind == "gitblob" else kind
        raise DatasetError(
            f"checksum mismatch for {path}: expected {what} {want}, got {got}. The file is "
            f"corrupt, truncated or a different version; delete it and download or copy it "
            f"again from a good source."
        )


def check_splits(arrays: Iterable[np.ndarray], sizes: Sequence[int | None], dim: int, where: str) -> Arrays:
    """The three converted splits as uint8 0/1, refused unless numeric, ``(n, dim)`` with the
    expected ``sizes`` (None: any number of rows) and binary; ``where`` names the source files."""
    out = []
    for s, x, n in zip(SPLITS, arrays, sizes, strict=True):
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise DatasetError(f"{where}: split {s!r} has non-numeric dtype {x.dtype}")
        if x.ndim != 2 or x.shape[1] != dim or (n is not None and x.shape[0] != n):
            want = f"({n if n is not None else 'N'}, {dim})"
            raise DatasetError(
                f"{where}: split {s!r} has shape {x.shape}, expected {want}. "
                f"Is it the right file? Images must be flattened to one row each."
            )
        if not is_binary(x):
            raise DatasetError(
                f"{where}: split {s!r} contains values other than 0 and 1. Binarize the "
                f"data first (and unpack np.packbits output with np.unpackbits)."
            )
        out.append(x.astype(np.uint8, copy=False))
    return as_splits(out)
