"""Device selection: CUDA when present, else CPU; and the precision sums are kept in on each."""

from __future__ import annotations

import torch

from .config import ConfigError, check_device_name


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available; ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` must exist
    on this machine (a ConfigError says what is there instead)."""
    if isinstance(name, torch.device):
        return name
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"invalid device = {name!r}: CUDA is not available on this machine; use cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"invalid device = {name!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"invalid device = {name!r}: MPS is not available on this machine; use cpu or auto")
    return device


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """The dtype for sums of log weights and losses kept on ``device``: float64 (an IWAE-5000 or
    AIS sum over many terms keeps its last digits), except on Apple's MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64
