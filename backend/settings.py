"""Process-wide settings, read once from the environment.

DASHBOARD_STORE       path of the DuckDB store (default: data/store.duckdb)
DASHBOARD_CACHE       where converted model checkpoints live (default: ~/.cache/interp-dashboard)
DASHBOARD_MAX_TOKENS  longest prompt accepted, in tokens (default: 256)
DASHBOARD_DEVICE      force a device ("cpu", "cuda"); default: CUDA when present
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"


def store_path() -> Path:
    return Path(os.environ.get("DASHBOARD_STORE", DATA_DIR / "store.duckdb"))


def corpus_root() -> Path:
    """Where corpora live (one folder per corpus name): DASHBOARD_CORPUS, default data/corpus."""
    return Path(os.environ.get("DASHBOARD_CORPUS", DATA_DIR / "corpus"))


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "interp-dashboard"
    return Path(os.environ.get("DASHBOARD_CACHE", default))


def max_tokens() -> int:
    return int(os.environ.get("DASHBOARD_MAX_TOKENS", "256"))


@lru_cache(maxsize=1)
def device() -> str:
    """The one place a device is chosen: CUDA when present, else CPU."""
    forced = os.environ.get("DASHBOARD_DEVICE")
    if forced:
        return forced
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
