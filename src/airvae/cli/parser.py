"""The ``airvae`` command's arguments: their types, checked as they are parsed, and one subparser per command."""

from __future__ import annotations

import argparse
import decimal
from pathlib import Path

from ..config import ARCHITECTURES, BUDGETS, LIKELIHOODS, MAX_SEED
from .commands import (
    TRAIN_DEFAULTS,
    cmd_bundle,
    cmd_datasets,
    cmd_evaluate,
    cmd_plot,
    cmd_report,
    cmd_reproduce,
    cmd_train,
)

DESCRIPTION = "The ``airvae`` command line: ``train``, ``evaluate``, ``plot``, ``reproduce``, ``report``, ``bundle``, ``datasets``."


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


def _add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    from ..estimators import REGISTRY
    from ..targets import EVALUATION_BUDGETS

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
    from ..targets import AIS_BUDGETS, EVALUATION_BUDGETS

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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="airvae", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one VAE/IWAE, optionally with AIR (denoising, WNI)")
    _add_train_arguments(p)
    _add_compile(p)
    p.set_defaults(func=cmd_train)
    TRAIN_DEFAULTS.update({action.dest: action.default for action in p._actions})
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
