"""Exports: stored results to JSON, store tables to Parquet, figures to HTML and PNG, a feature in
a Neuronpedia-like shape; bad requests give typed errors and write nothing."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest

from backend import PromptSpec, run
from backend.errors import DashboardError
from backend import export

pytestmark = pytest.mark.model


@pytest.fixture()
def prompt_run(store, model):
    return run(PromptSpec(model="smollm2-135m", text="The capital of France is"), store=store)


def test_result_json_round_trips_the_stored_arrays(store, prompt_run, tmp_path):
    info = export.export_result(prompt_run.run_key, tmp_path / "r.json", store=store)
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["kind"] == "prompt" and rec["run_key"] == prompt_run.run_key == info["run_key"]
    stored = store.get(prompt_run.run_key)["arrays"]
    for name, arr in stored.items():
        got = rec["arrays"][name]
        assert got["shape"] == list(arr.shape)
        if arr.dtype.kind == "f":
            np.testing.assert_allclose(np.array(got["data"], dtype=np.float64), arr, rtol=1e-6)
        else:
            assert np.array_equal(np.array(got["data"], dtype=arr.dtype), arr)
    # the spec in the file rebuilds the same run key
    from backend.spec import Spec

    assert Spec.from_dict(rec["spec"]).key() == prompt_run.run_key


def test_table_to_parquet_reads_back_with_duckdb(store, prompt_run, tmp_path):
    out = export.export_table("runs", tmp_path / "runs.parquet", store=store)
    rows = duckdb.sql(f"SELECT run_key FROM read_parquet('{tmp_path / 'runs.parquet'}')").fetchall()
    assert out["rows"] == len(rows) == store.count_runs()
    filtered = export.export_table("arrays", tmp_path / "a.parquet", store=store,
                                   where={"run_key": prompt_run.run_key})
    assert filtered["rows"] == len(store.get(prompt_run.run_key)["arrays"])


def test_figures_to_html_and_png(store, prompt_run, tmp_path):
    html = export.export_figure(prompt_run.run_key, tmp_path / "lens.html", store=store)
    assert html["figure"] == "logit_lens" and "top_k" in html["figures"]
    text = (tmp_path / "lens.html").read_text()
    assert "plotly" in text.lower() and "Logit lens" in text
    png = export.export_figure(prompt_run.run_key, tmp_path / "top.png", name="top_k", store=store)
    data = (tmp_path / "top.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and png["bytes"] > 5_000


@pytest.mark.parametrize("call, kind", [
    (lambda s, d: export.export_result("prompt-doesnotexist", d / "x.json", store=s), "NotStored"),
    (lambda s, d: export.export_table("runs; DROP TABLE runs", d / "x.parquet", store=s), "InvalidSpec"),
    (lambda s, d: export.export_table("runs", d / "x.parquet", store=s, where={"nope": 1}), "InvalidSpec"),
    (lambda s, d: export.export_table("runs", d / "x.csv", store=s), "InvalidSpec"),
])
def test_bad_requests_are_typed_errors_and_write_nothing(store, prompt_run, tmp_path, call, kind):
    before = store.count_runs()
    with pytest.raises(DashboardError) as e:
        call(store, tmp_path)
    assert type(e.value).__name__ == kind
    assert not list(tmp_path.glob("x.*")) and store.count_runs() == before


def test_feature_in_neuronpedia_shape(store, model):
    from backend.saes import list_saes

    sae = list_saes("smollm2-135m")[0]["sae_id"]
    rec = export.feature_record(sae, 3, store=store)     # no index, no scores yet: weights-only parts
    assert rec["index"] == "3" and rec["layer"] == sae and rec["modelId"] == "smollm2-135m"
    assert len(rec["pos_str"]) == len(rec["pos_values"]) > 0 and len(rec["neg_str"]) > 0
    assert rec["activations"] == [] and rec["explanations"] == []
    labelled = export.neuronpedia_shape(sae, 3, {"model": "smollm2-135m", "label": "fires on: x",
                                                 "top": [{"tokens": ["a", "b"], "acts": [None, 2.0], "value": 2.0,
                                                          "focus": 1, "doc": 0, "pos": 5}]})
    assert labelled["explanations"][0]["typeName"] == "generated"
    assert labelled["activations"][0] == {"tokens": ["a", "b"], "values": [0.0, 2.0], "maxValue": 2.0,
                                          "maxValueTokenIndex": 1, "doc": 0, "pos": 5}
    json.dumps(rec)   # JSON-able as it is
