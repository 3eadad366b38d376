"""The oldest torch airvae accepts, checked when airvae is imported.

airvae's promise that reading a checkpoint never runs code rests on ``torch.load(weights_only=True)``.
Before torch 2.6 a crafted file ran code through it anyway (CVE-2025-32434), and before 2.10 its
unpickler could be made to corrupt memory (CVE-2026-24747, GHSA advisory of 2026-01-26).
"""

from __future__ import annotations

import re

TORCH_FLOOR = (2, 10)


def parse_version(text: str) -> tuple[int, int]:
    """``"2.13.0+cpu"`` -> ``(2, 13)``; an unreadable version counts as too old."""
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def check_torch(version: str | None = None) -> None:
    """Raise ImportError, saying why and what to do, when torch is older than ``TORCH_FLOOR``."""
    if version is None:
        import torch

        version = torch.__version__
    if parse_version(version) < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise ImportError(f"airvae needs torch >= {floor}, found {version}: older versions can run code from a "
                          "crafted checkpoint even with weights_only=True (CVE-2025-32434, CVE-2026-24747). "
                          f"Upgrade torch: pip install 'torch>={floor}'")
