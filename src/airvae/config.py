"""Typed, validated configuration and the paper's presets (Tables 6 and 7, appendix E).

Everything a run needs is one :class:`RunConfig`. It is validated when built, before any work,
and round-trips through JSON (``config.json`` in every run directory).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """An invalid setting; the message names the field and the allowed values."""


@dataclass(frozen=True)
class Architecture:
    """Encoder/decoder hidden layers (Table 6 notation) and latent size."""

    encoder: str
    decoder: str
    z_dim: int = 64


# Table 6. "mnist-large" is the over-expressive encoder of appendix A / Table 4.
ARCHITECTURES: dict[str, Architecture] = {
    "mnist": Architecture("d300-d300", "d300-d300"),
    "mnist-large": Architecture("d1000-d1000-d1000", "d300-d300"),
    "omniglot": Architecture("d200-d200", "d200-d200"),
    "caltech": Architecture("d500", "d500"),
}


@dataclass(frozen=True)
class Schedule:
    """Optimisation settings of Table 6: initial learning rate, iterations, batch size."""

    lr: float
    iterations: int
    batch_size: int


PAPER_SCHEDULES: dict[str, Schedule] = {
    "mnist": Schedule(1e-3, 1_500_000, 100),
    "omniglot": Schedule(1e-3, 1_500_000, 100),
    "caltech": Schedule(1e-4, 400_000, 10),
}


@dataclass(frozen=True)
class Budget:
    """How much compute a run gets. ``iterations_fraction`` scales Table 6's iteration counts
    (per dataset, with a "default" entry)."""

    iterations_fraction: dict
    validations: int  # validation estimates over the run (early stopping granularity)
    val_k: int  # importance samples of the validation log-likelihood estimate
    val_examples: int | None  # None: the whole validation split
    max_iterations: int | None = None
    lr_scale: dict = dataclasses.field(default_factory=dict)  # dataset -> factor on Table 6's lr


BUDGETS: dict[str, Budget] = {
    # seconds: exercises every code path, numbers are meaningless
    "smoke": Budget(iterations_fraction={"default": 0.0}, validations=2, val_k=8, val_examples=64,
                    max_iterations=40),
    # minutes on a laptop CPU: 1% of the paper's iterations (15k steps, ~30 epochs of MNIST). Caltech
    # gets 2% (8k steps, 20 epochs) at 10x Table 6's lr: at lr 1e-4 its validation estimate was still
    # at -142 nats after 10k steps (measured), far from the overfitting regime AIR is about; at 1e-3
    # it reached -122.
    "quick": Budget(iterations_fraction={"default": 0.01, "caltech": 0.02}, validations=10, val_k=100,
                    val_examples=1000, lr_scale={"caltech": 10.0}),
    # appendix E exactly: early stopping on IWAE-5000 over the whole validation set
    "paper": Budget(iterations_fraction={"default": 1.0}, validations=150, val_k=5000, val_examples=None),
}


@dataclass(frozen=True)
class Regularizer:
    """AIR settings. ``sigma`` is the denoising noise std (eq. 13), ``alpha`` the partial-denoising
    weight (eq. 16), ``max_norm`` the WNI cap H (eq. 18). sigma = 0 and H = inf: plain VAE/IWAE."""

    sigma: float = 0.0
    alpha: float = 1.0
    max_norm: float = math.inf

    def __post_init__(self):
        _check(self.sigma >= 0 and math.isfinite(self.sigma), "sigma", self.sigma, "a finite number >= 0")
        _check(0.0 <= self.alpha <= 1.0, "alpha", self.alpha, "[0, 1]")
        _check(self.max_norm > 0, "H (max_norm)", self.max_norm, "> 0 (use inf for no cap)")

    @classmethod
    def from_paper(cls, x_dim: int, sigma_sqrt_d: float = 0.0, ten_over_h: float = 0.0,
                   alpha: float = 1.0) -> "Regularizer":
        """Table 7's parameterization: ``sigma * sqrt(d)`` and ``10 / H`` (0 means H = inf)."""
        _check(sigma_sqrt_d >= 0, "sigma*sqrt(d)", sigma_sqrt_d, ">= 0")
        _check(ten_over_h >= 0, "10/H", ten_over_h, ">= 0 (0 means H = inf)")
        return cls(sigma=sigma_sqrt_d / math.sqrt(x_dim), alpha=alpha,
                   max_norm=math.inf if ten_over_h == 0 else 10.0 / ten_over_h)

    @property
    def name(self) -> str:
        """The paper's model name for the encoder family (k is added by the caller)."""
        parts = []
        if self.sigma > 0:
            parts.append(f"D(a={self.alpha:g})")
        if math.isfinite(self.max_norm):
            parts.append("WNI")
        return "+".join(parts) or "plain"


@dataclass(frozen=True)
class RunConfig:
    """A complete, validated training run."""

    dataset: str
    architecture: Architecture
    x_dim: int = 784
    regularizer: Regularizer = field(default_factory=Regularizer)
    k: int = 1
    m: int = 1
    seed: int = 0
    lr: float = 1e-3
    iterations: int = 1000
    batch_size: int = 100
    lr_final_fraction: float = 0.1  # eq. 43: lr decays to 0.1 * lr0 over the run
    val_every: int = 100
    val_k: int = 100
    val_examples: int | None = 1000
    patience: int | None = None  # validations without improvement before stopping; None: never
    track_test_examples: int = 0  # >0: log the amortized bound L_k on this many test examples at each
    # validation (Figure 4's curves). Monitoring only: early stopping never looks at it.
    checkpoint_every: int = 100
    data_dir: str | None = None
    device: str = "auto"
    budget: str = "custom"

    def __post_init__(self):
        _check(self.k >= 1, "k", self.k, "an integer >= 1")
        _check(self.m >= 1, "m", self.m, "an integer >= 1")
        _check(self.iterations >= 1, "iterations", self.iterations, "an integer >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a finite number > 0")
        _check(0 < self.lr_final_fraction <= 1, "lr_final_fraction", self.lr_final_fraction, "(0, 1]")
        _check(self.val_every >= 1, "val_every", self.val_every, "an integer >= 1")
        _check(self.val_k >= 1, "val_k", self.val_k, "an integer >= 1")
        _check(self.val_examples is None or self.val_examples >= 1, "val_examples", self.val_examples,
               "an integer >= 1, or None for the whole split")
        _check(self.patience is None or self.patience >= 1, "patience", self.patience, ">= 1 or None")
        _check(self.track_test_examples >= 0, "track_test_examples", self.track_test_examples, "an integer >= 0")
        _check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "an integer >= 1")
        _check(self.x_dim >= 1, "x_dim", self.x_dim, "an integer >= 1")
        _check(self.architecture.z_dim >= 1, "z_dim", self.architecture.z_dim, "an integer >= 1")
        _check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
               self.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")

    @property
    def model_name(self) -> str:
        """Paper naming: VAE/IWAE-k, DVAE/DIWAE, WNI-VAE/WNI-IWAE."""
        base = "VAE" if self.k == 1 else f"IWAE-{self.k}"
        reg = self.regularizer
        prefix = ""
        if math.isfinite(reg.max_norm):
            prefix += "WNI-"
        if reg.sigma > 0:
            prefix += "D"
            suffix = f" (alpha={reg.alpha:g})"
        else:
            suffix = ""
        return f"{prefix}{base}{suffix}"

    def lr_at(self, step: int) -> float:
        """Eq. 43: ``lr_t = lr_0 * 0.1^(t / (T - 1))``."""
        if self.iterations == 1:
            return self.lr
        return self.lr * self.lr_final_fraction ** (step / (self.iterations - 1))

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["regularizer"]["max_norm"] = _encode_float(self.regularizer.max_norm)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "RunConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}; known fields: {sorted(known)}")
        data["architecture"] = Architecture(**data["architecture"])
        reg = dict(data.get("regularizer", {}))
        if "max_norm" in reg:
            reg["max_norm"] = float(reg["max_norm"])
        data["regularizer"] = Regularizer(**reg)
        return cls(**data)


def _encode_float(value: float):
    return "inf" if math.isinf(value) else value


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {name} = {value!r}: allowed {allowed}")


def resolve_run_config(
    dataset: str,
    *,
    x_dim: int,
    budget: str = "quick",
    architecture: str | None = None,
    encoder: str | None = None,
    decoder: str | None = None,
    z_dim: int | None = None,
    regularizer: Regularizer | None = None,
    **overrides,
) -> RunConfig:
    """Build a RunConfig from the presets: Table 6 for the dataset (or a named architecture),
    scaled by the budget, then explicit overrides (``None`` values are ignored)."""
    _check(budget in BUDGETS, "budget", budget, f"one of {sorted(BUDGETS)}")
    preset_key = dataset if dataset in ARCHITECTURES else "mnist"
    arch_key = architecture or preset_key
    _check(arch_key in ARCHITECTURES, "architecture", arch_key, f"one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[arch_key]
    arch = Architecture(encoder or arch.encoder, decoder or arch.decoder, z_dim or arch.z_dim)
    schedule = PAPER_SCHEDULES.get(dataset, PAPER_SCHEDULES["mnist"])
    b = BUDGETS[budget]
    fraction = b.iterations_fraction.get(dataset, b.iterations_fraction["default"])
    iterations = max(1, round(schedule.iterations * fraction))
    if b.max_iterations is not None:
        iterations = min(iterations, b.max_iterations) if fraction else b.max_iterations
    overrides = {key: value for key, value in overrides.items() if value is not None}
    iterations = overrides.pop("iterations", iterations)
    val_every = overrides.pop("val_every", max(1, iterations // b.validations))
    defaults = dict(
        dataset=dataset, architecture=arch, x_dim=x_dim, regularizer=regularizer or Regularizer(),
        lr=schedule.lr * b.lr_scale.get(dataset, 1.0),
        iterations=iterations, batch_size=schedule.batch_size, val_every=val_every, val_k=b.val_k,
        val_examples=b.val_examples, checkpoint_every=val_every, budget=budget,
    )
    defaults.update(overrides)
    return RunConfig(**defaults)
