"""Checkpoint files: written atomically, read weights-only (a checkpoint received from someone else
can never run code), and checked against the run they should resume before anything uses them.
Where a run keeps them, and which is its best, is [`airvae.runs`][]' business."""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any, NoReturn

import torch

from .files import RunError, atomic_write_bytes, hashed


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (a dict of tensors and plain values) as a checkpoint, ``RUN/checkpoints/NAME``, by
    [`atomic_write_bytes`][airvae.files.atomic_write_bytes]: neither the run folder nor its
    checkpoints folder may be a link.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue(), Path(path).parent.parent)


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, Any], str]:
    """A checkpoint and the sha256 of the very bytes it was loaded from.

    Loaded with ``weights_only=True``: tensors, numbers, strings and plain containers only. A file
    that needs more (a pickle carrying code, or anything not written by airvae) is refused and
    nothing in it runs.

    Args:
        path: the checkpoint file (``RUN/checkpoints/best.pt`` or ``last.pt``).
        device: where its tensors are loaded.

    Returns:
        ``(state, sha256)``.

    Raises:
        RunError: the file is missing, unreadable, corrupt or holds more than weights.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise RunError(f"checkpoint {path} does not exist: the run has not reached its first checkpoint") from error
    except OSError as error:
        raise RunError(f"could not read checkpoint {path}: {error.strerror or error}") from error
    if not zipfile.is_zipfile(io.BytesIO(data)):  # torch.save writes a zip archive; anything else is damage
        raise RunError(_corrupt(path, ValueError("not a zip archive")))
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Weights only" in str(error):
            raise RunError(f"checkpoint {path} holds Python objects besides weights; airvae refuses to load it "
                           "because unpickling them could run code. Only use checkpoints written by airvae; "
                           "delete this one") from error
        raise RunError(_corrupt(path, error)) from error
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, IndexError, KeyError) as error:
        raise RunError(_corrupt(path, error)) from error
    if not isinstance(state, dict):
        raise RunError(_corrupt(path, TypeError(f"holds a {type(state).__name__}, not a checkpoint dict")))
    return state, hashlib.sha256(data).hexdigest()


def _corrupt(path: Path, error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    how = ("delete it and resume with --resume (training restarts from the beginning if no checkpoint is left)"
           if path.name == "last.pt" else "delete it and train or resume the run again")
    return f"checkpoint {path} is truncated or corrupt ({first_line}); {how}"


_LOOP_STATE: dict[str, type | tuple[type, ...]] = {
    "step": int, "best_val": (int, float), "best_step": (int, type(None)), "bad_validations": int,
    "seconds": (int, float), "loss_sum": (int, float), "loss_count": int}


def check_training_checkpoint(saved: dict[str, Any], iterations: int, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """A ``last.pt`` checked against the run it should resume, before anything uses it: its parts
    (model, optimizer, loop state, random state), the loop state's fields (a step within the run's
    ``iterations``), and the model's tensor names and ``shapes``. Anything else is a
    [`RunError`][airvae.files.RunError] that names the file and the way out, so a bad checkpoint never leaves a run
    marked "running"."""
    def refuse(problem: str) -> NoReturn:
        raise RunError(f"checkpoint {path} cannot resume this run: {problem}; delete it to restart the run from the "
                       "beginning, or restore it from a copy")

    missing = [part for part in ("model", "optimizer", "state", "rng") if part not in saved]
    if missing:
        refuse(f"it lacks {', '.join(missing)}")
    state, optimizer = saved["state"], saved["optimizer"]
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) or isinstance(state.get(k), bool)
                                          for k, t in _LOOP_STATE.items()):
        refuse(f"its loop state is not {', '.join(_LOOP_STATE)}")
    if not 0 <= state["step"] <= iterations:
        refuse(f"its step {state['step']} is outside the run's 0..{iterations}")
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        refuse("its optimizer state is not Adam's")
    expected = dict(shapes)
    model = saved["model"]
    if not isinstance(model, dict) or not all(isinstance(t, torch.Tensor) for t in model.values()):
        refuse("its model is not a dict of tensors")
    found = {name: tuple(t.shape) for name, t in model.items()}
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or sorted(n for n in found if found[n] != expected[n])
        refuse(f"its model does not match the run's config.json ({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''})")


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """[`read_checkpoint`][airvae.checkpoints.read_checkpoint] without the digest."""
    return read_checkpoint(path, device)[0]


def read_best_weights(path: Path, device: torch.device | str = "cpu",
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header of a ``best.safetensors``
    ([`airvae.runs.best_weights_safetensors`][]), tensors on ``device``.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:  # on the CPU, then moved: any torch device works
            tensors = {name: weights.get_tensor(name) for name in weights.keys()}
            header = dict(weights.metadata() or {})
    except FileNotFoundError as error:
        raise RunError(f"weights {path} do not exist") from error
    except Exception as error:  # noqa: BLE001 - the safetensors parser's own errors: damage
        raise RunError(_corrupt(Path(path), error)) from error
    return {name: tensor.to(device) for name, tensor in tensors.items()}, header


def file_digest(path: Path) -> str:
    """The sha256 of a file, read in blocks."""
    with open(path, "rb") as f:
        return stream_digest(f)


def stream_digest(f: IO[bytes]) -> str:
    """The sha256 of what is left to read of a binary file object."""
    return hashed(hashlib.sha256(), f).hexdigest()
