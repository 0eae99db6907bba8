"""The DuckDB store: every result, keyed by its Spec's hash.

One Store object owns the DuckDB connection of a process; each thread works through its
own cursor (Streamlit serves sessions from several threads). Writes of one result happen in
one transaction, so a failure never leaves half a result. All SQL is parameterised.

Tables (schema version in `schema_version`, upgraded by MIGRATIONS in order):
  runs(run_key, kind, model, spec JSON, meta JSON, compute_seconds, created)
  arrays(run_key, name, dtype, shape INTEGER[], f FLOAT[], d DOUBLE[], i BIGINT[], s VARCHAR[])
  models(model_id, info JSON)
  jobs, job_chunks and the tables of each corpus job: defined beside the job (backend/jobs/),
  created by the migrations that name them.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from . import settings
from .errors import StoreCorrupted, StoreError, StoreLocked

MIGRATIONS: list[list[str] | str | list[str]] = [
    [  # 1: runs, arrays, models
        """CREATE TABLE runs(run_key VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL,
               model VARCHAR NOT NULL, spec JSON NOT NULL, meta JSON NOT NULL,
               compute_seconds DOUBLE, created TIMESTAMP DEFAULT current_timestamp)""",
        """CREATE TABLE arrays(run_key VARCHAR NOT NULL, name VARCHAR NOT NULL,
               dtype VARCHAR NOT NULL, shape INTEGER[] NOT NULL, f FLOAT[], d DOUBLE[],
               i BIGINT[], s VARCHAR[], PRIMARY KEY(run_key, name))""",
        "CREATE TABLE models(model_id VARCHAR PRIMARY KEY, info JSON NOT NULL)",
    ],
    # 2-4: the tables of the corpus jobs, defined beside each job (backend/jobs/): the job
    # protocol's own (jobs, job_chunks), neuron statistics and massive activations over a corpus
    # (per-chunk partial rows, then the merged tables), the SAE feature index (one index per
    # SAE id, weights hash and corpus slice; sparse rows, two clustered copies, per-feature
    # statistics, weight-derived tables keyed by "<sae id>@<weights hash>"). Resolved when a
    # store is migrated (a job module imports this one).
    "backend.jobs:SCHEMA",
    ["backend.jobs.neuron_stats:SCHEMA", "backend.jobs.massive_corpus:SCHEMA"],
    "backend.jobs.features.index:SCHEMA",
    # 5: saved circuits (backend/analyses/circuits.py): a name -> a circuit spec
    [
        """CREATE TABLE saved_circuits(circuit_id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL,
               run_key VARCHAR NOT NULL, spec JSON NOT NULL, faithfulness DOUBLE, link JSON,
               created TIMESTAMP DEFAULT current_timestamp)""",
    ],
    # 6: graphs over many prompts (backend/jobs/graph_corpus.py): feature nodes per stored graph
    "backend.jobs.graph_corpus:SCHEMA",
]
SCHEMA_VERSION = len(MIGRATIONS)


def _statements(step) -> list[str]:
    """A migration's SQL: its statements, or "module:NAME" references to a job's schema list."""
    import importlib

    refs = [step] if isinstance(step, str) else step
    out: list[str] = []
    for r in refs:
        if r.startswith("backend.") and ":" in r:          # SQL statements start with CREATE
            module, name = r.split(":")
            out += getattr(importlib.import_module(module), name)
        else:
            out.append(r)
    return out

_ARRAY_SCHEMA = pa.schema([
    ("run_key", pa.string()), ("name", pa.string()), ("dtype", pa.string()),
    ("shape", pa.list_(pa.int32())), ("f", pa.list_(pa.float32())), ("d", pa.list_(pa.float64())),
    ("i", pa.list_(pa.int64())), ("s", pa.list_(pa.string())),
])


def _column_of(arr: np.ndarray) -> str:
    if arr.dtype.kind == "f":
        return "d" if arr.dtype == np.float64 else "f"
    if arr.dtype.kind in "iub":
        return "i"
    if arr.dtype.kind in "UO":
        return "s"
    raise StoreError(f"Cannot store arrays of dtype {arr.dtype}.")


class Store:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else settings.store_path()
        self._local = threading.local()
        self._write_lock = threading.Lock()
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = duckdb.connect(str(self.path))
        except duckdb.Error as e:
            msg = str(e)
            if "lock" in msg.lower():
                raise StoreLocked(
                    f"The store {self.path} is in use by another process (a running dashboard?). "
                    "Stop it, or set DASHBOARD_STORE to another file.") from None
            raise StoreCorrupted(
                f"The store {self.path} cannot be opened ({msg.splitlines()[0]}). It was left "
                "untouched; move it aside or set DASHBOARD_STORE to another file.") from None
        self._migrate()

    # -- plumbing -----------------------------------------------------------------------
    def cursor(self) -> duckdb.DuckDBPyConnection:
        cur = getattr(self._local, "cur", None)
        if cur is None:
            cur = self._local.cur = self._conn.cursor()
        return cur

    def _migrate(self) -> None:
        cur = self.cursor()
        try:
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version(version INTEGER NOT NULL)")
            row = cur.execute("SELECT max(version) FROM schema_version").fetchall()[0]
        except duckdb.Error as e:
            raise StoreCorrupted(f"The store {self.path} is damaged: {e}") from None
        version = row[0] or 0
        if version > SCHEMA_VERSION:
            raise StoreError(f"The store {self.path} has schema {version}, newer than this code "
                             f"({SCHEMA_VERSION}). Update the code or use another store.")
        for v in range(version, SCHEMA_VERSION):
            cur.begin()
            try:
                for sql in _statements(MIGRATIONS[v]):
                    cur.execute(sql)
                cur.execute("INSERT INTO schema_version VALUES (?)", [v + 1])
                cur.commit()
            except Exception:
                cur.rollback()
                raise

    def close(self) -> None:
        self._conn.close()

    @contextlib.contextmanager
    def locked(self):
        """The store's write lock alone, for check-then-write sequences that keep their own
        cursor (and transaction); transaction() is the usual way to write. Nothing outside
        this module touches the lock itself."""
        with self._write_lock:
            yield

    @contextlib.contextmanager
    def transaction(self):
        """A cursor in one transaction under the store's write lock: committed when the block
        ends, rolled back if it raises."""
        cur = self.cursor()
        with self._write_lock:
            cur.begin()
            try:
                yield cur
                cur.commit()
            except BaseException:
                cur.rollback()
                raise

    # -- results ------------------------------------------------------------------------
    def has(self, run_key: str) -> bool:
        return bool(self.cursor().execute("SELECT 1 FROM runs WHERE run_key = ?", [run_key]).fetchall())

    def put(self, run_key: str, kind: str, model: str, spec_json: str, meta: dict[str, Any],
            arrays: dict[str, np.ndarray], compute_seconds: float) -> None:
        """Store one result atomically; a key already present is left as it is."""
        tables = record_tables(run_key, kind, model, spec_json, meta, arrays, compute_seconds)
        cur = self.cursor()
        with self._write_lock:
            if self.has(run_key):
                return
            cur.begin()
            try:
                insert_arrow(cur, "runs", tables["runs"])
                insert_arrow(cur, "arrays", tables["arrays"])
                cur.commit()
            except Exception:
                cur.rollback()
                raise

    def get(self, run_key: str) -> dict[str, Any] | None:
        """The stored record of a run: kind, spec, meta, arrays, compute_seconds; or None."""
        cur = self.cursor()
        rows = cur.execute("SELECT kind, spec, meta, compute_seconds FROM runs WHERE run_key = ?",
                           [run_key]).fetchall()
        if not rows:
            return None
        row = rows[0]
        tab = cur.sql("SELECT name, dtype, shape, f, d, i, s FROM arrays WHERE run_key = ?",
                      params=[run_key]).to_arrow_table()
        arrays = {}
        for k in range(tab.num_rows):
            name, dtype = tab["name"][k].as_py(), tab["dtype"][k].as_py()
            shape = tuple(tab["shape"][k].as_py())
            for c in "fdis":
                cell = tab[c][k]
                if cell.is_valid:
                    values = cell.values
                    flat = (np.array(values.to_pylist(), dtype=object) if c == "s"
                            else values.to_numpy(zero_copy_only=False))
                    break
            arr = flat.reshape(shape)
            arrays[name] = arr if dtype == "str" else arr.astype(dtype)
        return {"kind": row[0], "spec": json.loads(row[1]), "meta": json.loads(row[2]),
                "arrays": arrays, "compute_seconds": row[3]}

    def count_runs(self, kind: str | None = None) -> int:
        if kind is None:
            return self.cursor().execute("SELECT count(*) FROM runs").fetchall()[0][0]
        return self.cursor().execute("SELECT count(*) FROM runs WHERE kind = ?", [kind]).fetchall()[0][0]

    def list_runs(self, kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = "SELECT run_key, kind, model, spec, compute_seconds, created FROM runs"
        args: list[Any] = []
        if kind:
            sql += " WHERE kind = ?"
            args.append(kind)
        sql += " ORDER BY created DESC LIMIT ?"
        args.append(limit)
        return [{"run_key": r[0], "kind": r[1], "model": r[2], "spec": json.loads(r[3]),
                 "compute_seconds": r[4], "created": str(r[5])}
                for r in self.cursor().execute(sql, args).fetchall()]

    # -- models -------------------------------------------------------------------------
    def put_model_info(self, model_id: str, info: dict[str, Any]) -> None:
        with self._write_lock:
            self.cursor().execute("INSERT OR REPLACE INTO models VALUES (?, ?)", [model_id, json.dumps(info)])

    def get_model_info(self, model_id: str) -> dict[str, Any] | None:
        rows = self.cursor().execute("SELECT info FROM models WHERE model_id = ?", [model_id]).fetchall()
        return json.loads(rows[0][0]) if rows else None


_default: Store | None = None
_default_lock = threading.Lock()
# Called with the process's default store right after it opens (the CLI serves it: backend/cli.py).
on_open: list = []


def record_tables(run_key: str, kind: str, model: str, spec_json: str, meta: dict[str, Any],
                  arrays: dict[str, np.ndarray], compute_seconds: float) -> dict[str, pa.Table]:
    """One result as rows of `runs` and `arrays` (what Store.put writes), for a corpus job that
    stores ordinary results with its chunk (jobs/graph_corpus.py)."""
    rows = {c: [] for c in _ARRAY_SCHEMA.names}
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        col = _column_of(arr)
        flat = arr.reshape(-1)
        for c in "fdis":
            rows[c].append(None)
        rows["f" if col == "f" else col][-1] = (
            flat.astype(np.float32) if col == "f" else flat.astype(np.float64) if col == "d"
            else flat.astype(np.int64) if col == "i" else [str(x) for x in flat])
        rows["run_key"].append(run_key)
        rows["name"].append(name)
        rows["dtype"].append(str(arr.dtype) if col != "s" else "str")
        rows["shape"].append(list(arr.shape))
    table = pa.table({c: pa.array(rows[c], type=_ARRAY_SCHEMA.field(c).type) for c in _ARRAY_SCHEMA.names})
    run = pa.table({"run_key": [run_key], "kind": [kind], "model": [model], "spec": [spec_json],
                    "meta": [json.dumps(meta)], "compute_seconds": pa.array([compute_seconds], pa.float64())})
    return {"runs": run, "arrays": table}


def insert_arrow(cur, table: str, rows: pa.Table, order_by: str | None = None, or_ignore: bool = False) -> int:
    """Insert an Arrow table's rows into `table` by column name (in the caller's transaction);
    the number of rows. or_ignore: rows whose primary key is there already are skipped."""
    if rows.num_rows == 0:
        return 0
    name = "_arrow_rows"
    cur.register(name, rows)
    try:
        cols = ", ".join(rows.column_names)
        verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
        cur.execute(f"{verb} INTO {table}({cols}) SELECT {cols} FROM {name}" + (f" ORDER BY {order_by}" if order_by else ""))
    finally:
        cur.unregister(name)
    return rows.num_rows


def default_store() -> Store:
    """The process's store at settings.store_path(), opened once."""
    global _default
    with _default_lock:
        if _default is None or _default.path != settings.store_path():
            _default = Store()
            for fn in on_open:
                fn(_default)
        return _default


def default_is_open() -> bool:
    return _default is not None


def close_default() -> None:
    """Close the process's default store (a CLI hands the file to the next command)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
            _default = None
