"""Corpus-job chunks as Ray tasks: the same `work(chunk)` on a laptop or on a cluster.

`run_chunks` (called by jobs.run_job with engine="ray") connects to Ray (`RAY_ADDRESS` when
set, else a local instance with one CPU per worker), starts one actor per worker (each builds
the job's work function once, so it loads the model once; it takes a GPU when the cluster
offers one and DASHBOARD_RAY_GPUS asks for it), and hands out the chunks not yet done.

A worker writes its chunk's tables as Parquet files in a shard folder
(`<shards>/<job key>/chunk-000012/<table>.parquet`) and then, only after every file is
complete, the folder's DONE mark. The driver merges each finished shard into the store:
DuckDB reads the Parquet files and the rows go in with the chunk's done-mark in ONE
transaction (jobs.write_chunk), then the shard is deleted. So:
- a worker killed mid-chunk leaves a shard without DONE: the chunk is run again (on a new
  actor in the same run, or at the next run);
- a driver killed after workers finished leaves complete shards: the next run merges them
  without recomputing;
- a shard merged but not yet deleted is recognised by the store's done-mark and dropped.
No row is lost or written twice, and the rows are those the local engine writes.

The actor pool itself is `map_chunks(remote, chunks, on_result)`: any work function over
chunks (its result handed back to the driver), with the same retry of a chunk whose actor
died. The store path above wraps the job's work function in `shard_worker`; a job whose
chunks are files (the SAE training's activation cache, backend/train_sae.py) uses it directly.

Shards live beside the store (`<store dir>/shards`, or DASHBOARD_SHARDS); on a cluster it must
be a folder every node sees (NFS, a mounted bucket), as must the corpus.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import deque
from pathlib import Path

from .. import settings
from ..errors import DashboardError

MAX_RETRIES = 3


class RayUnavailable(DashboardError):
    code = "ray_unavailable"


class Stopped(DashboardError):
    code = "job_stopped"


def shard_root() -> Path:
    return Path(os.environ.get("DASHBOARD_SHARDS", settings.store_path().parent / "shards"))


def chunk_dir(root: Path, job_key: str, chunk: int) -> Path:
    return root / job_key / f"chunk-{chunk:06d}"


def connect(workers: int) -> None:
    """Connect to RAY_ADDRESS, or start a local Ray with `workers` CPUs (once per process)."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--engine ray needs Ray: pip install ray.") from None
    if ray.is_initialized():
        return
    # Workers import `backend` and read the same settings as this process.
    env = {k: v for k, v in os.environ.items() if k.startswith("DASHBOARD_")}
    env["PYTHONPATH"] = os.pathsep.join([str(settings.ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]          # a local Ray's workers inherit it
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")    # no token notice for a local instance
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)


def _worker_class():
    import ray

    @ray.remote
    class ChunkWorker:
        """Builds a job's work function once (the model loaded once), then runs chunks."""

        def __init__(self, remote, threads: int):
            import torch

            torch.set_num_threads(threads)
            t = time.perf_counter()
            self.work = remote.build()
            self.build_seconds = time.perf_counter() - t

        def run(self, chunk: int):
            return self.work(chunk)

        def ready(self) -> float:
            return self.build_seconds

    return ChunkWorker


def shard_worker(remote, root: str, job_key: str):
    """A worker's function for the store path: `remote`'s work(chunk) -> tables, written as the
    chunk's shard (Parquet files, then DONE); returns (compute seconds, seconds with the write)."""
    import pyarrow.parquet as pq

    work = remote.build()
    root_path = Path(root)

    def run(chunk: int) -> tuple[float, float]:
        t = time.perf_counter()
        tables = work(chunk)
        compute = time.perf_counter() - t
        out = chunk_dir(root_path, job_key, chunk)
        shutil.rmtree(out, ignore_errors=True)      # a partial shard of a killed worker
        out.mkdir(parents=True)
        for name, table in tables.items():
            pq.write_table(table, out / f"{name}.parquet")
        (out / "DONE").write_text(f"{compute:.6f}")
        return compute, time.perf_counter() - t
    return run


def read_shard(path: Path) -> dict:
    """The tables of a complete shard, read by DuckDB."""
    import duckdb

    con = duckdb.connect()
    try:
        return {f.stem: con.sql(f"SELECT * FROM read_parquet('{str(f).replace(chr(39), chr(39) * 2)}')").to_arrow_table()
                for f in sorted(path.glob("*.parquet"))}
    finally:
        con.close()


def _merge(store, job_key: str, chunk: int, path: Path, seconds: float) -> None:
    from .chunks import write_chunk

    write_chunk(store, job_key, chunk, read_shard(path), seconds)
    shutil.rmtree(path, ignore_errors=True)


def _dead_errors():
    import ray

    names = ("RayActorError", "WorkerCrashedError", "ActorUnavailableError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


def map_chunks(remote, chunks, on_result, workers: int | None = None, stats: dict | None = None,
               stop=None) -> dict:
    """Run `remote`'s work function on each of `chunks` on Ray actors (one per worker, each
    builds the function once) and call `on_result(chunk, result)` here, in this process, as
    each one finishes (in completion order). A chunk whose actor died (a killed or crashed
    worker) runs again on a fresh actor, up to MAX_RETRIES times; so the work function must be
    safe to run twice on a chunk (write to a temporary name, then rename). Returns timing
    statistics (also filled into `stats` if given): start_seconds (actors built), dispatch_seconds
    (one task start on a loaded actor), wall_seconds, retries. `stop` (a threading.Event, the
    process's jobs.STOP): once set, no chunk is handed out and the call raises `stopped` after
    the result in hand is handled; the chunks in flight are dropped with their actors (a chunk
    is whole or not there), and run again at the next run."""
    workers = max(1, int(workers or os.environ.get("DASHBOARD_RAY_WORKERS", 2)))
    stats = stats if stats is not None else {}
    todo = deque(chunks)
    stats.setdefault("retries", 0)
    if not todo:
        return stats
    connect(workers)
    import ray

    dead = _dead_errors()
    Worker = _worker_class()
    threads = int(os.environ.get("DASHBOARD_RAY_THREADS", 1))
    gpus = float(os.environ.get("DASHBOARD_RAY_GPUS", 0))
    make = lambda: Worker.options(num_cpus=threads, num_gpus=gpus).remote(remote, threads)  # noqa: E731
    actors = [make() for _ in range(min(workers, len(todo)))]
    t0 = time.perf_counter()
    try:
        ray.get([a.ready.remote() for a in actors])
        stats["start_seconds"] = time.perf_counter() - t0
        t = time.perf_counter()                 # the cost of one task start on a loaded actor
        for _ in range(5):
            ray.get([a.ready.remote() for a in actors])
        stats["dispatch_seconds"] = (time.perf_counter() - t) / 5
        in_flight: dict = {}
        retries: dict[int, int] = {}
        replaced: dict = {}                     # a dead actor's id -> its replacement

        def submit(actor) -> None:
            if todo:
                chunk = todo.popleft()
                in_flight[actor.run.remote(chunk)] = (actor, chunk)

        for a in actors:      # two chunks in flight per actor: it computes the next while the
            submit(a)         # driver handles the last one
            submit(a)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor, chunk = in_flight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except dead:
                retries[chunk] = retries.get(chunk, 0) + 1
                stats["retries"] += 1
                if retries[chunk] > MAX_RETRIES:
                    raise
                todo.appendleft(chunk)          # run it again on a fresh actor (one per dead actor:
                aid = actor._actor_id.hex()     # its other chunk in flight fails too)
                if aid not in replaced:
                    ray.kill(actor)
                    replaced[aid] = make()
                    actors.append(replaced[aid])
                    submit(replaced[aid])
                else:
                    submit(replaced[aid])
                continue
            on_result(chunk, result)
            if stop is not None and stop.is_set():
                raise Stopped(f"stopped after chunk {chunk} (the process is stopping); the rest runs at the next run")
            submit(actor)
    finally:
        for a in actors:
            ray.kill(a)
    stats["wall_seconds"] = time.perf_counter() - t0
    return stats


def run_chunks(store, job_key: str, kind: str, n_chunks: int, done: set[int], remote, progress=None,
               stop_after: int | None = None, workers: int | None = None, stats: dict | None = None,
               stop=None) -> dict:
    """Run the chunks not in `done` on Ray actors (map_chunks) and merge their shards into the
    store. Returns timing statistics (also filled into `stats` if given)."""
    from .chunks import Remote

    root = shard_root()
    stats = stats if stats is not None else {}
    # Shards a previous run completed but did not merge: merge them now, no recompute.
    for chunk in range(n_chunks):
        path = chunk_dir(root, job_key, chunk)
        if chunk in done:
            shutil.rmtree(path, ignore_errors=True)
        elif (path / "DONE").exists():
            _merge(store, job_key, chunk, path, float((path / "DONE").read_text() or 0))
            done.add(chunk)
    todo = [c for c in range(n_chunks) if c not in done]
    if stop_after is not None:
        todo = todo[:stop_after]
    stats.update(chunks=len(todo), compute_seconds=0.0, task_seconds=0.0, merge_seconds=0.0)
    if not todo:
        return stats

    def merge(chunk: int, result: tuple[float, float]) -> None:
        compute, task = result
        stats["compute_seconds"] += compute
        stats["task_seconds"] += task
        t = time.perf_counter()
        _merge(store, job_key, chunk, chunk_dir(root, job_key, chunk), compute)
        stats["merge_seconds"] += time.perf_counter() - t
        done.add(chunk)
        if progress:
            progress(len(done), n_chunks, f"{kind}: chunk {chunk + 1}/{n_chunks} (ray)")

    return map_chunks(Remote("backend.jobs.ray_engine:shard_worker", (remote, str(root), job_key)), todo, merge,
                      workers=workers, stats=stats, stop=stop)
