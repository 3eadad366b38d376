"""Results to share: ``airvae bundle DIR`` packs a reproduction's folder (or one run directory) into
one zip archive that holds no pickle; ``airvae report BUNDLE``, ``airvae evaluate BUNDLE/RUN`` and
[`load`][airvae.bundle.load] read it on another machine.

What a bundle holds: ``airvae-bundle.json`` (what it is), the reproduction's ``manifest.json``,
``REPORT.md``, tables, figures and studies, and per run its marker, ``config.json`` (with its
machine-specific ``data_dir`` cleared), ``metrics.jsonl``, ``summary.json``, ``error.json``,
``evaluations/``, ``plots/`` and ``checkpoints/best.safetensors`` (the best weights; no
``last.pt``, no tracking files). Only JSON, JSON lines, Markdown, CSV, PNG and safetensors.

Opening one never trusts it: members are checked before anything is extracted (no absolute path,
no ``..``, no link or other special file, no encrypted entry, deflate or none as compression, no
duplicate, only the kinds of file above, at most ``MAX_FILES`` files and ``MAX_BYTES`` bytes
by the headers' sizes, which no entry decompresses beyond: a header that understates a size fails
the entry's checksum; no entry, nor the whole, expanding more than ``MAX_RATIO`` times, and no
compressed data overlapping another entry's: a zip bomb), and so is every ``manifest.json``: each of
its fields by type and range before it names a path ([`manifest_jobs`][airvae.manifest.manifest_jobs]), and
every run folder it names must lie inside the extraction. The extraction lives in
``$AIRVAE_CACHE_DIR/bundles/<sha256 of the archive>/`` (default ``~/.cache/airvae``), written into a temporary
folder, synced, then renamed there, never through a symbolic link; the archive is only ever read, and what
``evaluate`` and ``report`` compute from it is written into that folder.

Bundling only reads its source: a folder that cannot hold a lock file (read-only) is read after
checking that no other process holds its lock, and its report is packed as it is, not rebuilt.
"""

from .limits import BUNDLE_FORMAT, BUNDLE_MARKER, MAX_BYTES, MAX_FILES, MAX_RATIO
from .read import extract, is_bundle, load, resolve
from .write import write_bundle

__all__ = ["BUNDLE_FORMAT", "BUNDLE_MARKER", "MAX_BYTES", "MAX_FILES", "MAX_RATIO", "extract", "is_bundle", "load",
           "resolve", "write_bundle"]
