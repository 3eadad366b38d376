"""Typed, validated configuration and the paper's presets (Tables 6 and 7, appendix E).

Everything a run needs is one [`RunConfig`][airvae.config.RunConfig]. It is validated when built, before any work,
and round-trips through JSON (``config.json`` in every run directory).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, TypeVar

from .likelihoods import Bernoulli, DiscretizedLogistic, Gaussian, Likelihood
from .networks import conv_map_shapes, parse_spec
from .objectives import Denoising

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")

MAX_SEED = 2**32 - 1  # seeds feed torch.manual_seed and derived streams (seed * 100_003 + epoch)
# Upper bounds of settings: far beyond what the paper or any sensible run uses (its largest: 1.5e6 steps,
# k = 5000, lr 1e-3, sigma*sqrt(d) = 17.5, i.e. sigma = 0.63), low enough that a typo (1e30, 1e308) is
# refused before anything is written instead of diverging or running for ever.
MAX_LR = 1.0  # Adam's step is about lr per parameter: beyond 1 any of these models diverges
MAX_SIGMA = 100.0  # denoising noise std: 100 times the range of binary or grey-level data
MAX_NORM = 1e6  # the WNI cap H (inf, no cap, is allowed): weights of norm 1e6 are no cap at all
MAX_STD = 1e6  # a Gaussian likelihood's std
MAX_ITERATIONS = 10**8  # training steps (and steps between validations or checkpoints)
MAX_SAMPLES = 10**7  # importance samples (k, m, validation k) per example
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:(0|[1-9][0-9]*))?")


class ConfigError(ValueError):
    """An invalid setting; the message names the field and the allowed values."""


class _Data(Protocol):
    """What RunConfig.check_dataset needs of a dataset (also read, when it has them: levels, image_shape)."""

    @property
    def dim(self) -> int: ...


class _Schedule(Protocol):
    """What eq. 43's learning-rate schedule reads of a configuration (RunConfig and FitConfig have it)."""

    @property
    def lr(self) -> float: ...

    @property
    def lr_final_fraction(self) -> float: ...

    @property
    def iterations(self) -> int: ...


def require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {name} = {value!r}: allowed {allowed}")


def is_int(value: object) -> TypeGuard[int]:
    """A true integer (``bool`` is not one, whatever Python says)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: object, minimum: int = 1, maximum: int | None = None) -> None:
    allowed = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    require(is_int(value) and value >= minimum and (maximum is None or value <= maximum), name, value, allowed)


def check_device_name(name: object) -> None:
    """Syntax only ("auto", "cpu", "mps", "cuda", "cuda:N"); availability is checked where the
    device is used ([`airvae.devices.resolve_device`][airvae.estimators.resolve_device])."""
    require(isinstance(name, str) and _DEVICE.fullmatch(name) is not None, "device", name,
           "auto, cpu, cuda, cuda:N (N >= 0) or mps")


def check_hidden_spec(name: str, spec: str) -> None:
    """``name`` ("encoder" or "decoder") is a valid architecture spec ([`airvae.networks`][])."""

    require(isinstance(spec, str) and spec.strip() != "", name, spec,
           "layers like d300-d300 or c32k4s2-c64k4s2, or 'none' for no hidden layer")
    try:
        parse_spec(spec, name)
    except ValueError as error:
        raise ConfigError(f"invalid {name} = {spec!r}: {error}") from None


@dataclass(frozen=True)
class Architecture:
    """A model's layers and latent size.

    Attributes:
        encoder: the encoder's spec, Table 6's notation (``d300-d300``: two dense ELU layers of 300
            units), with ``c32k4s2`` convolutions for image data ([`airvae.networks`][]).
        decoder: the decoder's spec (dense layers first).
        z_dim: the latent size.
    """

    encoder: str
    decoder: str
    z_dim: int = 64

    def __post_init__(self) -> None:
        check_hidden_spec("encoder", self.encoder)
        check_hidden_spec("decoder", self.decoder)
        check_int("z_dim", self.z_dim)

    @property
    def convolutional(self) -> bool:
        """Whether either network has convolution layers (which need image data)."""

        return bool(parse_spec(self.encoder, "encoder")[0] or parse_spec(self.decoder, "decoder")[0])


# Table 6. "mnist-large" is the over-expressive encoder of appendix A / Table 4. "digits" is not the
# paper's: a small conv VAE for 8x8 grey-level images (8x8 -> 4x4 -> 2x2 maps, 256 units, and back),
# large enough to overfit digits' 1197 training images within the quick budget (the VAE's validation
# estimate peaked at steps 1800, 2700 and 2100 of 3000 in seeds 0-2: results/grey-conv-digits-quick).
ARCHITECTURES: dict[str, Architecture] = {
    "mnist": Architecture("d300-d300", "d300-d300"),
    "mnist-large": Architecture("d1000-d1000-d1000", "d300-d300"),
    "omniglot": Architecture("d200-d200", "d200-d200"),
    "caltech": Architecture("d500", "d500"),
    "digits": Architecture("c32k3s2-c64k3s2-d256", "d256-c64k3s2-c32k3s2", z_dim=16),
}

LIKELIHOODS = ("bernoulli", "gaussian", "discretized-logistic")
MAX_BINS = 65536


@dataclass(frozen=True)
class LikelihoodConfig:
    """p(x|z) of a run ([`airvae.likelihoods`][]). ``std`` and ``std_mode`` apply to ``gaussian``
    only (the fixed std, or the initial value of a learned one), ``num_bins`` and ``components`` to
    ``discretized-logistic`` only (the data lie on the grid ``i / (num_bins - 1)``); a setting given
    for another likelihood is refused rather than ignored."""

    kind: str = "bernoulli"
    std: float = 1.0
    std_mode: str = "global"
    num_bins: int = 256
    components: int = 1

    def __post_init__(self) -> None:

        require(self.kind in LIKELIHOODS, "likelihood", self.kind, " | ".join(LIKELIHOODS))
        require(is_real(self.std) and 1e-3 < self.std <= MAX_STD, "gaussian std", self.std,
               f"a number > 0.001 (the floor of learned stds) and <= {MAX_STD:g}")
        require(self.std_mode in Gaussian.STD_MODES, "std_mode", self.std_mode, " | ".join(Gaussian.STD_MODES))
        check_int("num_bins", self.num_bins, 2, MAX_BINS)
        check_int("components", self.components, 1, 1024)
        default = LikelihoodConfig.__dataclass_fields__
        for name, owner in (("std", "gaussian"), ("std_mode", "gaussian"), ("num_bins", "discretized-logistic"),
                            ("components", "discretized-logistic")):
            require(self.kind == owner or getattr(self, name) == default[name].default,
                   "gaussian std" if name == "std" else name, getattr(self, name),
                   f"only with the {owner} likelihood (this one is {self.kind!r})")

    @classmethod
    def for_data(cls, levels: int | None) -> LikelihoodConfig:
        """The default for data with ``levels`` values per dimension (None: real-valued): Bernoulli for
        binary data, a discretized logistic on the data's grid for grey levels, a Gaussian otherwise."""
        if levels == 2:
            return cls()
        return cls("gaussian") if levels is None else cls("discretized-logistic", num_bins=levels)

    @property
    def params_per_dim(self) -> int:
        """P: parameters the decoder emits per data dimension (the likelihood's own count)."""
        return self.build(1).params_per_dim

    def build(self, x_dim: int) -> Likelihood:
        """The [`airvae.likelihoods.Likelihood`][] for data of ``x_dim`` dimensions."""

        if self.kind == "gaussian":
            return Gaussian(self.std, self.std_mode, (x_dim,) if self.std_mode == "per-dimension" else None)
        if self.kind == "discretized-logistic":
            return DiscretizedLogistic(self.num_bins, self.components)
        return Bernoulli()


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
    # Not in the paper (no digits there): ours, so that `quick` (1%) is 3000 steps, ~250 epochs of the
    # 1197 training images; at lr 3e-3 the conv VAE's validation estimate peaked after 1800 of them
    # (results/grey-conv-digits-quick/runs/digits/k1-m1/plain/seed0/summary.json).
    "digits": Schedule(3e-3, 300_000, 100),
}


@dataclass(frozen=True)
class Budget:
    """How much compute a run gets: ``smoke`` (seconds; checks plumbing), ``quick`` (minutes: 1% of
    Table 6's iterations) or ``paper`` (appendix E's schedule), in [`BUDGETS`][airvae.config.BUDGETS].

    Attributes:
        iterations_fraction: the fraction of Table 6's iteration counts, per dataset, with a
            ``"default"`` entry.
        validations: validation estimates over the run (early stopping's granularity).
        val_k: importance samples of the validation estimate.
        val_examples: validation examples used (None: the whole split).
        max_iterations: a cap on the iterations (None: none).
        lr_scale: dataset -> factor on Table 6's learning rate.
        patience: validations without improvement before training stops (None: never).
        judged: whether its runs can test the paper's claims (reports give verdicts: [`airvae.verdicts`][]).
    """

    iterations_fraction: dict[str, float]
    validations: int  # validation estimates over the run (early stopping granularity)
    val_k: int  # importance samples of the validation log-likelihood estimate
    val_examples: int | None  # None: the whole validation split
    max_iterations: int | None = None
    lr_scale: dict[str, float] = dataclasses.field(default_factory=dict)  # dataset -> factor on Table 6's lr
    patience: int | None = None  # validations without improvement before training stops; None: never
    judged: bool = True  # whether its runs can test the paper's claims (reports give verdicts: airvae.verdicts)


BUDGETS: dict[str, Budget] = {
    # seconds: exercises every code path, numbers are meaningless
    "smoke": Budget(iterations_fraction={"default": 0.0}, validations=2, val_k=8, val_examples=64,
                    max_iterations=40, judged=False),
    # minutes on a laptop CPU: 1% of the paper's iterations (15k steps, ~30 epochs of MNIST). Caltech
    # gets 2% (8k steps, 20 epochs) at 10x Table 6's lr: at lr 1e-4 the VAE's validation estimate is
    # still -127 nats after 20k steps and peaks only after 100k (-114; the paper-budget run's
    # results/table1-caltech-paper/runs/caltech/k1-m1/plain/seed0/metrics.jsonl), so 2% of the
    # schedule at that lr would stay far from the overfitting regime AIR is about.
    "quick": Budget(iterations_fraction={"default": 0.01, "caltech": 0.02}, validations=10, val_k=100,
                    val_examples=1000, lr_scale={"caltech": 10.0}),
    # appendix E: Table 6's schedule, early stopping on IWAE-5000 over the whole validation set. How often
    # the paper validated and when it stopped are not stated; ours: every 5% of the schedule, stopping after
    # 5 validations (a quarter of the schedule) without a new best. One IWAE-5000 pass over Caltech's 2264
    # validation images costs ~160 s on one CPU core (measured), so 150 validations would cost ~7 h a run.
    "paper": Budget(iterations_fraction={"default": 1.0}, validations=20, val_k=5000, val_examples=None,
                    patience=5),
}


@dataclass(frozen=True)
class Regularizer:
    """AIR settings of a run; sigma = 0 and H = inf: plain VAE/IWAE. Table 7 gives strengths as
    ``sigma * sqrt(d)`` and ``10 / H``: [`from_paper`][airvae.config.Regularizer.from_paper] takes those.

    Attributes:
        sigma: the denoising noise std (eq. 13; 0: none).
        alpha: the partial-denoising weight of eq. 16, in [0, 1].
        max_norm: the WNI cap H (eq. 18; inf: none).
    """

    sigma: float = 0.0
    alpha: float = 1.0
    max_norm: float = math.inf

    def __post_init__(self) -> None:
        require(is_real(self.sigma) and 0 <= self.sigma <= MAX_SIGMA, "sigma", self.sigma,
               f"a number >= 0 and <= {MAX_SIGMA:g}")
        require(is_real(self.alpha) and 0.0 <= self.alpha <= 1.0, "alpha", self.alpha, "[0, 1]")
        require(is_real(self.max_norm) and (0 < self.max_norm <= MAX_NORM or self.max_norm == math.inf),
               "H (max_norm)", self.max_norm, f"a number > 0 and <= {MAX_NORM:g}, or inf for no cap")

    @classmethod
    def from_paper(cls, x_dim: int, sigma_sqrt_d: float = 0.0, ten_over_h: float = 0.0,
                   alpha: float = 1.0) -> Regularizer:
        """Table 7's parameterization: ``sigma * sqrt(d)`` and ``10 / H`` (0 means H = inf)."""
        return cls(sigma=sigma_from_sqrt_d(sigma_sqrt_d, x_dim), alpha=alpha, max_norm=h_from_ten_over_h(ten_over_h))

    @property
    def denoising(self) -> Denoising:
        """What this regularizer asks of a training step ([`airvae.objectives.Denoising`][]: the one
        place that decides the step's draws)."""
        return Denoising(self.sigma, self.alpha)

    @property
    def draws_noise(self) -> bool:
        """Does a training step draw denoising noise (eq. 13)? Exactly when air_objective does."""
        return self.denoising.draws_noise

    @property
    def two_bounds(self) -> bool:
        """Does a training step evaluate two bounds (eq. 16 with 0 < alpha < 1)?"""
        return self.denoising.two_bounds

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
    """A complete, validated training run of one of airvae's models: checked when built, before any
    work, and round-tripped through ``config.json``. [`resolve_run_config`][airvae.config.resolve_run_config]
    builds one from the paper's presets.

    Attributes:
        dataset: a dataset's name or the path of a ``.npz``.
        architecture: the layers and latent size.
        x_dim: data dimensions per example.
        image_shape: ``(C, H, W)`` of image data, flattened to ``x_dim`` values (None: flat data).
        likelihood: p(x|z).
        regularizer: AIR's settings.
        k: importance samples of the training bound (IWAE-k, eq. 20; 1: the ELBO, eq. 5).
        m: Monte Carlo repeats of that bound.
        seed: the run's seed (initialization, minibatches, training draws).
        lr: Adam's initial learning rate.
        iterations: training steps.
        batch_size: examples per step.
        lr_final_fraction: eq. 43: the learning rate decays to this fraction of ``lr`` over the run.
        val_every: steps between validations.
        val_k: importance samples of the validation estimate (IWAE-``val_k``).
        val_examples: validation examples used (None: all).
        patience: validations without improvement before stopping (None: never).
        track_test_examples: > 0: log the amortized bound L_k on this many test examples at each
            validation (Figure 4's curves); monitoring only, early stopping never looks at it.
        checkpoint_every: steps between checkpoints.
        data_dir: where the dataset's files are (offline machines).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        budget: the budget the run was resolved with (``custom`` when built by hand).
    """

    dataset: str
    architecture: Architecture
    x_dim: int = 784
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of image data, flattened to x_dim values
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
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

    def __post_init__(self) -> None:
        require(isinstance(self.dataset, str) and self.dataset != "", "dataset", self.dataset,
               "a dataset name or the path of a .npz file")
        require(isinstance(self.architecture, Architecture), "architecture", self.architecture, "an Architecture")
        require(isinstance(self.regularizer, Regularizer), "regularizer", self.regularizer, "a Regularizer")
        require(isinstance(self.likelihood, LikelihoodConfig), "likelihood", self.likelihood, "a LikelihoodConfig")
        check_training_fields(self)
        self._check_image_shape()
        require(isinstance(self.budget, str), "budget", self.budget, "a budget name")

    def _check_image_shape(self) -> None:
        shape = self.image_shape
        require(shape is None or (isinstance(shape, tuple) and len(shape) == 3
                                  and all(is_int(n) and n >= 1 for n in shape) and math.prod(shape) == self.x_dim),
               "image_shape", shape,
               f"None, or (C, H, W) with C*H*W = x_dim = {self.x_dim}")
        if not self.architecture.convolutional:
            return

        for role in ("encoder", "decoder"):
            spec = getattr(self.architecture, role)
            convs = parse_spec(spec, role)[0]
            if not convs:
                continue
            if shape is None:
                raise ConfigError(f"invalid {role} = {spec!r}: convolution layers need image data ([n, C, H, W] "
                                  f"arrays); this data is flat, {self.x_dim} values per example: use dense layers "
                                  "like d300-d300")
            try:
                conv_map_shapes(shape, convs if role == "encoder" else convs[::-1])
            except ValueError as error:
                raise ConfigError(f"invalid {role} = {spec!r} for {shape[1]}x{shape[2]} images: {error}") from None

    def check_dataset(self, dataset: _Data) -> None:
        """Raise ConfigError unless ``dataset`` (an [`airvae.data.Dataset`][]; an object without
        ``levels`` and ``image_shape`` counts as flat binary data) can serve this run: its dimension
        and image shape, and values of the kind the likelihood scores."""
        if dataset.dim != self.x_dim:
            raise ConfigError(f"invalid x_dim = {self.x_dim}: dataset {self.dataset!r} has dimension {dataset.dim}")
        image_shape = getattr(dataset, "image_shape", None)
        if self.image_shape is not None and image_shape != self.image_shape:
            raise ConfigError(f"invalid image_shape = {self.image_shape}: dataset {self.dataset!r} has "
                              f"{'flat examples' if image_shape is None else image_shape}")
        levels, lik = getattr(dataset, "levels", 2), self.likelihood
        what = "real-valued" if levels is None else "binary" if levels == 2 else f"on a grid of {levels} levels"
        if lik.kind == "bernoulli" and levels != 2:
            fix = ("--likelihood gaussian" if levels is None else
                   f"--likelihood discretized-logistic --num-bins {levels} (or gaussian)")
            raise ConfigError(f"invalid likelihood = 'bernoulli': it scores binary data, and {self.dataset!r} is "
                              f"{what}; use {fix}")
        if lik.kind == "discretized-logistic" and levels != lik.num_bins:
            fix = "use --likelihood gaussian" if levels is None else f"use --num-bins {levels}"
            raise ConfigError(f"invalid num_bins = {lik.num_bins}: the discretized logistic needs data on the grid "
                              f"i/{lik.num_bins - 1}, and {self.dataset!r} is {what}; {fix}")

    @property
    def z_dim(self) -> int:
        """The latent size (the architecture's)."""
        return self.architecture.z_dim

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

    def lr_at(self: _Schedule, step: int) -> float:
        """Eq. 43: ``lr_t = lr_0 * 0.1^(t / (T - 1))``."""
        if self.iterations == 1:
            return self.lr
        return self.lr * self.lr_final_fraction ** (step / (self.iterations - 1))

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes``, validated again."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The configuration as ``config.json`` holds it (H = inf written as ``"inf"``)."""
        out = dataclasses.asdict(self)
        out["regularizer"]["max_norm"] = _encode_float(self.regularizer.max_norm)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of [`to_json`][airvae.config.RunConfig.to_json]; every field is validated, and a missing, unknown or
        mistyped one is a ConfigError naming it."""
        _check_fields(cls, data, "config")
        data = dict(data)
        data["architecture"] = _from_fields(Architecture, data["architecture"], "architecture")
        if "likelihood" in data:  # absent from configs written before likelihoods: the default, Bernoulli
            data["likelihood"] = _from_fields(LikelihoodConfig, data["likelihood"], "likelihood")
        if isinstance(data.get("image_shape"), list):
            data["image_shape"] = tuple(data["image_shape"])
        reg = data.get("regularizer", {})
        if isinstance(reg, dict) and reg.get("max_norm") == "inf":
            reg = {**reg, "max_norm": math.inf}
        data["regularizer"] = _from_fields(Regularizer, reg, "regularizer")
        return _from_fields(cls, data, "config")


CUSTOM = "custom"  # config.json's "kind" for a researcher's own model (airvae.fit)


@dataclass(frozen=True)
class FitConfig:
    """The training settings of a researcher's own model ([`airvae.fit.fit`][]): what
    [`RunConfig`][airvae.config.RunConfig] is to airvae's architectures, without the architecture. ``model`` says what
    built the model (``"package.module:function"``, or its class); airvae never imports it by
    itself: whoever loads the run passes the model (``--model`` on the command line)."""

    dataset: str
    model: str
    x_dim: int
    z_dim: int
    k: int = 1
    m: int = 1
    alpha: float = 1.0  # eq. 16's weight, for a model whose encoder is a DenoisingEncoder
    seed: int = 0
    lr: float = 1e-3
    lr_final_fraction: float = 0.1
    iterations: int = 10_000
    batch_size: int = 100
    val_every: int = 500
    val_k: int = 100
    val_examples: int | None = 1000
    patience: int | None = None
    checkpoint_every: int = 500
    track_test_examples: int = 0
    data_dir: str | None = None
    device: str = "auto"
    budget: str = "custom"

    def __post_init__(self) -> None:
        require(isinstance(self.dataset, str) and self.dataset != "", "dataset", self.dataset, "a dataset's name")
        require(isinstance(self.model, str) and self.model != "", "model", self.model, "what built the model")
        check_training_fields(self)
        check_int("z_dim", self.z_dim, 1, 10**9)
        require(is_real(self.alpha) and 0.0 <= self.alpha <= 1.0, "alpha", self.alpha, "[0, 1]")

    @property
    def model_name(self) -> str:
        """What built the model, with VAE or IWAE-k."""
        return f"{self.model} ({'VAE' if self.k == 1 else f'IWAE-{self.k}'})"

    lr_at = RunConfig.lr_at  # eq. 43, the same schedule

    def replace(self, **changes: Any) -> FitConfig:
        """A copy with ``changes``, validated again."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The configuration as ``config.json`` holds it, marked ``"kind": "custom"``."""
        return {"kind": CUSTOM, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FitConfig:
        """Inverse of [`to_json`][airvae.config.FitConfig.to_json]; every field is validated."""
        data = {key: value for key, value in data.items() if key != "kind"}
        return _from_fields(cls, data, "config")


def check_training_fields(cfg: RunConfig | FitConfig) -> None:
    """The settings [`RunConfig`][airvae.config.RunConfig] and [`FitConfig`][airvae.config.FitConfig] share
    (sampling, schedule, validation, data folder, device), each within its bounds; a
    [`ConfigError`][airvae.config.ConfigError] names the first one that is not."""
    for name in ("k", "m", "val_k"):
        check_int(name, getattr(cfg, name), 1, MAX_SAMPLES)
    for name in ("iterations", "val_every", "checkpoint_every"):
        check_int(name, getattr(cfg, name), 1, MAX_ITERATIONS)
    for name in ("batch_size", "x_dim"):
        check_int(name, getattr(cfg, name), 1, 10**9)
    check_int("seed", cfg.seed, 0, MAX_SEED)
    check_int("track_test_examples", cfg.track_test_examples, 0, 10**9)
    require(is_real(cfg.lr) and 0 < cfg.lr <= MAX_LR, "lr", cfg.lr, f"a number > 0 and <= {MAX_LR:g}")
    require(is_real(cfg.lr_final_fraction) and 0 < cfg.lr_final_fraction <= 1, "lr_final_fraction",
            cfg.lr_final_fraction, "(0, 1]")
    require(cfg.val_examples is None or (is_int(cfg.val_examples) and cfg.val_examples >= 1), "val_examples",
            cfg.val_examples, "an integer >= 1, or None for the whole split")
    require(cfg.patience is None or (is_int(cfg.patience) and 1 <= cfg.patience <= MAX_ITERATIONS), "patience",
            cfg.patience, f"an integer >= 1 and <= {MAX_ITERATIONS}, or None")
    require(cfg.data_dir is None or isinstance(cfg.data_dir, str), "data_dir", cfg.data_dir, "a path or None")
    check_device_name(cfg.device)


def sigma_from_sqrt_d(sigma_sqrt_d: float, x_dim: int) -> float:
    """Table 7's denoising strength ``sigma * sqrt(d)`` as the noise std sigma of eq. 13."""
    check_int("x_dim", x_dim)
    limit = MAX_SIGMA * math.sqrt(x_dim)
    require(is_real(sigma_sqrt_d) and 0 <= sigma_sqrt_d <= limit, "sigma_sqrt_d (sigma*sqrt(d))", sigma_sqrt_d,
           f"a number >= 0 and <= {limit:g} (sigma <= {MAX_SIGMA:g})")
    return sigma_sqrt_d / math.sqrt(x_dim)


def h_from_ten_over_h(ten_over_h: float) -> float:
    """Table 7's WNI strength ``10 / H`` as the cap H of eq. 18; 0 means no cap (H = inf)."""
    lowest = 10.0 / MAX_NORM
    require(is_real(ten_over_h) and (ten_over_h == 0 or lowest <= ten_over_h <= MAX_NORM), "ten_over_h (10/H)",
           ten_over_h, f"0 (no cap, H = inf), or a number >= {lowest:g} and <= {MAX_NORM:g} (H <= {MAX_NORM:g})")
    return math.inf if ten_over_h == 0 else 10.0 / ten_over_h


def _encode_float(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


def _check_fields(cls: type[DataclassInstance], data: dict[str, Any], what: str) -> None:
    """``data`` is a dict with every required field of ``cls`` and no unknown one."""
    require(isinstance(data, dict), what, data, "a JSON object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    require(not unknown, f"{what} fields", unknown, f"only {', '.join(sorted(fields))}")
    missing = sorted(name for name, f in fields.items() if name not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"invalid {what}: missing {', '.join(missing)}")


def _from_fields(cls: type[C], data: dict[str, Any], what: str) -> C:
    """``cls(**data)`` with a ConfigError naming missing, unknown or mistyped fields."""
    _check_fields(cls, data, what)
    try:
        return cls(**data)
    except TypeError as error:  # a comparison between a wrong type and a number
        raise ConfigError(f"invalid {what}: a field has the wrong type ({error})") from None


def resolve_run_config(
    dataset: str,
    *,
    x_dim: int,
    image_shape: tuple[int, int, int] | None = None,
    levels: int | None = 2,
    likelihood: LikelihoodConfig | None = None,
    budget: str = "quick",
    architecture: str | None = None,
    encoder: str | None = None,
    decoder: str | None = None,
    z_dim: int | None = None,
    regularizer: Regularizer | None = None,
    **overrides: Any,
) -> RunConfig:
    """Build a [`RunConfig`][airvae.config.RunConfig] from the presets: Table 6 for the dataset (or a
    named architecture; MNIST's for datasets not in the paper), scaled by the budget, then explicit
    overrides.

    Args:
        dataset: a dataset's name or the path of a ``.npz``.
        x_dim: data dimensions per example.
        image_shape: ``(C, H, W)`` of image data (None: flat).
        levels: values per dimension (2: binary; None: real-valued), as
            [`airvae.data.Dataset`][] says.
        likelihood: p(x|z) (default: the one for the data's kind of values,
            [`LikelihoodConfig.for_data`][airvae.config.LikelihoodConfig.for_data]).
        budget: ``smoke``, ``quick`` or ``paper`` ([`BUDGETS`][airvae.config.BUDGETS]).
        architecture: a key of [`ARCHITECTURES`][airvae.config.ARCHITECTURES] (default: the dataset's).
        encoder: overrides the architecture's encoder spec.
        decoder: overrides its decoder spec.
        z_dim: overrides its latent size.
        regularizer: AIR's settings (default: none).
        **overrides (Any): any other [`RunConfig`][airvae.config.RunConfig] field (``k``, ``m``,
            ``seed``, ``iterations``, ...); None values are ignored.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: an unknown budget or architecture, or an invalid setting.
    """
    require(budget in BUDGETS, "budget", budget, f"one of {sorted(BUDGETS)}")
    preset_key = dataset if dataset in ARCHITECTURES else "mnist"
    arch_key = architecture or preset_key
    require(arch_key in ARCHITECTURES, "architecture", arch_key, f"one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[arch_key]
    arch = Architecture(arch.encoder if encoder is None else encoder, arch.decoder if decoder is None else decoder,
                        arch.z_dim if z_dim is None else z_dim)
    schedule = PAPER_SCHEDULES.get(dataset, PAPER_SCHEDULES["mnist"])
    b = BUDGETS[budget]
    fraction = b.iterations_fraction.get(dataset, b.iterations_fraction["default"])
    iterations = max(1, round(schedule.iterations * fraction))
    if b.max_iterations is not None:
        iterations = min(iterations, b.max_iterations) if fraction else b.max_iterations
    overrides = {key: value for key, value in overrides.items() if value is not None}
    iterations = overrides.pop("iterations", iterations)
    val_every = overrides.pop("val_every", max(1, iterations // b.validations))
    defaults: dict[str, Any] = dict(
        dataset=dataset, architecture=arch, x_dim=x_dim, image_shape=image_shape,
        likelihood=likelihood or LikelihoodConfig.for_data(levels), regularizer=regularizer or Regularizer(),
        lr=schedule.lr * b.lr_scale.get(dataset, 1.0),
        iterations=iterations, batch_size=schedule.batch_size, val_every=val_every, val_k=b.val_k,
        val_examples=b.val_examples, patience=b.patience, checkpoint_every=val_every, budget=budget,
    )
    defaults.update(overrides)
    return RunConfig(**defaults)
