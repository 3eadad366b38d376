"""Memory a setting needs, estimated from the configuration before any work, against what the
device has: a setting that cannot fit is refused with both numbers instead of failing mid-run.

The estimates count the float32 tensors that dominate (parameters with their gradients and Adam
moments, the dataset resident on the device, activations kept for the backward pass, random
draws) and are meant to be within a small factor of the truth: good enough to tell 2 GiB from
2 TiB, not to pack a GPU to the last megabyte.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import ConfigError, RunConfig
from .estimators import DEFAULT_CHUNK_SAMPLES
from .estimators.registry import REGISTRY, EstimatorSettings, Footprint
from .networks import conv_map_shapes, parse_spec

FLOAT = 4  # bytes per float32
GiB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes needed by a piece of work, as the sum of named parts."""

    what: str  # the work, e.g. "training"
    parts: dict[str, int]  # name -> bytes

    @property
    def bytes(self) -> int:
        return sum(self.parts.values())

    def __str__(self) -> str:
        detail = ", ".join(f"{name} {format_bytes(n)}" for name, n in sorted(self.parts.items(), key=lambda p: -p[1]))
        return f"{self.what} needs about {format_bytes(self.bytes)} of memory ({detail})"


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 2**10:.3g} KiB"


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``; None when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(need: MemoryEstimate, device: torch.device, advice: str) -> None:
    """Raise ConfigError when ``need`` exceeds the memory ``device`` has available."""
    have = available_memory(device)
    if have is not None and need.bytes > have:
        raise ConfigError(f"{need}, but {device} has {format_bytes(have)} available; {advice}")


def largest_group(need: Callable[[int], MemoryEstimate], device: torch.device, runs: int, share: float = 0.8) -> int:
    """The most runs, up to ``runs``, that ``need(n)`` (a MemoryEstimate for n stacked runs) fits
    in ``share`` of the memory ``device`` has available; at least 1 (one run alone is checked again
    where it trains)."""
    have = available_memory(device)
    if have is None:
        return runs
    n = runs
    while n > 1 and need(n).bytes > share * have:
        n = max(1, min(n - 1, int(n * share * have / need(n).bytes)))  # the estimate is about linear in n
    return n


def _widths(spec: str, role: str) -> tuple[int, ...]:

    return parse_spec(spec, role)[1]


def _dense_parameters(inputs: int, hidden: tuple[int, ...], outputs: int) -> int:
    sizes = (inputs, *hidden, outputs)
    return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def _conv_sizes(cfg: RunConfig, role: str) -> tuple[int, int, int]:
    """(parameters, floats of one example's feature maps, floats of the map next to the dense layers)
    of the encoder's or decoder's convolutions; zeros without any."""

    convs = parse_spec(getattr(cfg.architecture, role), role)[0]
    if not convs:
        return 0, 0, 0
    if role == "decoder":
        convs = convs[::-1]  # the encoder it mirrors: its maps are the decoder's, walked backwards
    assert cfg.image_shape is not None  # convolutions need images: RunConfig refuses them otherwise
    shapes = conv_map_shapes(cfg.image_shape, convs)
    channels = [shape[0] for shape in shapes]  # layer i maps channels[i] <-> channels[i + 1]
    if role == "decoder":
        channels[0] *= cfg.likelihood.params_per_dim  # the last transposed convolution emits P per channel
    weights = sum((channels[i] * channels[i + 1]) * conv.kernel ** 2 + channels[i + 1] for i, conv in enumerate(convs))
    return weights, sum(math.prod(shape) for shape in shapes[1:]), math.prod(shapes[-1])


def _decoded_row(cfg: RunConfig) -> int:
    """Floats held per decoded latent: z, the reparameterization terms, each hidden layer's (and
    feature map's) pre- and post-activation, and the P parameters per dimension with the
    likelihood's intermediate terms."""
    maps = _conv_sizes(cfg, "decoder")[1]
    return (3 * cfg.architecture.z_dim + 2 * sum(_widths(cfg.architecture.decoder, "decoder")) + 2 * maps
            + 3 * cfg.likelihood.params_per_dim * cfg.x_dim)


def _encoder_row(cfg: RunConfig) -> int:
    """Floats held per encoded example: the input, hidden layers and feature maps, and the heads."""
    maps = _conv_sizes(cfg, "encoder")[1]
    return 2 * sum(_widths(cfg.architecture.encoder, "encoder")) + 2 * maps + 4 * cfg.architecture.z_dim + cfg.x_dim


def model_bytes(cfg: RunConfig, optimizer: bool = True) -> int:
    """Parameters (and, when training, their gradients and Adam's two moments)."""
    arch = cfg.architecture
    encoder_convs, _, encoder_flat = _conv_sizes(cfg, "encoder")
    decoder_convs, _, decoder_flat = _conv_sizes(cfg, "decoder")
    encoder = encoder_convs + _dense_parameters(encoder_flat or cfg.x_dim, _widths(arch.encoder, "encoder"),
                                                2 * arch.z_dim)
    decoder = decoder_convs + _dense_parameters(arch.z_dim, _widths(arch.decoder, "decoder"),
                                                decoder_flat or cfg.likelihood.params_per_dim * cfg.x_dim)
    return FLOAT * (encoder + decoder) * (4 if optimizer else 1) + FLOAT * encoder  # + WNI's computed weights


def iwae_bytes(cfg: RunConfig, k: int, examples: int, chunk_samples: int) -> int:
    """One chunk of [`airvae.estimators.iwae_given_q`][]: all k draws of its examples plus the
    decoded latents of the chunk (no gradients)."""
    per_chunk = max(1, min(examples, chunk_samples // k))
    k_chunk = min(k, chunk_samples)
    return FLOAT * per_chunk * (k * cfg.architecture.z_dim + k_chunk * (_decoded_row(cfg) + 2))


def training_memory(cfg: RunConfig, rows_on_device: int, runs: int = 1) -> MemoryEstimate:
    """Peak memory of [`airvae.train.train`][] (or of a stacked group of ``runs`` such runs,
    [`airvae.stacked`][]): models, optimizers, the resident data (shared by a group), and the
    larger of one training step and one validation chunk (a group splits its chunk among its runs)."""
    reg = cfg.regularizer
    passes = 2 if reg.two_bounds else 1  # eq. 16 computes both bounds
    latents = cfg.batch_size * cfg.m * cfg.k
    # activations kept for backward, and the gradients of the same size during it
    step = runs * 2 * FLOAT * passes * (latents * _decoded_row(cfg) + cfg.batch_size * _encoder_row(cfg))
    validation = iwae_bytes(cfg, cfg.val_k, cfg.val_examples or 10**9, DEFAULT_CHUNK_SAMPLES)
    tracked = iwae_bytes(cfg, cfg.k, cfg.track_test_examples, DEFAULT_CHUNK_SAMPLES) if cfg.track_test_examples else 0
    group = f"{runs} runs' " if runs > 1 else ""
    work = {f"{group}a step decoding batch_size x m x k = {latents:,} latents": step,
            f"validation with val_k = {cfg.val_k:,}": validation, "tracking the test bound": tracked}
    largest = max(work, key=work.__getitem__)  # steps and validations take turns: only the larger counts
    return MemoryEstimate("training", {f"{group}parameters, gradients and Adam moments": runs * model_bytes(cfg),
                                       "data on the device": FLOAT * cfg.x_dim * rows_on_device,
                                       largest: work[largest]})


def evaluation_memory(cfg: RunConfig, settings: EstimatorSettings, examples: int, runs: int = 1) -> MemoryEstimate:
    """Peak memory of [`airvae.evaluation.evaluate_model`][] on ``examples`` examples of a run
    (or of ``runs`` such runs evaluated together, [`airvae.stacked.evaluate_group`][]): the
    largest part any chosen estimator needs
    ([`airvae.estimators.Estimator.memory`][airvae.estimators.registry.Estimator.memory]), since
    they run one after the other."""
    footprint = Footprint(z_dim=cfg.architecture.z_dim, row=_decoded_row(cfg), training_k=cfg.k,
                          iwae=lambda k, n, chunk_samples: iwae_bytes(cfg, k, n, chunk_samples), float_bytes=FLOAT)
    parts: dict[str, int] = {}
    for name in settings.estimators:
        parts.update(REGISTRY[name].memory(footprint, settings, examples))
    largest = max(parts, key=parts.__getitem__)
    return MemoryEstimate("evaluation", {"parameters": runs * model_bytes(cfg, optimizer=False),
                                         "data on the device": FLOAT * cfg.x_dim * examples,
                                         largest: runs * parts[largest]})
