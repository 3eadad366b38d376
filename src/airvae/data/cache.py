"""airvae's local cache of the named datasets: the cache folder, the converted caches it holds (the
packed splits, written atomically and never through a symbolic link) and the downloads of source
files into its ``raw/`` subfolder, verified by checksum before they are kept."""
from __future__ import annotations

import http.client
import io
import os
import tempfile
import urllib.request
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..files import TEMPORARY_TAG, RunError, atomic_write_bytes, real_folder
from .dataset import SPLITS, DatasetError
from .npz import READ_ERRORS, read_npz
from .sources import PIXELS, Arrays, Variant, as_splits, verify

CACHE_DIR_ENV = "AIRVAE_CACHE_DIR"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """airvae's cache folder (datasets, extracted bundles): ``cache_dir``, else ``$AIRVAE_CACHE_DIR``,
    else ``~/.cache/airvae``."""
    return Path(cache_dir or os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "airvae").expanduser()


def read_cache(path: Path, v: Variant) -> tuple[Arrays, str]:
    """The splits of variant ``v`` from the cache file ``path``, and the origin it records; a cache
    that cannot be read as one is a DatasetError saying to delete it."""
    try:
        d = read_npz(path, ("dim", *SPLITS), optional=("origin",))
        if int(d["dim"]) != PIXELS:
            raise ValueError(f"dim is {int(d['dim'])}, expected {PIXELS}")
        arrays = []
        for s, n in zip(SPLITS, v.sizes, strict=True):
            packed = d[s]
            if packed.dtype != np.uint8 or packed.shape != (n, (PIXELS + 7) // 8):
                raise ValueError(f"split {s!r} has packed shape {packed.shape}")
            arrays.append(np.unpackbits(packed, axis=-1, count=PIXELS))
        origin = str(d["origin"]) if "origin" in d else v.provenance
    except READ_ERRORS as e:
        raise DatasetError(
            f"cache file {path} is corrupt or incompatible ({type(e).__name__}: {e}). "
            f"Delete it and load again; it will be rebuilt from the source files."
        ) from e
    return as_splits(arrays), origin


def write_cache(path: Path, arrays: Arrays, origin: str) -> None:
    """Store the splits at ``path``; a cache that cannot be written only costs a warning."""
    # The packed splits are small (MNIST's: 7 MB), so the .npz is built in memory and written by
    # airvae's one write path: atomic (a crash or a concurrent reader never sees a partial cache) and
    # never through a symbolic link, neither at the file nor at the cache folder.
    buffer = io.BytesIO()
    # (the ignore: numpy's stubs read **splits as possibly filling the keyword allow_pickle: bool)
    np.savez_compressed(
        buffer, dim=np.int64(PIXELS), origin=np.str_(origin),
        **{s: np.packbits(x, axis=-1) for s, x in zip(SPLITS, arrays, strict=True)},  # type: ignore[arg-type]
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


def download_file(url: str, dest: Path, expected: str, progress: bool) -> Path:
    """``url`` downloaded to ``dest``, kept only if its checksum is ``expected``; a failure is a DatasetError."""
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
            verify(tmp, expected)
        except DatasetError as e:
            raise DatasetError(f"downloaded {url} but it was deleted: {e}") from e
        os.replace(tmp, dest)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # already renamed, unless the download failed
    return dest


# The largest source file is MNIST's training split as text, about 80 MB: a download this long is
# not one of them, and is cut before it can fill the disk (its checksum would fail at the end anyway).
MAX_DOWNLOAD_BYTES = 1 << 30


def _fetch(url: str, f: BinaryIO, desc: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    too_long = f"it is longer than {MAX_DOWNLOAD_BYTES:,} bytes, which none of the datasets' files is"
    with urllib.request.urlopen(url, timeout=60) as r:
        total = int(r.headers.get("Content-Length") or 0) or None
        if total is not None and total > MAX_DOWNLOAD_BYTES:
            raise ValueError(too_long)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=desc, disable=not progress) as bar:
            fetched = 0
            for chunk in iter(lambda: r.read(1 << 16), b""):
                fetched += len(chunk)
                if fetched > MAX_DOWNLOAD_BYTES:
                    raise ValueError(too_long)
                f.write(chunk)
                bar.update(len(chunk))


def raw_dir(cache_dir: Path) -> Path:
    """The folder downloads go into: ``<cache_dir>/raw``, else (a link or not writable) a new temporary folder."""
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

