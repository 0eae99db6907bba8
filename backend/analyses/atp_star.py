"""AtP*: attribution patching with the two fixes of Kramár et al. (2024), and how many of
plain AtP's false negatives they recover against the exact sweep.

Plain AtP (backend.analyses.attribution) estimates a patch by a first-order Taylor term.
It fails in two known ways:

1. Attention saturation. A query or key patch can move a softmax a long way; the gradient
   at the base pattern sees almost none of that. The QK fix computes the patched attention
   pattern exactly (softmax of the patched scores; everything else at its base value) and
   only linearises from the pattern on:  (pattern' - pattern) . dM/dpattern.
   Used for the head_q and head_k sites (a key/value head changes the patterns of all the
   query heads of its group).
2. Cancellation. A node whose effect runs through two paths of opposite sign gets a small
   gradient. GradDrop recomputes the estimate L times, each time with the gradient through
   one layer's attention and MLP outputs stopped, and scores the node by the mean of the
   absolute estimates, (1 / (L - 1)) * sum_l |AtP_drop_l(n)|: a magnitude (unsigned) that a
   cancelling pair cannot hide. The L gradient-dropped runs and the plain run go through the
   model as one batch of L + 1 rows (a row-wise mask decides where the gradient stops), so
   the cost is one batched forward and backward.

An AtPStarSpec asks the question of a PatchSpec. Its result keeps the plain AtP deltas, the
QK-fixed deltas (`values` / `deltas`, on the scale of the exact sweep) and the GradDrop
magnitudes. `false_negatives` compares each estimate's ranking with the exact sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidSite, InvalidSpec
from ..model import LoadedModel
from ..runner import analysis
from ..patch_sites import STAR_SITES, TABLE
from .attribution import AtPResult, AtPSpec, estimate_over_pairs
from .patching import PatchSpec



@dataclass(frozen=True)
class AtPStarSpec(AtPSpec):
    KIND = "atpstar"
    ALLOWED_SITES = STAR_SITES


@dataclass(frozen=True)
class AtPStarResult(AtPResult):
    """values/deltas: AtP with the QK fix (= plain AtP outside head_q/head_k)."""

    atp_deltas: np.ndarray       # plain AtP, same cells
    graddrop: np.ndarray         # GradDrop magnitude per cell (>= 0), same scale as deltas


def _reduce(contrib, site):
    """[row pos ...] elementwise products -> per-cell sums [row pos] or [row head] (patch_sites)."""
    return contrib.sum(TABLE[site].atp_dims(batched=True))


def star_attribution(model: LoadedModel, base_ids, source_ids, site: str, metric):
    """(plain [cells], qk-fixed [cells], graddrop [cells], M(base), M(source), base logits,
    source logits) for one pair, float64 tensors [layer pos|head]. Caller holds model.lock."""
    import torch

    from kernels import patching as kp

    from ..sites import Component, Site, hook_name, hook_names

    info = model.info
    L = info.n_layers
    names = hook_names(TABLE[site].component, L)
    qk = site in ("head_q", "head_k")
    pat_names = hook_names(Component.PATTERN, L) if qk else []
    wanted = set(names)
    with torch.inference_mode():
        src_logits, cache = model.run_with_cache(source_ids, wanted)
        src_acts = [cache[n][0].detach().clone() for n in names]
    del cache

    B = L + 1                                    # row 0: plain; row 1 + l: gradient dropped at layer l
    base_t = model.tensor(base_ids).expand(B, -1)
    acts: dict[str, torch.Tensor] = {}

    def leaf(act, hook):
        return act.detach().requires_grad_(True)

    def keeper(name):
        def keep(act, hook):
            acts[name] = act
            return act
        return keep

    def dropper(layer):
        mask = torch.zeros(B, 1, 1, dtype=torch.bool)
        mask[1 + layer] = True

        def drop(act, hook):           # same values; no gradient through this row's output
            return torch.where(mask.to(act.device), act.detach(), act)
        return drop

    hooks = [(hook_name(Site(Component.EMBED)), leaf)] + [(n, keeper(n)) for n in names + pat_names]
    for layer in range(L):
        for comp in (Component.ATTN_OUT, Component.MLP_OUT):
            hooks.append((hook_name(Site(comp, layer)), dropper(layer)))
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model.forward(base_t)
        ms = metric.from_logits(logits[:, -1].float())             # [B], identical values
        targets = names + pat_names
        missing = [n for n in targets if n not in acts]
        if missing:
            raise InvalidSite(f"The model has no hook {missing[0]} for the {site} site.")
        grads = torch.autograd.grad(ms.sum(), [acts[n] for n in targets], allow_unused=True)
    act_grads, pat_grads = grads[:L], grads[L:]
    rows = []
    for n, g, s in zip(names, act_grads, src_acts):
        a = acts[n].detach()
        g = torch.zeros_like(a) if g is None else g
        rows.append(_reduce(((s.to(a.dtype) - a[0]).unsqueeze(0) * g).double(), site))   # [B cells]
    est = torch.stack(rows, 1)                                     # [B layer cells]
    plain = est[0]
    fixed_rows = est
    if qk:   # exact patterns, linear from the pattern on
        fm = kp.fast_model(model)
        if fm is None:
            raise InvalidSpec("The QK fix needs the fast path (canonical weights); this model has none.")
        with torch.inference_mode():
            bs, ss = kp.states(fm, base_ids), kp.states(fm, source_ids)
        rep = info.n_heads // info.n_kv_heads
        fixed = []
        for j in range(L):
            pg = pat_grads[j]
            pg = torch.zeros_like(acts[pat_names[j]]) if pg is None else pg     # [B head T T]
            base_pat = acts[pat_names[j]].detach()[0]                           # [head T T]
            with torch.inference_mode():
                qb = fm.queries(j, bs.pre[j])
                qs = fm.queries(j, ss.pre[j]) if site == "head_q" else None
            per_cell = []
            n_cells = info.n_heads if site == "head_q" else info.n_kv_heads
            for c in range(n_cells):
                heads = [c] if site == "head_q" else list(range(c * rep, (c + 1) * rep))
                total = torch.zeros(B, dtype=torch.float64)
                for h in heads:
                    g = h // rep
                    with torch.inference_mode():
                        new = fm.head_pattern(qs[:, h] if site == "head_q" else qb[:, h],
                                              bs.K[j, g] if site == "head_q" else ss.K[j, g], j)
                    dp = (new - base_pat[h]).to(pg.dtype)
                    total = total + (dp.unsqueeze(0) * pg[:, h]).sum((1, 2)).double()
                per_cell.append(total)
            fixed.append(torch.stack(per_cell, 1))                              # [B cells]
        fixed_rows = torch.stack(fixed, 1)                                      # [B layer cells]
    graddrop = fixed_rows[1:].abs().sum(0) / max(L - 1, 1)
    with torch.inference_mode():
        src_m = float(metric.from_logits(src_logits[:, -1].float())[0])
    return (plain, fixed_rows[0], graddrop, float(ms[0].detach()), src_m,
            logits.detach()[0, -1], src_logits[0, -1])


@analysis(AtPStarSpec, AtPStarResult)
def compute(spec: AtPStarSpec, model: LoadedModel, progress=None) -> AtPStarResult:
    def estimate(model, base, src, site, metric):
        plain, fixed, gd, *rest = star_attribution(model, base, src, site, metric)
        return ({"plain": plain, "fixed": fixed, "graddrop_abs": gd}, *rest)

    arr, fields = estimate_over_pairs(spec, model, estimate, progress, "AtP*")
    base_m = fields.pop("base_metric")
    return AtPStarResult(
        **fields, values=(base_m + arr["fixed"]).astype(np.float32), deltas=arr["fixed"].astype(np.float32),
        atp_deltas=arr["plain"].astype(np.float32), graddrop=arr["graddrop_abs"].astype(np.float32),
        method="atp*")


def false_negatives(exact_deltas: np.ndarray, scores: dict[str, np.ndarray], important: float = 0.05,
                    budget: float = 1.0) -> dict:
    """How each estimate ranks the cells that matter.

    A cell matters when its exact effect |delta| >= `important` (on the metric's scale). With n
    such cells, a method inspects its top budget * n cells by |score|; a cell that matters and
    is not among them is a false negative of that method.
    """
    ex = np.abs(np.asarray(exact_deltas, np.float64)).ravel()
    true = np.flatnonzero(ex >= important)
    k = max(1, int(round(budget * len(true))))
    out = {"important": int(len(true)), "inspected": k, "threshold": important, "methods": {}}
    for name, s in scores.items():
        order = np.argsort(-np.abs(np.asarray(s, np.float64)).ravel(), kind="stable")[:k]
        missed = sorted(set(true.tolist()) - set(order.tolist()), key=lambda i: -ex[i])
        out["methods"][name] = {"false_negatives": len(missed),
                                "missed": [{"cell": int(i), "exact": float(exact_deltas.ravel()[i])}
                                           for i in missed]}
    return out


def compare_with_exact(spec: AtPStarSpec, result: AtPStarResult | None = None,
                       important: float = 0.05, store=None) -> dict | None:
    """False negatives of plain AtP, AtP with the QK fix, and GradDrop against the stored exact
    sweep of the same question (never computes it; None when it is not stored)."""
    from ..runner import lookup, run
    from .attribution import correlation

    exact = lookup(spec.as_task(PatchSpec), store)
    if exact is None:
        return None
    r = result or run(spec, store).result
    ex = exact.result
    base = ex.corrupt_metric if spec.direction == "denoising" else ex.clean_metric
    exact_d = ex.values.astype(np.float64) - base
    scores = {"atp": r.atp_deltas, "graddrop": r.graddrop}
    if spec.site in ("head_q", "head_k"):
        scores["atp_qk_fix"] = r.deltas
        scores["atp_star"] = np.maximum(np.abs(r.deltas), r.graddrop)
    else:
        scores["atp_star"] = np.maximum(np.abs(r.atp_deltas), r.graddrop)
    fn = false_negatives(exact_d, scores, important)
    fn["pearson_atp"] = correlation(r.atp_deltas, exact_d)
    fn["pearson_qk_fix"] = correlation(r.deltas, exact_d)
    fn["exact_run_key"] = exact.run_key
    return fn


def add_cli_args(p) -> None:
    from .patching import add_cli_args as add_task_args

    add_task_args(p, sites=STAR_SITES, default_metric="logit_diff")


def run_cli(a) -> dict:
    from .attribution import estimate_cli

    spec, out, payload = estimate_cli(AtPStarSpec, a)
    payload["atp_deltas"] = np.round(out.result.atp_deltas.astype(np.float64), 6).tolist()
    payload["graddrop"] = np.round(out.result.graddrop.astype(np.float64), 6).tolist()
    cmp = compare_with_exact(spec, out.result)
    if cmp is not None:
        payload["false_negatives"] = cmp
    return payload
