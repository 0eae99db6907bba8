"""A work factory for the Ray worker-kill test (tests/test_ray_engine.py), imported by the Ray
workers (the repo root is on their PYTHONPATH): the neuron-stats job's work, except that the
first time a worker starts `chunk_to_kill` it publishes its process id in `pid_file` and
waits, so the test can kill it from outside. Nothing here kills anything."""

from __future__ import annotations

import os
import time


def slow_chunk_worker(job_class: str, job_fields: dict, spec: dict, inputs: dict, pid_file: str,
                      chunk_to_kill: int, wait: float):
    from backend.jobs.driver import rebuild

    work = rebuild(job_class, job_fields, spec, inputs)

    def run(chunk: int):
        if chunk == chunk_to_kill:
            try:    # only the first run of the chunk waits (its rerun after the kill must not)
                os.close(os.open(pid_file + ".claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                with open(pid_file + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.replace(pid_file + ".tmp", pid_file)     # the watcher never reads half a number
                time.sleep(wait)
        return work(chunk)
    return run
