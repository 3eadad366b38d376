"""Plots of one training run (``airvae plot RUN``): PNGs in ``RUN/plots/``, with the numbers behind
them beside as JSON.

* ``curves`` -- training loss, validation estimate, learning rate and (when tracked) the test bound,
  drawn from ``metrics.jsonl``; ``curves.json`` holds the plotted points, read back from the figure;
* ``samples`` -- the likelihood's mean E[x|z] for ``z ~ N(0, I)`` (any likelihood);
* ``reconstructions`` -- test images and E[x|z] at the clean encoder's mean and, for a denoising
  encoder, the noisy input it sees in training (eq. 13) and E[x|z] at its mean for it;
* ``posterior`` -- active units (Burda et al. 2016: Cov_x E_q[z_u] > 0.01) and the spread of the
  posterior standard deviations, on test examples (``posterior.json``);
* ``weight_norms`` -- WNI runs: each encoder layer's weight-vector norms against H (eq. 18)
  (``weight_norms.json``).

Image figures need images: a run's ``image_shape``, or flat data of a square size (x_dim = 784 for
the paper's three datasets: 28x28); for other runs they are skipped, and
[`RunPlots`][airvae.plots.RunPlots] says why.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn.utils import parametrize

from .data import evenly_spaced, load_dataset
from .devices import resolve_device
from .drawing import pyplot
from .files import RunError, check_writable, read_metrics, save_figure, write_json
from .networks import CappedFilterNorm, CappedWeightNormLinear, DenoisingEncoder
from .runs import METRICS, load_config, load_trained_model

if TYPE_CHECKING:
    from .model import LatentVariableModel

FIGURES = ("curves", "samples", "reconstructions", "posterior", "weight_norms")
PLOTS_DIR = "plots"
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016), section 5.2
# metrics.jsonl key -> panel title (filled from the run's config); the order of the panels
CURVES = {
    "train_loss": "training loss −L_{k} (the objective trained, eq. 16)",
    "val_log_likelihood": "validation estimate: IWAE-{val_k}, encoder q",
    "lr": "learning rate (eq. 43)",
    "test_bound": "test bound L_{k}, encoder q",
}
UNITS = {"train_loss": "nats per example", "val_log_likelihood": "ln p(x), nats per example", "lr": "learning rate",
         "test_bound": "L_k, nats per example"}


@dataclass
class RunPlots:
    """What [`plot_run`][airvae.plots.plot_run] did.

    Attributes:
        directory: the folder the figures went to.
        written: figure name -> PNG path.
        skipped: figure name -> why it was not drawn.
    """

    directory: Path
    written: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def plot_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None, *, which: str = "best",
             examples: int = 1000, seed: int = 0, data_dir: str | None = None, device: str = "auto",
             model: LatentVariableModel | None = None) -> RunPlots:
    """Every figure of a run (module docstring), as ``airvae plot RUN`` draws them.

    Samples and reconstructions show the likelihood's mean E[x|z] (any likelihood), as images when
    the data are images (or flat squares). A figure that cannot be drawn (no checkpoint yet, no
    data, not images, not a WNI run) is skipped with the reason.

    Args:
        run_dir: the run directory.
        out_dir: where the PNGs and JSON go (default ``RUN/plots``).
        which: the checkpoint of the model figures, ``"best"`` or ``"last"``.
        examples: test examples, spread evenly over the split, for the posterior figure.
        seed: fixes the prior samples and the denoising noise.
        data_dir: where the run's dataset files are (offline machines).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        model: for a run of a researcher's own model ([`airvae.fit.fit`][]), an untrained instance to
            load the weights into.

    Returns:
        What was written and what was skipped.
    """
    run_dir = Path(run_dir)
    if not (isinstance(examples, int) and examples >= 1):
        raise ValueError(f"invalid examples = {examples!r}: allowed an integer >= 1")
    on = resolve_device(device)
    cfg = load_config(run_dir)  # a clear error for a folder that is not a run
    out = RunPlots(Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR)
    check_writable(out.directory, run_dir if out_dir is None else None)  # no link on the way, before any work

    metrics = read_metrics(Path(run_dir) / METRICS)
    if metrics:
        _save(_curves_figure(metrics, cfg, out.directory / "curves.json"), out, "curves")
    else:
        out.skipped["curves"] = f"{run_dir / METRICS} has no validation yet"

    try:
        _, model = load_trained_model(run_dir, which=which, device=on, model=model)
    except RunError as error:
        out.skipped.update({name: str(error) for name in FIGURES[1:]})
        return out
    test_x, transpose, no_data = None, False, None
    try:

        dataset = load_dataset(cfg.dataset, data_dir or cfg.data_dir, progress=False)
        if dataset.dim != cfg.x_dim:
            raise ValueError(f"dataset {cfg.dataset!r} now has {dataset.dim} values per example, the run's model "
                             f"takes {cfg.x_dim}")
        test_x = torch.as_tensor(dataset.test[evenly_spaced(len(dataset.test), examples)], dtype=torch.float32,
                                 device=on)
        transpose = "chardata" in dataset.source  # Burda's OMNIGLOT keeps column-major pixels (data.py)
    except (ValueError, OSError) as error:  # DatasetError is a ValueError
        no_data = f"test data unavailable ({error}); pass data_dir / --data-dir"
    shape = image_shape(cfg)
    generator = torch.Generator(device=on).manual_seed(seed)

    with torch.no_grad():
        if shape is None:
            out.skipped["samples"] = out.skipped["reconstructions"] = (
                f"x_dim = {cfg.x_dim} values are not an image (give image data as (N, C, H, W))")
        else:
            _save(_samples_figure(model, generator, shape, transpose, cfg.z_dim), out, "samples")
            if test_x is None:
                assert no_data is not None  # why the test data could not be loaded
                out.skipped["reconstructions"] = no_data
            else:
                shown = test_x[evenly_spaced(len(test_x), 10)]
                _save(_reconstructions_figure(model, shown, seed, shape, transpose), out, "reconstructions")
        if test_x is None:
            assert no_data is not None
            out.skipped["posterior"] = no_data
        else:
            _save(_posterior_figure(model, test_x, out.directory / "posterior.json"), out, "posterior")
        encoder = getattr(model, "encoder", model)
        capped = _capped_layers(encoder) if isinstance(encoder, torch.nn.Module) else []
        if capped:
            _save(_weight_norms_figure(capped, out.directory / "weight_norms.json"), out, "weight_norms")
        else:
            out.skipped["weight_norms"] = "not a WNI run (no weight-norm cap H)"
    return out


def _save(fig, out: RunPlots, name: str) -> None:
    plt = pyplot()
    path = save_figure(fig, out.directory / f"{name}.png", out.directory, dpi=100)
    plt.close(fig)
    out.written[name] = path


def _curves_figure(metrics: list[dict], cfg, json_path: Path):
    """One panel per tracked metric against the step. The plotted points are read back from the
    figure's lines into ``json_path``, so the JSON is what the PNG shows."""
    plt = pyplot()
    keys = [key for key in CURVES if any(key in record for record in metrics)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    drawn = {}
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(r["step"], r[key]) for r in metrics if key in r]
        (line,) = ax.plot(*zip(*points, strict=True), marker="o", markersize=3)
        if key == "val_log_likelihood":
            best = max(points, key=lambda p: p[1])
            ax.axvline(best[0], color="gray", linestyle="--", linewidth=0.8, label=f"best (step {best[0]})")
            ax.legend(fontsize=7)
        if key == "lr":
            ax.set_yscale("log")
        steps, values = line.get_data()
        drawn[key] = {"step": [int(s) for s in steps], "value": [float(v) for v in values]}
        ax.set_title(CURVES[key].format(k=cfg.k, val_k=cfg.val_k), fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel(UNITS[key], fontsize=8)
        ax.grid(alpha=0.3)
    if len(metrics) < 3:  # a smoke run validates twice: say so rather than let two points pass for a curve
        fig.suptitle(f"only {len(metrics)} validation(s): too few points for a curve (a smoke run?)", fontsize=9,
                     color="tab:red")
    fig.tight_layout()
    write_json(json_path, drawn)
    return fig


def image_shape(cfg) -> tuple[int, int, int] | None:
    """``(C, H, W)`` of a run's examples: its image data's own, or a flat square of one channel
    (28x28 binary MNIST); None when they are not images.

    Args:
        cfg (RunConfig | FitConfig): the run's configuration.
    """
    shape = getattr(cfg, "image_shape", None)
    if shape is not None:
        return tuple(shape)
    side = math.isqrt(cfg.x_dim)
    return (1, side, side) if side * side == cfg.x_dim and side > 1 else None


def _image_grid(images: torch.Tensor, shape: tuple[int, int, int], columns: int, transpose: bool) -> np.ndarray:
    """``[n, C*H*W]`` (or ``[n, C, H, W]``) -> one grid of tiles: ``[rows*H, columns*W]`` for one
    channel, ``[..., 3]`` RGB for three (other channel counts: the first channel). Values are shown
    on the range they span when they leave [0, 1] (real-valued data)."""
    c, h, w = shape
    tiles = images.detach().cpu().double().reshape(-1, c, h, w)
    low, high = float(tiles.min()), float(tiles.max())
    if low < 0 or high > 1:  # real-valued data: map what is there onto [0, 1]
        tiles = (tiles - low) / max(high - low, 1e-12)
    tiles = tiles.clamp(0, 1)
    tiles = tiles.permute(0, 2, 3, 1) if c == 3 else tiles[:, 0]
    if transpose:
        tiles = tiles.transpose(1, 2)
    rows = math.ceil(len(tiles) / columns)
    grid = np.ones((rows * h, columns * w, *tiles.shape[3:]))
    for i, tile in enumerate(tiles.numpy()):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = tile
    return grid


def _show(ax, grid: np.ndarray) -> None:
    ax.imshow(grid, cmap=None if grid.ndim == 3 else "gray", vmin=0, vmax=1)
    ax.axis("off")


def _decoded_mean(model, z: torch.Tensor) -> torch.Tensor:
    """E[x|z] under the model's likelihood."""
    return model.likelihood.mean(model.decoder(z))


def _samples_figure(model, generator: torch.Generator, shape, transpose: bool, z_dim: int, n: int = 64):
    plt = pyplot()
    z = torch.randn(n, z_dim, generator=generator, device=generator.device)
    fig, ax = plt.subplots(figsize=(5, 5.3))
    _show(ax, _image_grid(_decoded_mean(model, z), shape, 8, transpose))
    ax.set_title(f"samples: E[x|z] of the {type(model.likelihood).__name__} likelihood, z ~ N(0, I)", fontsize=9)
    fig.tight_layout()
    return fig


def _reconstructions_figure(model, x: torch.Tensor, seed: int, shape, transpose: bool):
    """Rows: x; E[x|z] at the clean encoder's mean; for a denoising encoder also x + eps (what it
    sees in training, eq. 13) and E[x|z] at q(z | x + eps)'s mean."""
    plt = pyplot()
    reconstruct = lambda x_in: _decoded_mean(model, model.encode(x_in)[0])  # noqa: E731 - eval mode: clean
    rows = [("test x", x), ("E[x|z] at the mean of q(z|x), clean encoder", reconstruct(x))]
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, DenoisingEncoder) and encoder.sigma > 0:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)
            noisy_x = encoder.perturb(x, noisy=True)
        rows += [(f"x + eps, eps ~ N(0, {encoder.sigma:.3g}² I): what the denoising encoder sees", noisy_x),
                 ("E[x|z] at the mean of q(z | x + eps)", reconstruct(noisy_x))]
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.15 * len(rows) + 0.3), squeeze=False)
    for ax, (title, images) in zip(axes[:, 0], rows, strict=True):
        _show(ax, _image_grid(images, shape, len(x), transpose))
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def _posterior_figure(model, x: torch.Tensor, json_path: Path):
    plt = pyplot()
    mean, std = model.encode(x)  # eval mode: the clean encoder
    activity = mean.double().var(dim=0).cpu()  # Cov_x E_q[z_u], one value per latent unit
    active = int((activity > ACTIVE_UNIT_THRESHOLD).sum())
    std = std.double().cpu()
    quantiles = dict(zip(("q05", "q50", "q95"), np.quantile(std.numpy(), (0.05, 0.5, 0.95)).tolist(), strict=True))
    write_json(json_path, {"n_examples": int(x.shape[0]), "threshold": ACTIVE_UNIT_THRESHOLD,
                           "active_units": active, "z_dim": int(mean.shape[1]), "activity": activity.tolist(),
                           "std_mean_per_unit": std.mean(dim=0).tolist(), "std_quantiles": quantiles})
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    order = torch.argsort(activity, descending=True)
    a.bar(range(len(activity)), activity[order].clamp_min(1e-8).numpy(), color="tab:blue")
    a.axhline(ACTIVE_UNIT_THRESHOLD, color="black", linestyle="--", linewidth=0.8, label="threshold 0.01")
    a.set_yscale("log")
    a.set_xlabel("latent unit (sorted)")
    a.set_ylabel("Cov_x E_q[z_u]")
    a.set_title(f"{active} of {len(activity)} units active ({x.shape[0]} test examples)", fontsize=9)
    a.legend(fontsize=7)
    b.hist(std.flatten().clamp_min(1e-4).log10().numpy(), bins=50, color="tab:orange")
    b.set_xlabel("log10 posterior std (all units and examples)")
    b.set_title("spread of std: 5% {q05:.2g}, median {q50:.2g}, 95% {q95:.2g}".format(**quantiles), fontsize=9)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


@torch.no_grad()
def _capped_layers(encoder: torch.nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """Every layer that WNI caps (dense and convolution), as (name, each unit's or output channel's
    weight norm, its cap H sigmoid(u), H)."""
    layers = []
    for name, module in encoder.named_modules():
        if isinstance(module, CappedWeightNormLinear):
            layers.append((name, module.weight.norm(dim=1), module.max_norm * torch.sigmoid(module.u),
                           module.max_norm))
        elif parametrize.is_parametrized(module, "weight"):
            for cap in module.parametrizations.weight:
                if isinstance(cap, CappedFilterNorm):
                    layers.append((name, cap.filter_norms(module.weight), cap.max_norm * torch.sigmoid(cap.u),
                                   cap.max_norm))
    return layers


def _weight_norms_figure(capped: list[tuple[str, torch.Tensor, torch.Tensor, float]], json_path: Path):
    """Per capped layer (``_capped_layers``): each unit's weight-vector norm ||w_i|| (sorted; an
    output channel's whole filter for a convolution), its learned cap H sigmoid(u_i), and H; eq. 18
    keeps ||w_i|| <= H sigmoid(u_i) < H."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(capped), figsize=(3.6 * len(capped), 3.2), squeeze=False)
    data = {}
    for ax, (name, norms, caps, max_norm) in zip(axes[0], capped, strict=True):
        norms, caps = norms.cpu(), caps.cpu()
        at_cap = int((norms >= caps * (1 - 1e-4)).sum())
        data[name] = {"H": max_norm, "norms": norms.tolist(), "caps": caps.tolist(), "at_cap": at_cap}
        ax.plot(torch.sort(norms).values.numpy(), ".", markersize=3, label="||w_i||")
        ax.plot(torch.sort(caps).values.numpy(), linewidth=1, label="cap H·sigmoid(u_i)")
        ax.axhline(max_norm, color="black", linestyle="--", linewidth=0.8, label=f"H = {max_norm:.3g}")
        ax.set_title(f"{name}: {at_cap}/{len(norms)} units at their cap", fontsize=8)
        ax.set_xlabel("unit (sorted)")
        ax.set_ylabel("weight-vector norm")
        ax.grid(alpha=0.3)
    # one legend below the panels: inside one it covered the H line
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    write_json(json_path, data)
    return fig
