"""Ray engine vs local engine on the same corpus-job chunks (neuron statistics), one run.

    .venv/bin/python benchmarks/bench_ray.py [--windows 128] [--chunk 16] [--length 128]

Local: this process, 2 torch threads. Ray: a local Ray instance, 2 workers × 1 thread, models
already loaded in the actors when the clock starts. Prints tokens/s of both and, per chunk, the
Ray overhead: the task start on an actor whose model is loaded (an empty call's round trip)
plus the worker's shard write, over the chunk's compute (target under 5 %); and the driver's
merge time (DuckDB reading the Parquet shards and inserting them with the done-mark, which the
local engine pays too). Quiet 2-core machine, 2026-12-03: local 322 tok/s, Ray 251 tok/s
(0.78x: the driver's merges share the two cores with the workers), task start 1.5 ms (0.01 %),
shard write 2.0 %, overhead 2.0 %.
Builds a small corpus in a temporary DASHBOARD_CORPUS when none is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=16)   # the job's default
    ap.add_argument("--length", type=int, default=128)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    os.environ.setdefault("DASHBOARD_CORPUS", str(tmp / "corpus"))
    os.environ["DASHBOARD_SHARDS"] = str(tmp / "shards")
    import torch

    from backend import corpus, jobs
    from backend.jobs import driver
    from backend.jobs import neuron_stats as ns
    from backend.jobs import ray_engine
    from backend.model import DEFAULT_MODEL, load_model
    from backend.store import Store

    if not corpus.exists():
        corpus.build(["stdlib"], max_words=200_000)
    corpus.tokenize(DEFAULT_MODEL)
    torch.set_num_threads(2)
    model = load_model(DEFAULT_MODEL)
    job = ns.NeuronStatsJob(model=DEFAULT_MODEL, n_windows=a.windows, chunk=a.chunk, length=a.length)
    wins = job.windows()
    chunks = [wins[i:i + job.chunk] for i in range(0, len(wins), job.chunk)]
    thresholds = ns.measure_thresholds(model, chunks[0][:ns.THRESHOLD_WINDOWS])
    key = job.key()
    n_tokens = sum(len(w[2]) for w in wins)

    local = Store(tmp / "local.duckdb")
    t = time.perf_counter()
    jobs.run_job(local, key, ns.KIND, job.model, {}, len(chunks),
                 lambda c: ns.chunk_rows(model, chunks[c], thresholds, key, c))
    local_s = time.perf_counter() - t

    ray_store = Store(tmp / "ray.duckdb")
    jobs._register(ray_store, key, ns.KIND, job.model, {}, len(chunks))
    stats: dict = {}
    ray_engine.run_chunks(ray_store, key, ns.KIND, len(chunks), set(),
                          driver.remote(job, {"thresholds": thresholds}, {}),
                          workers=2, stats=stats)
    ray_s = stats["wall_seconds"]
    n = stats["chunks"]
    overhead = (stats["task_seconds"] - stats["compute_seconds"]) / stats["compute_seconds"]
    same = (local.cursor().execute("SELECT count(*) FROM neuron_part WHERE job_key = ?", [key]).fetchall()
            == ray_store.cursor().execute("SELECT count(*) FROM neuron_part WHERE job_key = ?", [key]).fetchall())
    print(f"{len(chunks)} chunks × {job.chunk} windows × {job.length} tokens = {n_tokens} tokens")
    print(f"local engine, 2 threads      : {local_s:7.1f} s  {n_tokens / local_s:7.0f} tok/s")
    print(f"ray, 2 workers × 1 thread    : {ray_s:7.1f} s  {n_tokens / ray_s:7.0f} tok/s "
          f"(actors started and models loaded in {stats['start_seconds']:.1f} s, not counted)")
    print(f"ray / local throughput       : {local_s / ray_s:5.2f}×")
    busy = stats["compute_seconds"] / (ray_s * min(2, n))
    dispatch = stats["dispatch_seconds"]
    per = stats["compute_seconds"] / n
    print(f"ray task start per chunk     : {dispatch * 1000:6.1f} ms = {dispatch / per * 100:5.2f} % of the chunk's "
          f"compute ({per:.2f} s; target < 5 %)")
    print(f"shard write per chunk        : {(stats['task_seconds'] - stats['compute_seconds']) / n * 1000:6.1f} ms = "
          f"{overhead * 100:5.2f} % (Parquet files + DONE mark, in the worker)")
    print(f"ray overhead per chunk       : {(overhead + dispatch / per) * 100:5.2f} % (task start + shard write)")
    print(f"worker utilisation           : {busy * 100:5.1f} % (compute / (wall × workers); the rest is "
          f"task dispatch, result transfer and uneven last chunks)")
    print(f"driver merge per chunk       : {stats['merge_seconds'] / n * 1000:6.1f} ms (DuckDB reads the shard, "
          f"one transaction with the done-mark)")
    print(f"same row counts              : {same}")


if __name__ == "__main__":
    main()
