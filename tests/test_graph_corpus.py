"""Graphs over many prompts as a corpus job (backend/jobs/graph_corpus.py): each prompt's graph
is the `graph` analysis's own stored run (the page opens it from the store), the feature nodes
land in graph_features, the job resumes chunk-wise, and a transcoder feature's "graphs this
feature appears in" reads them. Real model, shipped transcoders, a tiny corpus slice."""

from __future__ import annotations

import pytest

from backend import runner
from backend.analyses.graph import GraphSpec
from backend.errors import InvalidSpec
from backend.jobs import graph_corpus as gc
from backend.store import Store

from .conftest import DEFAULT_MODEL

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("session_corpus")]


def test_graphs_of_corpus_prompts_are_stored_graphs_and_feature_rows(model, tmp_path):
    job = gc.GraphCorpusJob(DEFAULT_MODEL, n_windows=2, length=6, chunk=1)
    store = Store(tmp_path / "g.duckdb")
    part = gc.run(job, store, stop_after=1)
    assert part["finished"] is False and part["done"] == 1
    # a prompt traced on a page before the job reaches it is read, not traced again
    texts = job.prompts(model)
    page = runner.run(job.spec_of(texts[1]), store)
    assert not page.from_store
    out = gc.run(job, store)
    assert out["finished"] and out["graphs"] == 2
    for text in texts:
        got = runner.lookup(job.spec_of(text), store)
        assert got is not None                                 # the graph page's own run
        want = {(n["layer"], n["pos"], n["feature"]) for n in got.result.nodes if n["kind"] == "feature"}
        rows = store.cursor().execute("SELECT layer, pos, feature, influence FROM graph_features "
                                      "WHERE job_key = ? AND prompt = ?", [job.key(), text]).fetchall()
        assert {(r[0], r[1], r[2]) for r in rows} == want and want
    # the same prompt through GraphSpec directly (as the page builds it) has the same key
    assert job.spec_of(texts[0]).key() == GraphSpec(model=DEFAULT_MODEL, text=texts[0]).key()
    layer, pos, feature, infl = store.cursor().execute(
        "SELECT layer, pos, feature, influence FROM graph_features WHERE job_key = ? ORDER BY influence DESC LIMIT 1",
        [job.key()]).fetchall()[0]
    found = gc.graphs_with_feature(store, job.transcoders.split("@")[0], layer, feature)
    assert found and found[0]["influence"] == pytest.approx(infl) and found[0]["prompt"] in texts
    assert gc.run(job, store)["graphs"] == 2                   # finished: read back, nothing traced
    store.close()


def test_bad_graph_corpus_settings_are_typed_errors():
    with pytest.raises(InvalidSpec):
        gc.GraphCorpusJob(DEFAULT_MODEL, n_windows=2, length=200)
    with pytest.raises(InvalidSpec):
        gc.GraphCorpusJob(DEFAULT_MODEL, n_windows=2, node_threshold=1.5)
