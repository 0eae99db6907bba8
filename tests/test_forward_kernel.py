"""The dense forward kernel (kernels/forward.py) against the bridge: captures, a forward
started at a block, additive hooks, right padding, the bfloat16 precisions' error, and
TokenChange computed through it. On SmolLM2, and on Gemma-3 when it is installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import forward as kf

pytestmark = pytest.mark.model

POINTS = ["blocks.0.hook_resid_pre", "blocks.5.hook_resid_pre", "blocks.7.hook_attn_out", "blocks.12.mlp.hook_post",
          "blocks.13.hook_mlp_out", "blocks.17.attn.hook_z", "blocks.17.hook_resid_post"]


def _ids(model, b=3, t=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(200, model.info.d_vocab - 200, (b, t), generator=g)


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / a.norm())


@pytest.fixture(scope="module")
def gemma():
    from backend.model import OFFLINE_MODELS, load_model

    if not OFFLINE_MODELS["gemma3-270m"].installed():
        pytest.skip("gemma3-270m is not installed")
    return load_model("gemma3-270m")


def _check_captures(model, points):
    ids = _ids(model)
    _, cache = model.run_with_cache(ids, points)
    got = kf.run(kf.dense_model(model), ids, capture=points)
    for n in points:
        assert got[n].shape == cache[n].shape, n
        assert _rel(cache[n], got[n]) < 2e-5, n
    logits = model.logits(ids)
    dm = kf.dense_model(model)
    final = kf.run(dm, ids, capture=[kf.FINAL])[kf.FINAL]
    assert _rel(logits, dm.logits(final)) < 2e-5


def test_float32_captures_equal_the_bridge(model):
    _check_captures(model, POINTS)


def test_gemma_float32_captures_equal_the_bridge(gemma):
    n = gemma.info.n_layers
    _check_captures(gemma, ["blocks.0.hook_resid_pre", "blocks.3.attn.hook_z", "blocks.5.hook_attn_out",
                            f"blocks.{n - 1}.hook_mlp_out", f"blocks.{n - 1}.hook_resid_post"])


def test_start_at_a_block_and_hooks_equal_hooked_bridge_forwards(model):
    ids = _ids(model, seed=1)
    dm = kf.dense_model(model)
    d = torch.randn(model.info.d_model, generator=torch.Generator().manual_seed(2)) * 5
    dz = torch.randn(model.info.n_heads, model.info.d_head, generator=torch.Generator().manual_seed(3))

    def add_resid(x, hook=None):
        x = x.clone()
        x[:, 1:] += d
        return x

    def add_z(x, hook=None):
        x = x.clone()
        x[:, 2:] += dz
        return x
    ref = model.run_with_hooks(ids, fwd_hooks=[("blocks.9.hook_resid_pre", add_resid), ("blocks.20.attn.hook_z", add_z)])
    pre9 = kf.run(dm, ids, capture=["blocks.9.hook_resid_pre"])["blocks.9.hook_resid_pre"]
    final = kf.run(dm, pre9, start=9, capture=[kf.FINAL],
                   hooks={"blocks.9.hook_resid_pre": add_resid, "blocks.20.attn.hook_z": add_z})[kf.FINAL]
    assert _rel(ref, dm.logits(final)) < 2e-5
    with pytest.raises(KeyError):
        kf.run(dm, pre9, start=9, capture=["blocks.3.hook_resid_pre"])
    with pytest.raises(KeyError):
        kf.run(dm, ids, capture=["blocks.99.hook_resid_pre"])


def test_right_padding_never_changes_a_real_position(model):
    dm = kf.dense_model(model)
    short, long_ = _ids(model, 1, 9, seed=4), _ids(model, 1, 16, seed=5)
    padded = torch.cat([torch.cat([short, torch.zeros(1, 7, dtype=torch.long)], 1), long_])
    got = kf.run(dm, padded, capture=["blocks.20.hook_resid_post"])["blocks.20.hook_resid_post"]
    alone = kf.run(dm, short, capture=["blocks.20.hook_resid_post"])["blocks.20.hook_resid_post"]
    assert _rel(alone[0], got[0, :9]) < 1e-5


@pytest.mark.parametrize("precision,bound", [("bf16-mixed", 0.03), ("bf16", 0.06)])
def test_bfloat16_precisions_stay_within_their_error(model, precision, bound):
    ids = _ids(model, 4, 32, seed=6)
    points = ["blocks.5.hook_resid_pre", "blocks.25.hook_resid_pre", "blocks.23.attn.hook_z"]
    ref = kf.run(kf.dense_model(model), ids, capture=points)
    got = kf.run(kf.dense_model(model, *kf.PRECISIONS[precision]), ids, capture=points)
    for n in points:
        a, b = ref[n][:, 1:].flatten(2), got[n][:, 1:].flatten(2).float()
        med = float(((a - b).norm(dim=-1) / a.norm(dim=-1)).median())
        assert 0 < med < bound, (n, med)          # not exact (it is bfloat16), and not far off


def test_bulk_precision_choice_and_override(monkeypatch):
    assert kf.bulk_precision() in kf.PRECISIONS
    monkeypatch.setenv("DASHBOARD_BULK_PRECISION", "float32")
    assert kf.bulk_precision() == "float32"
    monkeypatch.setenv("DASHBOARD_BULK_PRECISION", "fp7")
    with pytest.raises(ValueError, match="DASHBOARD_BULK_PRECISION"):
        kf.bulk_precision()


def test_token_change_through_the_kernel_matches_the_bridge(model):
    """TokenChange via the float32 kernel equals the bridge's run_from path; in bfloat16 its
    top-10 lists keep at least 90 % of their tokens."""
    from backend.jobs.features import scores as S
    from backend.saes import load_sae

    sae = load_sae("smollm2-135m-L15-resid_pre")
    wins = _ids(model, 8, 12, seed=7).tolist()
    rows = S.decoder_rows(sae)
    feats, c = np.array([1, 2, 3]), np.array([30.0, 30.0, 30.0])
    out = {p: S.token_change(model, sae, feats, rows, c, S.windows_state(model, sae, wins, p)) for p in ("float32", "bf16")}
    saved = dict(kf._dense)
    try:
        kf._dense.clear()
        kf._dense.update({k: None for k in saved})           # no kernel: the bridge's run_from
        kf._dense[(id(model), None, False)] = None
        bridge = S.token_change(model, sae, feats, rows, c, S.windows_state(model, sae, wins))
    finally:
        kf._dense.clear()
        kf._dense.update(saved)
    assert (out["float32"]["ids"] == bridge["ids"]).mean() > 0.97       # ties may swap
    np.testing.assert_allclose(out["float32"]["values"], bridge["values"], rtol=1e-3, atol=1e-3)
    overlap = np.mean([len(set(out["bf16"]["ids"][i, j]) & set(bridge["ids"][i, j])) / S.TC_K
                       for i in range(3) for j in range(4)])
    assert overlap >= 0.9


def test_gemma_cached_generation_equals_uncached(gemma):
    """Gemma-3 generates through the dense kernel's KV cache (q/k norms, post-norms, local and
    global rotary bases) token for token as the uncached bridge does, steered or not."""
    from backend.model.generate import _dense

    ids = gemma.encode("The weather today is")
    assert _dense(gemma, ["blocks.6.hook_resid_pre"]) is not None
    d = torch.randn(gemma.info.d_model, generator=torch.Generator().manual_seed(8))

    def add(x, pos, hook):
        return x + 40.0 * d / d.norm()
    for hooks in ([], [("blocks.6.hook_resid_pre", add)]):
        assert (gemma.generate([ids], 6, interventions=hooks, use_cache=True)
                == gemma.generate([ids], 6, interventions=hooks, use_cache=False))


def test_window_mask_with_a_cache(model):
    """A sliding window seen through the cache: queries after the cached positions mask keys
    further back than the window, as the full causal-window mask does."""
    dm = kf.DenseModel(model.weights())
    dm.layers[0] = dict(dm.layers[0], window=3)
    full = dm._mask(0, 0, 6, 6)
    tail = dm._mask(0, 4, 2, 6)
    assert torch.equal(full[4:], tail)
    assert dm._mask(0, 5, 1, 6) is not None and kf.DenseModel(model.weights())._mask(0, 5, 1, 6) is None
