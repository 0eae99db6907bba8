"""Foundation: the offline model, specs, the store, the runner, the CLI, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from backend import AttentionSpec, HeadScoresSpec, PromptSpec, TokenLensSpec, lookup, run
from backend import runner
from backend.analyses.head_scores import score_patterns
from backend.errors import (EmptyPrompt, InvalidSite, InvalidSpec, ModelUnavailableOffline, PromptTooLong,
                            StoreCorrupted, UnknownModel)
from backend.sites import Component, Site, hook_name, hook_names
from backend.spec import Spec
from backend.store import SCHEMA_VERSION, Store

from .conftest import DEFAULT_MODEL, ROOT

pytestmark = pytest.mark.model   # loads the real model

FRANCE = "The capital of France is"
IOI = "When Mary and John went to the store, John gave a drink to"


# -- the model ----------------------------------------------------------------------------
def test_bridge_logits_equal_hugging_face(model):
    import torch
    from transformers import AutoModelForCausalLM

    from backend.model import OFFLINE_MODELS, converted_dir

    hf = AutoModelForCausalLM.from_pretrained(converted_dir(OFFLINE_MODELS[DEFAULT_MODEL]), dtype=torch.float32,
                                              attn_implementation="eager")
    ids = model.tensor(model.encode(IOI))
    with torch.inference_mode():
        ours, theirs = model.logits(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (1, ids.shape[1], model.info.d_vocab)
    assert (ours - theirs).abs().max().item() <= 1e-3


def test_default_model_sanity(store):
    paris = run(PromptSpec(model=DEFAULT_MODEL, text=FRANCE), store).result
    assert paris.top_tokens[0] == " Paris" and 0.7 < paris.top_probs[0] < 0.85
    mary = run(PromptSpec(model=DEFAULT_MODEL, text=IOI), store).result
    assert mary.top_tokens[0] == " Mary" and mary.top_probs[0] > 0.85
    assert paris.tokens == ["The", " capital", " of", " France", " is"]  # no BOS, as the tokenizer says


def test_logit_lens_last_layer_is_the_model_output(store):
    r = run(PromptSpec(model=DEFAULT_MODEL, text=FRANCE), store).result
    n_layers = len(r.layer_labels) - 1
    assert r.lens_probs.shape == (n_layers + 1, len(r.tokens), 5)
    assert r.lens_ids[-1, -1, 0] == r.top_ids[0]
    assert r.lens_probs[-1, -1, 0] == pytest.approx(r.top_probs[0], abs=1e-5)
    assert np.all(np.diff(r.lens_probs, axis=-1) <= 1e-7)  # sorted within each cell
    t = run(TokenLensSpec(model=DEFAULT_MODEL, text=FRANCE, token=" Paris"), store).result
    assert t.probs[-1, -1] == pytest.approx(r.top_probs[0], abs=1e-5) and t.ranks[-1, -1] == 0
    # the embedding row of a tied-embedding model predicts the input token itself
    assert t.probs.shape == r.lens_probs.shape[:2]


def test_attention_patterns_are_distributions(store):
    r = run(AttentionSpec(model=DEFAULT_MODEL, text=IOI, layer=3), store).result
    n = len(r.tokens)
    assert r.pattern.shape == (9, n, n)
    np.testing.assert_allclose(r.pattern.sum(-1), 1.0, atol=1e-4)
    assert np.all(np.triu(r.pattern, 1) == 0)  # causal


def test_head_score_formula_on_hand_made_patterns():
    seq_len, n = 3, 6
    pattern = np.zeros((1, 2, n, n))
    for q in range(n):  # head 0: perfect previous-token head; head 1: perfect induction head
        pattern[0, 0, q, max(q - 1, 0)] = 1
        pattern[0, 1, q, q - seq_len + 1 if q >= seq_len else 0] = 1
    induction, prev = score_patterns(pattern, seq_len, offset=0)
    assert induction.tolist() == [0.0, 1.0] and prev[0] == 1.0 and prev[1] < 1.0


def test_head_scores_find_induction_heads(store):
    r = run(HeadScoresSpec(model=DEFAULT_MODEL, seq_len=20, n_seqs=4), store).result
    assert r.induction.shape == r.prev_token.shape == (30, 9)
    assert r.induction.max() > 0.5 and r.prev_token.max() > 0.5
    assert r.induction[:2].max() < 0.2  # no induction in the first layers


# -- store and runner -----------------------------------------------------------------------
def test_second_request_reads_the_store_and_does_not_compute(store):
    spec = PromptSpec(model=DEFAULT_MODEL, text="Compute once, read many times.")
    before = runner.compute_count
    first = run(spec, store)
    assert not first.from_store and first.compute_seconds > 0
    second = run(spec, store)
    assert second.from_store and second.compute_seconds == 0 and runner.compute_count == before + 1
    assert second.run_key == first.run_key == spec.key()
    np.testing.assert_array_equal(second.result.lens_probs, first.result.lens_probs)
    assert second.result.tokens == first.result.tokens
    assert second.result.lens_tokens.tolist() == first.result.lens_tokens.tolist()


def test_results_persist_across_store_reopen(tmp_path):
    path = tmp_path / "s.duckdb"
    s = Store(path)
    out = run(AttentionSpec(model=DEFAULT_MODEL, text="Persist me.", layer=1), s)
    s.close()
    s2 = Store(path)
    hit = lookup(out.spec, s2)
    assert hit is not None and hit.from_store
    np.testing.assert_array_equal(hit.result.pattern, out.result.pattern)
    assert s2.cursor().execute("SELECT max(version) FROM schema_version").fetchall()[0][0] == SCHEMA_VERSION
    assert s2.cursor().execute("SELECT count(*) FROM schema_version").fetchall()[0][0] == SCHEMA_VERSION
    s2.close()


def test_store_round_trips_every_dtype(store):
    arrays = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3) / 7, "f64": np.array([1 / 3, 2e-300]),
              "i": np.array([[1, -2], [3, 2**40]]), "b": np.array([True, False]),
              "s": np.array([["a", " b"], ["\n", "é"]], dtype=object), "empty": np.zeros((0, 4), np.float32)}
    store.put("k1", "test", "m", "{}", {"x": [1, "y"]}, arrays, 0.5)
    rec = store.get("k1")
    for name, arr in arrays.items():
        got = rec["arrays"][name]
        assert got.shape == arr.shape and got.tolist() == arr.tolist(), name
    assert rec["arrays"]["f32"].dtype == np.float32 and rec["meta"] == {"x": [1, "y"]}


def test_damaged_store_file_is_reported_and_left_untouched(tmp_path):
    path = tmp_path / "broken.duckdb"
    garbage = b"this is not a duckdb file" * 1000
    path.write_bytes(garbage)
    with pytest.raises(StoreCorrupted, match="left untouched"):
        Store(path)
    assert path.read_bytes() == garbage


def test_concurrent_sessions_get_their_own_results(store):
    texts = ["One fish, two fish.", "Red fish, blue fish.", "The cat sat on the mat.", "Hello there, world."]
    results, errors = {}, []

    def worker(t):
        try:
            results[t] = run(PromptSpec(model=DEFAULT_MODEL, text=t), store).result
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in texts]
    [th.start() for th in threads]
    [th.join() for th in threads]
    assert not errors
    for t in texts:  # each equals a sequential recomputation in a fresh store
        assert results[t].tokens[0] == t.split()[0]
        solo = runner.ANALYSES["prompt"].compute(PromptSpec(model=DEFAULT_MODEL, text=t),
                                                 __import__("backend.model").model.load_model(DEFAULT_MODEL))
        np.testing.assert_allclose(results[t].lens_probs, solo.lens_probs, atol=1e-6)


# -- specs and sites ------------------------------------------------------------------------
def test_spec_round_trip_and_tampering():
    spec = AttentionSpec(model=DEFAULT_MODEL, text="abc", layer=2)
    again = Spec.from_dict(json.loads(spec.to_json()))
    assert again == spec and again.key() == spec.key()
    assert AttentionSpec(model=DEFAULT_MODEL, text="abd", layer=2).key() != spec.key()
    with pytest.raises(InvalidSpec):
        Spec.from_dict({**spec.to_dict(), "layer": "2; DROP TABLE runs"})
    with pytest.raises(InvalidSpec):
        Spec.from_dict({**spec.to_dict(), "extra": 1})
    with pytest.raises(InvalidSpec):
        Spec.from_dict({"kind": "no-such-kind"})


def test_hook_names_come_from_typed_sites_and_exist(model):
    assert hook_name(Site(Component.RESID_PRE, 3)) == "blocks.3.hook_resid_pre"
    assert hook_name(Site(Component.Z, 5, head=2)) == "blocks.5.attn.hook_z"
    assert hook_name(Site(Component.EMBED)) == "hook_embed"
    for comp in Component:
        if comp is Component.RESULT:
            continue  # exists only with use_attn_result
        names = ([hook_name(Site(comp))] if comp in (Component.EMBED, Component.FINAL_NORM, Component.FINAL_IN)
                 else hook_names(comp, 30))
        missing = [n for n in names if n not in model.hook_points()]
        assert not missing, missing
    with pytest.raises(InvalidSite):
        Site("resid_sideways", 1)
    with pytest.raises(InvalidSite):
        Site(Component.RESID_PRE, 30).check(30, 9)
    with pytest.raises(InvalidSite):
        Site(Component.K, 1, head=3).check(30, 9, n_kv_heads=3)
    with pytest.raises(InvalidSite):
        Site(Component.MLP_OUT, 1, head=0)


# -- bad input: typed errors, nothing stored ------------------------------------------------
def test_bad_input_raises_typed_errors_and_stores_nothing(store, monkeypatch, model):
    before = store.count_runs()
    with pytest.raises(EmptyPrompt):
        PromptSpec(model=DEFAULT_MODEL, text="   \n")
    monkeypatch.setenv("DASHBOARD_MAX_TOKENS", "16")
    with pytest.raises(PromptTooLong, match="limit is 16"):
        run(PromptSpec(model=DEFAULT_MODEL, text="word " * 40), store)
    with pytest.raises(PromptTooLong):
        run(PromptSpec(model=DEFAULT_MODEL, text="x" * 100_000), store)
    monkeypatch.delenv("DASHBOARD_MAX_TOKENS")
    with pytest.raises(UnknownModel, match="smollm2-135m"):
        run(PromptSpec(model="definitely-not-a-model", text="hi"), store)
    with pytest.raises(ModelUnavailableOffline, match="offline"):
        run(PromptSpec(model="gpt2-small", text="hi"), store)
    with pytest.raises(InvalidSite, match="layers 0–29"):
        run(AttentionSpec(model=DEFAULT_MODEL, text="hi", layer=30), store)
    with pytest.raises(InvalidSpec, match="not a single token"):
        run(TokenLensSpec(model=DEFAULT_MODEL, text="hi", token=" Parisian metropolis"), store)
    assert store.count_runs() == before


# -- command line ----------------------------------------------------------------------------
def _cli(*args, env):
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_prompt_json(tmp_path):
    env = {**os.environ, "DASHBOARD_STORE": str(tmp_path / "cli.duckdb")}
    args = ["prompt", "--model", DEFAULT_MODEL, "--text", FRANCE, "--format", "json"]
    first = _cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert {"run_key", "tokens", "top_k", "compute_seconds"} <= set(out)
    assert out["top_k"][0]["token"] == " Paris" and out["compute_seconds"] > 0
    probs = [t["prob"] for t in out["top_k"]]
    assert len(probs) == 10 and probs == sorted(probs, reverse=True)
    second = json.loads(_cli(*args, env=env).stdout)
    assert second["compute_seconds"] == 0 and second["run_key"] == out["run_key"] and second["from_store"]
    bad = _cli("prompt", "--model", "nope", "--text", "hi", "--format", "json", env=env)
    assert bad.returncode == 2 and json.loads(bad.stdout)["error"]["type"] == "UnknownModel"
