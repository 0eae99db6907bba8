"""Neurons: top neurons per token against run_with_cache, the logit effect against the
Hugging Face weights by hand, typed errors for bad sites, store round trip, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backend.analyses.neurons import NeuronLogitSpec, NeuronsSpec, logit_effect
from backend.errors import InvalidSite
from backend.runner import run
from backend.sites import Component, Site, hook_name

pytestmark = pytest.mark.model   # loads the real model

TEXT = "The capital of France is Paris. It is a large city."
LAYER = 5


@pytest.fixture(scope="module")
def cached(model):
    names = [hook_name(Site(Component.MLP_POST, LAYER)), hook_name(Site(Component.MLP_OUT, LAYER))]
    with model.lock, torch.inference_mode():
        _, cache = model.run_with_cache(model.encode(TEXT), names)
    return cache[names[0]][0].float(), cache[names[1]][0].float()   # [pos d_mlp], [pos d_model]


def test_top_neurons_equal_run_with_cache(model, store, cached):
    post, mlp_out = cached
    out = run(NeuronsSpec(model=model.info.model_id, text=TEXT, layer=LAYER, k=7), store=store)
    r = out.result
    assert r.top_values.shape == (post.shape[0], 7) and r.d_mlp == model.info.d_mlp == post.shape[1]
    ref = post.topk(7, dim=-1)
    np.testing.assert_allclose(r.top_values, ref.values.numpy(), atol=1e-5)
    # Ids must hold the values they claim (ties aside, the same neurons as the reference).
    np.testing.assert_allclose(np.take_along_axis(post.numpy(), r.top_ids, 1), r.top_values, atol=1e-5)
    assert (r.top_ids == ref.indices.numpy()).mean() > 0.99
    ref_abs = post.abs().topk(7, dim=-1)
    np.testing.assert_allclose(np.abs(r.top_abs_values), ref_abs.values.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(post.numpy(), r.top_abs_ids, 1), r.top_abs_values, atol=1e-5)
    np.testing.assert_allclose(r.neuron_max, post.max(0).values.numpy(), atol=1e-5)
    np.testing.assert_allclose(r.prompt_top_acts, post[:, r.prompt_top_ids].numpy(), atol=1e-5)
    assert list(r.prompt_top_ids[:3]) == post.max(0).values.topk(3).indices.tolist()
    # The neurons are what the MLP's output matrix reads: post @ W_out = mlp_out.
    w_out = model.hf_model().model.layers[LAYER].mlp.down_proj.weight   # [d_model d_mlp]
    with torch.no_grad():
        torch.testing.assert_close(post @ w_out.T.float(), mlp_out, atol=1e-4, rtol=1e-4)

    again = run(NeuronsSpec(model=model.info.model_id, text=TEXT, layer=LAYER, k=7), store=store)
    assert again.from_store and again.compute_seconds == 0 and again.run_key == out.run_key
    np.testing.assert_array_equal(again.result.top_ids, r.top_ids)
    np.testing.assert_array_equal(again.result.top_abs_values, r.top_abs_values)
    assert again.result.tokens == r.tokens


def test_logit_effect_equals_hand_computed(model, store):
    hf = model.hf_model()
    layer, neuron = 12, 321
    with torch.no_grad():
        w = hf.model.layers[layer].mlp.down_proj.weight[:, neuron]                 # [d_model]
        ref = hf.lm_head.weight @ (w * hf.model.norm.weight)                        # [d_vocab]
    eff = logit_effect(model, layer, neuron)
    torch.testing.assert_close(eff, ref.float(), atol=1e-4, rtol=0)
    out = run(NeuronLogitSpec(model=model.info.model_id, layer=layer, neuron=neuron, k=20), store=store)
    r = out.result
    top, bottom = ref.topk(20), (-ref).topk(20)
    np.testing.assert_allclose(r.promoted_values, top.values.numpy(), atol=1e-4)
    np.testing.assert_allclose(r.suppressed_values, -bottom.values.numpy(), atol=1e-4)
    assert list(r.promoted_ids) == top.indices.tolist()
    assert list(r.suppressed_ids) == bottom.indices.tolist()
    assert r.promoted_tokens[0] == model.tokenizer.decode([int(r.promoted_ids[0])])
    assert np.all(np.diff(r.promoted_values) <= 0) and np.all(np.diff(r.suppressed_values) >= 0)
    again = run(NeuronLogitSpec(model=model.info.model_id, layer=layer, neuron=neuron, k=20), store=store)
    assert again.from_store and again.compute_seconds == 0
    np.testing.assert_array_equal(again.result.promoted_ids, r.promoted_ids)


def test_bad_layer_or_neuron_is_invalid_site(model, store):
    m = model.info.model_id
    for bad in (dict(layer=model.info.n_layers, neuron=0), dict(layer=0, neuron=model.info.d_mlp)):
        with pytest.raises(InvalidSite):
            run(NeuronLogitSpec(model=m, **bad), store=store)
    with pytest.raises(InvalidSite):
        run(NeuronsSpec(model=m, text=TEXT, layer=model.info.n_layers), store=store)
    with pytest.raises(InvalidSite):
        NeuronsSpec(model=m, text=TEXT, layer=-1)
    with pytest.raises(InvalidSite):
        NeuronLogitSpec(model=m, layer=0, neuron=-3)
    assert store.count_runs() == 0


def test_cli_json(model, capsys):
    from backend.cli import main

    rc = main(["neurons", "--model", model.info.model_id, "--text", TEXT, "--layer", str(LAYER),
               "--k", "4", "--neuron", "7", "--logit-k", "5", "--format", "json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["layer"] == LAYER and len(d["tokens"]) == len(d["top_neurons"])
    assert set(d) >= {"run_key", "tokens", "layer", "top_neurons", "compute_seconds", "logit_effect"}
    assert len(d["top_neurons"][0]) == 4 and set(d["top_neurons"][0][0]) == {"neuron", "value"}
    assert len(d["logit_effect"]["promoted"]) == 5
    rc = main(["neurons", "--model", model.info.model_id, "--text", TEXT, "--layer", "99", "--format", "json"])
    assert rc == 2 and json.loads(capsys.readouterr().out)["error"]["type"] == "InvalidSite"
