"""What every estimator shares: the [`Estimate`][airvae.estimators.Estimate] it returns, the per-example random streams
it draws from, and the checks and helpers around a model.

Random draws are tied to (seed, stream, example index): every example owns its random streams, so
an estimate does not depend on how the work is chunked, and chunked and unchunked runs agree for
the same seed (up to floating-point rounding of batched matrix products). Stream 0 is the
scoring stream shared by IWAE-k, the amortized bound and IW-SVI's final scoring (common random
numbers make their comparisons less noisy); the IW-SVI optimization, AIS, BDMC's reverse chains
and the simulation of data from the model use their own streams.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from ..likelihoods import Likelihood, bits_per_dim
from ..model import LatentVariableModel

# Latent samples decoded per chunk: large enough for efficient matmuls, small enough that
# [samples, x_dim] activations stay in cache-friendly memory (2.5k-10k measured best on CPU).
DEFAULT_CHUNK_SAMPLES = 8192

# Random streams per example (see the module docstring).
STREAM_SCORE, STREAM_SVI, STREAM_AIS, STREAM_BDMC_REVERSE, STREAM_SIMULATE = 0, 1, 2, 3, 4
NOISE_BLOCK = 16  # per-step noise is drawn in blocks of this many steps per example (bounded memory)

# A model, or any other module: what frozen() holds.
M = TypeVar("M", bound="torch.nn.Module | LatentVariableModel")
# Entries of an estimate's settings that describe the run rather than set it: averages over the examples,
# which differ between parts of one evaluation (Estimate.concat averages them).
AVERAGED_DIAGNOSTICS = ("mean_acceptance",)


@dataclass
class Estimate:
    """Per-example values of an estimator with its settings and cost: what every estimator returns.

    Attributes:
        name: the estimator and its main setting, e.g. ``iwsvi-5000``.
        values: per-example values in nats, ``[n]`` float64 on the CPU.
        settings: the settings it was computed with.
        seconds: wall time.
        dims: data dimensions per example, for bits/dim (None for a density).
    """

    name: str
    values: torch.Tensor  # [n] float64, on CPU
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    dims: int | None = None  # data dimensions per example, for bits/dim
    # True for a difference of log-likelihoods (the inference gap): its bits/dim keep its sign
    difference: bool = False

    @property
    def mean(self) -> float:
        """The mean over the examples, in nats."""
        return float(self.values.mean())

    @property
    def bits_per_dim(self) -> float | None:
        """The mean as bits per dimension: ``-mean / (dims ln 2)`` for a log-likelihood or a bound
        (exact for discrete likelihoods), ``mean / (dims ln 2)`` for a ``difference`` of them
        (a positive gap is a positive number of bits/dim)."""
        if self.dims is None:
            return None
        return self.mean / (self.dims * math.log(2)) if self.difference else float(bits_per_dim(self.mean, self.dims))

    @property
    def stderr(self) -> float:
        """The standard error of the mean over the examples (NaN for one example)."""
        n = self.values.numel()
        return float(self.values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")

    def to_dict(self, per_example: bool = True) -> dict[str, Any]:
        """A JSON-ready summary: name, settings, mean, stderr, n, seconds and dims, with the per-example
        ``values`` unless ``per_example`` is False.
        """
        out: dict[str, Any] = {"name": self.name, "settings": self.settings, "mean": self.mean, "stderr": self.stderr,
               "n": self.values.numel(), "seconds": self.seconds, "dims": self.dims}
        if self.difference:  # only then: the records of the other estimates keep their keys
            out["difference"] = True
        if per_example:
            out["values"] = self.values.tolist()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Estimate:
        """Inverse of [`to_dict`][airvae.estimators.Estimate.to_dict] (needs the per-example values). A
        ``gap`` stored before records said ``difference`` is read as the difference it is."""
        return cls(d["name"], torch.tensor(d["values"], dtype=torch.float64), dict(d.get("settings", {})),
                   float(d.get("seconds", 0.0)), d.get("dims"), bool(d.get("difference", d["name"] == "gap")))

    @classmethod
    def concat(cls, parts: Sequence[Estimate]) -> Estimate:
        """One estimate of examples evaluated in consecutive parts, each computed with its
        ``first_index`` (so its values are the ones a single call gives): the values joined in order,
        the seconds summed. The parts must agree on everything else, except the diagnostics in
        ``AVERAGED_DIAGNOSTICS`` (AIS's ``mean_acceptance``), averaged over the examples.

        Raises:
            ValueError: no parts, or parts of different estimators or settings.
        """
        if not parts:
            raise ValueError("no parts to join")
        first = parts[0]
        settings = {key: value for key, value in first.settings.items() if key not in AVERAGED_DIAGNOSTICS}
        for part in parts[1:]:
            other = {key: value for key, value in part.settings.items() if key not in AVERAGED_DIAGNOSTICS}
            if (part.name, other, part.dims, part.difference) != (first.name, settings, first.dims, first.difference):
                raise ValueError(f"cannot join estimates {first.name} {settings} and {part.name} {other}: "
                                 "parts of one evaluation share their estimator and settings")
        sizes = [part.values.numel() for part in parts]
        for key in AVERAGED_DIAGNOSTICS:
            if key in first.settings:
                weighted = (part.settings[key] * size for part, size in zip(parts, sizes, strict=True))
                settings[key] = math.fsum(weighted) / max(sum(sizes), 1)
        return cls(first.name, torch.cat([part.values for part in parts]), settings,
                   math.fsum(part.seconds for part in parts), first.dims, first.difference)


# ----------------------------------------------------------------------------------------------
# Random streams


def example_generator(seed: int, index: int, device: torch.device, stream: int = STREAM_SCORE) -> torch.Generator:
    """The random stream ``stream`` of example ``index``: independent of batching and chunking.

    Args:
        seed: the estimator's seed.
        index: the example's index in its split (or among the examples evaluated).
        device: where the generator lives.
        stream: which stream: ``STREAM_SCORE`` (0, shared by IWAE-k, the bound and IW-SVI's scoring:
            common random numbers), ``STREAM_SVI``, ``STREAM_AIS``, ``STREAM_BDMC_REVERSE`` or
            ``STREAM_SIMULATE``.

    Returns:
        A seeded ``torch.Generator``.

    Raises:
        ValueError: a negative ``index`` (its stream would be another seed's).
    """
    if index < 0:
        raise ValueError(f"invalid example index {index}: allowed >= 0 (first_index must not be negative)")
    if stream == STREAM_SCORE:
        state = (seed * 1_000_003 + index) % (2**63)
    else:  # other streams: a well-mixed seed, so they never coincide with stream 0 of another example
        state = int(np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0]) % (2**63)
    return torch.Generator(device=device).manual_seed(state)


class StepNoise:
    """Per-step random draws for a chunk of examples, each example from its own generator.

    ``next()`` returns one standard-normal tensor of shape ``[*normal_shape[:1], b, *normal_shape[1:]]``
    (the example axis second, like log-weights) and, if ``uniform_shape`` is given, a uniform tensor
    laid out the same way. Draws are made in fixed blocks of ``NOISE_BLOCK`` (16) steps per example
    so the stream of an example never depends on which other examples share its chunk.

    Args:
        generators: one per example of the chunk (b of them).
        normal_shape: the shape of one example's standard-normal draw per step.
        uniform_shape: the shape of one example's uniform draw per step (None: none).
        device (torch.device): where the draws are made.
        dtype (torch.dtype): their dtype.
    """

    def __init__(self, generators: list[torch.Generator], normal_shape: tuple[int, ...],
                 uniform_shape: tuple[int, ...] | None, device: torch.device, dtype: torch.dtype) -> None:
        self.gens, self.normal_shape, self.uniform_shape = generators, normal_shape, uniform_shape
        self.device, self.dtype = device, dtype
        self._normal: torch.Tensor = torch.empty(0)  # [block, n0, b, ...], drawn by the first next()
        self._uniform: torch.Tensor | None = None
        self._pos = NOISE_BLOCK  # the block is used up

    def _refill(self) -> None:
        normals, uniforms = [], []
        for g in self.gens:
            normals.append(torch.randn(NOISE_BLOCK, *self.normal_shape, generator=g, device=self.device,
                                       dtype=self.dtype))
            if self.uniform_shape is not None:
                uniforms.append(torch.rand(NOISE_BLOCK, *self.uniform_shape, generator=g, device=self.device,
                                           dtype=self.dtype))
        self._normal = torch.stack(normals, dim=2)  # [block, n0, b, ...]
        self._uniform = torch.stack(uniforms, dim=2) if uniforms else None
        self._pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next step's ``(normal, uniform or None)`` draws."""
        if self._pos == NOISE_BLOCK:
            self._refill()
        i, self._pos = self._pos, self._pos + 1
        return self._normal[i], (self._uniform[i] if self._uniform is not None else None)


# ----------------------------------------------------------------------------------------------
# The model: checks, inputs, latent size, freezing, encoding


def model_device(model: torch.nn.Module | LatentVariableModel) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_model(model: object) -> None:
    """A clear error for a model that does not follow [`airvae.model.LatentVariableModel`][]."""
    missing = [name for name in ("encode", "decoder", "likelihood") if not hasattr(model, name)]
    if not isinstance(model, torch.nn.Module) or missing or not isinstance(model.likelihood, Likelihood):
        what = f"missing {', '.join(missing)}" if missing else (
            "not an nn.Module" if not isinstance(model, torch.nn.Module)
            else f"likelihood is {type(model.likelihood).__name__}, not an airvae.likelihoods.Likelihood")
        raise TypeError(f"{type(model).__name__} cannot be evaluated ({what}): the estimators need an nn.Module "
                        "with encode(x) -> (mean, std), a decoder module z -> likelihood parameters and a "
                        "likelihood attribute (e.g. airvae.Bernoulli()); see airvae.model.LatentVariableModel")


def as_input(model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any]) -> torch.Tensor:
    """``x`` (tensor or array of any dtype) as float32 on the model's device, after checking that the
    model follows the protocol and that its likelihood can score x."""
    check_model(model)
    examples = torch.as_tensor(x).to(device=model_device(model), dtype=torch.float32)
    model.likelihood.validate(examples)
    return examples


def data_dims(model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any] | Sequence[Any]) -> int | None:
    """Data dimensions per example of ``x``, for bits/dim; None where bits/dim mean nothing (a density
    over real values, not a probability of discrete data).

    Args:
        model: the model, whose likelihood says whether it is discrete.
        x (torch.Tensor | numpy.ndarray | list): the examples.
    """
    return math.prod(np.shape(x)[1:]) if getattr(model.likelihood, "discrete", True) else None


def latent_dim(model: LatentVariableModel, x: torch.Tensor | np.ndarray[Any, Any] | None = None) -> int:
    """The latent size: ``model.z_dim``, else ``model.decoder.z_dim``, else the width of the
    encoder's mean for the first example of ``x``."""
    for owner in (model, model.decoder):
        z_dim = getattr(owner, "z_dim", None)
        if isinstance(z_dim, int):
            return z_dim
    if x is None:
        raise ValueError(f"the latent size of {type(model).__name__} is unknown: give the model (or its decoder) "
                         "a z_dim attribute, or pass z_dim")
    with torch.no_grad(), frozen(model):
        return int(model.encode(as_input(model, x[:1]))[0].shape[-1])


@contextmanager
def frozen(model: M) -> Iterator[M]:
    """Eval mode and ``requires_grad=False`` on every parameter, restored on exit.

    Per-example optimization (IW-SVI) and HMC (AIS) differentiate with respect to q's parameters
    or z only; freezing keeps the decoder out of the autograd graph, so no ``.grad`` is ever
    accumulated on it and nothing can update it.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@torch.no_grad()
def encode_all(model: LatentVariableModel, x: torch.Tensor, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's (mean, std) for every example: clean, since callers hold the model
    [`frozen`][airvae.estimators.frozen]
    (eval mode)."""
    means, stds = [], []
    for start in range(0, x.shape[0], batch):
        m, s = model.encode(x[start:start + batch])
        means.append(m)
        stds.append(s)
    return torch.cat(means), torch.cat(stds)


def check_k(name: str, value: int) -> None:
    """Refuse a sample or step count that is not an integer >= 1, naming it."""
    if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"invalid {name} = {value!r}: allowed an integer >= 1")
