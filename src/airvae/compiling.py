"""When and how airvae compiles its log-weights kernels with torch.compile: the compile policy
(``auto``, on, off), the kernels' cache, and a fallback to eager when compiling fails. Used by the
model ([`airvae.model`][airvae.model]), training and the estimators; nothing here knows a model.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

# Compiling fuses the elementwise work around the matrix products (softplus, the x * logits
# reduction, ELU, the reparameterization, WNI's weight rescaling) into single passes, forward and
# backward. The amortized path (training and IWAE-k) compiles encoder and decoder together; IW-SVI
# compiles the decoder kernel (speed-ups measured in benchmarks/README.md). The price is a one-off
# compilation per process and graph, seconds to tens of seconds (cached on disk by Inductor). Hence
# the default, ``auto``: long work (training runs of >= LONG_TRAINING_STEPS steps,
# paper-sized evaluations) compiles, short work (smoke and quick budgets, tests) never pays the
# cold start. AIRVAE_COMPILE=1/0 or set_compile() override it. Random draws always stay outside
# the compiled graphs, so streams (and results, to float rounding) match eager.

COMPILE_ENV = "AIRVAE_COMPILE"
LONG_TRAINING_STEPS = 100_000  # minutes of training steps: the one-off compilation is then small
LONG_EVALUATION_LATENTS = 50_000_000  # latents decoded by an evaluation: likewise minutes of work

T = TypeVar("T")


class _CompileState:
    def __init__(self) -> None:
        value = os.environ.get(COMPILE_ENV, "").strip().lower()
        self.mode = "auto" if value in ("", "auto") else ("off" if value in ("0", "false", "no", "off") else "on")
        self.enabled = self.mode == "on"
        self.fns: dict[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] = {}


_compile = _CompileState()


def set_compile(enabled: bool | None = True) -> None:
    """Use (``True``) or never use (``False``) torch.compile'd log-weights kernels, in training and
    every estimator; ``None`` restores ``auto`` (compile long work only, see [`compile_for`][airvae.compiling.compile_for]).
    Results agree with eager to float rounding and the random draws are identical. Default:
    ``AIRVAE_COMPILE`` (1, 0 or unset = auto)."""
    _compile.mode = "auto" if enabled is None else ("on" if enabled else "off")
    _compile.enabled = bool(enabled)


def compile_for(long_work: bool) -> bool:
    """Called before a job: in ``auto`` mode, compile exactly when the job is long. Returns
    whether kernels are compiled."""
    if _compile.mode == "auto":
        _compile.enabled = bool(long_work)
    return _compile.enabled


def torch_compile(fn: Callable[..., T], mode: str | None = None) -> Callable[..., T]:
    """``torch.compile(fn)`` with airvae's settings: a persistent cache, static shapes, and room for
    the graphs of many runs (and stacked groups) in one process."""
    # A persistent compile cache unless the user chose one (Inductor's default lives in /tmp), and
    # only a private one: Inductor runs the code it finds there.
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "airvae" / "torchinductor"
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ and _private_folder(cache):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    # Static shapes: one specialised graph per (architecture, grad mode, shape); a run sees a
    # handful (training, evaluation chunks, the last partial chunk, IW-SVI). Dynamic-shape kernels
    # were measurably slower for the small training shapes. Several runs or groups in one process
    # must not hit Dynamo's default limit of 8 graphs and silently fall back to eager.
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(fn, dynamic=False, mode=mode)


def _private_folder(folder: Path) -> bool:
    """Create ``folder`` (mode 0700) if missing; is it, and the folder holding it, a real folder
    that only this user owns and can write? Where it is not (a link, someone else's, writable by
    others), airvae keeps Inductor's own default cache."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        found = [os.lstat(f) for f in (folder.parent, folder)]
    except OSError:
        return False
    owner = os.getuid() if hasattr(os, "getuid") else None
    return all(stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o022 and owner in (None, st.st_uid) for st in found)


def call_compiled(compiled: Callable[..., T], eager: Callable[..., T], args: tuple[Any, ...],
                  what: str) -> tuple[T, bool]:
    """``compiled(*args)``; if compiling fails (no C++ compiler, an unsupported platform...), warn
    once and return ``eager(*args)``. Returns (output, whether the compiled version worked)."""
    try:
        return compiled(*args), True
    except Exception as exc:  # noqa: BLE001
        out = eager(*args)  # a genuine error raises here again
        warnings.warn(f"torch.compile of {what} failed ({type(exc).__name__}: {exc}); continuing without it",
                      RuntimeWarning, stacklevel=3)
        return out, False


def run_kernel(kernel: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``kernel(*args)``, compiled when compilation is on."""
    if not _compile.enabled:
        return kernel(*args)
    compiled = _compile.fns.get(kernel)
    if compiled is None:
        compiled = _compile.fns[kernel] = torch_compile(kernel)
    out, worked = call_compiled(compiled, kernel, args, "the log-weights kernel")
    if not worked:
        _compile.enabled, _compile.mode = False, "off"
    return out
