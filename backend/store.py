"""The DuckDB store: every result, keyed by its Spec's hash.

One Store object owns the DuckDB connection of a process; each thread works through its
own cursor (Streamlit serves sessions from several threads). Writes of one result happen in
one transaction, so a failure never leaves half a result. All SQL is parameterised.

Tables (schema version in `schema_version`, upgraded by MIGRATIONS in order):
  runs(run_key, kind, model, spec JSON, meta JSON, compute_seconds, created)
  arrays(run_key, name, dtype, shape INTEGER[], f FLOAT[], d DOUBLE[], i BIGINT[], s VARCHAR[])
  models(model_id, info JSON)
  jobs, job_chunks (resumable corpus jobs: backend/jobs.py)
Later migrations add the tables of corpus jobs (neuron statistics, SAE feature activations).
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

MIGRATIONS: list[list[str]] = [
    [  # 1: runs, arrays, models
        """CREATE TABLE runs(run_key VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL,
               model VARCHAR NOT NULL, spec JSON NOT NULL, meta JSON NOT NULL,
               compute_seconds DOUBLE, created TIMESTAMP DEFAULT current_timestamp)""",
        """CREATE TABLE arrays(run_key VARCHAR NOT NULL, name VARCHAR NOT NULL,
               dtype VARCHAR NOT NULL, shape INTEGER[] NOT NULL, f FLOAT[], d DOUBLE[],
               i BIGINT[], s VARCHAR[], PRIMARY KEY(run_key, name))""",
        "CREATE TABLE models(model_id VARCHAR PRIMARY KEY, info JSON NOT NULL)",
    ],
    # 2: resumable corpus jobs (backend/jobs.py)
    [
        """CREATE TABLE jobs(job_key VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, model VARCHAR NOT NULL,
               spec JSON NOT NULL, n_chunks INTEGER NOT NULL, summary JSON,
               created TIMESTAMP DEFAULT current_timestamp, finished TIMESTAMP)""",
        """CREATE TABLE job_chunks(job_key VARCHAR NOT NULL, chunk INTEGER NOT NULL,
               n_rows BIGINT NOT NULL, seconds DOUBLE, PRIMARY KEY(job_key, chunk))""",
    ],
    # 3: neuron corpus statistics (backend/neuron_stats.py) and massive activations over a
    # corpus (backend/massive_corpus.py): per-chunk partial rows, then the merged tables.
    [
        """CREATE TABLE neuron_part(job_key VARCHAR NOT NULL, chunk INTEGER NOT NULL, layer SMALLINT NOT NULL,
               n BIGINT, active INTEGER[], sum DOUBLE[], sumsq DOUBLE[], mass DOUBLE[], ss_tot DOUBLE[],
               ssb_pos DOUBLE[], ssb_tok DOUBLE[], g_pos INTEGER, g_tok INTEGER)""",
        """CREATE TABLE neuron_part_big(job_key VARCHAR NOT NULL, chunk INTEGER NOT NULL,
               layer SMALLINT NOT NULL, hist INTEGER[], k SMALLINT, top_value FLOAT[], top_doc INTEGER[],
               top_pos INTEGER[], kt SMALLINT, tok_id INTEGER[], tok_mass FLOAT[], tok_count INTEGER[])""",
        """CREATE TABLE neuron_stats(job_key VARCHAR NOT NULL, layer SMALLINT NOT NULL, neuron SMALLINT NOT NULL,
               n BIGINT, active BIGINT, freq DOUBLE, mean DOUBLE, std DOUBLE, max FLOAT, dead BOOLEAN,
               mass DOUBLE, top1_share DOUBLE, top5_share DOUBLE, top_tokens INTEGER[],
               top_token_mass FLOAT[], top_token_count INTEGER[], pos_share DOUBLE, tok_share DOUBLE,
               token_detector BOOLEAN, is_positional BOOLEAN)""",
        """CREATE TABLE neuron_top(job_key VARCHAR NOT NULL, layer SMALLINT NOT NULL, neuron SMALLINT NOT NULL,
               rank SMALLINT NOT NULL, doc INTEGER, pos INTEGER, value FLOAT)""",
        """CREATE TABLE neuron_hist(job_key VARCHAR NOT NULL, layer SMALLINT NOT NULL, neuron SMALLINT NOT NULL,
               counts INTEGER[])""",
        """CREATE TABLE massive_part(job_key VARCHAR NOT NULL, chunk INTEGER NOT NULL, layer SMALLINT NOT NULL,
               dim SMALLINT NOT NULL, kind VARCHAR NOT NULL, n BIGINT, n_seqs INTEGER, sum DOUBLE,
               sumsq DOUBLE, vmin FLOAT, vmax FLOAT)""",
        """CREATE TABLE massive_layer_part(job_key VARCHAR NOT NULL, chunk INTEGER NOT NULL,
               layer SMALLINT NOT NULL, n_seqs INTEGER, seqs_with INTEGER, median_sum DOUBLE,
               top_sum DOUBLE, top_max FLOAT, ratio_max DOUBLE, n_tokens BIGINT)""",
    ],
    # 4: SAE features over a corpus (backend/features_corpus): one index per (SAE id, weights
    # hash, corpus slice); sparse activation rows as the job writes them, then two clustered
    # copies; per-feature statistics; weight-derived tables keyed by "<sae id>@<weights hash>".
    [
        """CREATE TABLE feature_indexes(ix SMALLINT PRIMARY KEY, sae_id VARCHAR NOT NULL,
               weights_hash VARCHAR NOT NULL, model VARCHAR NOT NULL, hook_name VARCHAR, d_sae INTEGER,
               corpus VARCHAR, split VARCHAR, context INTEGER, n_windows INTEGER, job_key VARCHAR NOT NULL,
               n_tokens BIGINT, n_rows BIGINT, built TIMESTAMP)""",
        """CREATE TABLE feature_acts(ix SMALLINT NOT NULL, feature INTEGER NOT NULL, doc INTEGER NOT NULL,
               pos INTEGER NOT NULL, value FLOAT NOT NULL, token INTEGER NOT NULL)""",
        """CREATE TABLE feature_acts_by_feature(ix SMALLINT NOT NULL, feature INTEGER NOT NULL,
               doc INTEGER NOT NULL, pos INTEGER NOT NULL, value FLOAT NOT NULL, token INTEGER NOT NULL)""",
        """CREATE TABLE feature_acts_by_doc(ix SMALLINT NOT NULL, feature INTEGER NOT NULL,
               doc INTEGER NOT NULL, pos INTEGER NOT NULL, value FLOAT NOT NULL, token INTEGER NOT NULL)""",
        """CREATE TABLE feature_windows(ix SMALLINT NOT NULL, doc INTEGER NOT NULL, start INTEGER NOT NULL,
               ids INTEGER[] NOT NULL)""",
        """CREATE TABLE feature_stats(ix SMALLINT NOT NULL, feature INTEGER NOT NULL, n BIGINT, density DOUBLE,
               max FLOAT, mean FLOAT, quantiles FLOAT[])""",
        """CREATE TABLE feature_hist(ix SMALLINT NOT NULL, feature INTEGER NOT NULL, bin SMALLINT NOT NULL,
               n BIGINT)""",
        """CREATE TABLE feature_top_tokens(ix SMALLINT NOT NULL, feature INTEGER NOT NULL, token INTEGER NOT NULL,
               n INTEGER)""",
        """CREATE TABLE sae_logit_effects(sae_key VARCHAR NOT NULL, feature INTEGER NOT NULL,
               rank SMALLINT NOT NULL, token INTEGER NOT NULL, value FLOAT NOT NULL)""",
        """CREATE TABLE sae_similar(sae_key VARCHAR NOT NULL, feature INTEGER NOT NULL, rank SMALLINT NOT NULL,
               other INTEGER NOT NULL, cosine FLOAT NOT NULL)""",
        """CREATE TABLE sae_maps(sae_key VARCHAR NOT NULL, feature INTEGER NOT NULL, x FLOAT, y FLOAT)""",
        """CREATE TABLE token_strings(model VARCHAR NOT NULL, token INTEGER NOT NULL, text VARCHAR NOT NULL)""",
    ],
    # 5: saved circuits (backend/analyses/circuits.py): a name -> a circuit spec
    [
        """CREATE TABLE saved_circuits(circuit_id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL,
               run_key VARCHAR NOT NULL, spec JSON NOT NULL, faithfulness DOUBLE, link JSON,
               created TIMESTAMP DEFAULT current_timestamp)""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)

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
                for sql in MIGRATIONS[v]:
                    cur.execute(sql)
                cur.execute("INSERT INTO schema_version VALUES (?)", [v + 1])
                cur.commit()
            except Exception:
                cur.rollback()
                raise

    def close(self) -> None:
        self._conn.close()

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
        table = pa.table({c: pa.array(rows[c], type=_ARRAY_SCHEMA.field(c).type)
                          for c in _ARRAY_SCHEMA.names})
        cur = self.cursor()
        with self._write_lock:
            if self.has(run_key):
                return
            cur.begin()
            try:
                cur.execute("INSERT INTO runs(run_key, kind, model, spec, meta, compute_seconds) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            [run_key, kind, model, spec_json, json.dumps(meta), compute_seconds])
                if arrays:
                    insert_arrow(cur, "arrays", table)
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


def insert_arrow(cur, table: str, rows: pa.Table, order_by: str | None = None) -> int:
    """Insert an Arrow table's rows into `table` by column name (in the caller's transaction);
    the number of rows."""
    if rows.num_rows == 0:
        return 0
    name = "_arrow_rows"
    cur.register(name, rows)
    try:
        cols = ", ".join(rows.column_names)
        cur.execute(f"INSERT INTO {table}({cols}) SELECT {cols} FROM {name}" + (f" ORDER BY {order_by}" if order_by else ""))
    finally:
        cur.unregister(name)
    return rows.num_rows


def default_store() -> Store:
    """The process's store at settings.store_path(), opened once."""
    global _default
    with _default_lock:
        if _default is None or _default.path != settings.store_path():
            _default = Store()
        return _default
