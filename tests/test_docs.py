"""The documentation site builds with --strict and without network, and every code block of README.md
and docs/*.md works against today's airvae.

How the blocks are checked (a newcomer pastes one block at a time, so each one must work alone):

* ```` ```python ```` blocks run, each on its own in a fresh namespace, in a temporary folder.
* ```` ```bash ```` / ```` ```sh ```` blocks: every ``airvae ...`` command in them (after ``&&``, ``;``,
  ``VAR=value`` prefixes and ``\\`` continuations, comments dropped) is parsed by the CLI's own parser,
  ``airvae.cli.build_parser().parse_args``, without running it, so a renamed or removed flag, command
  or reproduction target fails here. Then the block runs: its commands, which must all be ``airvae``
  commands, are run in order through ``airvae.cli.main`` in a fresh temporary folder, and each must
  exit with status 0. Such blocks must stay quick: the bundled ``digits``, ``--budget smoke``, small
  evaluations.
* A block that cannot run (it installs packages, trains for minutes or more, or needs the results of
  one that does) is marked in the Markdown, alone on a line before it, with pytest-codeblocks' marker

      <!--pytest.mark.skip(reason="why")-->

  (an HTML comment: GitHub and the built site do not show it) and must be listed in ``NOT_RUN`` below
  with the same reason; its ``airvae`` commands are still parsed. A marked block that is not listed,
  or a listed one that is not marked, fails the suite.
* The README's conv VAE example (the first Python block after "Any VAE: the estimators' protocol")
  is run by tests/test_readme_example.py, which also checks what it computes; here it is only checked
  to be that block, so it is not trained twice.
* Any other fence language fails: a typo such as ```` ```pyhton ```` must not make a block unchecked.

Why pytest-codeblocks (a dev dependency): it is maintained (0.18.0, 2026), reads both Python and shell
blocks, and its markers are HTML comments that render as nothing. We use its parser and marker syntax
(``pytest_codeblocks.extract_from_file``) but not its collector (``pytest --codeblocks``): that
collector runs shell blocks whole with bash (installing packages, training for minutes) with no
parse-only check, and only collects with the flag given, so a plain ``python -m pytest`` would skip the
docs. pytest-markdown-docs was the other candidate: it runs Python fences only and also needs its own
flag (``--markdown-docs``).
"""

import contextlib
import importlib
import inspect
import io
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from pytest_codeblocks import extract_from_file
from test_readme_example import readme_example

import airvae.cli
from airvae.evaluation import ESTIMATORS, parse_estimators
from airvae.targets import TARGETS

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
PYTHON, SHELL, NOT_CODE = {"python", "py"}, {"bash", "sh", "shell"}, {"text", "console", "json", "yaml", "toml"}

# The blocks that are not run: (page, the start of the block's first line) -> the reason, which the
# block's <!--pytest.mark.skip(reason="...")--> marker repeats.
NOT_RUN = {
    ("README.md", "python3 -m venv .venv"):
        "installs packages, trains for minutes, then runs this test suite",
    ("README.md", "airvae datasets"):
        "an overview: needs the downloaded datasets, your own .npz files, earlier runs and results, and some "
        "lines train at the paper budget",
    ("docs/index.md", "pip install torch"): "installs packages",
    ("README.md", "airvae reproduce table1 --dataset caltech --budget paper --strengths paper"):
        "the paper budget: hours of training and evaluation on this machine",
    ("docs/train-my-model.md", "airvae evaluate runs/my-conv-vae --model my_models:conv_vae"):
        "needs your module (my_models.py with conv_vae) on the Python path",
    ("docs/estimate-log-likelihood.md", "airvae evaluate --study iwsvi-vs-iwae"):
        "the Figure 3 study's fixed grid (k up to 5000, T up to 1000) takes minutes",
    ("docs/reproduce-a-table.md", "airvae reproduce table1 --dataset caltech --budget quick --seeds 2 --workers 2"):
        "trains a grid of runs for minutes and needs the Caltech 101 Silhouettes files",
    ("docs/reproduce-a-table.md", "airvae reproduce table1 --dataset mnist --budget paper"):
        "the paper budget: the paper's full training (appendix E)",
    ("docs/reproduce-a-table.md", "airvae bundle results/table1-caltech-quick"):
        "needs results/table1-caltech-quick, made by the reproduction above",
    ("docs/reproduce-a-table.md", "airvae report table1-caltech-quick.zip"):
        "needs table1-caltech-quick.zip, made by the bundle above",
    ("docs/reproduce-a-table.md", "airvae reproduce table1 --dataset caltech --budget quick --seeds 2 --estimators"):
        "trains and evaluates for minutes and needs the Caltech 101 Silhouettes files",
    ("docs/reproduce-a-table.md", "airvae evaluate results/table1-caltech-quick/runs"):
        "needs results/table1-caltech-quick, made by the reproduction above",
}


def _blocks() -> list[tuple[str, object]]:
    return [(page, block) for page in PAGES for block in extract_from_file(ROOT / page)]


BLOCKS = _blocks()


def _skip_reason(block) -> str | None:
    """The reason of the block's skip marker; None when it has none. Other markers are refused."""
    reasons = []
    for mark in block.marks:
        decorator = eval(mark, {"pytest": pytest})  # as pytest-codeblocks' own collector reads them
        assert decorator.mark.name == "skip" and "reason" in decorator.mark.kwargs, (
            f"unsupported marker <!--{mark}-->: use <!--pytest.mark.skip(reason=\"...\")-->")
        reasons.append(decorator.mark.kwargs["reason"])
    assert len(reasons) <= 1, f"block at line {block.lineno}: one skip marker at most"
    return reasons[0] if reasons else None


def _listed(page: str, block) -> tuple[str, str] | None:
    keys = [key for key in NOT_RUN if key[0] == page and block.code.startswith(key[1])]
    assert len(keys) <= 1, keys
    return keys[0] if keys else None


def _id(page: str, block) -> str:
    return f"{page}:{block.lineno}"


def _params(languages: set[str]) -> list:
    params = []
    for page, block in BLOCKS:
        if block.syntax not in languages or _is_readme_conv_example(page, block):
            continue
        reason = _skip_reason(block)
        marks = [pytest.mark.skip(reason=f"marked not to run: {reason}")] if reason is not None else []
        params.append(pytest.param(page, block, marks=marks, id=_id(page, block)))
    return params


def _is_readme_conv_example(page: str, block) -> bool:
    """The README's conv VAE, which tests/test_readme_example.py runs (and checks what it computes)."""
    return page == "README.md" and block.code == readme_example()


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine does not slow them down by 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- the inventory


def test_every_block_is_known_and_every_marked_block_is_listed():
    marked, python, shell = {}, 0, 0
    for page, block in BLOCKS:
        assert block.syntax in PYTHON | SHELL | NOT_CODE, (
            f"{page}:{block.lineno}: fence language {block.syntax!r}; use python, bash or text")
        python += block.syntax in PYTHON
        shell += block.syntax in SHELL
        reason = _skip_reason(block)
        key = _listed(page, block)
        if reason is not None:
            assert key is not None, f"{page}:{block.lineno} is marked not to run but not listed in NOT_RUN"
            assert NOT_RUN[key] == reason, f"{page}:{block.lineno}: the marker's reason differs from NOT_RUN's"
            marked[key] = reason
        else:
            assert key is None, f"{page}:{block.lineno} is listed in NOT_RUN but not marked in the page"
    assert set(marked) == set(NOT_RUN), f"listed in NOT_RUN, found in no page: {set(NOT_RUN) - set(marked)}"
    assert python >= 6 and shell >= 10  # the pages hold code: the parser found it


# --------------------------------------------------------------------------- Python blocks


@pytest.mark.parametrize(("page", "block"), _params(PYTHON))
def test_python_block_runs_on_its_own(page, block, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(block.code, f"{page}, block at line {block.lineno}", "exec"), {"__name__": "__main__"})


def test_the_one_python_block_left_out_above_is_the_one_test_readme_example_runs():
    assert sum(_is_readme_conv_example(page, block) for page, block in BLOCKS) == 1


# --------------------------------------------------------------------------- shell blocks


_SEPARATORS = {"&&", "||", ";", "|", "&"}
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def shell_commands(code: str) -> list[tuple[dict[str, str], list[str]]]:
    """The simple commands of a shell block, each as (its VAR=value prefixes, its words)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token not in _SEPARATORS:
                words.append(token)
                continue
            env = {}
            while words and _ASSIGNMENT.match(words[0]):
                name, value = words.pop(0).split("=", 1)
                env[name] = value
            if words:
                commands.append((env, words))
            words = []
    return commands


def test_shell_commands_are_split_as_a_shell_would():
    code = ("A=1 B='x y' airvae train --dataset digits  # a comment\n"
            ". .venv/bin/activate && airvae evaluate RUN \\\n    --k 10; echo done\n")
    assert shell_commands(code) == [({"A": "1", "B": "x y"}, ["airvae", "train", "--dataset", "digits"]),
                                    ({}, [".", ".venv/bin/activate"]),
                                    ({}, ["airvae", "evaluate", "RUN", "--k", "10"]), ({}, ["echo", "done"])]


def _check_airvae_command(argv: list[str], where: str) -> None:
    """What the CLI would accept before doing any work: its parser, and the names it checks itself."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            args = airvae.cli.build_parser().parse_args(argv)
        except SystemExit as stop:
            pytest.fail(f"{where}: `airvae {shlex.join(argv)}` is refused by the CLI's parser "
                        f"(status {stop.code}): {stderr.getvalue().strip()}")
    if args.command == "reproduce":
        assert args.target in TARGETS, f"{where}: unknown reproduction target {args.target!r}"
    if getattr(args, "estimators", None) is not None:
        estimators = parse_estimators(args.estimators)
        assert estimators and set(estimators) <= set(ESTIMATORS), f"{where}: --estimators {args.estimators!r}"


def _airvae_commands(page: str, block) -> list[tuple[dict[str, str], list[str]]]:
    return [(env, words[1:]) for env, words in shell_commands(block.code) if words[0] == "airvae"]


@pytest.mark.parametrize(("page", "block"),
                         [pytest.param(page, block, id=_id(page, block)) for page, block in BLOCKS
                          if block.syntax in SHELL])
def test_shell_block_airvae_commands_parse(page, block):
    """Every block, marked or not: a renamed or removed flag fails here without running anything."""
    for _, argv in _airvae_commands(page, block):
        _check_airvae_command(argv, f"{page}:{block.lineno}")


@pytest.mark.parametrize(("page", "block"), _params(SHELL))
def test_shell_block_runs(page, block, tmp_path, monkeypatch, capsys, one_thread):
    commands = shell_commands(block.code)
    others = [shlex.join(words) for _, words in commands if words[0] != "airvae"]
    assert not others, (f"{page}:{block.lineno} runs {others}: a block that runs holds airvae commands only; "
                        "mark it <!--pytest.mark.skip(reason=...)--> and list it in NOT_RUN")
    assert commands, f"{page}:{block.lineno}: no command"
    monkeypatch.chdir(tmp_path)
    for env, words in commands:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        status = airvae.cli.main(words[1:])
        out = capsys.readouterr()
        assert status == 0, f"{page}:{block.lineno}: `{shlex.join(words)}` exited {status}:\n{out.err[-3000:]}"


# --------------------------------------------------------------------------- the site


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The documentation site, built once with ``mkdocs build --strict`` and no network: a broken
    cross-reference, a docstring that does not parse, a parameter documented but not in the signature
    (or a type missing) fails the build."""
    import subprocess

    for module in ("mkdocs", "mkdocstrings_handlers.python", "material"):
        pytest.importorskip(module, reason="the docs tools come with the dev extra: pip install -e '.[dev]'")
    # An unreachable proxy: any attempt to fetch something (fonts, inventories) fails the build.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "http_proxy": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    site = tmp_path_factory.mktemp("docs") / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return site


def test_docs_build_strictly_offline(site):
    api = (site / "api" / "index.html").read_text()
    for name in ("iw_svi_log_likelihood", "cap_weight_norms", "plot_run", "load_trained_model", "write_bundle",
                 "TrackingSettings"):
        assert name in api, name  # the reference is generated from the docstrings
    for page in ("index.html", "reproduce-a-table/index.html", "use-air-in-my-model/index.html",
                 "estimate-log-likelihood/index.html"):
        html = (site / page).read_text()
        # The not-to-run markers stay HTML comments: never shown as text on the site.
        assert "pytest.mark.skip" not in re.sub(r"<!--.*?-->", "", html, flags=re.S), page


# The API reference (docs/api.md) shows every public function and class of the modules it lists (and
# the names of their __all__), except these: public only because other airvae modules import them (the
# suite forbids importing private names), no part of what a user calls. A new public function or class
# must be either on the page or here, with its reason.
_CHECKS = "a validation helper of the configuration's fields"
_KERNEL = "a kernel of the log-weights path, behind log_weights_given_q, air_objective and VAE.log_weights"
_COMPILE = "torch.compile plumbing behind set_compile and compile_for"
_TRAIN = "a step of train()/fit() before training: refusing a run directory, or creating it"
_RUN_FILES = "run-directory plumbing of the trainers (marker, lock checks, leftovers of killed writes)"
_REPORT = "a piece of REPORT.md that render() assembles"
INTERNAL = {
    "airvae.config": {"require": _CHECKS, "is_int": _CHECKS, "is_real": _CHECKS, "check_int": _CHECKS,
                      "check_device_name": _CHECKS, "check_hidden_spec": _CHECKS, "check_training_fields": _CHECKS},
    "airvae.model": {"log_weights_from_eps": _KERNEL, "encode_log_weights": _KERNEL,
                     "denoising_parts": "how air_objective and a stacked group split a model's denoising encoder"},
    "airvae.compiling": {"torch_compile": _COMPILE, "call_compiled": _COMPILE, "run_kernel": _COMPILE},
    "airvae.networks": {"capped_rows": "eq. 17/18 on a weight's rows, inside CappedWeightNormLinear and "
                                       "CappedFilterNorm",
                        "mlp": "the dense ELU trunk of the encoders and decoders"},
    "airvae.estimators": {"chunked_iwae": "the running-logsumexp loop inside iwae_given_q and stacked_iwae"},
    "airvae.evaluation": {"check_run_data": "a step of evaluate_run and evaluate_group",
                          "store_evaluation": "a step of evaluate_run and evaluate_group",
                          "load_best_examples": "a step of evaluate_run and run_study"},
    "airvae.train": {"check_training_inputs": _TRAIN},
    "airvae.driver": {"StopFlag": "drive()'s signal handling", "fast_adam_options": "the optimizer's flags",
                      "diverged_message": "the text of a diverged run's summary"},
    "airvae.runs": {"check_run_dir_use": _TRAIN, "open_run_dir": _TRAIN,
                    "clean_temporaries": _RUN_FILES, "read_marker": _RUN_FILES, "write_marker": _RUN_FILES},
    "airvae.checkpoints": {"check_training_checkpoint": _RUN_FILES, "stream_digest": "hashing of a checkpoint file",
                           "file_digest": "hashing of a checkpoint file"},
    "airvae.locks": {"check_unlocked": _RUN_FILES},
    "airvae.files": {"hashed": "hashing in blocks, for runs and data", "write_error": "the message of a failed write",
                     "open_regular": "the open behind append_line and the run locks"},
    "airvae.sweep": {"finished_summary": "a step of execute()"},
    "airvae.report": {"check_reproduction": "a step of render()", "columns": _REPORT, "column_of": _REPORT,
                      "paper_column": _REPORT, "bdmc_section": _REPORT, "plots_section": _REPORT},
    "airvae.claims": {"fmt": "number formatting of the claims", "sign": "the sign of a number",
                      "seeds_note": "a table cell's seed count, formatting"},
    "airvae.resources": {"format_bytes": "the numbers of check_fits' message"},
    "airvae.manifest": {"said": "an error's message, cut short for manifest_jobs' one line"},
}
# Modules of airvae not rendered on the API page, and why; a package's modules are rendered through the
# package, whose names they define.
NOT_ON_PAGE = {"airvae.cli": "the command line: `airvae --help` and the README document it",
               "airvae.drawing": "loads matplotlib for the modules that draw; nothing for a user to call"}
_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj|const|py:\w+):`")


def test_every_module_is_on_the_api_page_or_said_why_not():
    import pkgutil

    import airvae

    page = {m.__name__ for m in _api_modules()}
    top = {m.name for m in pkgutil.iter_modules(airvae.__path__, "airvae.") if not m.name.split(".")[-1].startswith("_")}
    assert not top - page - set(NOT_ON_PAGE), f"modules missing from docs/api.md: {sorted(top - page - set(NOT_ON_PAGE))}"
    assert not set(NOT_ON_PAGE) & page, "a module in NOT_ON_PAGE is on the page"


def _api_modules() -> list:
    """The modules docs/api.md renders (``::: airvae.x`` lines naming a module, not a class)."""
    modules = []
    for path in re.findall(r"^::: (\S+)", (ROOT / "docs" / "api.md").read_text(), re.M):
        try:
            modules.append(importlib.import_module(path))
        except ImportError:  # a class of a module, rendered on its own
            assert importlib.import_module(path.rsplit(".", 1)[0]), path
    return modules


def _public(module) -> dict:
    """A module's public functions and classes: defined there without a leading underscore, or
    named in its __all__ (a package re-exporting its modules' API)."""
    exported = set(getattr(module, "__all__", ()))
    return {name: obj for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
            and (obj.__module__ == module.__name__ or name in exported)}


def _resolve(identifier: str):
    """The object a heading id of the API page (``airvae.module.Name``) stands for; None if none."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute, None)
        return obj
    return None


def test_api_reference_shows_every_public_name_and_no_internal_one(site):
    import airvae

    api = (site / "api" / "index.html").read_text()
    # mkdocstrings gives every rendered object a heading whose id is its path: the objects on the page
    shown: dict[str, list] = {}
    for identifier in set(re.findall(r'id="(airvae(?:\.[\w]+)*)"', api)):
        shown.setdefault(identifier.rsplit(".", 1)[-1], []).append(_resolve(identifier))

    def on_page(name: str, obj) -> bool:
        return any(candidate is obj for candidate in shown.get(name, []))

    missing = [f"airvae.{name}" for name in airvae.__all__ if not on_page(name, getattr(airvae, name))]
    modules = _api_modules()
    assert {"airvae.model", "airvae.likelihoods", "airvae.estimators", "airvae.evaluation", "airvae.data",
            "airvae.config"} <= {m.__name__ for m in modules}
    for module in modules:
        internal = INTERNAL.get(module.__name__, {})
        public = _public(module)
        assert set(internal) <= set(public), f"INTERNAL lists names {module.__name__} no longer has"
        for name, obj in public.items():
            if name in internal:
                assert not on_page(name, obj), f"{module.__name__}.{name} is internal ({internal[name]}) but shown"
            elif not on_page(name, obj):
                missing.append(f"{module.__name__}.{name}")
    assert not missing, ("public names missing from the API reference (add them to docs/api.md, or to INTERNAL "
                         f"with a reason): {sorted(set(missing))}")
    assert len(shown) > 300  # the page holds the reference, not a stub


def test_no_sphinx_roles_left(site):
    """The docstrings are Google-style Markdown: a cross-reference is [`name`][airvae.module.name] (checked by
    --strict), never a Sphinx role such as :func:`name`, which mkdocstrings would show as literal text."""
    in_source = [f"{path.relative_to(ROOT)}:{number}" for path in sorted((ROOT / "src" / "airvae").rglob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1) if _ROLE.search(line)]
    assert not in_source, f"Sphinx roles in the source: {in_source}"
    in_site = [str(page.relative_to(site)) for page in sorted(site.rglob("*.html")) if _ROLE.search(page.read_text())]
    assert not in_site, f"Sphinx roles shown on the site: {in_site}"


def test_package_ships_py_typed():
    from importlib import resources

    assert resources.files("airvae").joinpath("py.typed").is_file()  # PEP 561: the package is typed


# A decimal number in prose or a table ("107.79", "0.0228"); signs and units are left off.
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.]*\d)")


def result_sections():
    """(page, section title, committed results folders it cites, its text without code blocks) for each
    ``## `` section of the docs that cites a folder of results/ and quotes decimal numbers."""
    for page in PAGES:
        for section in re.split(r"(?m)^## ", (ROOT / page).read_text()):
            folders = sorted({ROOT / "results" / name for name in re.findall(r"results/([\w.-]+)/", section)})
            folders = [folder for folder in folders if folder.is_dir()]
            text = re.sub(r"```.*?```", "", section, flags=re.S)
            if folders and DECIMAL.search(text):
                yield page, section.splitlines()[0], folders, text


@pytest.mark.parametrize("page, title, folders, text",
                         [pytest.param(*section, id=f"{section[0]}: {section[1]}") for section in result_sections()])
def test_every_number_a_results_section_quotes_is_in_its_committed_report(page, title, folders, text):
    """A section that reports a committed result quotes its decimals verbatim from that result's
    REPORT.md or tables (or from the paper's own tables), so a number cannot drift from the files
    behind it, be rounded differently, or come from a run that was never committed."""
    files = [file for folder in folders for file in sorted(folder.rglob("*")) if file.suffix in {".md", ".csv"}]
    files.append(ROOT / "src/airvae/paper_results/paper_tables.json")
    committed = {number for file in files for number in DECIMAL.findall(file.read_text())}
    quoted = DECIMAL.findall(text)
    missing = sorted(set(quoted) - committed)
    assert not missing, (f"{page} '{title}' quotes {missing}, found in no REPORT.md or CSV of "
                         f"{[str(f.relative_to(ROOT)) for f in folders]}: quote the committed figure")


def test_the_readme_sections_that_report_results_are_among_those_checked():
    titles = {title for _, title, _, _ in result_sections()}
    assert {"The paper's protocol, run for real: Table 1 on Caltech 101 Silhouettes",
            "Beyond the paper: does AIR help a conv VAE on grey-level images?"} <= titles, titles
