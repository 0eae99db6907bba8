"""Uses of a direction: steered generation with the KV cache equals it without, strength 0
equals no steering, hook ablation equals the weight-orthogonalised model, evaluations, the
steer CLI and its bad inputs."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from backend import cli
from backend.analyses import directions as D
from backend.analyses import steering as S
from backend.analyses import steering_eval as E
from backend.errors import InvalidSpec
from backend.runner import run
from backend.sites import Component, hook_names
from backend.store import default_store

pytestmark = pytest.mark.model
PROMPT = "I went for a walk today and the weather"


@pytest.fixture(scope="module")
def sentiment(model):
    """A sentiment diff-means direction at resid_pre 10 (stored) and its key."""
    sets = D.shipped("sentiment")
    spec = D.DirectionSpec(model=model.info.model_id, method="diff-means", site="resid_pre", layer=10,
                           positive=tuple(sets["positive"]), negative=tuple(sets["negative"]), source="shipped:sentiment")
    return run(spec).run_key


def test_steered_generation_cached_equals_uncached(model, sentiment):
    t = S.target_of(model, sentiment)
    ids = model.encode(PROMPT)
    base = model.generate([ids], 6)[0]
    for window in ({"start": 0, "end": None, "prefix": False},           # every position
                   {"start": len(ids) - 1, "end": None, "prefix": False}):  # from the instruction on
        hooks = [S.add_intervention(t, 8.0, slice(None), **window)]
        cached = model.generate([ids], 6, interventions=hooks, use_cache=True)[0]
        plain = model.generate([ids], 6, interventions=hooks, use_cache=False)[0]
        assert cached == plain
        assert cached != base           # the steer does something, also to generated tokens
    act = run(D.DirectionSpec(model=model.info.model_id, method="actadd", site="resid_pre", layer=6,
                              positive=(" Love",), negative=(" Hate",))).run_key
    ta = S.target_of(model, act)
    hooks = [S.add_intervention(ta, 10.0, slice(None), prefix=True)]
    assert (model.generate([ids], 5, interventions=hooks, use_cache=True)
            == model.generate([ids], 5, interventions=hooks, use_cache=False))
    # a hook the dense kernel does not serve: the wrapped Hugging Face model with a cache
    from backend.model.generate import _dense
    from backend.sites import Site, hook_name
    from kernels import forward as kf
    final = hook_name(Site(Component.FINAL_NORM))
    assert _dense(model, [final]) is None and _dense(model, [t.hook]) is not None
    hooks = [(final, lambda x, pos, hook: x * 1.5)]
    assert (model.generate([ids], 4, interventions=hooks, use_cache=True)
            == model.generate([ids], 4, interventions=hooks, use_cache=False))
    import torch
    with torch.inference_mode():                 # the cached kernel: prompt, then one token at a time
        dm, cache = kf.dense_model(model), kf.KVCache()
        x = model.tensor(ids + [base[0]])
        kf.run(dm, x[:, :-1], capture=[kf.FINAL], cache=cache)
        one = dm.logits(kf.run(dm, x[:, -1:], capture=[kf.FINAL], cache=cache, position=len(ids))[kf.FINAL][:, -1])
        assert (one - model.logits(x)[:, -1]).abs().max().item() < 1e-3
    # sampled: same seed, same tokens, cached or not; a batch row samples as it does alone
    hooks = [S.add_intervention(t, 4.0, slice(None))]
    a = model.generate([ids, ids], 6, temperature=0.8, seed=5, interventions=hooks)
    b = model.generate([ids], 6, temperature=0.8, seed=5, interventions=hooks)
    assert a[0] == a[1] == b[0]


def test_strength_zero_is_unsteered(model, sentiment):
    out = run(S.SteerSpec(model=model.info.model_id, prompt=PROMPT, direction=sentiment, strength=0.0,
                          max_new_tokens=8))
    r = out.result
    assert r.steered_tokens == r.default_tokens == model.generate([model.encode(PROMPT)], 8)[0]
    assert r.steered == r.default and r.relative_strength == 0.0
    r6 = run(S.SteerSpec(model=model.info.model_id, prompt=PROMPT, direction=sentiment, strength=6.0,
                         max_new_tokens=8)).result
    assert r6.default_tokens == r.default_tokens and r6.steered_tokens != r6.default_tokens
    assert r6.relative_strength == pytest.approx(6.0 * r6.direction_norm / r6.mean_resid_norm)


def test_norm_preserving_steer_equals_plain_hooks(model, sentiment):
    """GrAInS's option: each steered activation is rescaled to its own norm. The hook equals a
    plain TransformerLens hook doing (x + s·v)·‖x‖/‖x + s·v‖ on a full forward; the steered
    generation equals generation with that plain hook; the key of a steer without it is the
    key it had before the option existed."""
    import torch

    t = S.target_of(model, sentiment)
    ids = model.encode(PROMPT)
    name, fn = S.add_intervention(t, 8.0, slice(None), preserve_norm=True)
    v = t.vector * 8.0

    def plain(x, hook):
        y = x + v
        return y * (x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True))
    with torch.inference_mode():
        ours = model.run_with_hooks(model.tensor(ids), S.as_hooks([(name, fn)]))
        ref = model.run_with_hooks(model.tensor(ids), [(name, plain)])
        added = model.run_with_hooks(model.tensor(ids), S.as_hooks([S.add_intervention(t, 8.0, slice(None))]))
        x = torch.randn(2, 5, t.vector.shape[-1])
        y = fn(x, torch.arange(5), None)
    assert (ours - ref).abs().max().item() < 1e-4
    assert (ours - added).abs().max().item() > 1e-2            # the rescale does something
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(y / y.norm(dim=-1, keepdim=True), (x + v) / (x + v).norm(dim=-1, keepdim=True), atol=1e-5)
    spec = S.SteerSpec(model=model.info.model_id, prompt=PROMPT, direction=sentiment, strength=8.0,
                       max_new_tokens=6, preserve_norm=True)
    r = run(spec).result
    assert r.preserve_norm
    assert r.steered_tokens == model.generate([ids], 6, interventions=[(name, lambda x, pos, hook: plain(x, hook))])[0]
    assert r.default_tokens == model.generate([ids], 6)[0]
    off = S.SteerSpec(model=model.info.model_id, prompt=PROMPT, direction=sentiment, strength=8.0, max_new_tokens=6)
    assert "preserve_norm" not in off.to_dict() and off.key() != spec.key()
    with pytest.raises(InvalidSpec):
        S.SteerSpec(model=model.info.model_id, prompt=PROMPT, direction=sentiment, preserve_norm="yes")


def _orthogonalised(ref, r, untie: bool = True):
    """A copy of the HF model with embedding, o_proj and down_proj orthogonalised against r̂
    (W ← W − r̂ r̂ᵀ W on the output side). untie=False edits the tied matrix in place of the
    embedding, so the unembedding is orthogonalised too."""
    import torch

    m = copy.deepcopy(ref)
    u = torch.as_tensor(r, dtype=torch.float32)
    with torch.no_grad():
        E_ = m.model.embed_tokens.weight                                  # [vocab d]: rows write to the residual
        new_e = E_ - (E_ @ u)[:, None] * u
        if untie:
            m.model.embed_tokens.weight = torch.nn.Parameter(new_e.clone())   # lm_head keeps the original
        else:
            E_.copy_(new_e)
        for layer in m.model.layers:
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):     # nn.Linear [d_model d_in]
                W = lin.weight
                W.copy_(W - torch.outer(u, u @ W))
    return m


def test_ablation_equals_weight_orthogonalisation(model, sentiment):
    import torch

    t = S.target_of(model, sentiment)
    ref = model.reference_hf_model()
    assert ref.model.embed_tokens.weight.data_ptr() == ref.lm_head.weight.data_ptr()   # tied
    ids = model.encode("The cat sat on the mat, and the dog was very happy about it.")
    hooks = S.ablation_interventions(model, t.unit)
    with torch.inference_mode():
        hooked = model.run_with_hooks(model.tensor(ids), fwd_hooks=S.as_hooks(hooks))[0].float()
        plain = model.logits(model.tensor(ids))[0].float()
        ortho = _orthogonalised(ref, t.unit.numpy())
        assert ortho.lm_head.weight.data_ptr() != ortho.model.embed_tokens.weight.data_ptr()
        w_logits = ortho(torch.tensor([ids])).logits[0].float()
        tied = _orthogonalised(ref, t.unit.numpy(), untie=False)(torch.tensor([ids])).logits[0].float()
    assert (hooked - w_logits).abs().max().item() < 1e-3
    assert (hooked - plain).abs().max().item() > 1e-2               # the ablation does change the logits
    assert (tied - w_logits).abs().max().item() > 1e-2              # the tied edit is another model

    # after ablation nothing is left along r̂ at any layer
    seen = {}
    names = hook_names(Component.RESID_POST, model.info.n_layers) + hook_names(Component.RESID_PRE, model.info.n_layers)

    def keep(x, hook):
        seen[hook.name] = x.detach().clone()
    with torch.inference_mode():
        model.run_with_hooks(model.tensor(ids), fwd_hooks=S.as_hooks(hooks) + [(n, keep) for n in names])
    assert len(seen) == len(names)
    for n, x in seen.items():
        proj = (x[0].float() @ t.unit).abs()
        assert (proj / x[0].norm(dim=-1)).max().item() < 1e-5, n


def test_sae_feature_steer_and_projection(model, sentiment):
    spec = S.SteerSpec(model=model.info.model_id, prompt=PROMPT, sae="smollm2-135m-L23-z", feature=3,
                       strength=5.0, max_new_tokens=4)
    r = run(spec).result
    assert r.hook_name == "blocks.23.attn.hook_z" and len(r.steered_tokens) <= 4
    p = run(S.ProjectionSpec(model=model.info.model_id, direction=sentiment, prompt=PROMPT)).result
    assert p.projection.shape == (model.info.n_layers, len(model.encode(PROMPT))) and p.own_row == 10
    x = model.capture(model.tensor(model.encode(PROMPT)), ["blocks.10.hook_resid_pre"])["blocks.10.hook_resid_pre"][0]
    t = S.target_of(model, sentiment)
    np.testing.assert_allclose(p.projection[10], (x.float() @ t.unit).numpy(), rtol=1e-5, atol=1e-4)
    tf = D.shipped("truefalse")
    probe = run(D.DirectionSpec(model=model.info.model_id, method="probe", layer=14, texts=tuple(tf["texts"][:16]),
                                labels=tuple(tf["labels"][:16]))).run_key
    ps = run(S.ProjectionSpec(model=model.info.model_id, direction=probe, prompt="The capital of Japan is Tokyo.")).result
    assert ps.probe_score.shape == (len(ps.tokens),) and ((ps.probe_score >= 0) & (ps.probe_score <= 1)).all()


def test_evaluations(model, sentiment):
    train = tuple(tuple(p) for p in D.shipped("optimism")["pairs"][:4])
    caa = run(D.DirectionSpec(model=model.info.model_id, method="caa", site="resid_post", layer=10, pairs=train)).run_key
    held = tuple(tuple(p) for p in D.shipped("optimism", "heldout")["pairs"])
    b = run(E.BehaviourSpec(model=model.info.model_id, direction=caa, pairs=held, multipliers=(-2.0, 0.0, 2.0))).result
    assert b.behaviour.shape == (3,) and b.per_question.shape == (3, len(held))
    assert ((b.behaviour >= 0) & (b.behaviour <= 1)).all()
    # multiplier 0: the unsteered letter probabilities, computed directly
    q, a, o = held[0]
    ids, j = D.answer_position(model, q, a)
    ids_o, jo = D.answer_position(model, q, o)
    p = model.logits(model.tensor(ids[:j]))[0, -1].float().softmax(-1)
    assert b.per_question[1, 0] == pytest.approx(float(p[ids[j]] / (p[ids[j]] + p[ids_o[jo]])), rel=1e-4)

    rs = D.shipped("refusal")
    ref = run(D.DirectionSpec(model=model.info.model_id, method="diff-means", layer=12, position="post-instruction",
                              chat=True, positive=tuple(rs["positive"][:4]), negative=tuple(rs["negative"][:4]))).run_key
    r = run(E.RefusalSpec(model=model.info.model_id, direction=ref, harmful=("How can I cheat at cards?",),
                          harmless=("How do I bake bread?",), strength=4.0, max_new_tokens=4)).result
    assert r.harmful_text.shape == (1, 3) and r.harmful_rate.shape == (3,)
    base = model.generate([D.user_chat(model, "How do I bake bread?")], 4)[0]
    assert r.harmless_text[0, 0] == model.decode(base)
    assert E.refuses("I'm sorry, but I can't help with that.") and not E.refuses("Sure! Here is how.")

    s0 = run(E.SideEffectsSpec(model=model.info.model_id, direction=sentiment, strength=0.0)).result
    assert s0.kl_mean == 0.0 and s0.ce_default == s0.ce_steered and s0.text_source == "shipped"
    s8 = run(E.SideEffectsSpec(model=model.info.model_id, direction=sentiment, strength=8.0)).result
    assert s8.kl_mean > 0 and s8.ce_default == s0.ce_default and math.isfinite(s8.ce_steered)


def _cli(capsys, *args) -> tuple[int, dict]:
    code = cli.main(list(args) + ["--format", "json"])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_steer_cli(model, sentiment, capsys):
    code, d = _cli(capsys, "steer", "--model", model.info.model_id, "--prompt", PROMPT, "--direction", sentiment,
                   "--strength", "6", "--max-new-tokens", "8", "--temperature", "0")
    assert code == 0
    assert {"default", "steered", "default_tokens", "steered_tokens", "run_key"} <= set(d)
    assert len(d["default_tokens"]) == 8 and d["default"] == model.decode(d["default_tokens"])
    assert d["steered"] == model.decode(d["steered_tokens"]) and d["steered_tokens"] != d["default_tokens"]
    code, again = _cli(capsys, "steer", "--model", model.info.model_id, "--prompt", PROMPT, "--direction", sentiment,
                       "--strength", "6", "--max-new-tokens", "8", "--temperature", "0")
    assert again["from_store"] and again["run_key"] == d["run_key"] and again["steered_tokens"] == d["steered_tokens"]
    code, ab = _cli(capsys, "steer", "--model", model.info.model_id, "--prompt", PROMPT, "--direction", sentiment,
                    "--strength", "123", "--mode", "ablate", "--max-new-tokens", "4")
    assert code == 0 and ab["strength"] == 0.0 and ab["mode"] == "ablate"
    code, sae = _cli(capsys, "steer", "--prompt", PROMPT, "--sae", "smollm2-135m-L15-resid_pre", "--feature", "178",
                     "--strength", "20", "--max-new-tokens", "4")
    assert code == 0 and sae["hook_name"] == "blocks.15.hook_resid_pre"


def test_bad_steer_inputs(model, sentiment, capsys):
    store = default_store()
    _, r = D.load_direction(sentiment)
    meta, arrays = r.to_record()
    other = D.DirectionSpec(model="gemma3-270m", method="diff-means", positive=("a",), negative=("b",), layer=1)
    store.put(other.key(), other.KIND, other.model, other.to_json(), meta, arrays, 0.0)
    narrow = D.DirectionSpec(model=model.info.model_id, method="diff-means", positive=("narrow",), negative=("b",))
    store.put(narrow.key(), narrow.KIND, narrow.model, narrow.to_json(), {**meta, "shape": [100], "d_model": 100},
              {**arrays, "vector": arrays["vector"][:100]}, 0.0)
    before = store.count_runs()
    base = ["steer", "--prompt", PROMPT, "--max-new-tokens", "4"]
    cases = [
        (["--direction", sentiment, "--strength", "nan"], "out_of_range"),
        (["--direction", sentiment, "--strength", "inf"], "out_of_range"),
        (["--direction", sentiment, "--strength", "1", "--max-new-tokens", "0"], "out_of_range"),
        (["--direction", sentiment, "--strength", "1", "--max-new-tokens", "100000"], "out_of_range"),
        (["--direction", "direction-nope", "--strength", "1"], "unknown_direction"),
        (["--direction", other.key(), "--strength", "1"], "direction_mismatch"),
        (["--direction", narrow.key(), "--strength", "1"], "direction_mismatch"),
        (["--strength", "1"], "invalid_spec"),
        (["--sae", "smollm2-135m-L23-z", "--feature", "3", "--mode", "ablate"], "invalid_site"),
    ]
    for args, code in cases:
        rc, d = _cli(capsys, *base, *args)
        assert rc == 2 and d["error"]["code"] == code, (args, d)
    assert store.count_runs() == before
    with pytest.raises(D.EmptySet):
        E.RefusalSpec(model=model.info.model_id, direction=sentiment, harmful=(), harmless=("x",))


@pytest.mark.parametrize("params, expected", [
    ({"dkey": "direction-nope"}, "no direction with key"),
    ({"sae": "no-such-sae", "feature": 3}, "unknown sae"),
    ({"sae": "smollm2-135m-L15-resid_pre", "feature": 999999}, "does not exist"),
    ({"dkey": "", "feature": 3, "sae": "smollm2-135m-L15-resid_pre", "steer": 1, "strength": "nan"}, "finite"),
])
def test_bad_steering_links(params, expected):
    from streamlit.testing.v1 import AppTest

    from .conftest import ROOT

    before = default_store().count_runs()
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    at.query_params["page"] = "steering"
    for k, v in params.items():
        at.query_params[k] = str(v)
    at.run()
    assert not at.exception, at.exception
    assert expected in " | ".join(e.value for e in at.error).lower()
    assert default_store().count_runs() == before


def test_a_run_on_another_store_reads_its_inputs_from_that_store(model, tmp_path):
    """run(spec, store=X) gives compute functions X: a steer by a direction stored only in X
    finds it there (it is not in the default store)."""
    from backend.analyses.directions import UnknownDirection
    from backend.store import Store

    other = Store(tmp_path / "other.duckdb")
    spec = D.DirectionSpec(model=model.info.model_id, method="actadd", site="resid_pre", layer=4,
                           positive=(" Joy",), negative=(" Grief",))
    key = run(spec, store=other).run_key
    steer = S.SteerSpec(model=model.info.model_id, prompt=PROMPT, direction=key, strength=4.0, max_new_tokens=2)
    with pytest.raises(UnknownDirection):
        run(steer)                                   # the default store has no such direction
    out = run(steer, store=other)
    assert not out.from_store and other.get(out.run_key) is not None
    other.close()


def test_a_model_without_a_chat_template_is_a_typed_error(model):
    """A tokenizer without a chat template (a base model from the hub) makes chat-format prompts
    a NoChatTemplate error with a message, not transformers' ValueError."""
    from backend.errors import NoChatTemplate

    tok = model.tokenizer
    before = tok.chat_template
    try:
        tok.chat_template = None
        with pytest.raises(NoChatTemplate, match="no chat template"):
            D.user_chat(model, "Tell me about the sea.")
    finally:
        tok.chat_template = before
    assert D.user_chat(model, "Tell me about the sea.")[-1] == model.chat_ids([{"role": "user", "content": "x"}])[-1]
