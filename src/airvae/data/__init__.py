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

Whatever the source, every [`Dataset`][airvae.data.Dataset] holds its splits as ``(N, D)`` arrays of the rows models
see, images flattened row-major: uint8 0/1 for binary data, float32 otherwise (grey levels on the
grid ``i / (levels - 1)``, real values as given); ``levels`` (2, the grid size, or None for
real-valued) and ``image_shape`` (``(C, H, W)``, or None for flat vectors) say how to read them.
"""
from __future__ import annotations

# The package, module by module (each imports only those above it, and airvae.files):
#   dataset.py     the Dataset class, DatasetError, SPLITS and the helpers over splits (no other airvae import)
#   npz.py         reading any .npz safely: the limits checked from zip entries and .npy headers
#   sources.py     the registry of the paper's datasets (files, checksums, URLs, converters) and the bundled digits
#   cache.py       the cache folder, the packed caches in it and downloads into its raw/ subfolder
#   user_files.py  users' own .npz datasets: regular-file checks, validation, kind of values
#   torch_split.py one split as a torch.utils.data.Dataset of float tensors (TorchSplit)
#   __init__.py    the public API: load_dataset (cache, then local files, then download) and check_dataset_name
import os
from pathlib import Path

# Importable from here as before the split into modules (airvae.data was one file); the values read by
# the code live in the modules named: patch the limits there (airvae.data.npz), not here.
from ..files import hashed  # noqa: F401  (a generic file utility, now in airvae.files)
from .cache import CACHE_DIR_ENV, cache_root, download_file, raw_dir, read_cache, write_cache
from .dataset import SPLITS, Dataset, DatasetError, dataset_digest, evenly_spaced
from .npz import MAX_ARRAY_BYTES, MAX_COMPRESSION_RATIO, RATIO_CHECKED_ABOVE, READ_ERRORS  # noqa: F401
from .sources import (  # noqa: F401
    DATASETS,
    DIGITS_FILE,
    DIGITS_PROVENANCE,
    DIGITS_SHA256,
    DIGITS_SIZES,
    OMNIGLOT_DEVIATION,
    PIXELS,
    SPECS,
    Arrays,
    Spec,
    Variant,
    as_splits,
    check_splits,
    load_digits,
    verify,
)
from .torch_split import TorchSplit
from .user_files import check_user_file, load_user_npz

__all__ = [
    "CACHE_DIR_ENV",
    "DATASETS",
    "DATA_DIR_ENV",
    "Dataset",
    "DatasetError",
    "SPLITS",
    "TorchSplit",
    "cache_root",
    "check_dataset_name",
    "dataset_digest",
    "evenly_spaced",
    "load_dataset",
    "load_digits",
]

DATA_DIR_ENV = "AIRVAE_DATA_DIR"
_HOW_TO_PROVIDE = (
    f"Put the files in a folder (or its originals/ subfolder) and pass --data-dir DIR "
    f"(data_dir=DIR in Python) or set {DATA_DIR_ENV}=DIR."
)


def load_dataset(name_or_path: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, download: bool = True,
                 progress: bool = True) -> Dataset:
    """Load a named dataset (``"mnist"``, ``"omniglot"``, ``"caltech"``, the bundled ``"digits"``) or a
    user's ``.npz``.

    See the module docstring for the resolution order (cache, ``data_dir``, download) and each
    dataset's conventions.

    Args:
        name_or_path: a dataset's name, or the path of an ``.npz`` with arrays ``train``, ``valid``
            and ``test``, each ``(N, D)`` or images ``(N, C, H, W)`` (optionally ``levels``: module
            docstring).
        data_dir: a folder holding the source files (offline machines; default ``$AIRVAE_DATA_DIR``).
        cache_dir: airvae's cache folder (default ``$AIRVAE_CACHE_DIR``, else ``~/.cache/airvae``).
        download: fetch missing source files from their public URLs; False never touches the network.
        progress: show download progress.

    Returns:
        The three splits and what their values are.

    Raises:
        DatasetError: every data problem, with instructions ([`DatasetError`][airvae.data.DatasetError]).
    """
    text = os.fspath(name_or_path)
    if text.lower() == "digits":
        return load_digits()
    if text.lower() in SPECS:
        return _load_named(SPECS[text.lower()], data_dir, cache_dir, download, progress)
    path = Path(text).expanduser()
    if path.suffix == ".npz":
        return load_user_npz(path)
    raise _not_a_dataset(text, path)


def check_dataset_name(name_or_path: str | os.PathLike[str]) -> None:
    """Refuse, without reading any data, what [`load_dataset`][airvae.data.load_dataset] would refuse from
    the name alone: an unknown name, or an ``.npz`` path that does not exist or is not a regular
    file. Commands call it before long work starts.

    Raises:
        DatasetError: the name or path is refused.
    """
    text = os.fspath(name_or_path)
    if text.lower() in DATASETS:
        return
    path = Path(text).expanduser()
    if path.suffix != ".npz":
        raise _not_a_dataset(text, path)
    check_user_file(path)


def _not_a_dataset(text: str, path: Path) -> DatasetError:
    if path.is_file():
        return DatasetError(f"{path}: only .npz files are supported for user datasets")
    return DatasetError(f"unknown dataset {text!r}: use one of {', '.join(DATASETS)} or the path of an "
                        f".npz file with arrays train, valid, test")


# --------------------------------------------------------------------------- named datasets

def _load_named(spec: Spec, data_dir: str | os.PathLike[str] | None, cache_dir: str | os.PathLike[str] | None,
                download: bool, progress: bool) -> Dataset:
    cache = cache_root(cache_dir)
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
    dirs.append(cache / "raw")  # earlier downloads whose conversion did not finish

    # (1) cache, (2) local files: variant by variant, so a preferred variant wins.
    partial = []
    for v in spec.variants:
        cache_file = cache / f"{v.key}.npz"
        if cache_file.is_file():
            arrays, origin = read_cache(cache_file, v)
            return Dataset(spec.name, *arrays, source=f"{cache_file} (cache of {origin})", deviation=v.deviation)
        found = {n: next((d / n for d in dirs if (d / n).is_file()), None) for n in v.files}
        paths = [p for p in found.values() if p is not None]
        if len(paths) == len(found):
            return _convert(spec, v, paths, cache_file)
        if paths:
            missing = [n for n, p in found.items() if p is None]
            partial.append(f"Found only part of a set; missing: {', '.join(missing)}.")

    # (3) download the variants that have a public URL.
    failures = []
    if download:
        for v in spec.variants:
            if not v.url:
                continue
            try:
                raw = raw_dir(cache)
                paths = [download_file(v.url + n, raw / n, h, progress) for n, h in v.files.items()]
            except DatasetError as e:
                failures.append(str(e))
                continue
            return _convert(spec, v, paths, cache / f"{v.key}.npz")
    raise DatasetError(_missing_message(spec, cache, dirs, partial, download, failures))


def _convert(spec: Spec, v: Variant, paths: list[Path], cache: Path) -> Dataset:
    for p, expected in zip(paths, v.files.values(), strict=True):
        verify(p, expected)
    where = ", ".join(map(str, paths))
    try:
        arrays = v.read(paths, v)
    except DatasetError:
        raise
    except (*READ_ERRORS, NotImplementedError) as e:
        # The checksum matched, so this is an environment problem (e.g. an old scipy).
        raise DatasetError(f"could not read {where} ({type(e).__name__}: {e})") from e
    arrays = check_splits(arrays, v.sizes, PIXELS, where)
    if v.transform is not None:
        arrays = as_splits(v.transform(x) for x in arrays)
    origin = f"{where}: {v.provenance}"
    write_cache(cache, arrays, origin)
    return Dataset(spec.name, *arrays, source=origin, deviation=v.deviation)


def _missing_message(spec: Spec, cache_dir: Path, dirs: list[Path], partial: list[str],
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

