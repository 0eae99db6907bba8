"""Attribution patching (AtP): a gradient estimate of every patch at once (Kramár et al. 2024).

For a node n with activation a_n, patching the source value into the base run changes the
metric M by approximately

    (a_n(source) - a_n(base)) . dM/da_n |base

a first-order Taylor estimate. All nodes come from one forward + backward on the base run and
one forward (cached) on the source run: about 3 forward-equivalents, against one patched run
per node for the exact sweep (backend.analyses.patching).

An AtPSpec asks the same question as a PatchSpec (same task encoding, metrics and directions,
see backend.analyses.patching) for the sites resid_pre, attn_out, mlp_out (layer x position)
and head_out (layer x head: hook_z summed over positions, TransformerLens's convention for a
head's output node). `values` estimate the metric of the patched run, on the scale of the
exact sweep's values (for logit_diff_norm: 0 = corrupted, 1 = clean), so the two heatmaps can
be shown side by side; `deltas` are the estimated changes from the base run.

Known limits (the paper's AtP* fixes are not applied): attention saturation makes the
gradient through a softmax underestimate large changes of attention (QK false negatives),
and effects that cancel across paths can hide a node (GradDrop addresses that).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidSite, InvalidSpec
from ..model import LoadedModel
from ..runner import analysis
from ..tasks import encode_pairs
from ..patch_sites import ATP_SITES, SITE_AXES, TABLE
from .patching import PatchResult, PatchSpec, _metrics, normalising_gap



@dataclass(frozen=True)
class AtPSpec(PatchSpec):
    """The same question as a PatchSpec (task, site, metric, direction), answered by AtP."""

    KIND = "atp"
    ALLOWED_SITES = ATP_SITES
    metric: str = "logit_diff"

    def patch_spec(self) -> PatchSpec:
        """The exact sweep asking the same question."""
        return self.as_task(PatchSpec)


@dataclass(frozen=True)
class AtPResult(PatchResult):
    """A PatchResult whose values are AtP estimates (method "atp"), plus the raw estimated changes."""

    deltas: np.ndarray           # estimated change from the base run (values - base metric)


def attribution(model: LoadedModel, base_ids, source_ids, site: str, metric) -> tuple:
    """(estimated deltas [layer pos|head] float64, M(base), M(source), base logits, source logits).

    `metric` is a kernels.patching Metric (from_logits on [n d_vocab] logits, differentiable).
    The base run's activations at every layer's hook are captured by forward hooks and the
    metric is differentiated with respect to them (torch.autograd.grad: no parameter grads).
    The caller holds model.lock.
    """
    import torch

    from ..sites import Component, Site, hook_name, hook_names

    names = hook_names(TABLE[site].component, model.info.n_layers)
    wanted = set(names)
    with torch.inference_mode():
        src_logits, cache = model.run_with_cache(source_ids, wanted)
        src_acts = [cache[n].detach().clone() for n in names]
    del cache

    acts: dict[str, torch.Tensor] = {}

    def leaf(act, hook):          # parameters need no grad: start the graph at the embeddings
        return act.detach().requires_grad_(True)

    def keeper(name):             # keyed by our name: the bridge's hook.name may be its own alias
        def keep(act, hook):
            acts[name] = act
            return act
        return keep

    embed = hook_name(Site(Component.EMBED))
    with torch.enable_grad(), model.hooks(fwd_hooks=[(embed, leaf)] + [(n, keeper(n)) for n in names]):
        logits = model.forward(base_ids)
        m = metric.from_logits(logits[:, -1].float())[0]
        missing = [n for n in names if n not in acts]
        if missing:
            raise InvalidSite(f"The model has no hook {missing[0]} for the {site} site.")
        grads = torch.autograd.grad(m, [acts[n] for n in names], allow_unused=True)
    rows = []
    for n, g, s in zip(names, grads, src_acts):
        a = acts[n].detach()
        if g is None:        # a node the metric does not depend on (cannot happen for these sites)
            g = torch.zeros_like(a)
        contrib = ((s.to(a.dtype) - a) * g).double()[0]          # [pos d] or [pos head d_head]
        rows.append(contrib.sum(TABLE[site].atp_dims(batched=False)))
    with torch.inference_mode():
        src_m = float(metric.from_logits(src_logits[:, -1].float())[0])
    return (torch.stack(rows), float(m.detach()), src_m,
            logits.detach()[0, -1], src_logits[0, -1])


def estimate_over_pairs(spec, model: LoadedModel, estimate, progress=None, label: str = "AtP") -> tuple[dict, dict]:
    """Run a gradient estimate on every pair of a PatchSpec-like spec and average it.

    `estimate(model, base_ids, source_ids, site, metric)` returns (arrays: dict of [cells]
    tensors, M(base), M(source), base logits, source logits). Returns (the averaged arrays, on
    the sweep's scale: divided by the clean - corrupted gap for logit_diff_norm, arrays whose
    name ends in "_abs" by its magnitude; the PatchResult fields shared by every estimate)."""
    from kernels import patching as kp

    encoded = encode_pairs(model, spec.pairs())
    info = model.info
    acc: dict = {}
    clean_m = corrupt_m = clean_ld = corrupt_ld = 0.0
    with model.lock:
        for i, e in enumerate(encoded):
            if progress and len(encoded) > 1:
                progress(f"{label}: pair {i + 1} of {len(encoded)}…")
            base, src = ((e.corrupt_ids, e.clean_ids) if spec.direction == "denoising"
                         else (e.clean_ids, e.corrupt_ids))
            metric = _metrics(model, None, e, spec.metric)
            arrays, base_m, src_m, base_l, src_l = estimate(model, base, src, spec.site, metric)
            ld = kp.LogitDiff(e.answer_id, e.wrong_id)
            base_ld, src_ld = (float(ld.from_logits(x[None].float())[0]) for x in (base_l, src_l))
            cm, km, cl, kl = ((src_m, base_m, src_ld, base_ld) if spec.direction == "denoising"
                              else (base_m, src_m, base_ld, src_ld))
            acc = {k: acc.get(k, 0.0) + v for k, v in arrays.items()}
            clean_m, corrupt_m, clean_ld, corrupt_ld = clean_m + cm, corrupt_m + km, clean_ld + cl, corrupt_ld + kl
    n = len(encoded)
    arr = {k: (v / n).cpu().numpy() for k, v in acc.items()}
    clean_m, corrupt_m, clean_ld, corrupt_ld = clean_m / n, corrupt_m / n, clean_ld / n, corrupt_ld / n
    base_m = corrupt_m if spec.direction == "denoising" else clean_m
    if spec.metric == "logit_diff_norm":
        gap = normalising_gap(clean_m, corrupt_m)
        arr = {k: v / (abs(gap) if k.endswith("_abs") else gap) for k, v in arr.items()}
        base_m = 0.0 if spec.direction == "denoising" else 1.0
    T = len(encoded[0].clean_ids)
    axes = list(SITE_AXES[spec.site])
    fields = dict(
        site=spec.site, metric=spec.metric, direction=spec.direction, axes=axes,
        layers=list(range(info.n_layers)), positions=list(range(T)) if "pos" in axes else [],
        heads=(list(range(info.n_heads)) if "head" in axes
               else list(range(info.n_kv_heads)) if "kv_head" in axes else []),
        clean_tokens=model.str_tokens(encoded[0].clean_ids),
        corrupt_tokens=model.str_tokens(encoded[0].corrupt_ids),
        clean_metric=float(1.0 if spec.metric == "logit_diff_norm" else clean_m),
        corrupt_metric=float(0.0 if spec.metric == "logit_diff_norm" else corrupt_m),
        clean_logit_diff=float(clean_ld), corrupt_logit_diff=float(corrupt_ld), n_pairs=n)
    return arr, {"base_metric": base_m, **fields}


@analysis(AtPSpec, AtPResult)
def compute(spec: AtPSpec, model: LoadedModel, progress=None) -> AtPResult:
    def estimate(model, base, src, site, metric):
        d, *rest = attribution(model, base, src, site, metric)
        return ({"deltas": d}, *rest)

    arr, fields = estimate_over_pairs(spec, model, estimate, progress, "Attribution patching")
    base_m = fields.pop("base_metric")
    deltas = arr["deltas"]
    return AtPResult(**fields, values=(base_m + deltas).astype(np.float32), deltas=deltas.astype(np.float32),
                     method="atp")


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two same-shape heatmaps over all cells (nan when one is constant)."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if x.shape != y.shape:
        raise InvalidSpec(f"Cannot correlate heatmaps of shapes {a.shape} and {b.shape}.")
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def compare_with_exact(spec: AtPSpec, atp_result: AtPResult | None = None, store=None) -> dict | None:
    """Pearson r against the exact sweep of the same question, if that sweep is already stored.

    Never computes the exact sweep. None when it is not in the store.
    """
    from ..runner import lookup, run

    exact = lookup(spec.patch_spec(), store)
    if exact is None:
        return None
    atp_result = atp_result or run(spec, store).result
    ev = exact.result.values
    return {"pearson": correlation(atp_result.values, ev), "exact_run_key": exact.run_key,
            "max_abs_error": float(np.abs(atp_result.values.astype(np.float64) - ev).max())}


# ---------------------------------------------------------------------------------------
# Command line: python -m backend atp ...
# ---------------------------------------------------------------------------------------
def add_cli_args(p) -> None:
    from .patching import add_cli_args as add_task_args

    add_task_args(p, sites=ATP_SITES, default_metric="logit_diff")


def estimate_cli(cls, a):
    """(spec, outcome, JSON payload) of an AtP-like estimate from the command line options."""
    import sys

    from ..runner import run
    from .patching import spec_from_args, sweep_payload

    spec = spec_from_args(cls, a)
    out = run(spec, progress=lambda m: print(m, file=sys.stderr))
    return spec, out, sweep_payload(spec, out)


def run_cli(a) -> dict:
    spec, out, payload = estimate_cli(AtPSpec, a)
    cmp = compare_with_exact(spec, out.result)
    if cmp is not None:
        payload["correlation_with_exact"] = round(cmp["pearson"], 6)
        payload["exact_run_key"] = cmp["exact_run_key"]
    return payload
