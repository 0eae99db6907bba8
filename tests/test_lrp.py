"""LRP for transformers (kernels/lrp.py; `attribute --method lrp|lrp-cp`).

The kernel writes the rules as a modified gradient; the reference here writes them as
relevance propagation, rule by rule, in float64 (R_in = x * W^T (R_out / z) for a linear map,
the uniform split of products, AttnLRP's softmax rule, the identity rule of norms and the
gate's SiLU), over the first block of the default model read out by the final norm and the
unembedding. Then conservation on the whole model: CP-LRP's token relevances add up to the
logit at every layer; AttnLRP's gap is reported as what it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.analyses.token_attribution import TokenAttributionSpec, attribute
from backend.errors import InvalidSpec
from kernels.lrp import LRPModel, relevance
from kernels.token_attribution import Readout

pytestmark = pytest.mark.model
FRANCE = "The capital of France is"


def _lin(x, W, R, z):
    """LRP-0 through z = x W^T: R_x = x * ((R / z) W)."""
    return x * ((R / z) @ W)


@torch.no_grad()
def _reference_one_block(lm: LRPModel, x: torch.Tensor, target: int, mode: str):
    """(f, token relevance [T], positional relevance [T]) of block 0 + final norm + W_U[target]."""
    L = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in lm.layers[0].items()}
    H, KV, D, eps = lm.n_heads, lm.n_kv, lm.d_head, lm.eps
    x = x.double()
    T = x.shape[0]

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w

    # forward
    h1 = rms(x, L["ln1"])
    q, k, v = h1 @ L["wq"].T, h1 @ L["wk"].T, h1 @ L["wv"].T                    # [T H*D], [T KV*D]
    cos, sin = (t.double() for t in lm.rope(T, 0))                             # [T D]
    half = D // 2

    def rot(t):                                                                # t [T n D]
        return torch.cat((-t[..., half:], t[..., :half]), -1)
    qh, kh, vh = q.view(T, H, D), k.view(T, KV, D), v.view(T, KV, D)
    qr = qh * cos[:, None] + rot(qh) * sin[:, None]
    kr = kh * cos[:, None] + rot(kh) * sin[:, None]
    rep = H // KV
    krh, vhh = kr.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)       # [T H D]
    sc = torch.einsum("thd,shd->hts", qr, krh) * L["scale"]                    # [H T T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    P = sc.masked_fill(~causal, float("-inf")).softmax(-1)
    z = torch.einsum("hts,shd->thd", P, vhh)                                   # [T H D]
    attn = z.reshape(T, H * D) @ L["wo"].T
    hmid = x + attn
    h2 = rms(hmid, L["ln2"])
    g, u = h2 @ L["wg"].T, h2 @ L["wu"].T
    a = torch.nn.functional.silu(g)
    post = a * u
    mlp = post @ L["wd"].T
    y = hmid + mlp
    yn = rms(y[-1:], lm.ln_f.double())
    wt = lm.W_U[target].double()
    f = float(yn[0] @ wt)

    # relevance, backwards
    R_y = torch.zeros_like(y)
    R_y[-1] = yn[0] * wt                                       # the final norm passes relevance through
    R_h = hmid * R_y / y
    R_mlp = mlp * R_y / y
    R_post = _lin(post, L["wd"], R_mlp, mlp)
    if mode == "cp":                                            # the gate is a constant
        R_h2 = _lin(h2, L["wu"], R_post, u)
    else:
        R_a, R_u = 0.5 * R_post, 0.5 * R_post                  # uniform rule; identity rule through SiLU
        R_h2 = _lin(h2, L["wg"], R_a, g) + _lin(h2, L["wu"], R_u, u)
    R_h = R_h + R_h2                                            # the norm passes relevance through
    R_x = x * R_h / hmid
    R_attn = attn * R_h / hmid
    R_z = _lin(z.reshape(T, H * D), L["wo"], R_attn, attn).view(T, H, D)
    contrib = torch.einsum("hts,shd->htsd", P, vhh)            # P[t,s] v[s,d] per head
    share = contrib * (R_z / z).permute(1, 0, 2)[:, :, None, :]  # [H t s d]
    if mode == "cp":
        R_v = share.sum(1)                                      # [H s d]: the weights are constants
        R_P = None
    else:
        R_v = 0.5 * share.sum(1)
        R_P = 0.5 * share.sum(-1)                               # [H t s]
    R_vkv = R_v.permute(1, 0, 2).reshape(T, KV, rep, D).sum(2).reshape(T, KV * D)
    R_h1 = _lin(h1, L["wv"], R_vkv, v)
    R_pos = torch.zeros(T, dtype=torch.float64)
    if R_P is not None:
        scm = torch.where(causal, sc, torch.zeros_like(sc))
        R_sc = scm * (R_P - P * R_P.sum(-1, keepdim=True))      # AttnLRP's softmax rule
        pair = torch.einsum("thd,shd->htsd", qr, krh) * L["scale"]
        frac = torch.where(causal, R_sc / torch.where(causal, sc, torch.ones_like(sc)), torch.zeros_like(sc))
        rel = pair * frac[..., None]                            # [H t s d]
        R_qr = 0.5 * rel.sum(2).permute(1, 0, 2)                 # [T H D]
        R_kr = (0.5 * rel.sum(1).permute(1, 0, 2)).reshape(T, KV, rep, D).sum(2)   # [T KV D]

        def unrotate(t, R_t):                                   # t [T n D] before rotary, R_t after
            p1, p2 = t * cos[:, None], rot(t) * sin[:, None]
            tot = p1 + p2
            r1, r2 = p1 * R_t / tot, p2 * R_t / tot
            R_t_in = 0.5 * r1 + 0.5 * torch.cat((r2[..., half:], r2[..., :half]), -1)   # rot moves dims
            return R_t_in, (0.5 * r1 + 0.5 * r2).sum((-1, -2))
        R_q, pq = unrotate(qh, R_qr)
        R_k, pk = unrotate(kh, R_kr)
        R_pos = pq + pk
        R_h1 = R_h1 + _lin(h1, L["wq"], R_q.reshape(T, H * D), q) + _lin(h1, L["wk"], R_k.reshape(T, KV * D), k)
    R_x = R_x + R_h1
    return f, R_x.sum(-1), R_pos


@pytest.mark.parametrize("mode", ["cp", "attnlrp"])
def test_kernel_equals_rule_by_rule_propagation_on_one_block(model, mode):
    lm = LRPModel(model.weights(), mode)
    lm.n_layers = 1
    ids = model.encode(FRANCE)
    x = lm.embed(torch.tensor(ids)).float()
    target = model.encode(" Paris")[0]
    r = relevance(lm, x, Readout(target))
    f, tok, pos = _reference_one_block(lm, x, target, mode)
    assert abs(r["f"] - f) < 1e-3 * max(1.0, abs(f))
    np.testing.assert_allclose(r["tokens"].numpy(), tok.numpy(), rtol=1e-3, atol=1e-4 * max(1.0, abs(f)))
    np.testing.assert_allclose(r["positions"].numpy(), pos.numpy(), rtol=1e-3, atol=1e-4 * max(1.0, abs(f)))
    if mode == "cp":
        assert abs(float(tok.sum()) - f) < 1e-6 * max(1.0, abs(f))
    else:
        assert np.abs(pos.numpy()).sum() > 0


def test_cp_lrp_conserves_the_logit_at_every_layer(model):
    out = attribute(TokenAttributionSpec(model="smollm2-135m", text=FRANCE, method="lrp-cp", target=" Paris",
                                         layers=True), model)
    f = out.target_logit
    assert abs(out.completeness_gap) < 1e-4 * abs(f)
    assert np.all(np.abs(out.layer_scores.sum(-1) - f) < 1e-4 * abs(f))
    assert np.all(out.position_scores == 0)
    np.testing.assert_allclose(out.layer_scores[0], out.scores, rtol=1e-6, atol=1e-9)


def test_attnlrp_reports_positions_and_its_gap(model):
    out = attribute(TokenAttributionSpec(model="smollm2-135m", text=FRANCE, method="lrp",
                                         contrast=(" Paris", " London")), model)
    p = out.payload()
    assert len(p["position_scores"]) == len(p["scores"]) == len(p["tokens"])
    assert all(0.0 <= s <= 1.0 for s in p["position_share"])
    want = sum(p["scores"]) + sum(p["position_scores"]) - p["target_logit"]
    assert abs(p["completeness_gap"] - want) < 1e-9 and p["engine"] == "lrp"
    with pytest.raises(InvalidSpec):
        TokenAttributionSpec(model="smollm2-135m", text=FRANCE, method="lrp-foo")


def _lxt_python():
    import os
    from pathlib import Path

    p = os.environ.get("LXT_PYTHON", "")
    return p if p and Path(p).exists() else None


@pytest.mark.parametrize("mode", ["cp", "attnlrp"])
def test_equals_lxt(model, mode, tmp_path):
    """LXT 2.1 (the AttnLRP reference, in its own venv: transformers 4.57 beside torch 2.13; see
    benchmarks/lxt_reference.py) on the same SmolLM2 checkpoint: per-token relevance within 1e-3
    relative. LXT's attention patch sees queries and keys after the rotation, so it gives no
    positional share: compared with positions=False (positions=True only moves relevance from
    content to position)."""
    import json
    import subprocess

    from backend.model.loading import OFFLINE_MODELS, converted_dir

    from .browser import ROOT

    py = _lxt_python()
    if py is None:
        pytest.skip("set LXT_PYTHON to a venv made as benchmarks/lxt_reference.py says")
    src = converted_dir(OFFLINE_MODELS["smollm2-135m"])
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta"))  # as transformers 4.x reads it
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    ids = model.encode(FRANCE)
    target = model.encode(" Paris")[0]
    r = subprocess.run([py, str(ROOT / "benchmarks" / "lxt_reference.py"), "--model-dir", str(tmp_path),
                        "--ids", json.dumps(ids), "--target", str(target), "--mode", mode],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = json.loads(r.stdout.strip().splitlines()[-1])
    lm = LRPModel(model.weights(), mode, positions=False)
    got = relevance(lm, lm.embed(torch.tensor(ids)).float(), Readout(target))
    scale = max(abs(v) for v in ref["tokens"])
    np.testing.assert_allclose(got["tokens"].numpy(), ref["tokens"], rtol=1e-3, atol=1e-3 * scale)
    assert abs(got["f"] - ref["f"]) < 1e-3 * abs(ref["f"])
