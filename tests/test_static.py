"""Static checks that catch what tests may not execute: ruff's rule set (undefined names, unused imports,
import order, bugbear's traps, outdated syntax), the import layers, and the type annotations."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is in the dev extra")
def test_ruff_rules_pass():
    """The rules chosen in pyproject.toml [tool.ruff.lint], on everything that ships or measures."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                             "src", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_passes_on_src():
    """The annotations py.typed promises, checked by mypy with pyproject.toml [tool.mypy]: every module's
    bodies, and the public API's signatures complete (what a researcher's own type checker reads)."""
    pytest.importorskip("mypy", reason="mypy is in the dev extra")
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_is_layered_without_cycles():
    """import-linter's layers contract (pyproject.toml [tool.importlinter]): every module imports only
    from the layers below it, function-level imports included."""
    pytest.importorskip("importlinter", reason="import-linter comes with the dev extra")
    done = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0 and "broken" not in done.stdout.replace("0 broken", ""), done.stdout + done.stderr


def test_no_private_name_is_imported_across_modules():
    import ast

    private = []
    for path in sorted((ROOT / "src" / "airvae").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("airvae")):
                private += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, private
