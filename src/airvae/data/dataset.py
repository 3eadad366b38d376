"""The [`Dataset`][airvae.data.Dataset] every loader returns, the error every data problem raises, and the helpers
over a dataset's splits (subsets spread over a split, a digest of the contents). Imports nothing else
of airvae: the other modules of [`airvae.data`][] build on it."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "valid", "test")


class DatasetError(ValueError):
    """A data problem the user can fix; the message says which file, what and how."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is ambiguous
class Dataset:
    """Three splits of examples, one row each (images flattened row-major), plus what their values are
    and where they came from; checked when made.

    Attributes:
        name: the dataset's name (or the user file's).
        train: the training split, ``[N, dim]``.
        valid: the validation split.
        test: the test split.
        source: where the data came from (files and checksums, or the provenance of bundled data).
        deviation: how the data depart from the paper's, when they do (None: they do not).
        levels: 2: binary, uint8 0/1 (the paper's data); an integer L > 2: grey levels, float32 on the
            grid ``i / (L - 1)``; None: real-valued float32.
        image_shape: ``(C, H, W)`` when the rows are images (None: flat vectors).
    """

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
        """Values per example."""
        return int(self.train.shape[1])

    def split(self, name: str) -> np.ndarray:
        """The split ``name`` (``train``, ``valid`` or ``test``)."""
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)


def evenly_spaced(total: int, n: int | None) -> np.ndarray:
    """Indices of ``min(n, total)`` examples spread evenly over a split (all of it for ``n=None``),
    never just its first rows: MNIST's test file is sorted by digit (its first 500 are all zeros)."""
    if n is None or n >= total:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, n).round().astype(np.int64))


def dataset_digest(dataset: object) -> str:
    """sha256 of the three splits' contents (not of the files they came from), for any object with
    ``train``, ``valid`` and ``test`` arrays: runs record it so that resuming on other data is caught."""
    h = hashlib.sha256()
    for s in SPLITS:
        x = np.ascontiguousarray(getattr(dataset, s))
        h.update(f"{s}:{x.shape}:{x.dtype};".encode())
        h.update(x.data.cast("B"))
    return h.hexdigest()


def is_binary(x: np.ndarray) -> bool:
    """Whether every value of ``x`` is 0 or 1 (any dtype; an empty array is)."""
    if x.size == 0 or x.dtype == np.bool_:
        return True
    if x.dtype.kind == "u":
        return bool(x.max() <= 1)  # fast path for the usual uint8 data
    return bool(((x == 0) | (x == 1)).all())  # NaN and fractions fail here
