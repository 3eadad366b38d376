"""What each ``airvae`` command does with its parsed arguments: checks that need no data first, then the
library call, then a table or the written paths on stdout. Errors are raised (ConfigError and the
like); ``airvae.cli.main`` turns them into one line."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ..config import (
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
    from ..data import DATASETS, check_dataset_name

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
    from ..tracking import TrackingSettings

    return None if args.log is None else TrackingSettings.parse(args.log)


# What `train --resume --run-dir DIR` alone may be given: where and how to run, not what to train.
_RESUME_FLAGS = {"dataset", "resume", "run_dir", "device", "data_dir", "no_progress", "compile", "log",
                 "allow_data_change", "func", "command"}
TRAIN_DEFAULTS: dict = {}  # the train parser's defaults, filled by parser.build_parser


def cmd_train(args) -> int:
    from ..data import load_dataset
    from ..runs import load_config
    from ..train import train

    tracking = _tracking(args)
    if args.allow_data_change and not args.resume:
        raise ConfigError("--allow-data-change applies to --resume only (a new run records the data it starts on); "
                          "drop it, or add --resume")
    if args.dataset is None:
        if not (args.resume and args.run_dir):
            from ..data import DATASETS

            raise ConfigError(f"missing --dataset: allowed {', '.join(DATASETS)} or a .npz path "
                              "(only `--resume --run-dir DIR` may leave it out)")
        ignored = [f"--{dest.replace('_', '-')}" for dest, value in vars(args).items()
                   if dest not in _RESUME_FLAGS and value != TRAIN_DEFAULTS.get(dest)]
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
        from ..runs import check_run_dir_use

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
    from ..data import DATASETS, load_dataset

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
    from ..config import FitConfig
    from ..runs import build_model, load_config

    cfg = load_config(run_dir)  # a clear error for a folder that is not a run
    model = _user_model(text)
    if isinstance(cfg, FitConfig) != (model is not None):
        build_model(cfg, model, Path(run_dir))  # refuses, saying which way round
    return model


def cmd_evaluate(args) -> int:
    from ..bundle import resolve
    from ..evaluation import EvaluationSettings, evaluate_run, format_table, parse_estimators
    from ..iwsvi_study import run_study

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
        from ..figures import draw_figure3

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
    from ..runs import load_config
    from ..targets import EVALUATION_BUDGETS

    budget = getattr(load_config(run_dir), "budget", None)
    return budget if budget in EVALUATION_BUDGETS else "paper"


def _evaluation_effort(args, estimators: tuple[str, ...], budget: str) -> dict:
    """EvaluationSettings' effort fields: the budget's (targets.EVALUATION_BUDGETS, and AIS_BUDGETS when
    ais or bdmc run), each replaced by its flag where one was given."""
    from ..targets import AIS_BUDGETS, EVALUATION_BUDGETS

    effort = dict(EVALUATION_BUDGETS[budget])
    if {"ais", "bdmc"} & set(estimators):
        effort.update(AIS_BUDGETS[budget])
    effort.update({key: getattr(args, key) for key in _EFFORT_FLAGS if getattr(args, key) is not None})
    return effort


def cmd_plot(args) -> int:
    from ..bundle import resolve
    from ..plots import plot_run

    run_dir = resolve(args.run_dir)
    plots = plot_run(run_dir, args.out, which=args.which, examples=args.examples, data_dir=args.data_dir,
                     device=args.device, model=_run_model(run_dir, args.model))
    print("\n".join(f"written {path}" for path in plots.written.values()))
    print("\n".join(f"skipped {name}: {why}" for name, why in plots.skipped.items()))
    return 0


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
    from ..devices import resolve_device
    from ..evaluation import parse_estimators
    from ..reproduce import reproduce
    from ..sweep import make_executor
    from ..targets import TARGETS

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
    from ..bundle import resolve
    from ..locks import RunLock
    from ..report import check_reproduction, render

    folder = check_reproduction(resolve(args.results_dir))
    with RunLock(folder):  # refused while a reproduction writes the folder
        out_dir = render(folder)
    print((out_dir / "REPORT.md").read_text())
    print(f"plots and REPORT.md in {out_dir}")  # for a bundle, its extraction: a cache folder nobody chose
    return 0


def cmd_bundle(args) -> int:
    from ..bundle import write_bundle

    out = write_bundle(args.results_dir, args.out)
    print(f"written {out} ({out.stat().st_size / 1e6:.1f} MB): `airvae report {out}`, "
          f"`airvae evaluate {out}/RUN` and airvae.load('{out}/RUN') read it anywhere")
    return 0
