"""Neuron corpus statistics: equal to a direct run_with_cache computation on the same windows,
resumable without lost or doubled rows, typed errors for bad sites, and the page renders them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from backend import jobs
from backend.jobs import neuron_stats as ns
from backend.errors import InvalidSite, InvalidSpec
from backend.sites import Component, Site, hook_name

from .conftest import DEFAULT_MODEL, ROOT

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("session_corpus")]   # a small corpus, built once

JOB = ns.NeuronStatsJob(model=DEFAULT_MODEL, n_windows=4, chunk=2, length=40)
LAYERS = (0, 11, 29)


@pytest.fixture(scope="module")
def finished(model, tmp_path_factory):
    from backend.store import Store

    store = Store(tmp_path_factory.mktemp("ns") / "store.duckdb")
    out = ns.run(JOB, store=store, model=model)
    yield store, out
    store.close()


@pytest.fixture(scope="module")
def reference(model):
    """Every window alone (no padding), all its neurons from run_with_cache."""
    wins = JOB.windows()
    names = [hook_name(Site(Component.MLP_POST, layer)) for layer in LAYERS]
    acts = {layer: [] for layer in LAYERS}
    where = []
    for doc, start, ids in wins:
        with model.lock, torch.inference_mode():
            _, cache = model.run_with_cache(ids, names)
        for layer, name in zip(LAYERS, names):
            acts[layer].append(cache[name][0].float().numpy())
        where += [(doc, start + p, t) for p, t in enumerate(ids)]
    return {k: np.concatenate(v) for k, v in acts.items()}, np.array(where)


def test_stats_equal_a_direct_computation(finished, reference):
    store, out = finished
    assert out["finished"] and out["layers"] == 30
    thresholds = out["thresholds"]
    acts, where = reference
    t = ns.layer_summaries(store, JOB.key())
    assert t.num_rows == 30 and set(t["neurons"].to_pylist()) == {1536}
    for layer in LAYERS:
        x = acts[layer]                                                    # [T 1536]
        rows = ns.layer_neurons(store, JOB.key(), layer).to_pylist()
        thr = ns.job_spec(store, JOB)["thresholds"][layer]
        assert abs(thr - thresholds[layer]) < 1e-4
        freq = np.array([r["freq"] for r in rows])
        np.testing.assert_allclose(freq, (x > thr).mean(0), atol=1.5 / x.shape[0])
        np.testing.assert_allclose([r["max"] for r in rows], x.max(0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose([r["mean"] for r in rows], x.mean(0), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose([r["std"] for r in rows], x.std(0), rtol=1e-3, atol=1e-4)
        assert [r["dead"] for r in rows] == list((x > thr).sum(0) == 0)
        for neuron in (0, 777, int(x.max(0).argmax())):
            st = ns.neuron_stats(store, JOB.key(), layer, neuron)
            ref = np.argsort(-x[:, neuron], kind="stable")[:ns.TOP_K]
            np.testing.assert_allclose([c["value"] for c in st["top"]], x[ref, neuron], rtol=1e-4, atol=1e-4)
            got = {(c["doc"], c["pos"]) for c in st["top"][:5]}
            assert got == {tuple(where[i, :2]) for i in ref[:5]}
            assert sum(st["hist"]) == x.shape[0]
            # the histogram bin of the max holds it
            edges = np.array(ns.HIST_EDGES)
            b = int(np.clip(np.searchsorted(edges, x[:, neuron].max(), side="right") - 1, 0, ns.HIST_BINS - 1))
            assert st["hist"][b] >= 1
            # token mass: the top token's share is the exact one (lower bound at worst)
            mass = np.where(x[:, neuron] > thr, x[:, neuron], 0.0)
            if mass.sum() > 0:
                per_tok = {}
                for tok, m in zip(where[:, 2], mass):
                    per_tok[tok] = per_tok.get(tok, 0.0) + m
                best = max(per_tok.values()) / mass.sum()
                assert st["top1_share"] <= best + 1e-4
                if best > 0.5:
                    assert st["top1_share"] == pytest.approx(best, abs=1e-3)


def test_resume_gives_the_same_rows(model, tmp_path, finished):
    from backend.store import Store

    store_a, _ = finished
    store = Store(tmp_path / "resume.duckdb")
    part = ns.run(JOB, store=store, model=model, stop_after=1)
    assert part == {"job_key": JOB.key(), "finished": False, "done": 1, "n_chunks": 2}
    assert jobs.state(store, JOB.key()).done == 1
    out = ns.run(JOB, store=store, model=model)
    assert out["finished"]
    cur, ref = store.cursor(), store_a.cursor()
    assert cur.execute("SELECT count(*), count(DISTINCT (chunk, layer)) FROM neuron_part").fetchall() == [(60, 60)]
    for table, order in (("neuron_stats", "layer, neuron"), ("neuron_top", "layer, neuron, rank"),
                         ("neuron_hist", "layer, neuron")):
        a = cur.sql(f"SELECT * EXCLUDE (job_key) FROM {table} ORDER BY {order}").to_arrow_table()
        b = ref.sql(f"SELECT * EXCLUDE (job_key) FROM {table} ORDER BY {order}").to_arrow_table()
        assert a.num_rows == b.num_rows > 0
        assert a.equals(b), table
    assert cur.execute("SELECT count(*) FROM neuron_part_big").fetchall() == [(0,)]
    store.close()


def test_bad_input_is_a_typed_error():
    with pytest.raises(InvalidSite, match="Layer 30 does not exist"):
        ns.check_site(30, 1536, 30)
    with pytest.raises(InvalidSite, match="Neuron 1536 does not exist"):
        ns.check_site(30, 1536, 3, 1536)
    with pytest.raises(InvalidSpec):
        ns.NeuronStatsJob(model=DEFAULT_MODEL, n_windows=0)
    with pytest.raises(InvalidSpec):
        ns.NeuronStatsJob(model=DEFAULT_MODEL, split="test")


def _app(store_path, **params) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=600)
    for k, v in params.items():
        at.query_params[k] = str(v)
    at.run()
    return at


def test_neuron_page_renders_from_the_store(finished, monkeypatch):
    """The page reads the finished job from the session store (copied there from the fixture)."""
    from backend.store import default_store

    store, _ = finished
    target = default_store()
    cur = store.cursor()
    for table in ("jobs", "job_chunks", "neuron_stats", "neuron_top", "neuron_hist"):
        t = cur.sql(f"SELECT * FROM {table}").to_arrow_table()
        tc = target.cursor()
        tc.execute(f"DELETE FROM {table} WHERE " + ("job_key = ?"), [JOB.key()])
        tc.register("_copy", t)
        tc.execute(f"INSERT INTO {table} SELECT * FROM _copy")
        tc.unregister("_copy")
    at = _app(None, page="neuron", model=DEFAULT_MODEL, layer=11, neuron=-1)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) == 1 and len(at.dataframe) == 1
    at = _app(None, page="neuron", model=DEFAULT_MODEL, layer=11, neuron=5)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) >= 2
    text = " ".join(m.value for m in at.markdown)
    assert "N5" in text or "neuron 5" in text.lower()
    at = _app(None, page="neuron", model=DEFAULT_MODEL, layer=11, neuron=4000)
    assert any("Neuron 4000 does not exist" in e.value for e in at.error)
    at = _app(None, page="neuron", model=DEFAULT_MODEL, layer=30, neuron=1)
    assert any("Layer 30 does not exist" in e.value for e in at.error)
