"""Activation patching: the fast sweep against TransformerLens's own patching functions,
against the hooked reference, and on the bad inputs a user can give.

TransformerLens's full sweeps take ~80 s each on the IOI prompt here, so its functions run
on a sample of cells (they accept an index_df), on a short pair whose full sweeps through
our analysis are cheap.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from backend import PatchSpec, run
from backend.analyses.patching import SITES as SPEC_SITES, intervene
from backend.errors import (EmptyDataset, IdenticalAnswers, InvalidSite, NotSingleToken,
                            PromptLengthMismatch)
from backend.tasks import PromptPair, encode_pair, encode_pairs, generate
from kernels import patching as kp

from .patching_refs import tl_normalised

pytestmark = pytest.mark.model   # loads the real model

IOI = PromptPair("When Mary and John went to the store, John gave a drink to",
                 "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")
IOI_SWAP = PromptPair(IOI.clean, "When John and Mary went to the store, Mary gave a drink to", " Mary", " John")
FACT = PromptPair("The capital of France is", "The capital of Italy is", " Paris", " Rome")
def _sample(site, n_layers, T, n_heads, n, seed=0, min_pos=0, n_kv=3):
    cells = kp.cells(site, n_layers, T, n_heads, n_kv)
    pos_axis = kp.SITE_AXES[site].index("pos") if "pos" in kp.SITE_AXES[site] else None
    idx = [i for i, c in enumerate(cells) if pos_axis is None or c[pos_axis] >= min_pos]
    idx = sorted(random.Random(seed).sample(idx, n))
    return idx, [cells[i] for i in idx]


def _spec(pair, **kw):
    return PatchSpec(model="smollm2-135m", clean=pair.clean, corrupt=pair.corrupt, answer=pair.answer,
                     wrong=pair.wrong, **kw)


def test_sites_agree():
    assert tuple(SPEC_SITES) == tuple(kp.SITES)


@pytest.mark.parametrize("site,n", [("resid_pre", 12), ("attn_out", 8), ("mlp_out", 8), ("head_out", 8),
                                    ("head_out_pos", 8), ("head_q", 6), ("head_k", 6), ("head_v", 6),
                                    ("head_pattern", 6)])
def test_sweep_equals_transformer_lens(model, site, n):
    """The stored sweep (fast kernel) equals TL's own function on sampled cells, within 1e-4."""
    e = encode_pair(model, FACT)        # "France" -> "Italy" at position 3
    info = model.info
    out = run(_spec(FACT, site=site)).result
    assert out.method == "fast" and list(out.axes) == list(kp.SITE_AXES[site])
    idx, cells = _sample(site, info.n_layers, len(e.clean_ids), info.n_heads, n, seed=len(site), min_pos=3)
    tl = tl_normalised(model, e, site, cells).numpy()
    np.testing.assert_allclose(out.values.reshape(-1)[idx], tl, atol=1e-4, rtol=0)
    assert np.abs(tl).max() > 1e-3      # the sample holds cells that matter
    if site == "resid_pre":
        assert np.all(out.values[:, :3] == 0.0)               # identity patches: exactly 0
        assert out.values[0, 3] == pytest.approx(1.0, abs=1e-4)  # the clean token is the clean run


@pytest.mark.parametrize("site", kp.SITES)
def test_clean_into_clean_changes_nothing(model, site):
    fm = kp.fast_model(model)
    e = encode_pair(model, IOI)
    metric = kp.LogitDiff(e.answer_id, e.wrong_id)
    out = kp.sweep(fm, e.clean_ids, e.clean_ids, site, metric)
    assert out.n_identity == out.values.numel()
    assert torch.equal(out.values, torch.full_like(out.values, out.base))
    if site not in ("resid_pre", "head_out_pos", "head_k"):
        return      # the hooked reference for a layer x pos site, a head site and a kv-head site
    _, cells = _sample(site, model.info.n_layers, len(e.clean_ids), model.info.n_heads, 1)
    base, _, outs = kp.reference_logits(model, e.clean_ids, e.clean_ids, site, cells)
    for logits in outs:
        assert torch.allclose(logits, base, atol=1e-5, rtol=0)


@pytest.mark.parametrize("site", kp.SITES)
def test_reference_equals_fast_kernel(model, site):
    """Hooked bridge forwards vs the kernel, both directions, three metrics (IOI, all names swapped)."""
    fm = kp.fast_model(model)
    e = encode_pair(model, IOI_SWAP)
    info = model.info
    _, cells = _sample(site, info.n_layers, len(e.clean_ids), info.n_heads, 3, seed=1, min_pos=1)
    with torch.inference_mode():
        clean_lp = kp.base_logits(fm, e.clean_ids).log_softmax(-1)
    metrics = [kp.LogitDiff(e.answer_id, e.wrong_id), kp.AnswerProb(e.answer_id), kp.KLFromClean(clean_lp)]
    _, _, outs = kp.reference_logits(model, e.corrupt_ids, e.clean_ids, site, cells)
    for metric in metrics:
        fast = kp.sweep(fm, e.corrupt_ids, e.clean_ids, site, metric, cell_list=cells).values
        ref = metric.from_logits(torch.stack(outs))
        assert torch.allclose(fast, ref, atol=1e-4, rtol=0), (type(metric).__name__, fast, ref)
    ld = metrics[0]     # noising: the corrupted activation into the clean run
    fast = kp.sweep(fm, e.clean_ids, e.corrupt_ids, site, ld, cell_list=cells[:1]).values
    ref = kp.reference_sweep(model, e.clean_ids, e.corrupt_ids, site, ld, info.n_layers,
                             info.n_heads, cells[:1]).values
    assert torch.allclose(fast, ref, atol=1e-4, rtol=0)
    assert (fast - ld.from_logits(kp.base_logits(fm, e.clean_ids)[None])).abs().max() > 1e-3


def test_noising_and_metrics_through_the_spec(model, store):
    noise = run(_spec(FACT, direction="noising"), store=store).result
    # noising the country token at layer 0 gives the corrupted run (0); before it nothing changes (1)
    assert noise.values[0, 3] == pytest.approx(0.0, abs=1e-4)
    assert np.all(noise.values[:, :3] == 1.0)
    prob = run(_spec(FACT, metric="prob"), store=store).result
    assert 0.5 < prob.clean_metric < 1 and prob.corrupt_metric < 0.1
    assert prob.values[0, 3] == pytest.approx(prob.clean_metric, abs=1e-4)
    kl = run(_spec(FACT, metric="kl"), store=store).result
    assert kl.clean_metric == pytest.approx(0.0, abs=1e-5) and kl.corrupt_metric > 0.5
    assert kl.values[0, 3] == pytest.approx(0.0, abs=1e-4)
    assert kl.clean_logit_diff > 0 > kl.corrupt_logit_diff


def test_dataset_averages_pairs(model, store):
    pairs = generate(model, "facts", n=2, seed=3)
    both = run(PatchSpec.from_pairs("smollm2-135m", pairs, metric="logit_diff"), store=store).result
    one = [run(PatchSpec.from_pairs("smollm2-135m", [p], metric="logit_diff"), store=store).result for p in pairs]
    assert both.n_pairs == 2
    np.testing.assert_allclose(both.values, (one[0].values + one[1].values) / 2, atol=1e-5)
    assert both.clean_logit_diff == pytest.approx((one[0].clean_logit_diff + one[1].clean_logit_diff) / 2, abs=1e-5)


def test_generated_tasks_are_valid_and_the_model_solves_them(model):
    fm = kp.fast_model(model)
    for task in ("ioi", "induction", "facts"):
        pairs = generate(model, task, n=3, seed=1)
        assert len(pairs) == 3
        for e in encode_pairs(model, pairs):
            assert any(a != b for a, b in zip(e.clean_ids, e.corrupt_ids)), task
            clean, corrupt = kp.sweep_baselines(fm, e.clean_ids, e.corrupt_ids, kp.LogitDiff(e.answer_id, e.wrong_id))
            assert clean > corrupt, (task, clean, corrupt)


def test_bad_inputs_raise_typed_errors_and_store_nothing(model, store):
    ok = dict(model="smollm2-135m", clean=IOI.clean, corrupt=IOI.corrupt, answer=IOI.answer, wrong=IOI.wrong)
    cases = [
        (dict(ok, corrupt="When Mary and John went to the big store, Mary gave a drink to"), PromptLengthMismatch),
        (dict(ok, answer=" Maryanne Smith"), NotSingleToken),
        (dict(ok, wrong=" Mary"), IdenticalAnswers),
    ]
    for kw, err in cases:
        spec = PatchSpec(**kw)
        with pytest.raises(err) as info:
            run(spec, store=store)
        assert store.get(spec.key()) is None
        if err is PromptLengthMismatch:
            assert "[When| Mary|" in str(info.value) and "differ at token 7" in str(info.value)
    with pytest.raises(EmptyDataset):
        PatchSpec(model="smollm2-135m")
    with pytest.raises(EmptyDataset):
        PatchSpec.from_pairs("smollm2-135m", [])
    with pytest.raises(InvalidSite):
        PatchSpec(**ok, site="resid_sideways")
    with pytest.raises(InvalidSite):
        intervene(PatchSpec(**ok), layer=30, pos=0, model=model)
    assert store.cursor().execute("SELECT count(*) FROM runs").fetchone()[0] == 0


def test_intervene_matches_the_sweep(model, store):
    spec = _spec(FACT, site="head_out")
    values = run(spec, store=store).result.values
    layer, head = np.unravel_index(np.abs(values).argmax(), values.shape)
    r = intervene(spec, layer=int(layer), head=int(head), model=model)
    assert r.after == pytest.approx(float(values[layer, head]), abs=1e-4)
    assert r.before == pytest.approx(0.0, abs=1e-6)
    assert len(r.top_before) == len(r.top_after) == 10
    assert r.top_before[0]["token"] == " Rome"      # the corrupted run's answer
    r2 = intervene(_spec(FACT), layer=0, pos=3, model=model)
    assert r2.after == pytest.approx(1.0, abs=1e-4)   # the clean token at layer 0 is the clean run
    assert r2.top_after[0]["token"] == " Paris"
    assert intervene(_spec(FACT), layer=5, pos=1, model=model).after == 0.0   # identity patch
    # a click is stored like any result: its link reopens it from the store
    from backend.analyses.patching import InterventionSpec
    ispec = InterventionSpec(**_spec(FACT, site="head_k").fields(), layer=int(layer), head=1)
    first = run(ispec, store=store)
    again = run(ispec, store=store)
    assert not first.from_store and again.from_store and again.result == first.result
    kv_sweep = run(_spec(FACT, site="head_k"), store=store).result.values
    assert first.result.after == pytest.approx(float(kv_sweep[layer, 1]), abs=1e-4)
    assert first.result.cell == {"layer": int(layer), "kv_head": 1}
    with pytest.raises(InvalidSite):
        run(InterventionSpec(**_spec(FACT, site="head_k").fields(), layer=0, head=5), store=store)
    assert not store.has(InterventionSpec(**_spec(FACT, site="head_k").fields(), layer=0, head=5).key())


def test_cli_patch_json_and_store_hit(model, capsys):
    from backend.cli import main

    argv = ["patch", "--clean", FACT.clean, "--corrupt", FACT.corrupt, "--answer", FACT.answer,
            "--wrong", FACT.wrong, "--site", "attn_out", "--direction", "noising", "--format", "json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    for field in ("run_key", "layers", "positions", "values", "compute_seconds"):
        assert field in first
    assert np.array(first["values"]).shape == (model.info.n_layers, len(first["positions"]))
    assert first["compute_seconds"] > 0 and first["metric"] == "logit_diff_norm"
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["compute_seconds"] == 0 and second["run_key"] == first["run_key"]
    assert second["values"] == first["values"]
    assert main(argv[:-4] + ["--answer", " Paris France", "--format", "json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "not_single_token"
