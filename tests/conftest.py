import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests explore the same examples on every run: a red CI must mean a regression, not a new
# random draw (run `pytest --hypothesis-seed=random` to explore further).
settings.register_profile("airvae", derandomize=True)
settings.load_profile("airvae")

# The datasets' offline copies (never committed): ../shared/data beside the repository, as in CI.
DATA_DIR = Path(os.environ.get("AIRVAE_TEST_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def data_dir() -> str:
    if not DATA_DIR.exists():
        pytest.skip(f"dataset copies not found at {DATA_DIR} (set AIRVAE_TEST_DATA_DIR)")
    return str(DATA_DIR)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Tests never write into the user's ~/.cache; one cache per session keeps conversions cheap.
    monkeypatch.setenv("AIRVAE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "airvae-cache"))
