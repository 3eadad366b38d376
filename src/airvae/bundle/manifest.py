"""A bundle's manifests, checked before anything is extracted ([`airvae.manifest`][] checks each
field) and once extracted: every path they name kept inside the extracted folder."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from ..config import ConfigError
from ..files import RunError, read_json
from ..manifest import check_manifest, manifest_jobs, said
from ..targets import figure3_dir
from .limits import MANIFEST, refuse


def check_archived_manifest(bundle: zipfile.ZipFile, info: zipfile.ZipInfo, archive: Path) -> None:
    """A manifest inside an archive, checked before anything is extracted (its size was, with every
    text entry's, by the bundle's members check: limits.MAX_TEXT_BYTES)."""
    try:
        manifest = json.loads(bundle.read(info).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise refuse(archive, f"{info.filename} is not valid JSON ({type(error).__name__})") from None

    try:
        check_manifest(manifest)
    except ConfigError as error:
        raise refuse(archive, f"{info.filename}: {said(error)}") from None


def check_extracted_manifest(folder: Path, archive: Path, name: str) -> None:
    """The manifest of an extracted folder (``name`` in the bundle), if it has one: its fields, and
    the run folders it names, which must lie inside ``folder`` once resolved."""
    if not (folder / MANIFEST).exists():
        return

    where, fix = f"bundle {archive} refused: {name}", "an archive airvae wrote never holds this: do not use it"
    manifest = read_json(folder / MANIFEST)
    jobs = manifest_jobs(manifest, where, fix)
    inside = folder.resolve()  # follows links: a folder linked elsewhere is outside
    named = [job.run_dir(folder) for job in jobs] + [figure3_dir(folder, dataset) for dataset in manifest["datasets"]]
    for path in named:
        if not path.resolve().is_relative_to(inside):
            raise RunError(f"{where}: {path.relative_to(folder)} leads outside the bundle's folder {folder}; {fix}")
