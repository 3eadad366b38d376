"""The run directory: where a training run keeps its config, metrics, checkpoints and summary.

    RUN/config.json            resolved RunConfig
    RUN/metrics.jsonl          one JSON object per validation
    RUN/checkpoints/last.pt    model, optimizer, step, RNG state (for exact resume)
    RUN/checkpoints/best.pt    model at the best validation estimate (early stopping)
    RUN/summary.json           status and final numbers, rewritten as the run progresses
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .config import RunConfig
from .model import VAE, build_vae

CONFIG, METRICS, SUMMARY = "config.json", "metrics.jsonl", "summary.json"
LAST, BEST = "checkpoints/last.pt", "checkpoints/best.pt"


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (missing, incomplete, already exists)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def save_checkpoint(path: Path, state: dict) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise RunError(f"checkpoint {path} does not exist: the run has not reached its first checkpoint")
    return torch.load(path, map_location=device, weights_only=False)


def load_config(run_dir: str | os.PathLike) -> RunConfig:
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise RunError(f"{run_dir} is not an airvae run directory: {CONFIG} is missing "
                       "(create one with `airvae train --run-dir ...`)")
    return RunConfig.from_json(read_json(path))


def model_from_config(cfg: RunConfig) -> VAE:
    arch, reg = cfg.architecture, cfg.regularizer
    return build_vae(cfg.x_dim, arch.z_dim, arch.encoder, arch.decoder, reg.sigma, reg.max_norm)


def load_trained_model(run_dir: str | os.PathLike, which: str = "best",
                       device: torch.device | str | None = None) -> tuple[RunConfig, VAE]:
    """The trained model of a run (``which``: "best" by validation, or "last"), in eval mode."""
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    cfg = load_config(run_dir)
    device = device or "cpu"
    state = load_checkpoint(Path(run_dir) / (BEST if which == "best" else LAST), device)
    model = model_from_config(cfg).to(device)
    model.load_state_dict(state["model"])
    return cfg, model.eval()
