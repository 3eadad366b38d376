"""What a bundle may hold and how large it may be: the limits every archive is checked against
before anything is extracted, and the run entries a bundle shares."""

from __future__ import annotations

from pathlib import Path

from ..files import RunError
from ..runs import CHECKPOINTS, ERROR, MARKER, METRICS, RUN_FOLDERS, SUMMARY, TENSORBOARD

BUNDLE_MARKER = "airvae-bundle.json"
BUNDLE_FORMAT = 1
SUFFIXES = (".json", ".jsonl", ".md", ".csv", ".png", ".safetensors")  # everything a bundle may hold
MAX_FILES = 100_000
MAX_BYTES = 8 << 30  # uncompressed: a paper-budget reproduction with every run's weights is well below
MAX_RATIO = 100  # uncompressed/compressed: deflate packs airvae's files (weights, JSON, PNG) under 10:1, bombs ~1000:1
RATIO_FLOOR = 1 << 20  # files (and totals) below 1 MiB may compress further (a JSON of blanks) but fill no disk
MANIFEST = "manifest.json"
# Text entries (manifests among them) are read whole into memory: each is capped (the largest airvae
# writes, a run's per-example evaluation of 10,000 test images, is about 1 MB).
TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".csv")
MAX_TEXT_BYTES = 64 << 20
# A run's entries that a bundle shares, by the run directory's own layout (airvae.runs); config.json
# and the best weights are added apart, the lock, tracking files and last.pt never.
SHARED_FILES = (MARKER, METRICS, SUMMARY, ERROR)
SHARED_FOLDERS = {folder: names for folder, names in RUN_FOLDERS.items() if folder not in (CHECKPOINTS, TENSORBOARD)}
RESULTS_SUFFIXES = (".md", ".csv", ".json", ".png")  # a reproduction's own files (not sweep.jsonl: a local log)


def refuse(archive: Path, why: str) -> RunError:
    return RunError(f"bundle {archive} refused: {why}; nothing was extracted (an archive airvae wrote never "
                    "holds this: do not use it)")


