"""The ``airvae`` command line: ``train``, ``evaluate``, ``plot``, ``reproduce``, ``report``, ``bundle``, ``datasets``.

Every user error (bad value, missing data, existing run) is reported as one line naming what is
wrong and how to fix it, with exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import decimal
import math
import os
import re
import sys
from pathlib import Path

from .config import (
    ARCHITECTURES,
    BUDGETS,
    LIKELIHOODS,
    MAX_NORM,
    MAX_SEED,
    ConfigError,
    LikelihoodConfig,
    Regularizer,
    RunConfig,
    check_int,
    h_from_ten_over_h,
    resolve_run_config,
    sigma_from_sqrt_d,
)


class _Parser(argparse.ArgumentParser):
    """argparse with airvae's error format: one line naming the argument, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"airvae: error: {message} (see `{self.prog} --help`)\n")


def integer(text: str) -> int:
    """An integer argument; ``1e5`` is accepted when it is a whole number."""
    try:
        value = decimal.Decimal(text.strip())
    except decimal.InvalidOperation:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if not value.is_finite() or value != value.to_integral_value() or abs(value) > 10**100:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}: not a whole number")
    return int(value)


def path(text: str) -> Path:
    """A path argument: never empty (that would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path")
    return Path(text)


def directory(text: str) -> str:
    """An existing folder."""
    if not path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing folder")
    return text


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset",
                   help="mnist, omniglot, caltech, digits (bundled, 17 grey levels), or a path to your own .npz with "
                        "train/valid/test arrays, (N, D) or (N, C, H, W): 0/1, 8-bit integers or real-valued floats "
                        "(not needed with --resume: the stored configuration is used)")
    p.add_argument("--budget", default="quick", choices=sorted(BUDGETS),
                   help="smoke: seconds; quick: minutes on a laptop CPU (1%% of the paper's iterations); "
                        "paper: appendix E exactly (default: quick)")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES),
                   help="architecture preset of Table 6 (default: the dataset's own)")
    p.add_argument("--encoder", help="encoder hidden layers, e.g. d300-d300, or for images convolutions "
                                      "c<channels>k<kernel>s<stride> first, e.g. c32k4s2-c64k4s2-d256 "
                                      "(overrides --arch)")
    p.add_argument("--decoder", help="decoder hidden layers in the decoder's order, e.g. d300-d300; the mirror of "
                                      "a conv encoder, e.g. d256-c64k4s2-c32k4s2 (overrides --arch)")
    p.add_argument("--z-dim", type=integer, help="latent dimension (default 64)")
    lik = p.add_argument_group("likelihood p(x|z)")
    lik.add_argument("--likelihood", choices=LIKELIHOODS,
                     help="default: bernoulli for binary data, discretized-logistic on the data's grid for grey "
                          "levels, gaussian for real-valued data")
    lik.add_argument("--gaussian-std", type=float,
                     help="gaussian: the fixed std, or the initial value of a learned one (default 1)")
    lik.add_argument("--std-mode", help="gaussian: fixed, global (one learned std), per-dimension (learned) or "
                                        "decoder (emitted by the decoder) (default global)")
    lik.add_argument("--num-bins", type=integer,
                     help="discretized-logistic: levels of the data grid i/(num_bins-1) (default: the data's, "
                          "e.g. 256 for 8-bit images, 17 for digits)")
    lik.add_argument("--components", type=integer, help="discretized-logistic: mixture components (default 1)")
    p.add_argument("--k", type=integer, default=1, help="importance samples: 1 = VAE (ELBO), k > 1 = IWAE-k")
    p.add_argument("--m", type=integer, default=1, help="Monte Carlo repeats of the bound per example")
    reg = p.add_argument_group("amortized inference regularization")
    sigma = reg.add_mutually_exclusive_group()
    sigma.add_argument("--sigma", type=float, help="denoising noise std of eq. 13 (0 = off)")
    sigma.add_argument("--sigma-sqrt-d", type=float,
                       help="denoising strength in Table 7's parameterization sigma*sqrt(d)")
    reg.add_argument("--alpha", type=float, default=1.0,
                     help="partial denoising weight of eq. 16, in [0, 1] (default 1)")
    cap = reg.add_mutually_exclusive_group()
    cap.add_argument("--H", dest="max_norm", type=float, help="WNI weight-norm cap H of eq. 18 (inf = off)")
    cap.add_argument("--ten-over-h", type=float, help="WNI strength in Table 7's parameterization 10/H (0 = off)")
    p.add_argument("--seed", type=integer, default=0, help=f"0 to {MAX_SEED}")
    p.add_argument("--iterations", type=integer, help="training steps (default: from the budget)")
    p.add_argument("--batch-size", type=integer, help="default: Table 6")
    p.add_argument("--lr", type=float, help="initial learning rate (default: Table 6)")
    p.add_argument("--val-every", type=integer, help="steps between validation estimates")
    p.add_argument("--val-k", type=integer, help="importance samples of the validation IWAE estimate")
    p.add_argument("--val-examples", type=integer, help="validation examples used (default: from the budget)")
    p.add_argument("--patience", type=integer, help="stop after this many validations without improvement")
    p.add_argument("--checkpoint-every", type=integer, help="steps between checkpoints")
    p.add_argument("--run-dir", type=path, help="where the run is written (default: runs/DATASET/MODEL-seedN)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    mode.add_argument("--overwrite", action="store_true",
                      help="discard the airvae run in --run-dir (refused for folders airvae did not create)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume even though the dataset's contents changed since the run was created")
    _add_log(p)
    _add_common(p)


def _add_log(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log", help="tracking sinks besides metrics.jsonl: tensorboard (RUN/tensorboard/), mlflow "
                                 "($MLFLOW_TRACKING_URI, else the SQLite store ./mlflow.db), wandb (Weights & "
                                 "Biases: offline in ./wandb/ unless WANDB_MODE=online), comma-separated, or none; "
                                 "default: none for a new run, the run's own choice when resuming")


def _add_compile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the log-weights kernels (1.0-1.25x faster on CPU after a one-off "
                        "compilation of 10-30 s per process); default: only for long work (paper budget)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=directory, help="local folder with the dataset files (or set AIRVAE_DATA_DIR)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _regularizer(args, x_dim: int) -> Regularizer:
    """Raw (--sigma, --H) or Table 7's (--sigma-sqrt-d, --ten-over-h) strengths, in any mix."""
    sigma = sigma_from_sqrt_d(args.sigma_sqrt_d, x_dim) if args.sigma_sqrt_d is not None else args.sigma
    max_norm = h_from_ten_over_h(args.ten_over_h) if args.ten_over_h is not None else args.max_norm
    return Regularizer(sigma=0.0 if sigma is None else sigma, alpha=args.alpha,
                       max_norm=math.inf if max_norm is None else max_norm)


def _likelihood(args, dataset) -> LikelihoodConfig:
    """--likelihood and its options; what is not given follows the data (LikelihoodConfig.for_data)."""
    kind = args.likelihood or LikelihoodConfig.for_data(dataset.levels).kind
    options = {name: value for name, value in (("std", args.gaussian_std), ("std_mode", args.std_mode),
                                               ("num_bins", args.num_bins), ("components", args.components))
               if value is not None}
    if kind == "discretized-logistic" and "num_bins" not in options and dataset.levels is not None:
        options["num_bins"] = dataset.levels
    return LikelihoodConfig(kind, **options)


def _check_dataset_name(name: str) -> None:
    from .data import DATASETS, check_dataset_name

    if name in DATASETS:
        return
    if not name.endswith(".npz"):
        raise ConfigError(f"invalid --dataset = {name!r}: allowed {', '.join(DATASETS)}, "
                          "or the path of an existing .npz file with train/valid/test arrays")
    check_dataset_name(name)  # missing, or not a regular file (a folder, a device, a pipe): one line


def default_run_dir(cfg) -> Path:
    reg = cfg.regularizer
    name = cfg.model_name.replace(" ", "").replace("(alpha=", "-a").replace(")", "")
    if reg.sigma > 0:
        name += f"-s{reg.sigma * math.sqrt(cfg.x_dim):g}"
    if math.isfinite(reg.max_norm):
        name += f"-h{10 / reg.max_norm:g}"
    dataset = Path(cfg.dataset).stem if cfg.dataset.endswith(".npz") else cfg.dataset
    return Path("runs") / dataset / f"{name}-seed{cfg.seed}"


def _tracking(args):
    """``--log`` as [`airvae.tracking.TrackingSettings`][]; None when not given."""
    from .tracking import TrackingSettings

    return None if args.log is None else TrackingSettings.parse(args.log)


# What `train --resume --run-dir DIR` alone may be given: where and how to run, not what to train.
_RESUME_FLAGS = {"dataset", "resume", "run_dir", "device", "data_dir", "no_progress", "compile", "log",
                 "allow_data_change", "func", "command"}
_TRAIN_DEFAULTS: dict = {}  # the train parser's defaults, filled by build_parser


def cmd_train(args) -> int:
    from .data import load_dataset
    from .runs import load_config
    from .train import train

    tracking = _tracking(args)
    if args.allow_data_change and not args.resume:
        raise ConfigError("--allow-data-change applies to --resume only (a new run records the data it starts on); "
                          "drop it, or add --resume")
    if args.dataset is None:
        if not (args.resume and args.run_dir):
            from .data import DATASETS

            raise ConfigError(f"missing --dataset: allowed {', '.join(DATASETS)} or a .npz path "
                              "(only `--resume --run-dir DIR` may leave it out)")
        ignored = [f"--{dest.replace('_', '-')}" for dest, value in vars(args).items()
                   if dest not in _RESUME_FLAGS and value != _TRAIN_DEFAULTS.get(dest)]
        if ignored:  # the stored configuration is used: a setting given now would be silently ignored
            raise ConfigError(f"{', '.join(sorted(ignored))} cannot change a run resumed from its own configuration; "
                              "drop them, or give --dataset and every setting to compare them with the stored ones")
        stored = load_config(args.run_dir)
        if not isinstance(stored, RunConfig):  # a FitConfig: a model of the researcher's own, not one airvae builds
            raise ConfigError(f"{args.run_dir} trained a model of your own ({stored.model}); `airvae train` trains "
                              "airvae's models: resume it with airvae.fit(model, ..., resume=True)")
        stored = stored.replace(device=args.device, data_dir=args.data_dir or stored.data_dir)
        dataset = load_dataset(stored.dataset, data_dir=stored.data_dir, progress=not args.no_progress)
        return _report_training(stored, args.run_dir, train(stored, args.run_dir, resume=True,
                                                            progress=not args.no_progress, dataset=dataset,
                                                            allow_data_change=args.allow_data_change,
                                                            tracking=tracking))
    _check_dataset_name(args.dataset)
    # Validate everything that does not need the data before loading it.
    Regularizer(alpha=args.alpha)
    check_int("k", args.k)
    check_int("m", args.m)
    if args.run_dir is not None:
        from .runs import check_run_dir_use

        check_run_dir_use(args.run_dir, resume=args.resume, overwrite=args.overwrite)  # before loading data
    dataset = load_dataset(args.dataset, data_dir=args.data_dir, progress=not args.no_progress)
    cfg = resolve_run_config(
        args.dataset, x_dim=dataset.dim, image_shape=dataset.image_shape, likelihood=_likelihood(args, dataset),
        budget=args.budget, architecture=args.arch, encoder=args.encoder,
        decoder=args.decoder, z_dim=args.z_dim, regularizer=_regularizer(args, dataset.dim), k=args.k,
        m=args.m, seed=args.seed, iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
        val_every=args.val_every, val_k=args.val_k, val_examples=args.val_examples, patience=args.patience,
        checkpoint_every=args.checkpoint_every, data_dir=args.data_dir, device=args.device,
    )
    run_dir = args.run_dir or default_run_dir(cfg)
    if dataset.deviation:
        print(f"note: {dataset.deviation}", file=sys.stderr)
    result = train(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                   dataset=dataset, allow_data_change=args.allow_data_change, tracking=tracking)
    return _report_training(cfg, run_dir, result)


def _report_training(cfg, run_dir: Path, result) -> int:
    best = "n/a" if result.best_val_log_likelihood is None else f"{result.best_val_log_likelihood:.2f}"
    print(f"\n| model | dataset | steps | best valid IWAE-{cfg.val_k} log-lik. (step) | status | seconds |")
    print("|---|---|---|---|---|---|")
    print(f"| {cfg.model_name} | {cfg.dataset} | {result.steps} | {best} ({result.best_step}) | "
          f"{result.status} | {result.seconds:.1f} |")
    print(f"\nrun written to {run_dir}")
    return 0 if result.status != "interrupted" else 130


def cmd_datasets(args) -> int:
    from .data import DATASETS, load_dataset

    print("| dataset | train | valid | test | dim | values | source |")
    print("|---|---|---|---|---|---|---|")
    for name in args.names or DATASETS:
        d = load_dataset(name, data_dir=args.data_dir, progress=not args.no_progress)
        shape = "" if d.image_shape is None else f" ({'x'.join(map(str, d.image_shape))})"
        print(f"| {d.name} | {len(d.train)} | {len(d.valid)} | {len(d.test)} | {d.dim}{shape} | {d.kind} "
              f"| {d.source} |")
        if d.deviation:
            print(f"|  | deviation: {d.deviation} ||||||")
    return 0


def _add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    from .estimators import REGISTRY
    from .targets import EVALUATION_BUDGETS

    p.add_argument("run_dir", type=path, help="a training run directory, or a run inside a bundle (BUNDLE/RUN)")
    p.add_argument("--study", choices=("iwsvi-vs-iwae",),
                   help="instead of a table: the paper's Figure 3 (IW-SVI vs IWAE-k over k and T, with wall time)")
    p.add_argument("--estimators",
                   help=f"comma-separated subset of {', '.join(REGISTRY)} (default bound,iwsvi,gap); "
                        "bdmc: the sandwich lower <= ln p(x) <= upper on data simulated from the model")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--budget", choices=sorted(EVALUATION_BUDGETS),
                   help=f"the effort of the estimators where no flag below sets it. {_budget_help()}. Default: the "
                        "budget the run was trained at (paper for a run of custom settings); not for --study")
    p.add_argument("--max-examples", type=integer,
                   help="evaluate only N examples, spread evenly over the split (default: from --budget)")
    p.add_argument("--k", dest="k_iwae", type=integer, help="IWAE-k samples (default: from --budget)")
    p.add_argument("--svi-k", type=integer, help="IW-SVI scoring samples (default: from --budget)")
    p.add_argument("--svi-l", type=integer, help="IW-SVI optimization bound IWAE-l (default: from --budget)")
    p.add_argument("--svi-steps", type=integer, help="IW-SVI Adam steps T (default: from --budget)")
    p.add_argument("--svi-lr", type=float, help="IW-SVI learning rate")
    p.add_argument("--ais-intermediate", type=integer,
                   help="ais, bdmc: intermediate distributions (default: from --budget)")
    p.add_argument("--ais-chains", type=integer, help="ais, bdmc: chains per example (default: from --budget)")
    p.add_argument("--bdmc-examples", type=integer,
                   help="bdmc: examples simulated from the model (default: from --budget)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="evaluate although the dataset's contents changed since the run was trained")
    p.add_argument("--chunk-samples", type=integer, help="latents decoded per chunk (memory bound)")
    p.add_argument("--seed", type=integer, default=0, help=f"0 to {MAX_SEED}")
    p.add_argument("--recompute", action="store_true", help="ignore a stored result with the same settings")
    _add_model(p)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _budget_help() -> str:
    """The effort of each evaluation budget in words, from targets.EVALUATION_BUDGETS and AIS_BUDGETS."""
    from .targets import AIS_BUDGETS, EVALUATION_BUDGETS

    names = {"k_iwae": "k={}", "svi_k": "svi-k={}", "svi_l": "l={}", "svi_steps": "T={}",
             "ais_intermediate": "{} AIS distributions", "ais_chains": "{} chains",
             "bdmc_examples": "{} simulated examples"}

    def words(effort: dict) -> str:
        shown = [names[key].format(value) for key, value in effort.items() if key in names]
        examples = effort.get("max_examples", "")
        if "max_examples" in effort:
            shown.append("the whole split" if examples is None else f"{examples} examples")
        return ", ".join(shown)

    budgets = "; ".join(f"{name}: {words(effort)}" for name, effort in EVALUATION_BUDGETS.items())
    ais = "; ".join(f"{name}: {words(effort)}" for name, effort in AIS_BUDGETS.items())
    return f"{budgets}. With ais or bdmc, AIS's effort too ({ais}; any other AIS setting at its default)"


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="for a run of your own model (airvae.fit): package.module:function, a function "
                                   "that returns an untrained instance; airvae imports and calls it to load the "
                                   "weights into (it never builds code named in a run folder by itself)")


def _user_model(text: str | None):
    """``--model package.module:function``: the untrained model the function returns (None: none given)."""
    if text is None:
        return None
    import importlib

    import torch

    module, _, name = text.partition(":")
    if not module or not name.isidentifier():
        raise ConfigError(f"invalid --model = {text!r}: allowed package.module:function (a function returning an "
                          "untrained instance of your model)")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"invalid --model = {text!r}: {error}; is the module importable from here "
                          "(installed, or on PYTHONPATH)?") from None
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"invalid --model = {text!r}: it returned a {type(model).__name__}, not a torch nn.Module")
    return model


def _run_model(run_dir: Path, text: str | None):
    """The model ``--model`` names, checked against the run: needed by (and only by) a run of the user's
    own model. Refused before any work."""
    from .config import FitConfig
    from .runs import build_model, load_config

    cfg = load_config(run_dir)  # a clear error for a folder that is not a run
    model = _user_model(text)
    if isinstance(cfg, FitConfig) != (model is not None):
        build_model(cfg, model, Path(run_dir))  # refuses, saying which way round
    return model


def cmd_evaluate(args) -> int:
    from .bundle import resolve
    from .evaluation import EvaluationSettings, evaluate_run, format_table, parse_estimators
    from .iwsvi_study import run_study

    estimators = parse_estimators(args.estimators) if args.estimators is not None else ("bound", "iwsvi", "gap")
    _refuse_duplicates("--estimators", estimators)
    if args.study and args.estimators is not None:
        raise ConfigError("--study and --estimators contradict each other: the study runs its own estimators "
                          "(IWAE-k and IW-SVI); drop one")
    if args.study and args.budget is not None:
        raise ConfigError("--study and --budget contradict each other: the study sets its own effort "
                          "(Figure 3's k and T); drop --budget")
    annealed = {"ais", "bdmc"} & set(estimators)
    for flag, value, needs in (("--ais-intermediate", args.ais_intermediate, annealed),
                               ("--ais-chains", args.ais_chains, annealed),
                               ("--bdmc-examples", args.bdmc_examples, {"bdmc"} & set(estimators))):
        if value is not None and (args.study or not needs):
            raise ConfigError(f"{flag} is given but no estimator uses it: add "
                              f"{'bdmc' if flag == '--bdmc-examples' else 'ais or bdmc'} to --estimators, or drop it")
    args.run_dir = resolve(args.run_dir)  # BUNDLE/RUN: the run in the bundle's extraction (a cache folder)
    model = _run_model(args.run_dir, args.model)  # a clear error for a folder that is not a run, or lacks --model
    check_int("seed", args.seed, 0, MAX_SEED)
    if args.study:
        from .figures import draw_figure3

        data = run_study(args.run_dir, split=args.split, max_examples=args.max_examples or 100,
                         device=args.device, progress=not args.no_progress, seed=args.seed)
        json_path = Path(data["files"][0])
        print(f"written {draw_figure3(data, json_path.with_suffix('.png'))}\nwritten {json_path}")
        return 0
    optional = {key: getattr(args, key) for key in ("svi_lr", "chunk_samples") if getattr(args, key) is not None}
    effort = _evaluation_effort(args, estimators, args.budget or _run_budget(args.run_dir))
    settings = EvaluationSettings(estimators=estimators, split=args.split, seed=args.seed, device=args.device,
                                  **effort, **optional)
    result = evaluate_run(args.run_dir, settings, recompute=args.recompute, progress=not args.no_progress,
                          allow_data_change=args.allow_data_change, model=model)
    print(format_table(result))
    return 0


# The flags of `airvae evaluate` whose defaults come from --budget (EvaluationSettings fields)
_EFFORT_FLAGS = ("k_iwae", "svi_k", "svi_l", "svi_steps", "max_examples", "ais_intermediate", "ais_chains",
                 "bdmc_examples")


def _run_budget(run_dir: Path) -> str:
    """The budget a run was trained at, as an evaluation budget: "paper" for custom settings (and any
    name airvae does not know), whose size nothing says, so that the default stays the paper's."""
    from .runs import load_config
    from .targets import EVALUATION_BUDGETS

    budget = getattr(load_config(run_dir), "budget", None)
    return budget if budget in EVALUATION_BUDGETS else "paper"


def _evaluation_effort(args, estimators: tuple[str, ...], budget: str) -> dict:
    """EvaluationSettings' effort fields: the budget's (targets.EVALUATION_BUDGETS, and AIS_BUDGETS when
    ais or bdmc run), each replaced by its flag where one was given."""
    from .targets import AIS_BUDGETS, EVALUATION_BUDGETS

    effort = dict(EVALUATION_BUDGETS[budget])
    if {"ais", "bdmc"} & set(estimators):
        effort.update(AIS_BUDGETS[budget])
    effort.update({key: getattr(args, key) for key in _EFFORT_FLAGS if getattr(args, key) is not None})
    return effort


def cmd_plot(args) -> int:
    from .bundle import resolve
    from .plots import plot_run

    run_dir = resolve(args.run_dir)
    plots = plot_run(run_dir, args.out, which=args.which, examples=args.examples, data_dir=args.data_dir,
                     device=args.device, model=_run_model(run_dir, args.model))
    print("\n".join(f"written {path}" for path in plots.written.values()))
    print("\n".join(f"skipped {name}: {why}" for name, why in plots.skipped.items()))
    return 0


def _add_executor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", default="auto", choices=("auto", "local", "stacked", "ray"),
                   help="auto (default): stacked on a GPU, on a CPU whichever measures faster here; local: worker "
                        "processes of one run each; stacked: the runs sharing an architecture trained as one "
                        "model per group; ray: one Ray task per run, local Ray or --address")
    p.add_argument("--workers", type=integer,
                   help="local (and auto on a CPU): worker processes, each given cores/workers threads (default 1); "
                        "ray: CPUs of a local Ray")
    p.add_argument("--address", help="ray: cluster address (e.g. ray://head:10001); default: start a local Ray")
    p.add_argument("--gpus-per-task", type=float, help="ray: GPUs reserved per run (>= 0, default 0)")


def _refuse_duplicates(flag: str, values) -> None:
    seen = [v for i, v in enumerate(values) if v in list(values)[:i]]
    if seen:
        raise ConfigError(f"invalid {flag}: {', '.join(map(str, dict.fromkeys(seen)))} given twice; give each once")


def _grid(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        grid = tuple(float(v) for v in text.split(","))
    except ValueError:
        grid = ()
    lowest, highest = 10 / MAX_NORM, 1000.0  # 10/H <= 1e6 (H >= 1e-5); sigma*sqrt(d) <= 1000 (sigma <= 36 on MNIST)
    if not grid or not all(lowest <= v <= highest for v in grid):
        raise ConfigError(f"invalid --grid = {text!r}: allowed comma-separated strengths between {lowest:g} and "
                          f"{highest:g}, e.g. 2.5,5 (the baseline is always run)")
    _refuse_duplicates("--grid", grid)
    return grid


def cmd_reproduce(args) -> int:
    from .devices import resolve_device
    from .evaluation import parse_estimators
    from .reproduce import reproduce
    from .sweep import make_executor
    from .targets import TARGETS

    if args.target not in TARGETS:
        raise ConfigError(f"invalid target = {args.target!r}: allowed {', '.join(TARGETS)}")
    datasets = [d.strip() for d in (args.dataset if args.dataset is not None
                                    else TARGETS[args.target].default_dataset).split(",")]
    _refuse_duplicates("--dataset", datasets)
    for dataset in datasets:
        _check_dataset_name(dataset)
    check_int("seeds", args.seeds, 1, MAX_SEED + 1)
    grid = _grid(args.grid)
    tracking = _tracking(args)
    resolve_device(args.device)
    out_dir = args.out or Path("results") / f"{args.target}-{'-'.join(Path(d).stem for d in datasets)}-{args.budget}"
    if args.executor != "ray":
        for flag, value in (("--address", args.address), ("--gpus-per-task", args.gpus_per_task)):
            if value is not None:
                raise ConfigError(f"{flag} applies to --executor ray only, not {args.executor}; drop it or use ray")
    if args.executor == "stacked" and args.workers is not None:
        raise ConfigError("--workers applies to the local, auto and ray executors: a stacked group trains in one "
                          "process; drop it or use --executor local")
    executor = make_executor(args.executor, args.workers or 1, args.address, args.gpus_per_task or 0.0, args.device)
    estimators = parse_estimators(args.estimators) if args.estimators is not None else ()
    _refuse_duplicates("--estimators", estimators)
    extra = sorted(set(estimators) - {"ais", "bdmc"})
    if extra or (args.estimators is not None and not estimators):
        raise ConfigError(f"invalid --estimators = {args.estimators!r}: reproduce adds ais and/or bdmc beside the "
                          "target's own estimators (IW-SVI, IWAE-k, the bound); allowed ais, bdmc, or both")
    failures = reproduce(args.target, datasets, args.budget, args.seeds, executor, out_dir, grid=grid,
                         data_dir=args.data_dir, device=args.device, progress=not args.no_progress,
                         tracking=tracking, estimators=estimators, strengths=args.strengths)
    print((out_dir / "REPORT.md").read_text())
    print(f"written to {out_dir}")
    if failures:
        print(f"airvae: {len(failures)} run(s) did not finish; the table above lacks them:", file=sys.stderr)
        for result in failures:
            print(f"  - {result['name']}: {result['status']}: {result['error']}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from .bundle import resolve
    from .locks import RunLock
    from .report import check_reproduction, render

    folder = check_reproduction(resolve(args.results_dir))
    with RunLock(folder):  # refused while a reproduction writes the folder
        out_dir = render(folder)
    print((out_dir / "REPORT.md").read_text())
    print(f"plots and REPORT.md in {out_dir}")  # for a bundle, its extraction: a cache folder nobody chose
    return 0


def cmd_bundle(args) -> int:
    from .bundle import write_bundle

    out = write_bundle(args.results_dir, args.out)
    print(f"written {out} ({out.stat().st_size / 1e6:.1f} MB): `airvae report {out}`, "
          f"`airvae evaluate {out}/RUN` and airvae.load('{out}/RUN') read it anywhere")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="airvae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one VAE/IWAE, optionally with AIR (denoising, WNI)")
    _add_train_arguments(p)
    _add_compile(p)
    p.set_defaults(func=cmd_train)
    _TRAIN_DEFAULTS.update({action.dest: action.default for action in p._actions})
    p = sub.add_parser("evaluate", help="estimate ln p(x), the amortized bound and the inference gap of a run")
    _add_evaluate_arguments(p)
    _add_compile(p)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("plot", help="training curves, samples, reconstructions, posterior statistics and WNI "
                                    "weight norms of a run, as PNGs in RUN/plots/")
    p.add_argument("run_dir", type=Path, help="a training run directory, or a run inside a bundle (BUNDLE/RUN)")
    p.add_argument("--which", default="best", choices=("best", "last"), help="checkpoint to draw (default best)")
    p.add_argument("--examples", type=int, default=1000, help="test examples for the posterior statistics")
    p.add_argument("--out", type=path, help="output folder (default RUN/plots)")
    _add_model(p)
    _add_common(p)
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("reproduce", help="regenerate one of the paper's tables or figures at a budget")
    p.add_argument("target", help="table1, table2, table3, table4, figure1, figure2, figure3 or figure4; or "
                                   "grey-conv (not the paper's: DVAE and WNI on a conv VAE, grey-level images)")
    p.add_argument("--dataset", help="mnist, omniglot, caltech, digits, a .npz, or several comma-separated "
                                     "(default: caltech; digits for grey-conv)")
    p.add_argument("--budget", default="quick", choices=sorted(BUDGETS))
    p.add_argument("--seeds", type=integer, default=1, help="seeds per configuration (0 .. seeds-1)")
    p.add_argument("--grid", help="comma-separated strengths (sigma*sqrt(d) and 10/H); default per budget")
    p.add_argument("--strengths", default="grid", choices=("grid", "paper"),
                   help="grid (default): train each regularized model at every strength of the grid and select on "
                        "validation; paper: only at the strength the paper selected (Table 7), not reselected")
    p.add_argument("--out", type=path, help="output folder (default results/TARGET-DATASET-BUDGET)")
    p.add_argument("--estimators",
                   help="more estimators for the evaluated models, beside the target's IW-SVI: ais and/or bdmc "
                        "(comma-separated; effort set by --budget), e.g. ais,bdmc")
    _add_executor(p)
    _add_log(p)
    _add_common(p)
    _add_compile(p)
    p.set_defaults(func=cmd_reproduce)
    p = sub.add_parser("report", help="rebuild tables, figures and REPORT.md of a reproduction, no training")
    p.add_argument("results_dir", type=path, help="a reproduction's folder, or a bundle of one")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("bundle", help="one zip archive of a reproduction (or a run) to share: tables, REPORT.md, "
                                      "plots, every run's files and best weights as safetensors, no pickle")
    p.add_argument("results_dir", type=path, help="a reproduction's folder, or a run directory")
    p.add_argument("--out", type=path, help="the archive to write (default DIR.zip beside DIR); never overwritten")
    p.set_defaults(func=cmd_bundle)
    p = sub.add_parser("datasets", help="fetch, verify and describe the datasets")
    p.add_argument("names", nargs="*", help="default: all of them")
    _add_common(p)
    p.set_defaults(func=cmd_datasets)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0 done, 1 a reproduction with failed runs or
    an internal error, 2 a refused command (one line on stderr says what and how to fix it), 130
    interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--compile" in argv and "--no-compile" in argv:
        print("airvae: error: --compile and --no-compile contradict each other; give one", file=sys.stderr)
        return 2
    for before, arg in zip([""] + argv, argv, strict=False):
        if "\0" in arg:  # the OS cannot take such a string as a path or name
            print(f"airvae: error: argument {before if before.startswith('-') else repr(arg)} contains a NUL "
                  "character", file=sys.stderr)
            return 2
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error already printed as one line
        return stop.code if isinstance(stop.code, int) else 2
    import torch

    from .data import DatasetError
    from .files import RunError
    from .train import TrainingDiverged

    if getattr(args, "compile", None) is not None:
        from .compiling import COMPILE_ENV, set_compile

        os.environ[COMPILE_ENV] = "1" if args.compile else "0"  # inherited by sweep worker processes
        set_compile(args.compile)
    try:
        return args.func(args)
    except (ConfigError, DatasetError, RunError, TrainingDiverged, ValueError, FileNotFoundError) as error:
        if os.environ.get("AIRVAE_DEBUG"):
            raise
        print(f"airvae: error: {_with_flag_names(_one_line(error), parser, args.command)}", file=sys.stderr)
        return 2
    except OSError as error:  # the operating system refused a path: say which and why, not "internal error"
        if os.environ.get("AIRVAE_DEBUG"):
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"airvae: error: {where}{error.strerror or _one_line(error)}; check the path (its length, its folders, "
              "its permissions) or choose another one", file=sys.stderr)
        return 2
    except (MemoryError, torch.OutOfMemoryError) as error:
        if os.environ.get("AIRVAE_DEBUG"):
            raise
        print(f"airvae: error: out of memory ({_one_line(error) or 'no details'}); lower --k, --m, --batch-size "
              "or --chunk-samples", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("airvae: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug: still one line, with the way to the traceback
        if os.environ.get("AIRVAE_DEBUG"):
            raise
        print(f"airvae: internal error: {type(error).__name__}: {_one_line(error)} (please report it; "
              "AIRVAE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


# Names the library's messages use for settings whose flag is spelled otherwise.
_FIELD_NAMES = {"H (max_norm)": "max_norm", "sigma_sqrt_d (sigma*sqrt(d))": "sigma_sqrt_d",
                "ten_over_h (10/H)": "ten_over_h", "gaussian std": "gaussian_std", "log": "log"}


def _with_flag_names(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """``invalid k_iwae = 5`` -> ``invalid --k = 5``: the flag the user typed, not the internal field."""
    match = re.match(r"invalid (.+?) = ", message)
    if not match:
        return message
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {action.dest: action.option_strings[0] for action in subparsers.choices[command]._actions
             if action.option_strings}
    flag = flags.get(_FIELD_NAMES.get(match[1], match[1]))
    return message.replace(match[0], f"invalid {flag} = ", 1) if flag else message


if __name__ == "__main__":
    sys.exit(main())
