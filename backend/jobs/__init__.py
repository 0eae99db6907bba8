"""Long corpus work as resumable jobs: a job is a fixed list of chunks; each chunk's rows and
the mark that the chunk is done are written in ONE transaction, so an interrupted job resumes
at the first chunk without a mark, with no row lost and none written twice.

    def work(chunk: int) -> dict[str, pyarrow.Table]:   # rows for tables made by a migration
        ...
    state = run_job(store, job_key, kind="neuron_stats", model="smollm2-135m",
                    spec={"windows": 400}, n_chunks=40, work=work, progress=bar)

`progress(done, total, message)` is called after every chunk: the CLI passes a tqdm bar
(`tqdm_progress`), the page a st.progress callback. `finish(...)` of the caller (clustering,
summaries) runs after the last chunk; `JobState.finished` says whether it has.

Tables (store.py migration 2):
  jobs(job_key, kind, model, spec JSON, n_chunks, summary JSON, created, finished)
  job_chunks(job_key, chunk, n_rows, seconds)
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from ..errors import StoreError
from .chunks import Remote, write_chunk  # noqa: F401  (re-exported: jobs.Remote, jobs.write_chunk)

# The protocol's tables (store migration 2).
SCHEMA = [
    """CREATE TABLE jobs(job_key VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, model VARCHAR NOT NULL,
               spec JSON NOT NULL, n_chunks INTEGER NOT NULL, summary JSON,
               created TIMESTAMP DEFAULT current_timestamp, finished TIMESTAMP)""",
    """CREATE TABLE job_chunks(job_key VARCHAR NOT NULL, chunk INTEGER NOT NULL,
               n_rows BIGINT NOT NULL, seconds DOUBLE, PRIMARY KEY(job_key, chunk))""",
]


Progress = Callable[[int, int, str], None]

# Set when the process is stopping (the dashboard's exit, backend/bootstrap.py): a job running
# in a background thread stops before its next chunk (JobStopped), the chunks written stay.
STOP = threading.Event()


class JobStopped(StoreError):
    """The process is stopping: the job stopped between two chunks and resumes at the next start."""
    code = "job_stopped"


@dataclass(frozen=True)
class JobState:
    job_key: str
    kind: str
    n_chunks: int
    done: int
    finished: bool
    summary: dict[str, Any] | None

    @property
    def fraction(self) -> float:
        return self.done / self.n_chunks if self.n_chunks else 1.0


def state(store, job_key: str) -> JobState | None:
    cur = store.cursor()
    rows = cur.execute("SELECT kind, n_chunks, summary, finished IS NOT NULL FROM jobs WHERE job_key = ?",
                       [job_key]).fetchall()
    if not rows:
        return None
    kind, n, summary, finished = rows[0]
    done = cur.execute("SELECT count(*) FROM job_chunks WHERE job_key = ?", [job_key]).fetchall()[0][0]
    return JobState(job_key, kind, n, done, bool(finished), json.loads(summary) if summary else None)


def _register(store, job_key: str, kind: str, model: str, spec: dict, n_chunks: int) -> None:
    with store.locked():
        cur = store.cursor()
        rows = cur.execute("SELECT n_chunks FROM jobs WHERE job_key = ?", [job_key]).fetchall()
        if rows:
            if rows[0][0] != n_chunks:
                raise StoreError(f"Job {job_key} was started with {rows[0][0]} chunks, not {n_chunks}.")
            return
        cur.execute("INSERT INTO jobs(job_key, kind, model, spec, n_chunks) VALUES (?, ?, ?, ?, ?)",
                    [job_key, kind, model, json.dumps(spec, sort_keys=True), n_chunks])


def done_chunks(store, job_key: str) -> set[int]:
    rows = store.cursor().execute("SELECT chunk FROM job_chunks WHERE job_key = ?", [job_key]).fetchall()
    return {r[0] for r in rows}


def finish(store, job_key: str, summary: dict[str, Any], sql: list[str] | None = None,
           params: list[list] | None = None) -> None:
    """Mark a job finished with its summary; `sql` (e.g. building a clustered copy) runs in the
    same transaction."""
    with store.transaction() as cur:
        for k, q in enumerate(sql or []):
            cur.execute(q, (params or [[]] * len(sql))[k])
        cur.execute("UPDATE jobs SET summary = ?, finished = current_timestamp WHERE job_key = ?",
                    [json.dumps(summary), job_key])


ENGINES = ("local", "ray")


def run_job(store, job_key: str, kind: str, model: str, spec: dict, n_chunks: int,
            work: Callable[[int], dict[str, pa.Table]] | None, progress: Progress | None = None,
            stop_after: int | None = None, engine: str = "local", remote: Remote | None = None,
            workers: int | None = None) -> JobState:
    """Run the chunks not yet done. `stop_after` (tests, time-boxed page runs) stops after that
    many new chunks, leaving the job resumable.

    engine "local" runs `work` here, in chunk order. engine "ray" runs the chunks as Ray tasks on
    actors built from `remote` (backend/jobs/ray_engine.py): each writes its chunk as Parquet shards,
    and this process merges every complete shard into the store with its done-mark, in one
    transaction per chunk, exactly as the local engine writes its rows."""
    if engine not in ENGINES:
        raise StoreError(f"Unknown engine {engine!r}; use one of {', '.join(ENGINES)}.")
    _register(store, job_key, kind, model, spec, n_chunks)
    done = done_chunks(store, job_key)
    if progress:
        progress(len(done), n_chunks, f"{kind}: {len(done)}/{n_chunks} chunks done")
    if engine == "ray":
        if remote is None:
            raise StoreError(f"The {kind} job cannot run on Ray: it gives no remote work factory.")
        from .ray_engine import Stopped, run_chunks

        try:
            run_chunks(store, job_key, kind, n_chunks, done, remote, progress=progress, stop_after=stop_after,
                       workers=workers, stop=STOP)
        except Stopped as e:
            raise JobStopped(f"{kind} {e}") from None
        return state(store, job_key)
    new = 0
    for chunk in range(n_chunks):
        if chunk in done:
            continue
        if stop_after is not None and new >= stop_after:
            break
        if STOP.is_set():
            raise JobStopped(f"{kind} stopped at chunk {chunk + 1}/{n_chunks} (the process is stopping); "
                             "it resumes there.")
        t = time.perf_counter()
        tables = work(chunk)
        if write_chunk(store, job_key, chunk, tables, time.perf_counter() - t):
            done.add(chunk)
            new += 1
        if progress:
            progress(len(done), n_chunks, f"{kind}: chunk {chunk + 1}/{n_chunks}")
    return state(store, job_key)


def check_windows(cfg) -> None:
    """Validate the window fields shared by corpus-job configs (n_windows, length, chunk, split)."""
    from ..errors import InvalidSpec

    for name, lo, hi in (("n_windows", 1, 100_000), ("length", 2, 1024), ("chunk", 1, 256)):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise InvalidSpec(f"{name} must be an integer in {lo}–{hi}, got {v!r}.")
    if cfg.split not in ("train", "heldout"):
        raise InvalidSpec(f"split must be 'train' or 'heldout', got {cfg.split!r}.")


def add_engine_args(p) -> None:
    """--engine local|ray for a corpus job's subcommand (Ray: RAY_ADDRESS, else a local instance)."""
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: this process; ray: Ray tasks (RAY_ADDRESS when set, else a local Ray; "
                        "DASHBOARD_RAY_WORKERS workers, default 2)")


def tqdm_progress(desc: str):
    """A progress callback drawing a tqdm bar on stderr (the CLI's)."""
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="chunk")

    def update(done: int, total: int, message: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()
        if done >= total:
            bar.close()
    return update


__all__ = ["JobState", "Remote", "ENGINES", "run_job", "state", "write_chunk", "finish", "done_chunks", "tqdm_progress", "add_engine_args", "check_windows",
]
