"""ACDC: automatic circuit discovery by pruning edges one run at a time (Conmy et al. 2023).

Start from the whole graph of kernels/circuits.py (every edge from `input`, each head and MLP
into each later head, MLP and `logits`). Visit the downstream nodes from the logits back
(reverse topological order) and, for each, its incoming edges from the latest sender to the
earliest. Remove an edge when the metric, measured on the circuit run by edge patching (edges
outside it carry the corrupted run), changes by less than τ when the edge is taken out of the
current circuit; keep it otherwise. The metric is KL(clean || circuit) of the next-token
distribution by default, as in the paper, or the task metric (a logit difference, normalised
or not, or the answer's probability), for which "changes" means "drops": the change is
v(without the edge) - v(current) with v = KL, -LD, -LD / (LD_clean - LD_corrupt) or -p.

Two analyses, as for EAP: ACDCSpec (kind "acdc") runs the search once and stores the kept
edges and the log of every edge visited (its change, removed or kept, measured or removed
unmeasured because its receiver no longer reaches the logits: change 0 exactly);
CircuitSpec(method="acdc", threshold=τ) reads it and reports the circuit like any other
(removal clicks, pruning, faithfulness), plus `forward_passes` and the overlap (edge Jaccard)
with the EAP and EAP-IG circuits of the same size on the same task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidSpec
from ..model import LoadedModel
from ..runner import analysis
from ..spec import Result
from ..tasks import PairTaskSpec
from .circuits import (CIRCUIT_METRICS, EXTRA_METHODS, CircuitAblationsSpec, CircuitSpec, _gap, _graph, _kernel_metric,
                       _task, apply_removed, circuit_result, faithfulness_curve, prune)
from .patching import _check_choice

ACDC_METRIC = "kl"


def _check_tau(tau) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise InvalidSpec(f"ACDC needs a threshold τ > 0 (the metric change below which an edge is "
                          f"removed), got {tau!r}.")


@dataclass(frozen=True)
class ACDCSpec(PairTaskSpec):
    """The ACDC search on a task: metric (KL to the clean output by default) and τ."""

    KIND = "acdc"
    metric: str = ACDC_METRIC
    threshold: float = 0.05

    def validate(self):
        _check_choice(self.metric, CIRCUIT_METRICS, "metric")
        _check_tau(self.threshold)
        self.validate_pairs()


@dataclass(frozen=True)
class ACDCResult(Result):
    metric: str
    threshold: float
    up: list[str]
    down: list[str]
    kept: np.ndarray             # [U D] uint8: the edges ACDC kept (before pruning dangling ones)
    log_from: np.ndarray         # [V] str: every edge in the order visited
    log_to: np.ndarray           # [V] str
    log_change: np.ndarray       # [V] float64: v(without the edge) - v(current) when visited
    log_removed: np.ndarray      # [V] bool
    log_measured: np.ndarray     # [V] bool (False: its receiver reached nothing, change 0 exactly)
    forward_passes: int          # runs the algorithm needs: one per measured edge, plus the first
    kernel_rows: int             # trial runs the batched kernel computed (speculative ones included)
    final_value: float           # v of the final circuit
    clean_raw: float             # raw metric (logit diff for both logit-diff metrics), mean over pairs
    corrupt_raw: float
    clean_logit_diff: float
    corrupt_logit_diff: float
    clean_tokens: list[str]
    corrupt_tokens: list[str]
    n_pairs: int


def _sign_scale(metric: str, clean_ld: float, corrupt_ld: float) -> tuple[float, float]:
    if metric == "kl":
        return 1.0, 1.0
    if metric == "logit_diff_norm":
        return -1.0, _gap(clean_ld, corrupt_ld)
    return -1.0, 1.0


@analysis(ACDCSpec, ACDCResult)
def compute_acdc(spec: ACDCSpec, model: LoadedModel, progress=None) -> ACDCResult:
    from kernels import circuits as kc
    from kernels import patching as kp

    encoded, fm, clean, corrupt = _task(spec, model)
    graph = _graph(model)
    with model.lock:
        lds = [kp.sweep_baselines(fm, e.clean_ids, e.corrupt_ids, kp.LogitDiff(e.answer_id, e.wrong_id))
               for e in encoded]
        clean_ld, corrupt_ld = float(np.mean([x[0] for x in lds])), float(np.mean([x[1] for x in lds]))
        sign, scale = _sign_scale(spec.metric, clean_ld, corrupt_ld)
        if progress:
            progress(f"ACDC over {graph.n_edges} edges (τ = {spec.threshold:g}, {spec.metric})…")
        metric = _kernel_metric(model, fm, encoded, spec.metric)
        out = kc.acdc(fm, clean, corrupt, metric, graph, float(spec.threshold), sign=sign, scale=scale)
    up, down = graph.up, graph.down
    return ACDCResult(
        metric=spec.metric, threshold=float(spec.threshold), up=up, down=down,
        kept=out.mask.numpy().astype(np.uint8),
        log_from=np.array([up[u] for u, _, _, _ in out.log], dtype=str),
        log_to=np.array([down[d] for _, d, _, _ in out.log], dtype=str),
        log_change=np.array([c for _, _, c, _ in out.log], dtype=np.float64),
        log_removed=np.array([r for _, _, _, r in out.log], dtype=bool),
        log_measured=np.array(out.evaluated, dtype=bool),
        forward_passes=out.forward_passes, kernel_rows=out.kernel_rows, final_value=out.final_value,
        clean_raw=float(out.clean_metric.mean()), corrupt_raw=float(out.corrupt_metric.mean()),
        clean_logit_diff=clean_ld, corrupt_logit_diff=corrupt_ld,
        clean_tokens=model.str_tokens(encoded[0].clean_ids), corrupt_tokens=model.str_tokens(encoded[0].corrupt_ids),
        n_pairs=len(encoded))


def validate_acdc(spec) -> None:
    """CircuitSpec(method="acdc") checks: τ > 0; top_n and ig_steps fixed (they do not apply)."""
    _check_choice(spec.metric, CIRCUIT_METRICS, "metric")
    _check_tau(spec.threshold)
    object.__setattr__(spec, "threshold", float(spec.threshold))
    object.__setattr__(spec, "top_n", 0)
    object.__setattr__(spec, "ig_steps", 5)
    spec._validate_removed()
    spec.validate_pairs()


def acdc_spec(spec) -> ACDCSpec:
    return spec.as_task(ACDCSpec)


def circuit_from_acdc(spec, model: LoadedModel, progress=None, store=None):
    """The CircuitResult of CircuitSpec(method="acdc"): the stored search, the clicks removed,
    pruned, run for faithfulness; edge scores are the changes measured when each edge was kept;
    overlaps with the EAP / EAP-IG circuits of the same size."""
    from ..runner import run

    graph = _graph(model)
    apply_removed(graph.valid.numpy(), graph.up, graph.down, spec.removed)    # bad names fail before the search
    a_out = run(acdc_spec(spec), store=store, progress=progress)
    a = a_out.result
    kept = a.kept.astype(bool)
    mask = prune(apply_removed(kept, a.up, a.down, spec.removed), a.up, a.down)
    scores = np.zeros(kept.shape)                      # a kept edge's score: its change when it was kept
    for f, t, c, r in zip(a.log_from.tolist(), a.log_to.tolist(), a.log_change, a.log_removed):
        if not r:
            scores[graph.up_index[f], graph.down_index[t]] = c
    edges = {(a.up[u], a.down[d]) for u, d in zip(*np.nonzero(mask))}
    return circuit_result(spec, model, graph, mask, scores, int(kept.sum()), a, a_out.run_key, progress,
                          forward_passes=a.forward_passes, overlaps=overlaps(spec, edges, store=store, progress=progress))


def overlaps(spec, edges: set, store=None, progress=None) -> list[dict]:
    """Edge Jaccard of a circuit with the EAP and EAP-IG circuits of as many edges (top_n = its
    size, pruned) on the same task, with their faithfulness (logit-difference metrics: EAP has no
    KL gradient at the clean run, so a KL task compares on the normalised logit difference)."""
    from ..runner import run

    if not edges:
        return []
    metric = spec.metric if spec.metric != "kl" else "logit_diff_norm"
    out = []
    for method in ("eap", "eap-ig"):
        other = spec.replace(method=method, metric=metric, top_n=min(len(edges), spec.MAX_TOP_N),
                             threshold=0.0, removed=(), ig_steps=5)
        o = run(other, store=store, progress=progress)
        theirs = set(zip(o.result.edge_from.tolist(), o.result.edge_to.tolist()))
        out.append({"method": method, "metric": metric, "top_n": other.top_n, "edges": len(theirs),
                    "jaccard": len(edges & theirs) / len(edges | theirs), "faithfulness": o.result.faithfulness,
                    "run_key": o.run_key})
    return out


def removed_log(result, store=None) -> list[dict]:
    """The log of an ACDC circuit's search: every edge removed, in the order visited, with the
    metric change when it was removed and whether a run measured it."""
    from ..store import default_store

    a = _search(result, store or default_store())
    return [{"edge": f"{f}->{t}", "change": float(c), "measured": bool(m)}
            for f, t, c, r, m in zip(a.log_from, a.log_to, a.log_change, a.log_removed, a.log_measured) if r]


def _search(result, store) -> ACDCResult:
    from ..runner import ANALYSES

    rec = store.get(result.scores_run_key)
    if rec is None:
        raise InvalidSpec(f"The ACDC search {result.scores_run_key} is not in this store.")
    return ANALYSES[ACDCSpec.KIND].result_cls.from_record(rec["meta"], rec["arrays"])


def search_of(result, store=None) -> ACDCResult:
    from ..store import default_store

    return _search(result, store or default_store())


def method_curves(spec, top_ns: list[int], acdc_specs: list, store=None) -> dict:
    """Faithfulness (logit difference, resample / denoising) against edges for the three methods
    on one task: EAP and EAP-IG top-n circuits for each n in top_ns, and the given ACDC circuits
    (CircuitSpecs with method "acdc", read or run through the store)."""
    from ..runner import run

    out = {}
    for method in ("eap", "eap-ig"):
        s = spec.as_task(CircuitSpec, method=method, metric="logit_diff", top_n=1, threshold=0.0, removed=(), ig_steps=5)
        c = faithfulness_curve(s.scores_spec(), top_ns)
        out[method] = {"edges": c["edges_after_prune"], "faithfulness": c["faithfulness"],
                       "labels": [f"top {n}" for n in c["top_n"]]}
    pts = {"edges": [], "faithfulness": [], "labels": []}
    for a in acdc_specs:
        r = run(a, store=store).result
        tab = run(a.as_task(CircuitAblationsSpec), store=store).result
        f = next(x["faithfulness"] for x in tab.rows
                 if (x["ablation"], x["metric"], x["direction"]) == ("resample", "logit_diff", "denoising"))
        pts["edges"].append(len(r.edge_score))
        pts["faithfulness"].append(f)
        pts["labels"].append(f"τ = {a.threshold:g} ({a.metric})")
    out["acdc"] = pts
    return out


EXTRA_METHODS["acdc"] = {
    "validate": validate_acdc,
    "circuit": circuit_from_acdc,
    "cli": lambda r: {"forward_passes": r.forward_passes, "overlaps": r.overlaps, "removed_log": removed_log(r)},
}
