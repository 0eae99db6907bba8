"""Shared fixtures. Tests use the real packaged model and real DuckDB files.

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
_TMP = tempfile.mkdtemp(prefix="dash-tests-")
os.environ["DASHBOARD_STORE"] = str(Path(_TMP) / "session-store.duckdb")
os.environ["DASHBOARD_CORPUS"] = str(Path(_TMP) / "corpus")   # never the developer's data/corpus

DEFAULT_MODEL = "smollm2-135m"


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
