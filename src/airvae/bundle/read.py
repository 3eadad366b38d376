"""Reading a bundle: the archive checked member by member before anything is extracted, extracted
once into the cache under its digest, and resolved to the folder a command reads."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from ..checkpoints import stream_digest
from ..data import cache_root
from ..files import TEMPORARY_TAG, LinkRefused, RunError, real_folder
from ..runs import BEST_WEIGHTS, CONFIG, LAST, load_trained_model
from .limits import (
    BUNDLE_MARKER,
    MANIFEST,
    MAX_BYTES,
    MAX_FILES,
    MAX_RATIO,
    MAX_TEXT_BYTES,
    RATIO_FLOOR,
    SUFFIXES,
    TEXT_SUFFIXES,
    refuse,
)
from .manifest import check_archived_manifest, check_extracted_manifest

if TYPE_CHECKING:
    from ..model import LatentVariableModel

# ----------------------------------------------------------------------------------------------
# Reading


def is_bundle(path: Path) -> bool:
    """A zip archive with an ``airvae-bundle.json`` at its root."""
    try:
        with zipfile.ZipFile(path) as archive:
            return BUNDLE_MARKER in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def resolve(path: str | os.PathLike[str]) -> Path:
    """The folder a command works on: an existing folder as it is; a bundle, or a path inside one
    (``results.zip/runs/caltech/k1-m1/plain/seed0``), as that folder of the bundle's extraction
    ([`extract`][airvae.bundle.extract]); anything else unchanged, for the caller to report."""
    path = Path(path)
    if path.is_dir():
        return path
    archive = next((p for p in (path, *path.parents) if p.is_file()), None)
    if archive is None:
        return path
    if not is_bundle(archive):
        if archive != path and zipfile.is_zipfile(archive):
            raise RunError(f"{path}: {archive} is a zip archive but not an airvae bundle ({BUNDLE_MARKER} is missing)")
        return path
    inner = PurePosixPath(path.relative_to(archive).as_posix())
    if ".." in inner.parts:
        raise RunError(f"{path}: a path inside a bundle cannot contain '..'")
    root = extract(archive)
    target = root.joinpath(*inner.parts)
    if not target.is_dir() or target.is_symlink():
        runs = runs_in(root)
        raise RunError(f"{archive} holds no folder {inner}; its runs are {', '.join(runs[:3]) or 'none'}"
                       f"{', ...' if len(runs) > 3 else ''}")
    if target != root:
        check_extracted_manifest(target, archive, f"{inner}/{MANIFEST}")  # report BUNDLE/FOLDER reads it
    return target


def runs_in(folder: Path) -> list[str]:
    """The run directories below ``folder`` (each holds a config.json), relative to it."""
    return sorted(path.parent.relative_to(folder).as_posix() for path in folder.rglob(CONFIG))


def extract(archive: str | os.PathLike[str]) -> Path:
    """The folder holding a bundle's files: ``$AIRVAE_CACHE_DIR/bundles/<sha256 of the archive>/``,
    extracted on first use after every member is checked (module docstring); a refused archive
    extracts nothing and raises [`airvae.files.RunError`][] saying why. Its manifest is checked
    on every use, so an extraction by an older airvae is checked as well."""

    archive = Path(archive)
    root = cache_root() / "bundles"
    try:
        with open(archive, "rb") as f:  # one open file, hashed then read: what is extracted is what was hashed
            target = root / stream_digest(f)
            for folder in (root, target):  # what a link points at is never read as the bundle nor written
                if folder.is_symlink():
                    raise LinkRefused(f"{folder} is a symbolic link; airvae never writes through links: remove "
                                      "the link, or choose another cache folder ($AIRVAE_CACHE_DIR)")
            if not target.is_dir():
                f.seek(0)
                _extract_into(zipfile.ZipFile(f), archive, root, target, os.fstat(f.fileno()).st_size)
    except zipfile.BadZipFile as error:
        raise RunError(f"bundle {archive} is not a readable zip archive ({error}); nothing was extracted") from error
    except OSError as error:
        raise RunError(f"could not extract bundle {archive} into {root}: {error.strerror or error}") from error
    check_extracted_manifest(target, archive, MANIFEST)
    return target


def _extract_into(bundle: zipfile.ZipFile, archive: Path, root: Path, target: Path, size: int) -> None:
    """Check every member and every manifest, extract into a temporary folder beside ``target``
    (a name no user picks), sync it, then rename it there: a crash never leaves a torn extraction
    under the digest's name, which is trusted from then on."""
    with bundle:
        members = _checked_members(bundle, archive, size)
        for info in members:
            if PurePosixPath(info.filename).name == MANIFEST:
                check_archived_manifest(bundle, info, archive)
        real_folder(root)  # created now that the archive passed, never through a link
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name[:16]}{TEMPORARY_TAG}"))
        try:
            _extract_members(bundle, members, tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir() or target.is_symlink():  # not another process extracting it meanwhile
                    raise
                shutil.rmtree(tmp)
            _sync(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _checked_members(bundle: zipfile.ZipFile, archive: Path, size: int) -> list[zipfile.ZipInfo]:
    members, seen, total = [], set(), 0
    infos = bundle.infolist()
    if len(infos) > MAX_FILES:
        raise refuse(archive, f"it holds {len(infos)} entries, more than {MAX_FILES}")
    _check_no_overlap(infos, min(bundle.start_dir, size), archive)
    for info in infos:
        name = info.filename
        kind = stat.S_IFMT(info.external_attr >> 16)
        parts = name.rstrip("/").split("/")
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            raise refuse(archive, f"entry {name!r} has an absolute path")
        if "\\" in name or "\0" in name or any(part in ("", ".", "..") for part in parts):
            raise refuse(archive, f"entry {name!r} escapes the bundle's folder (path traversal) or is malformed")
        if kind == stat.S_IFLNK:
            raise refuse(archive, f"entry {name!r} is a symbolic link")
        if info.is_dir():
            if kind not in (0, stat.S_IFDIR):
                raise refuse(archive, f"entry {name!r} is a special file")
            continue
        if kind not in (0, stat.S_IFREG):
            raise refuse(archive, f"entry {name!r} is a special file")
        if info.flag_bits & 0x1:
            raise refuse(archive, f"entry {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # zipfile bounds each deflate read's output; bzip2 and LZMA reads are not bounded
            raise refuse(archive, f"entry {name!r} is compressed with method {info.compress_type}, not deflate")
        if PurePosixPath(name).suffix not in SUFFIXES:
            raise refuse(archive, f"entry {name!r} is not a kind of file a bundle holds ({', '.join(SUFFIXES)})")
        if PurePosixPath(name).suffix in TEXT_SUFFIXES and info.file_size > MAX_TEXT_BYTES:
            raise refuse(archive, f"entry {name!r} holds {info.file_size:,} bytes of text, more than {MAX_TEXT_BYTES:,}")
        if name in seen:
            raise refuse(archive, f"entry {name!r} appears twice")
        seen.add(name)
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise refuse(archive, f"entry {name!r} expands from {info.compress_size:,} to {info.file_size:,} bytes, "
                                   f"more than {MAX_RATIO} times (a zip bomb)")
        total += info.file_size
        if total > MAX_BYTES:
            raise refuse(archive, f"its files add up to more than {MAX_BYTES:,} bytes")
        members.append(info)
    if BUNDLE_MARKER not in seen:
        raise refuse(archive, f"it has no {BUNDLE_MARKER}: it is not an airvae bundle")
    compressed = sum(info.compress_size for info in members)
    if total > RATIO_FLOOR and total > MAX_RATIO * max(compressed, 1):
        raise refuse(archive, f"its files expand from {compressed:,} to {total:,} bytes, more than {MAX_RATIO} times "
                               "(a zip bomb)")
    return members


def _check_no_overlap(infos: list[zipfile.ZipInfo], end: int, archive: Path) -> None:
    """Each entry's compressed data must fit between its header and the next entry (or the
    central directory): the compressed sizes the ratios are judged by are then real bytes of the
    archive, and no two entries share data (zip bombs that overlap entries, or overstate a size
    to hide their ratio)."""
    ordered = sorted(infos, key=lambda info: info.header_offset)
    for info, following in zip(ordered, [other.header_offset for other in ordered[1:]] + [end], strict=True):
        if info.header_offset + info.compress_size > following:
            raise refuse(archive, f"entry {info.filename!r} overlaps the next entry or the archive's end (its "
                                   "compressed size is overstated or its data shared: a zip bomb)")


def _extract_members(bundle: zipfile.ZipFile, members: list[zipfile.ZipInfo], folder: Path) -> None:
    """Write each checked member below ``folder`` (a fresh temporary folder), each file synced, and
    give it the archive's modification time (``airvae report`` tells stale plots by comparing
    times). Never through a link: each folder is checked ([`airvae.files.real_folder`][]) and
    each file created anew ("x": fails on anything there, a link included). No member
    decompresses to more than its header's size, which ``_checked_members`` counted: zipfile
    stops there, and a header that understates the size fails the entry's CRC check (BadZipFile)."""
    folders = {folder}  # those checked (and made) so far
    for info in members:
        path = folder.joinpath(*info.filename.split("/"))
        if path.parent not in folders:
            real_folder(path.parent, folder)
            folders.update(p for p in (path.parent, *path.parent.parents) if folder in (p, *p.parents))
        with bundle.open(info) as source, open(path, "xb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
            target.flush()
            os.fsync(target.fileno())
            stamp = time.mktime(info.date_time + (0, 0, -1))
            os.utime(target.fileno() if os.utime in os.supports_fd else path, (stamp, stamp))
    for made in folders:
        _sync(made)  # the entries of each folder too: a crash after the rename keeps every file


def _sync(folder: Path) -> None:
    """fsync a folder's entries (where the system allows opening a folder: not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | os.PathLike[str], which: str = "best", device: str = "cpu",
         model: LatentVariableModel | None = None) -> LatentVariableModel:
    """The trained model of a run directory, of a run inside a bundle (``BUNDLE/RUN``), or of a bundle
    of one run: ``model = airvae.load("runs/caltech/VAE-seed0")``. In eval mode, on ``device``.

    Weights come from ``best.pt`` (loaded weights-only) or a bundle's safetensors: a bundle never
    runs code. A run of your own model ([`airvae.fit.fit`][]) needs ``model``.

    Args:
        path: a run directory, a bundle, or a run inside one (``results.zip/runs/...``).
        which: ``"best"`` (early stopping's model) or ``"last"`` (``last.pt`` of a run directory; a
            bundle holds no ``last.pt``).
        device: where the model is loaded.
        model (LatentVariableModel | None): an untrained instance of your own model to load the weights
            into; None for airvae's own models.

    Returns:
        (LatentVariableModel): The model (a torch ``nn.Module``).

    Raises:
        RunError: no run there, a refused bundle, a missing checkpoint, or weights that do not fit.
    """

    folder = resolve(path)
    if folder != Path(path) and not (folder / CONFIG).exists():
        runs = runs_in(folder)
        raise RunError(f"{path} holds {len(runs)} runs; load one of them: {Path(path) / runs[0]}"
                       if runs else f"{path} holds no run")
    if which == "last" and not (folder / LAST).exists() and (folder / BEST_WEIGHTS).exists():
        raise RunError(f"{path} comes from a bundle, which holds the best weights only (no last.pt); "
                       "load which='best'")
    return load_trained_model(folder, which=which, device=device, model=model)[1]
