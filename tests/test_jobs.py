"""Resumable corpus jobs: an interrupted job resumes with no row lost and none duplicated."""

from __future__ import annotations

import pyarrow as pa
import pytest

from backend import jobs
from backend.errors import StoreError


def _rows(chunk: int) -> dict[str, pa.Table]:
    return {"t": pa.table({"chunk": pa.array([chunk] * 3, pa.int32()), "v": [0.5, 1.5, 2.5]})}


def _table(store) -> list[tuple]:
    return store.cursor().execute("SELECT chunk, count(*), sum(v) FROM t GROUP BY chunk ORDER BY chunk").fetchall()


@pytest.fixture
def job_store(store):
    store.cursor().execute("CREATE TABLE t(chunk INTEGER, v DOUBLE)")
    return store


def test_interrupted_job_resumes_without_loss_or_duplicates(job_store):
    calls = []

    def work(c):
        calls.append(c)
        if c == 4 and calls.count(4) == 1:
            raise KeyboardInterrupt  # the user stops the job halfway through chunk 4
        return _rows(c)

    with pytest.raises(KeyboardInterrupt):
        jobs.run_job(job_store, "j", "test", "m", {"n": 7}, 7, work)
    st = jobs.state(job_store, "j")
    assert (st.done, st.finished) == (4, False)
    seen = []
    st = jobs.run_job(job_store, "j", "test", "m", {"n": 7}, 7, work,
                      progress=lambda d, n, msg: seen.append((d, n)))
    assert st.done == 7 and calls == [0, 1, 2, 3, 4, 4, 5, 6]   # done chunks are not redone
    assert seen[0] == (4, 7) and seen[-1] == (7, 7)
    assert _table(job_store) == [(c, 3, 4.5) for c in range(7)]
    jobs.finish(job_store, "j", {"rows": 21})
    assert jobs.state(job_store, "j").finished and jobs.state(job_store, "j").summary == {"rows": 21}


def test_stop_after_and_a_failed_chunk_leave_nothing_half_written(job_store):
    st = jobs.run_job(job_store, "j2", "test", "m", {}, 5, _rows, stop_after=2)
    assert st.done == 2 and _table(job_store) == [(0, 3, 4.5), (1, 3, 4.5)]

    def bad(c):  # rows for a table that does not exist: the insert fails inside the transaction
        return {"t": _rows(c)["t"], "missing_table": pa.table({"x": [1]})}
    with pytest.raises(Exception):
        jobs.run_job(job_store, "j2", "test", "m", {}, 5, bad)
    assert jobs.state(job_store, "j2").done == 2 and len(_table(job_store)) == 2
    assert not jobs.write_chunk(job_store, "j2", 0, _rows(0), 0.0)        # done already: no-op
    assert len(_table(job_store)) == 2
    with pytest.raises(StoreError):
        jobs.run_job(job_store, "j2", "test", "m", {}, 6, _rows)          # same key, other plan
    with pytest.raises(StoreError):
        jobs.write_chunk(job_store, "j2", 3, {"t; DROP TABLE t": pa.table({"x": [1]})}, 0.0)
