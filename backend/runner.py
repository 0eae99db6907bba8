"""Compute once, read many times: the one entry point from which every analysis runs.

`run(spec)` looks the spec's key up in the store; on a hit it returns the stored result
without touching a model. On a miss it loads the model, computes under the model's lock,
stores the result in one transaction, and returns it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .errors import DashboardError, InvalidSpec
from .spec import Result, Spec
from .store import Store, default_store


@dataclass(frozen=True)
class Analysis:
    spec_cls: type[Spec]
    result_cls: type[Result]
    compute: Callable[..., Result]   # compute(spec, model, progress[, store]) -> Result

    @property
    def wants_store(self) -> bool:
        """Whether compute reads other stored results: then it gets the store it writes to."""
        import inspect

        return "store" in inspect.signature(self.compute).parameters


ANALYSES: dict[str, Analysis] = {}


def analysis(spec_cls: type[Spec], result_cls: type[Result]):
    """Register `compute(spec, model, progress)` as the analysis of spec_cls; a compute that
    reads other stored results takes `store` too and is given the store the runner writes to
    (so run(spec, store=X) never mixes X with the default store)."""
    def wrap(fn):
        ANALYSES[spec_cls.KIND] = Analysis(spec_cls, result_cls, fn)
        return fn
    return wrap


@dataclass(frozen=True)
class Outcome:
    spec: Spec
    result: Any
    run_key: str
    from_store: bool
    compute_seconds: float     # 0 when read from the store
    read_seconds: float        # time to read it back (0 when computed)
    stored_compute_seconds: float  # what computing it took when it was computed


_key_locks: dict[str, threading.Lock] = {}
_key_locks_guard = threading.Lock()
compute_count = 0  # how many computations this process ran (tests read it)


def _key_lock(key: str) -> threading.Lock:
    with _key_locks_guard:
        return _key_locks.setdefault(key, threading.Lock())


def lookup(spec: Spec, store: Store | None = None) -> Outcome | None:
    """The stored outcome of a spec, or None; never computes."""
    store = store or default_store()
    key = spec.key()
    t = time.perf_counter()
    rec = store.get(key)
    if rec is None:
        return None
    result = ANALYSES[spec.KIND].result_cls.from_record(rec["meta"], rec["arrays"])
    return Outcome(spec, result, key, True, 0.0, time.perf_counter() - t, rec["compute_seconds"] or 0.0)


def run(spec: Spec, store: Store | None = None, progress: Callable[[str], None] | None = None) -> Outcome:
    """The result of a spec: from the store if there, else computed and stored."""
    global compute_count
    if spec.KIND not in ANALYSES:
        raise InvalidSpec(f"No analysis is registered for kind {spec.KIND!r}.")
    store = store or default_store()
    with _key_lock(spec.key()):
        hit = lookup(spec, store)
        if hit is not None:
            return hit
        from .model import load_model  # imported late: a store hit never needs torch

        model = load_model(spec.model, progress=progress)
        t = time.perf_counter()
        a = ANALYSES[spec.KIND]
        result = a.compute(spec, model, progress, store=store) if a.wants_store else a.compute(spec, model, progress)
        seconds = time.perf_counter() - t
        compute_count += 1
        meta, arrays = result.to_record()
        store.put(spec.key(), spec.KIND, spec.model, spec.to_json(), meta, arrays, seconds)
        store.put_model_info(model.info.model_id, model.info.to_dict())
        return Outcome(spec, result, spec.key(), False, seconds, 0.0, seconds)


def model_info(model_id: str, store: Store | None = None) -> dict:
    """Dimensions of a model, from the store when known (no load), else by loading it."""
    store = store or default_store()
    info = store.get_model_info(model_id)
    if info is None:
        from .model import load_model

        info = load_model(model_id).info.to_dict()
        store.put_model_info(model_id, info)
    return info


__all__ = ["run", "lookup", "analysis", "Outcome", "model_info", "DashboardError"]
