"""Attribution-guided steering (GrAInS, `direction --method grains`): integrated gradients over
a prompt's tokens picks the top-k positive and negative tokens; the direction is the mean
difference of the activations there. Checked against a plain IG loop on the Hugging Face model
(the tokens) and a hand-written mean difference from the bridge's cache (the vector)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backend.analyses.directions import GRAINS_STEPS, DirectionSpec, grains_tokens
from backend.errors import InvalidSpec, OutOfRange
from backend.runner import lookup, run

from .test_token_attribution import _hf_ig

pytestmark = pytest.mark.model
PAIRS = (("The capital of France is", " Paris", " London"),
         ("The opposite of hot is", " cold", " warm"))
LAYER = 6


def _spec(top_k=2, **kw):
    return DirectionSpec(model="smollm2-135m", method="grains", site="resid_pre", layer=LAYER, pairs=PAIRS,
                         top_k=top_k, **kw)


def test_grains_tokens_and_direction_equal_plain_loops(model, tmp_path):
    from backend.store import Store

    store = Store(tmp_path / "g.duckdb")
    out = run(_spec(), store=store)
    r = out.result
    hf = model.reference_hf_model()
    W = hf.get_input_embeddings().weight.detach()
    name = f"blocks.{LAYER}.hook_resid_pre"
    ups, downs = [], []
    for (prompt, a, b), picked in zip(PAIRS, r.made["tokens"]):
        ids = model.encode(prompt)
        x = W[ids].double()
        base = torch.zeros_like(x)
        base[0] = x[0]                                     # position 0 held, as the analysis does
        ta, tb = (model.tokenizer.encode(t, add_special_tokens=False)[0] for t in (a, b))
        scores = _hf_ig(hf, x, base, GRAINS_STEPS, ta, tb)
        pos, neg = grains_tokens(scores, 2)
        toks = model.str_tokens(ids)
        assert picked == {"positive": [toks[i] for i in pos], "negative": [toks[i] for i in neg]}
        _, cache = model.run_with_cache(ids, [name])
        h = cache[name][0].double()
        if pos:
            ups.append(h[pos].mean(0))
        if neg:
            downs.append(h[neg].mean(0))
    want = (torch.stack(ups).mean(0) - torch.stack(downs).mean(0)).numpy()
    np.testing.assert_allclose(r.vector, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert r.layer_vectors.shape[0] == model.info.n_layers and r.made["top_k"] == 2
    # stored: a second run reads it; the default top_k leaves older direction keys unchanged
    assert lookup(_spec(), store).from_store
    assert "top_k" not in json.loads(DirectionSpec(model="smollm2-135m", method="diff-means", positive=("a",),
                                                   negative=("b",)).to_json())
    store.close()


def test_grains_bad_input():
    with pytest.raises(OutOfRange):
        _spec(top_k=0)
    with pytest.raises(InvalidSpec):
        DirectionSpec(model="smollm2-135m", method="grains", layer=3, pairs=(("The sky is", " blue", " blue"),))
