"""Work factories for the Ray engine tests (imported by Ray workers, so not a test module)."""

from __future__ import annotations

import os


def dying_worker(job_fields: dict, thresholds: list[float], key: str, marker: str):
    """neuron_stats' work, except that the first worker to reach chunk 1 dies there (once)."""
    from backend.neuron_stats import chunk_worker

    work = chunk_worker(job_fields, thresholds, key)

    def run(chunk: int):
        if chunk == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)              # the worker process dies mid-chunk
        return work(chunk)
    return run
