"""The documentation site builds with --strict and without network, and its task pages' examples run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strictly_offline(tmp_path):
    for module in ("mkdocs", "mkdocstrings_handlers.python", "material"):
        pytest.importorskip(module, reason="the docs tools come with the dev extra: pip install -e '.[dev]'")
    # An unreachable proxy: any attempt to fetch something (fonts, inventories) fails the build.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "http_proxy": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    api = (site / "api" / "index.html").read_text()
    for name in ("iw_svi_log_likelihood", "cap_weight_norms", "plot_run", "load_trained_model", "write_bundle",
                 "TrackingSettings"):
        assert name in api, name  # the reference is generated from the docstrings
    for page in ("reproduce-a-table", "use-air-in-my-model", "estimate-log-likelihood"):
        assert (site / page / "index.html").exists()


@pytest.mark.parametrize("page", ["use-air-in-my-model", "estimate-log-likelihood"])
def test_task_page_examples_run_against_todays_api(page):
    text = (ROOT / "docs" / f"{page}.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    namespace: dict = {}
    for block in blocks:  # in order, sharing names, as a reader would paste them
        exec(compile(block, f"docs/{page}.md", "exec"), namespace)


def test_package_ships_py_typed():
    from importlib import resources

    assert resources.files("airvae").joinpath("py.typed").is_file()  # PEP 561: the package is typed
