"""Shared fixtures and test tiers. Tests use the real packaged model and real DuckDB files.

Tiers (markers): `model` for modules that load a real model, `browser` for Playwright tests;
a module with neither runs in seconds. Fast tier: `pytest -m "not model and not browser"`.

The store of every test session is a fresh temporary file (DASHBOARD_STORE), so the
developer's data/store.duckdb is never touched. The converted model checkpoint is cached
across runs in DASHBOARD_CACHE (default ~/.cache/interp-dashboard).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n N` the N workers share the machine's cores: one math thread each (set
    # before torch is imported; the dashboards and Ray workers the tests start inherit it), so
    # the workers do not oversubscribe the cores and spin against each other.
    _per_worker = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_per_worker))
_TMP = tempfile.mkdtemp(prefix="dash-tests-")
os.environ["DASHBOARD_STORE"] = str(Path(_TMP) / "session-store.duckdb")
os.environ["DASHBOARD_CORPUS"] = str(Path(_TMP) / "corpus")   # never the developer's data/corpus

DEFAULT_MODEL = "smollm2-135m"
# The longest modules (minutes each under `pytest -n 2`), started first: with `--dist loadfile`
# a worker takes whole modules in collection order, so a long module collected last would run
# alone at the end while the other worker idles. Measured in session 14 (-n 2, 2 cores). test_gemma
# is the longest where the Gemma package is installed (it skips at once where it is not, as in CI).
LONG_MODULES = ("test_gemma", "test_ray_engine", "test_real_use", "test_bootstrap", "test_app", "test_steering_browser",
                "test_graph_corpus", "test_das_browser", "test_saes", "test_graph_browser",
                "test_token_attribution_browser", "test_feature_pages", "test_probes_browser", "test_shared_store")
MODEL_FIXTURES = {"model", "session_corpus", "gemma"}


def pytest_configure(config):
    """Test tiers: `pytest -m "not model and not browser"` runs in seconds with no model load."""
    config.addinivalue_line("markers", "model: loads a real model (slow tier)")
    config.addinivalue_line("markers", "browser: drives the dashboard in headless Chromium (slowest tier)")


def pytest_collection_modifyitems(config, items):
    """A test that asks for a model fixture is in the model tier even if its module forgot the mark.
    The long modules go first (a stable sort: a module's tests keep their order)."""
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("model"):
            item.add_marker(pytest.mark.model)
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))


@pytest.fixture(scope="session")
def model():
    """The real default model, loaded once per test session."""
    from backend.model import load_model

    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def session_corpus(model):
    """A small default corpus (Python standard-library docstrings: always installed), tokenised
    for the default model, in the session's DASHBOARD_CORPUS; for tests of corpus jobs."""
    from backend import corpus

    if not corpus.exists():
        corpus.build(["stdlib"], max_words=30_000)
        corpus.tokenize(DEFAULT_MODEL)
    return corpus.corpus_dir()


@pytest.fixture()
def store(tmp_path):
    """A fresh DuckDB store file for one test."""
    from backend.store import Store

    s = Store(tmp_path / "store.duckdb")
    yield s
    s.close()
