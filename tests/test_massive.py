"""Massive activations: the on-the-fly kernel against its run_with_cache reference, the
detector on a planted spike, the CLI and the store, bad input, and the ablation experiment.

The default model (SmolLM2-135M, no BOS) carries one massive activation from layer 11 on, at
the first token, dimension 507 (~2·10^4 against a layer median ~2): some tests rely on it.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from backend.analyses.massive import MassiveAblationSpec, MassiveSpec, summarise
from backend.errors import EmptyPrompt, InvalidSite, InvalidSpec, NoMassiveActivations
from backend.runner import run
from backend.sites import Component, Site, hook_name
from kernels.massive import scan, scan_reference

TEXT = "The quick brown fox jumps over the lazy dog. It was a sunny day."
HELD_OUT = (
    "The capital of France is Paris, and it is a big city.",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "def add(a, b):\n    return a + b\n",
)

pytestmark = pytest.mark.model   # loads the real model


def _assert_scans_equal(fast, ref):
    for f in dataclasses.fields(fast):
        a, b = getattr(fast, f.name), getattr(ref, f.name)
        if f.name == "attn_received":  # a mean: summation order differs
            torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), rtol=1e-5, atol=1e-6)
        elif isinstance(a, np.ndarray):
            assert a.shape == b.shape, f.name
            np.testing.assert_array_equal(a, b, err_msg=f.name)
        else:
            assert a == b, f.name


def test_kernel_equals_reference(model):
    ids = model.encode(TEXT)
    tokens = model.tensor([ids[:8], ids[8:16]])  # a batch of two, odd sizes below
    # Low thresholds so that the massive set is large and not just the one spike.
    kw = dict(top_k=5, n_dims=7, abs_threshold=5.0, ratio_threshold=3.0, attention=True)
    fast, _ = scan(model, tokens, **kw)
    ref = scan_reference(model, tokens, **kw)
    assert len(ref.massive) > 100
    _assert_scans_equal(fast, ref)
    assert fast.top_values.shape == (2, model.info.n_layers, 5)
    assert fast.attn_received.shape == (2, model.info.n_layers, model.info.n_heads, 8)


@pytest.mark.parametrize("layer,pos,dim,value", [(1, 4, 123, -5.0e4)])
def test_detector_finds_planted_spike(model, layer, pos, dim, value):
    ids = model.encode(TEXT)
    site = hook_name(Site(Component.RESID_POST, layer))
    planted = []

    def plant(x, hook):
        x = x.clone()
        x[0, pos, dim] = value
        planted.append(True)
        return x

    s, _ = scan(model, model.tensor(ids), attention=True, extra_hooks=[(site, plant)])
    assert planted
    r = summarise(s, model.str_tokens(ids), ids)
    assert r.first_layer == layer
    rows = [row for row in r.massive if row["layer"] == layer]
    assert [(row["position"], row["dim"], row["value"]) for row in rows] == [(pos, dim, value)]
    assert rows[0]["token"] == model.str_tokens(ids)[pos]
    assert rows[0]["ratio"] == pytest.approx(abs(value) / float(r.median[layer]))
    assert (r.top_values[layer, 0], r.top_positions[layer, 0], r.top_dims[layer, 0]) == (value, pos, dim)
    assert r.pos_max[layer, pos] == abs(value)
    assert pos in r.sink_positions
    # without the plant, nothing is massive at that layer
    clean, _ = scan(model, model.tensor(ids))
    assert not (clean.massive[:, 1] == layer).any()


def test_cli_json_schema_and_store(model, capsys):
    from backend.cli import main

    text = "Massive activations sit at the first token. Then a full stop."
    argv = ["massive", "--model", "smollm2-135m", "--text", text, "--format", "json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    for key in ("run_key", "tokens", "layers", "compute_seconds", "massive", "first_layer", "sink"):
        assert key in first
    ids = model.encode(text)
    assert first["tokens"] == model.str_tokens(ids)
    assert first["from_store"] is False and first["compute_seconds"] > 0
    assert len(first["layers"]) == model.info.n_layers
    ref = scan_reference(model, model.tensor(ids))
    for layer, entry in enumerate(first["layers"]):
        assert len(entry["top"]) == 3
        assert all(set(t) >= {"value", "position", "dim"} for t in entry["top"])
        mags = [abs(t["value"]) for t in entry["top"]]
        assert mags == sorted(mags, reverse=True)
        assert [t["value"] for t in entry["top"]] == ref.top_values[0, layer].tolist()
        assert [(t["position"], t["dim"]) for t in entry["top"]] == list(
            zip(ref.top_positions[0, layer].tolist(), ref.top_dims[0, layer].tolist()))
        assert entry["median"] == pytest.approx(float(ref.median[0, layer]))
    # the default model's known spike: first token, dim 507, from layer 11
    assert first["first_layer"] == 11
    assert (first["layers"][11]["top"][0]["position"], first["layers"][11]["top"][0]["dim"]) == (0, 507)
    assert first["sink"]["positions"] == [0]
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["from_store"] is True and second["compute_seconds"] == 0
    assert second["run_key"] == first["run_key"] and second["layers"] == first["layers"]


def test_thresholds_change_the_table(model, store):
    low = run(MassiveSpec(model="smollm2-135m", text=TEXT, abs_threshold=50.0, ratio_threshold=100.0),
              store=store).result
    high = run(MassiveSpec(model="smollm2-135m", text=TEXT), store=store).result
    assert low.first_layer < high.first_layer == 11
    assert len(low.massive) > len(high.massive) > 0
    assert all(abs(r["value"]) >= 100 and r["ratio"] >= 1000 for r in high.massive)
    np.testing.assert_array_equal(low.top_values, high.top_values)  # ratios shown regardless
    assert high.sink_share.shape == (model.info.n_layers, model.info.n_heads)
    assert ((high.sink_share >= 0) & (high.sink_share <= 1 + 1e-5)).all()


def test_bad_input_raises_typed_errors(model, store, capsys):
    from backend.cli import main
    from backend.spec import Spec

    with pytest.raises(EmptyPrompt):
        MassiveSpec(model="smollm2-135m", text="   ")
    for bad in (dict(top_k=0), dict(top_k=21), dict(n_dims=0), dict(abs_threshold=-1.0),
                dict(ratio_threshold=float("nan"))):
        with pytest.raises(InvalidSpec):
            MassiveSpec(model="smollm2-135m", text="hi there", **bad)
    with pytest.raises(InvalidSpec):
        Spec.from_dict({"kind": "massive", "model": "smollm2-135m", "text": "hi", "top_k": "3"})
    with pytest.raises(InvalidSpec):
        MassiveAblationSpec(model="smollm2-135m", texts=())
    with pytest.raises(EmptyPrompt):
        MassiveAblationSpec(model="smollm2-135m", texts=("fine text", ""))
    with pytest.raises(InvalidSpec):
        MassiveAblationSpec(model="smollm2-135m", texts=("fine text",), layer=-1)
    with pytest.raises(InvalidSite):
        run(MassiveAblationSpec(model="smollm2-135m", texts=("a fine text",), layer=99), store=store)
    with pytest.raises(EmptyPrompt):
        run(MassiveAblationSpec(model="smollm2-135m", texts=("Hello",)), store=store)
    with pytest.raises(NoMassiveActivations):
        run(MassiveAblationSpec(model="smollm2-135m", texts=("a fine text",), abs_threshold=1e9),
            store=store)
    assert main(["massive", "--text", "ok", "--top-k", "0", "--format", "json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "invalid_spec"


def test_ablation_zero_breaks_mean_keeps(model, store):
    spec = MassiveAblationSpec(model="smollm2-135m", texts=HELD_OUT)
    out = run(spec, store=store)
    r = out.result
    assert r.layer == 11 and r.layer_chosen == "first appearance" and 507 in r.dims
    losses = (r.loss_original, r.loss_zero, r.loss_mean)
    assert all(math.isfinite(x) for x in losses)
    assert r.loss_zero > r.loss_original + 2.0          # the paper: zeroing them breaks the model
    assert abs(r.loss_mean - r.loss_original) < 0.3     # the paper: their mean is enough
    assert r.ppl_original == pytest.approx(math.exp(r.loss_original))
    assert r.n_tokens == sum(len(model.encode(t)) - 1 for t in HELD_OUT)
    assert (r.text_entries >= 1).all() and len(r.entries) == r.text_entries.sum()
    # reference: TransformerLens's own loss, unhooked and with a hand-written zero hook
    ids = model.encode(HELD_OUT[0])
    site = hook_name(Site(Component.RESID_POST, 11))
    entries = [(e["position"], e["dim"]) for e in r.entries if e["text"] == 0]

    def zero(x, hook):
        x = x.clone()
        for p, d in entries:
            x[:, p, d] = 0.0
        return x

    with model.lock, torch.inference_mode():
        clean = model.loss(ids)
        zeroed = float(model.run_with_hooks(model.tensor(ids), fwd_hooks=[(site, zero)],
                                                   return_type="loss"))
    assert r.text_losses[0, 0] == pytest.approx(clean, abs=1e-4)
    assert r.text_losses[0, 1] == pytest.approx(zeroed, abs=1e-4)
    again = run(spec, store=store)
    assert again.from_store and again.result.loss_zero == r.loss_zero
