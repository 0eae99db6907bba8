"""SAEs: training path (tiny), shipped SAEs, encode equal to SAELens's, fused kernel equal to
its reference, the features analysis and its CLI."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from backend import corpus, saes, train_sae
from backend.analyses.features import hook_activations
from backend.errors import UnknownSAE
from backend.sites import Component, Site, hook_name
from kernels.sae_encode import fused_encode, reference_encode, sparse_decode, to_dense

pytestmark = pytest.mark.model   # loads the real model

SHIPPED = [train_sae.sae_id("smollm2-135m", c.value, layer) for c, layer in train_sae.PLAN]
TEXT = "When Mary and John went to the store, John gave a drink to Mary. It was raining."


def _dense_decode(sae, dense):
    """SAELens's decode on flat activations (hook_z SAEs reshape unless told not to)."""
    z = sae.cfg.reshape_activations == "hook_z"
    if z:
        sae.turn_off_forward_pass_hook_z_reshaping()
    try:
        with torch.inference_mode():
            return sae.decode(dense)
    finally:
        if z:
            sae.turn_on_forward_pass_hook_z_reshaping()


# -- training path ------------------------------------------------------------------------
def test_tiny_sae_trains_through_the_training_path(tmp_path, model):
    root = tmp_path / "corpus"
    corpus.build(["stdlib"], root=root, max_words=8_000)
    cfg = train_sae.TrainConfig(sites=(("resid_pre", 3),), train_tokens=1_500, heldout_tokens=200,
                                ce_windows=1, eval_texts=1, context=64, width=128, k=8,
                                epochs=2, batch=128)
    reports = train_sae.train(cfg, out_dir=tmp_path / "out", work=tmp_path / "work", root=root)
    (r,) = reports
    sid = train_sae.sae_id(cfg.model, "resid_pre", 3)
    assert r["sae_id"] == sid and r["hook_name"] == hook_name(Site(Component.RESID_PRE, 3))
    held = r["quality"]["heldout"]
    assert held["l0"] <= 8 + 1e-6 and np.isfinite(held["variance_explained"])
    assert held["ce_clean"] <= held["ce_zero"] and 0 <= held["dead_fraction"] <= 1
    sae = saes.load_sae(str(tmp_path / "out" / sid))
    assert sae.cfg.d_sae == 128 and sae.cfg.metadata.hook_name == r["hook_name"]
    # float16 on disk, float32 in memory, and the cast is exact
    from safetensors.torch import load_file
    w = load_file(str(tmp_path / "out" / sid / "sae_weights.safetensors"))
    assert w["W_enc"].dtype == torch.float16 and torch.equal(w["W_enc"].float(), sae.W_enc.detach())
    # a second call finds the finished SAE and does not train again
    again = train_sae.train(cfg, out_dir=tmp_path / "out", work=tmp_path / "work", root=root)
    assert again == reports

    # continuing from the saved folder: the folded activation scale is unfolded, so with a
    # vanishing learning rate the weights come back as they were (float16 rounding aside)
    from dataclasses import replace
    still = replace(cfg, init_from=str(tmp_path / "out"), epochs=0.5, lr=1e-12)
    (c,) = train_sae.train(still, out_dir=tmp_path / "still", work=tmp_path / "work", root=root)
    w2 = load_file(str(tmp_path / "still" / sid / "sae_weights.safetensors"))
    for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(w2[k].float(), w[k].float(), rtol=2e-3, atol=1e-4)
    assert c["training"]["continued_from"]["samples"] == r["training"]["samples"]
    assert c["training"]["samples"] == r["training"]["samples"] + int(r["training"]["unique_tokens"] * 0.5)
    # and with the usual learning rate it goes on learning (held-out VE at least as good)
    more = replace(cfg, init_from=str(tmp_path / "out"), epochs=2)
    (m,) = train_sae.train(more, out_dir=tmp_path / "more", work=tmp_path / "work", root=root)
    assert m["quality"]["heldout"]["variance_explained"] >= held["variance_explained"] - 0.02
    with pytest.raises(train_sae.InvalidSpec):
        train_sae.train(replace(cfg, init_from=str(tmp_path / "nothing")), out_dir=tmp_path / "x",
                        work=tmp_path / "work", root=root)


def test_batches_resume_on_the_same_stream():
    acts = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float16)
    fresh = train_sae._Batches(acts, 64, seed=3)
    seq = [next(fresh) for _ in range(20)]          # crosses an epoch (15 batches per epoch)
    resumed = train_sae._Batches(acts, 64, seed=3, start_sample=17 * 64)
    assert torch.equal(next(resumed), seq[17]) and torch.equal(next(resumed), seq[18])


def test_site_activations_equal_run_with_cache(model):
    sites = [Site(Component.RESID_PRE, 4), Site(Component.Z, 2)]
    ids = model.tensor(model.encode(TEXT))
    got = train_sae.site_activations(model, sites, ids)
    names = [hook_name(s) for s in sites]
    with torch.inference_mode():
        _, cache = model.run_with_cache(ids, names)
    assert torch.equal(got[0], cache[names[0]])
    assert torch.equal(got[1], cache[names[1]].flatten(2))


# -- shipped SAEs -------------------------------------------------------------------------
def test_shipped_saes_are_listed_with_quality():
    listed = {s["sae_id"]: s for s in saes.list_saes("smollm2-135m")}
    assert set(SHIPPED) <= set(listed)
    for sid in SHIPPED:
        s = listed[sid]
        assert s["d_sae"] >= 8 * 576 and s["architecture"] == "topk"
        q = s["quality"]["heldout"]
        for key in ("l0", "variance_explained", "ce_recovered", "ce_recovered_vs_mean",
                    "delta_loss", "dead_fraction", "dense_fraction"):
            assert np.isfinite(q[key]), (sid, key)


@pytest.mark.parametrize("sid", SHIPPED)
def test_shipped_encode_equals_saelens(model, sid):
    sae = saes.load_sae(sid)
    x = hook_activations(model, sae.cfg.metadata.hook_name, model.encode(TEXT)).float()
    v_ref, i_ref = reference_encode(sae, x)
    v, i = fused_encode(sae, x)
    torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-6)
    d_sae = sae.cfg.d_sae
    torch.testing.assert_close(to_dense(v, i, d_sae), to_dense(v_ref, i_ref, d_sae), atol=1e-5, rtol=1e-6)
    # SAELens's own encode on the unflattened hook activation (its hook_z reshaping on)
    if sae.cfg.reshape_activations == "hook_z":
        with torch.inference_mode():
            dense = sae.encode(x.unflatten(-1, (model.info.n_heads, model.info.d_head)))
    else:
        with torch.inference_mode():
            dense = sae.encode(x)
    torch.testing.assert_close(to_dense(v, i, d_sae), dense, atol=1e-5, rtol=1e-6)
    assert_rows_close(sparse_decode(sae, v, i), _dense_decode(sae, dense))


def assert_rows_close(got, ref, rel: float = 2e-6, atol: float = 1e-5):
    """Equal up to float32 summation order: a decoded row is a sum of k decoder rows of a few
    hundred in magnitude, so its rounding error scales with the row's largest entry, not with
    each entry (an entry near zero in a row of large norm carries the row's error)."""
    scale = ref.abs().amax(dim=-1, keepdim=True)
    bad = (got - ref).abs() > atol + rel * scale
    assert not bad.any(), f"{int(bad.sum())} entries differ beyond float32 rounding: max |diff| " \
        f"{(got - ref).abs().max():.3g}, row scale {scale.max():.3g}"


# -- the fused kernel on random SAEs -------------------------------------------------------
def _random_topk_sae(d_in, d_sae, k, rescale, seed):
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, rescale_acts_by_decoder_norm=rescale))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(d_sae, 1) + 0.5)
    return sae.eval()


@pytest.mark.parametrize("d_in,d_sae,k,n,block,rescale", [
    (64, 256, 8, 256, 64, True),       # powers of two
    (64, 256, 8, 300, 128, False),
    (37, 1001, 13, 7, 256, True),      # odd sizes, fewer rows than a block
    (576, 4608, 32, 513, 256, True),   # the shipped shape, a ragged last block
])
def test_fused_equals_reference(d_in, d_sae, k, n, block, rescale):
    sae = _random_topk_sae(d_in, d_sae, k, rescale, seed=d_sae + n)
    x = torch.randn(n, d_in) * 2
    v_ref, i_ref = reference_encode(sae, x)
    v, i = fused_encode(sae, x, row_block=block)
    assert v.shape == (n, k) and i.shape == (n, k)
    torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(to_dense(v, i, d_sae), to_dense(v_ref, i_ref, d_sae), atol=1e-5, rtol=1e-6)
    with torch.inference_mode():
        dense = sae.encode(x)
        rec = sae.decode(dense)
    torch.testing.assert_close(to_dense(v, i, d_sae), dense, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(sparse_decode(sae, v, i), rec, atol=1e-5, rtol=1e-5)


# -- the analysis and the CLI --------------------------------------------------------------
def _cli(*args) -> dict:
    from backend.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(list(args) + ["--format", "json"])
    assert code == 0, buf.getvalue()
    return json.loads(buf.getvalue())


def test_features_cli_and_second_call_from_store(model):
    sid = SHIPPED[1]
    args = ("features", "--model", "smollm2-135m", "--sae", sid, "--text", TEXT)
    first = _cli(*args)
    for key in ("run_key", "tokens", "hook_name", "top_features", "compute_seconds", "recon_error"):
        assert key in first
    assert first["hook_name"] == saes.sae_info(sid)["hook_name"]
    assert len(first["top_features"]) == len(first["tokens"]) == len(model.encode(TEXT))
    for row in first["top_features"]:
        assert 1 <= len(row) <= 10
        vals = [f["value"] for f in row]
        assert vals == sorted(vals, reverse=True) and all(v > 0 for v in vals)
    second = _cli(*args)
    assert second["from_store"] and second["compute_seconds"] == 0
    assert second["top_features"] == first["top_features"] and second["run_key"] == first["run_key"]
    # the stored features are the SAE's top latents of that prompt
    sae = saes.load_sae(sid)
    x = hook_activations(model, first["hook_name"], model.encode(TEXT)).float()
    v, i = reference_encode(sae, x)
    assert [f["feature"] for f in first["top_features"][3]] == i[3][v[3] > 0][:10].tolist()


def test_saes_cli_lists_shipped():
    out = _cli("saes")
    ids = {s["sae_id"]: s for s in out["saes"]}
    assert set(SHIPPED) <= set(ids)
    assert all(ids[s]["hook_name"] and ids[s]["d_sae"] and ids[s]["quality"] for s in SHIPPED)


def test_unknown_sae_is_a_typed_error():
    with pytest.raises(UnknownSAE):
        saes.resolve("no-such-sae")
    with pytest.raises(UnknownSAE):
        saes.load_sae("no-such-sae")
    from backend.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["features", "--sae", "no-such-sae", "--text", "hi", "--format", "json"])
    assert code == 2 and json.loads(buf.getvalue())["error"]["code"] == "unknown_sae"
