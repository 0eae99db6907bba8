"""Corpus jobs on Ray (a real local Ray instance): the same rows as the local engine (neuron
stats, massive corpus, feature index, feature scores) and the same activation-cache files (SAE
training); a worker killed mid-chunk (SIGKILL from a watcher thread in this process, never this
process itself) and a driver killed after workers finished both resume with no row lost or
written twice."""

from __future__ import annotations

import contextlib
from dataclasses import asdict

import pyarrow as pa
import pytest

from backend import jobs
from backend.jobs import driver
from backend.jobs import massive_corpus as mc
from backend.jobs import neuron_stats as ns
from backend.jobs import ray_engine
from backend.store import Store

from .conftest import DEFAULT_MODEL

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("session_corpus")]

JOB = ns.NeuronStatsJob(model=DEFAULT_MODEL, n_windows=6, chunk=2, length=32)


@pytest.fixture(scope="module", autouse=True)
def ray_local(tmp_path_factory):
    import os

    import ray

    os.environ["DASHBOARD_SHARDS"] = str(tmp_path_factory.mktemp("shards"))
    yield
    if ray.is_initialized():
        ray.shutdown()


def _rows(store: Store, table: str, key: str) -> list[tuple]:
    cols = [r[0] for r in store.cursor().execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
        [table]).fetchall()]
    order = ", ".join(c for c in ("chunk", "layer", "neuron", "dim", "kind", "rank") if c in cols)
    return store.cursor().execute(f"SELECT * FROM {table} WHERE job_key = ? ORDER BY {order}", [key]).fetchall()


@contextlib.contextmanager
def threads(n: int):
    """Ray workers run one thread each; the local run does too here, so that the float sums of
    the model's matmuls happen in the same order and the rows compare bitwise."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local_run(model, tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("local") / "s.duckdb")
    with threads(1):
        summary = ns.run(JOB, store=store, model=model)
    yield store, summary
    store.close()


def test_ray_engine_gives_the_local_rows(local_run, tmp_path):
    local, local_summary = local_run
    store = Store(tmp_path / "ray.duckdb")
    with threads(1):   # the driver measures the activity thresholds (workers use them as given)
        summary = ns.run(JOB, store=store, engine="ray")
    key = JOB.key()
    for table in ("neuron_stats", "neuron_top", "neuron_hist"):
        assert _rows(store, table, key) == _rows(local, table, key), table
    assert summary["finished"] and summary.get("n_chunks", 3) == local_summary.get("n_chunks", 3)
    assert not any(ray_engine.shard_root().glob(f"{key}/chunk-*")), "merged shards are deleted"
    store.close()


def test_massive_corpus_on_ray_equals_local(model, tmp_path):
    job = mc.MassiveCorpusJob(model=DEFAULT_MODEL, n_windows=4, length=32, chunk=2)
    a, b = Store(tmp_path / "a.duckdb"), Store(tmp_path / "b.duckdb")
    with threads(1):
        mc.run(job, store=a, model=model)
    mc.run(job, store=b, engine="ray")
    for table in ("massive_part", "massive_layer_part"):
        assert _rows(a, table, job.key()) == _rows(b, table, job.key()), table
    a.close()
    b.close()


def test_killed_driver_resumes_from_shards_without_lost_or_doubled_rows(local_run, model, tmp_path):
    local, _ = local_run
    key = JOB.key()
    spec = ns.job_spec(local, JOB)
    thresholds = spec["thresholds"]
    n_chunks = 3
    root = ray_engine.shard_root()

    # A previous driver died after its workers finished chunk 0 (a complete shard) and while a
    # worker was writing chunk 2 (a shard without its DONE mark).
    work = driver.rebuild("backend.jobs.neuron_stats:NeuronStatsJob", asdict(JOB), spec, {})
    import pyarrow.parquet as pq

    with threads(1):
        shards = {c: work(c) for c in (0, 2)}
    for chunk, complete in ((0, True), (2, False)):
        d = ray_engine.chunk_dir(root, key, chunk)
        d.mkdir(parents=True, exist_ok=True)
        for name, table in shards[chunk].items():
            pq.write_table(table if complete else table.slice(0, 1), d / f"{name}.parquet")
        if complete:
            (d / "DONE").write_text("1.0")

    # This run merges the complete shard without recomputing and reruns the incomplete one.
    store = Store(tmp_path / "resume.duckdb")
    remote = driver.remote(JOB, spec, {})
    st = jobs.run_job(store, key, ns.KIND, JOB.model, spec, n_chunks, None, engine="ray", remote=remote)
    assert st.done == n_chunks
    assert _rows(store, "neuron_part", key) == _rows(local, "neuron_part", key)
    big = store.cursor().execute("SELECT count(*), count(DISTINCT (chunk, layer)) FROM neuron_part_big "
                                 "WHERE job_key = ?", [key]).fetchall()[0]
    assert big == (n_chunks * model.info.n_layers,) * 2   # (the local store merged and dropped them)
    counts = store.cursor().execute("SELECT chunk, count(*) FROM job_chunks WHERE job_key = ? GROUP BY 1 ORDER BY 1",
                                    [key]).fetchall()
    assert counts == [(0, 1), (1, 1), (2, 1)]
    store.close()


def test_a_job_without_a_remote_factory_says_so(store):
    from backend.errors import StoreError

    with pytest.raises(StoreError, match="cannot run on Ray"):
        jobs.run_job(store, "x-1", "x", DEFAULT_MODEL, {}, 1, lambda c: {"t": pa.table({})}, engine="ray")


def test_feature_index_on_ray_equals_local(model, tmp_path):
    from backend.jobs.features.index import build_index
    from backend.saes import list_saes

    sae = list_saes(DEFAULT_MODEL)[0]["sae_id"]
    a, b = Store(tmp_path / "a.duckdb"), Store(tmp_path / "b.duckdb")
    with threads(1):
        la = build_index(DEFAULT_MODEL, sae, 4, store=a, chunk_windows=2)
    lb = build_index(DEFAULT_MODEL, sae, 4, store=b, chunk_windows=2, engine="ray")
    assert la["job_key"] == lb["job_key"]
    q = "SELECT ix, feature, doc, pos, value, token FROM feature_acts_by_feature ORDER BY ALL"
    rows = a.cursor().execute(q).fetchall()
    assert rows and rows == b.cursor().execute(q).fetchall()
    a.close()
    b.close()


def _kill_when_published(pid_file, seen: dict, stop, timeout: float = 3600.0) -> None:
    """Watcher thread: SIGKILL the process whose id appears in pid_file; never this pytest
    process (nor its parent), and only a Ray worker where /proc tells. It waits until the job
    ends (`stop`): on a loaded machine an actor's model load alone took over 6 minutes."""
    import os
    import signal
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        if pid_file.exists():
            pid = int(pid_file.read_text())
            if pid in (os.getpid(), os.getppid()) or pid <= 1:
                seen["own"] = pid               # Ray local mode: the work runs in this process
                return
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                cmd = None
            if cmd is not None and "ray" not in cmd.lower():
                seen["not_ray"] = (pid, cmd)
                return
            os.kill(pid, signal.SIGKILL)
            seen["killed"] = pid
            return
        time.sleep(0.02)


def test_a_worker_killed_mid_chunk_loses_and_doubles_no_row(local_run, model, tmp_path, monkeypatch):
    import os
    import threading

    local, _ = local_run
    key = JOB.key()
    spec = ns.job_spec(local, JOB)
    n_chunks = 3
    monkeypatch.setenv("DASHBOARD_SHARDS", str(tmp_path / "shards"))
    pid_file = tmp_path / "worker.pid"
    remote = jobs.Remote("tests.ray_kill_helper:slow_chunk_worker",
                         ("backend.jobs.neuron_stats:NeuronStatsJob", asdict(JOB), spec, {}, str(pid_file), 1, 20.0))
    seen: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_when_published, args=(pid_file, seen, stop), daemon=True)
    watcher.start()
    store = Store(tmp_path / "killed.duckdb")
    try:
        st = jobs.run_job(store, key, ns.KIND, JOB.model, spec, n_chunks, None, engine="ray", remote=remote)
    finally:
        stop.set()
        watcher.join(5)
    if "own" in seen:
        store.close()
        pytest.skip("Ray runs the work in this process (local mode): no worker to kill")
    assert "not_ray" not in seen, seen
    assert "killed" in seen and seen["killed"] != os.getpid()
    assert st.done == n_chunks
    assert _rows(store, "neuron_part", key) == _rows(local, "neuron_part", key)
    counts = store.cursor().execute("SELECT chunk, count(*) FROM job_chunks WHERE job_key = ? GROUP BY 1 ORDER BY 1",
                                    [key]).fetchall()
    assert counts == [(0, 1), (1, 1), (2, 1)]
    big = store.cursor().execute("SELECT count(*), count(DISTINCT (chunk, layer)) FROM neuron_part_big "
                                 "WHERE job_key = ?", [key]).fetchall()[0]
    assert big == (n_chunks * model.info.n_layers,) * 2
    assert not any((tmp_path / "shards").glob(f"{key}/chunk-*")), "merged shards are deleted"
    store.close()


def _score_rows(store: Store, table: str) -> list[tuple]:
    return store.cursor().execute(f"SELECT * FROM {table} ORDER BY feature").fetchall()


def test_feature_scores_on_ray_equal_local(model, tmp_path):
    from backend.jobs.features import scores as S
    from backend.jobs.features.index import build_index
    from backend.saes import list_saes

    sae = list_saes(DEFAULT_MODEL)[0]["sae_id"]
    runs = {}
    for engine in ("local", "ray"):
        store = Store(tmp_path / f"{engine}.duckdb")
        with threads(1):   # the driver computes the lens tokens (and, here, the index behind c)
            build_index(DEFAULT_MODEL, sae, 4, store=store, chunk_windows=2)
            r = S.build_scores(DEFAULT_MODEL, sae, store=store, features=16, tc_windows=8, tc_precision="float32",
                               engine=engine)
        runs[engine] = (store, r["saes"][sae])
    (a, ra), (b, rb) = runs["local"], runs["ray"]
    for part in ("vocab_proj", "output_score", "token_change"):
        assert ra[part]["status"] == rb[part]["status"] == "done", (part, ra[part], rb[part])
        assert ra[part]["computed"] == rb[part]["computed"] == 16, part
    assert rb["token_change"]["n_chunks"] >= 2
    for table in ("feature_vocab_proj", "feature_output_scores", "feature_token_change"):
        rows = _score_rows(a, table)
        assert len(rows) == 16 and rows == _score_rows(b, table), table
    a.close()
    b.close()


def test_sae_activation_cache_on_ray_equals_local(model, tmp_path, monkeypatch):
    import numpy as np

    from backend import train_sae as T

    monkeypatch.setattr(T, "CHUNK_TOKENS", 300)   # the driver passes it to the workers
    cfg = T.TrainConfig(sites=(("resid_pre", 3), ("z", 2)), train_tokens=700, precision="float32")
    with threads(1):
        got_local = T.collect(model, cfg, "train", cfg.train_tokens, tmp_path / "local")
    got_ray = T.collect(None, cfg, "train", cfg.train_tokens, tmp_path / "ray", engine="ray")
    files = sorted(p.name for p in (tmp_path / "local" / "acts-train").iterdir())
    assert len(files) >= 2 and all(f.endswith(".npz") and ".tmp" not in f for f in files)
    assert files == sorted(p.name for p in (tmp_path / "ray" / "acts-train").iterdir())
    for f in files:
        x, y = np.load(tmp_path / "local" / "acts-train" / f), np.load(tmp_path / "ray" / "acts-train" / f)
        assert sorted(x.files) == sorted(y.files) == ["s0", "s1"]
        for k in x.files:
            assert x[k].dtype == y[k].dtype == np.float16 and x[k].shape == y[k].shape
            assert x[k].tobytes() == y[k].tobytes(), (f, k)
    for x, y in zip(got_local, got_ray):
        assert x.tobytes() == y.tobytes()
    import json

    assert json.loads((tmp_path / "ray" / "collect-train.json").read_text())["engine"] == "ray"


def test_a_stop_ends_the_ray_loop_between_chunks():
    """jobs.STOP set while a Ray job runs: map_chunks hands out no further chunk and raises
    Stopped after the result in hand (run_job turns it into JobStopped): six chunks of a trivial
    work function on the local Ray, the event set by the first result."""
    import threading

    from backend.jobs.ray_engine import Stopped, map_chunks

    stop = threading.Event()
    seen = []

    def on_result(chunk, result):
        seen.append(chunk)
        stop.set()

    with pytest.raises(Stopped):
        map_chunks(jobs.Remote("tests.test_ray_engine:_echo_worker"), [0, 1, 2, 3, 4, 5], on_result, workers=1,
                   stop=stop)
    assert len(seen) == 1


def _echo_worker():
    return lambda chunk: chunk
