"""Process-wide settings, read once from the environment.

DASHBOARD_STORE       path of the DuckDB store (default: data/store.duckdb)
DASHBOARD_CACHE       where converted model checkpoints live (default: ~/.cache/interp-dashboard)
DASHBOARD_MAX_TOKENS  longest prompt accepted, in tokens (default: 256)
DASHBOARD_DEVICE      force a device ("cpu", "cuda"); default: CUDA when present
DASHBOARD_MODELS      local checkpoint folders to list as models, separated by os.pathsep (':');
                      `python -m backend models add PATH` registers more in <store>.models.txt
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


def env_model_folders() -> list[str]:
    """Checkpoint folders named in DASHBOARD_MODELS (os.pathsep-separated), in order."""
    return [p.strip() for p in os.environ.get("DASHBOARD_MODELS", "").split(os.pathsep) if p.strip()]


def registered_models_file() -> Path:
    """Where `models add` keeps the folders it registered: beside the store (one path a line), so
    each store (a project, a test) has its own list."""
    s = store_path()
    return s.with_name(s.stem + ".models.txt")


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
