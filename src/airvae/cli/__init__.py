"""The ``airvae`` command line: ``train``, ``evaluate``, ``plot``, ``reproduce``, ``report``, ``bundle``, ``datasets``.

Every user error (bad value, missing data, existing run) is reported as one line naming what is
wrong and how to fix it, with exit status 2; never a traceback. The arguments are declared in
``parser``, what each command does is in ``commands``, and ``main`` below turns errors into that line.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from ..config import ConfigError
from .parser import build_parser

__all__ = ["build_parser", "main"]


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

    from ..data import DatasetError
    from ..files import RunError
    from ..train import TrainingDiverged

    if getattr(args, "compile", None) is not None:
        from ..compiling import COMPILE_ENV, set_compile

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
