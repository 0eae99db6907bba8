"""Reference computations shared by the patching tests (SmolLM2 and Gemma): TransformerLens's own
patching functions, and the exact pattern change that AtP*'s QK fix must equal."""

from __future__ import annotations

import pandas as pd
import torch

from backend.patch_sites import SITE_AXES
from backend.sites import Component, Site, hook_name

TL_SITE = {"resid_pre": "get_act_patch_resid_pre", "attn_out": "get_act_patch_attn_out",
           "mlp_out": "get_act_patch_mlp_out", "head_out": "get_act_patch_attn_head_out_all_pos",
           "head_out_pos": "get_act_patch_attn_head_out_by_pos", "head_q": "get_act_patch_attn_head_q_all_pos",
           "head_k": "get_act_patch_attn_head_k_all_pos", "head_v": "get_act_patch_attn_head_v_all_pos",
           "head_pattern": "get_act_patch_attn_head_pattern_all_pos"}
TL_AXES = {"layer": "layer", "pos": "pos", "head": "head_index", "kv_head": "head_index"}


def tl_normalised(model, e, site, cells=None):
    """TransformerLens's patching function on the model, normalised logit diff, denoising
    (the whole sweep, or the given cells in the order of SITE_AXES[site])."""
    with torch.inference_mode():
        clean_logits, corrupt_logits = model.logits(e.clean_ids), model.logits(e.corrupt_ids)

    def ld(logits):
        return logits[0, -1, e.answer_id] - logits[0, -1, e.wrong_id]

    c, k = ld(clean_logits).item(), ld(corrupt_logits).item()
    df = None if cells is None else pd.DataFrame(cells, columns=[TL_AXES[a] for a in SITE_AXES[site]])
    return model.tl_patching(TL_SITE[site], e.corrupt_ids, e.clean_ids, lambda lg: (ld(lg) - k) / (c - k), df).cpu()


def qk_pattern_change(model, e, metric, layer: int, head: int) -> float:
    """(hooked pattern with head's queries from the clean run - base pattern) . dM/dpattern on the
    corrupted run: what the QK-fixed AtP estimate of a head_q patch must equal."""
    qn, pn = hook_name(Site(Component.Q, layer)), hook_name(Site(Component.PATTERN, layer))
    with torch.inference_mode():
        _, clean_cache = model.run_with_cache(e.clean_ids, [qn])
        pats = {}

        def put_q(a, hook):
            a = a.clone()
            a[:, :, head] = clean_cache[qn][:, :, head]
            return a
        with model.hooks(fwd_hooks=[(qn, put_q), (pn, lambda a, hook: pats.__setitem__("new", a.clone()))]):
            model.forward(e.corrupt_ids)
    acts = {}
    with model.lock, torch.enable_grad(), model.hooks(fwd_hooks=[
            (hook_name(Site(Component.EMBED)), lambda a, hook: a.detach().requires_grad_(True)),
            (pn, lambda a, hook: acts.__setitem__("p", a) or a)]):
        m = metric.from_logits(model.forward(e.corrupt_ids)[:, -1].float())[0]
        (g,) = torch.autograd.grad(m, [acts["p"]])
    return float(((pats["new"][0, head] - acts["p"].detach()[0, head]) * g[0, head]).sum())
