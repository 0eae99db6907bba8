"""A chunk's two halves that both engines share: how a worker rebuilds the work (Remote) and
how a finished chunk lands in the store (write_chunk). Kept apart from the driver
(backend/jobs/__init__.py) so that the Ray engine imports them without importing the driver
that imports it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from ..errors import StoreError

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
# Tables a chunk may write rows of that exist already (keyed results: a graph traced on a page
# and again by a corpus job is stored once).
KEYED = {"runs", "arrays"}


def write_chunk(store, job_key: str, chunk: int, tables: dict[str, pa.Table], seconds: float) -> bool:
    """Insert a chunk's rows and its done-mark atomically; False if the chunk was already done."""
    for name in tables:
        if not _IDENT.match(name):
            raise StoreError(f"Not a table name: {name!r}")
    from ..store import insert_arrow

    with store.transaction() as cur:
        if cur.execute("SELECT 1 FROM job_chunks WHERE job_key = ? AND chunk = ?",
                       [job_key, chunk]).fetchall():
            return False
        n = sum(insert_arrow(cur, name, table, or_ignore=name in KEYED) for name, table in tables.items())
        cur.execute("INSERT INTO job_chunks VALUES (?, ?, ?, ?)", [job_key, chunk, n, seconds])
    return True


@dataclass(frozen=True)
class Remote:
    """How a worker process rebuilds a job's `work(chunk)`: `factory` ("module:function") is
    called once per worker with `args` (plain, picklable values: the job config, thresholds…)
    and returns the work function, so each worker loads the model once."""

    factory: str
    args: tuple = ()

    def build(self) -> Callable[[int], dict[str, pa.Table]]:
        import importlib

        module, name = self.factory.split(":")
        return getattr(importlib.import_module(module), name)(*self.args)
