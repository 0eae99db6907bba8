"""Edge-level circuit discovery: EAP / EAP-IG scores, a circuit of the top edges, and its
faithfulness measured by running it (Syed et al. 2023; Hanna et al. 2024).

The graph, the scores and the circuit run are described in kernels/circuits.py. In short:
nodes are the embeddings (`input`), every head `A{l}.{h}`, every MLP `M{l}` and `logits`;
an edge carries an upstream node's output into a downstream node's input (one input per
head, not split into q/k/v). A circuit is run by edge patching: edges outside it carry the
corrupted run's activation. Faithfulness = (M(circuit) - M(corrupt)) / (M(clean) - M(corrupt)),
with M the raw metric averaged over pairs.

Two analyses, both through the runner and the store:
- EdgeScoresSpec (kind "edge_scores"): the task (same fields as a PatchSpec: clean, corrupt,
  answer, wrong, metric, dataset) and the method -> every edge's score [U D]. The expensive part.
- CircuitSpec (kind "circuit"): the same plus top_n (or threshold) and `removed` (nodes or
  edges "A23.3->logits" taken out by clicks) -> edges, nodes, faithfulness. It reads its
  scores through the runner (the default store), so removing a node re-runs only the circuit.

Saved circuits (a name -> a circuit spec) live in the `saved_circuits` table.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import InvalidSpec
from ..model import LoadedModel, load_model
from ..runner import analysis
from ..spec import Result, Spec
from ..tasks import PairTaskSpec, encode_pairs
from .patching import METRICS, _check_choice

METHODS = ("eap", "eap-ig")
CIRCUIT_METHODS = METHODS + ("acdc",)   # ACDC (backend/analyses/acdc.py) prunes by runs, not scores
CIRCUIT_METRICS = METRICS
# Circuit methods that are not edge scores register here ({"validate", "circuit", "cli"} functions):
# ACDC does, from backend/analyses/acdc.py, which imports this module (never the reverse).
EXTRA_METHODS: dict[str, dict] = {}


@dataclass(frozen=True)
class EdgeScoresSpec(PairTaskSpec):
    """Scores of every edge for a task (the pair fields of every task spec) by EAP or EAP-IG."""

    KIND = "edge_scores"
    ALLOWED_METHODS: ClassVar[tuple[str, ...]] = METHODS
    metric: str = "logit_diff_norm"
    method: str = "eap"
    ig_steps: int = 5

    def validate(self):
        _check_choice(self.metric, CIRCUIT_METRICS, "metric")
        _check_choice(self.method, self.ALLOWED_METHODS, "circuit method")
        if self.method == "eap" and self.metric == "kl":
            raise InvalidSpec("EAP takes the gradient at the clean run, where KL to the clean run has "
                              "gradient 0: use EAP-IG (method eap-ig) or another metric for KL.")
        if not isinstance(self.ig_steps, int) or not 1 <= self.ig_steps <= 50:
            raise InvalidSpec(f"ig_steps must be 1–50, got {self.ig_steps!r}.")
        self.validate_pairs()


@dataclass(frozen=True)
class EdgeScoresResult(Result):
    method: str
    metric: str
    up: list[str]                # upstream node names (rows of scores)
    down: list[str]              # downstream node names (columns)
    scores: np.ndarray           # [U D] float32 on the spec's metric scale; 0 where there is no edge
    clean_raw: float             # raw metric (logit diff for both logit-diff metrics), mean over pairs
    corrupt_raw: float
    clean_logit_diff: float
    corrupt_logit_diff: float
    clean_tokens: list[str]
    corrupt_tokens: list[str]
    n_pairs: int
    n_edges: int


def _kernel_metric(model: LoadedModel, fm, encoded, metric: str):
    import torch

    from kernels import circuits as kc
    from kernels import patching as kp

    dev = fm.W_U.device
    a = torch.tensor([e.answer_id for e in encoded], device=dev)
    w = torch.tensor([e.wrong_id for e in encoded], device=dev)
    if metric in ("logit_diff", "logit_diff_norm"):
        return kc.PairMetric("logit_diff", a, w)
    if metric == "prob":
        return kc.PairMetric("prob", a, w)
    clean_lp = torch.stack([kp.base_logits(fm, e.clean_ids).float().log_softmax(-1) for e in encoded])
    return kc.PairMetric("kl", a, w, clean_lp)


def _fast(model: LoadedModel):
    from kernels import patching as kp

    fm = kp.fast_model(model)
    if fm is None:
        raise InvalidSpec(f"Circuits need a model with canonical weights (Llama-style or Gemma-3: "
                          f"the graph is built from its block weights); {model.info.model_id} has none.")
    return fm


def _graph(model: LoadedModel):
    from kernels import circuits as kc

    return kc.Graph(model.info.n_layers, model.info.n_heads)


def _ids(encoded):
    return [e.clean_ids for e in encoded], [e.corrupt_ids for e in encoded]


def _task(spec, model: LoadedModel):
    """A task's encoded pairs, the fast model, and the clean and corrupted ids of every pair."""
    encoded = encode_pairs(model, spec.pairs())
    return (encoded, _fast(model), *_ids(encoded))


def _gap(clean: float, corrupt: float) -> float:
    if abs(clean - corrupt) < 1e-6:
        raise InvalidSpec(f"The clean and corrupted prompts give the same metric ({clean:.4f}), so "
                          "faithfulness (and the normalised logit difference) is undefined: pick a "
                          "corruption that changes the answer.")
    return clean - corrupt


@analysis(EdgeScoresSpec, EdgeScoresResult)
def compute_scores(spec: EdgeScoresSpec, model: LoadedModel, progress=None) -> EdgeScoresResult:
    from kernels import circuits as kc
    from kernels import patching as kp

    encoded, fm, clean, corrupt = _task(spec, model)
    graph = _graph(model)
    with model.lock:
        if progress:
            progress(f"{spec.method.upper()} scores of {graph.n_edges} edges…")
        metric = _kernel_metric(model, fm, encoded, spec.metric)
        s = kc.edge_scores(fm, clean, corrupt, metric, graph, spec.method, spec.ig_steps)
        lds = [kp.sweep_baselines(fm, e.clean_ids, e.corrupt_ids, kp.LogitDiff(e.answer_id, e.wrong_id))
               for e in encoded]
    clean_raw, corrupt_raw = float(s.clean_metric.mean()), float(s.corrupt_metric.mean())
    scores = s.scores
    if spec.metric == "logit_diff_norm":
        scores = scores / _gap(clean_raw, corrupt_raw)
    return EdgeScoresResult(
        method=spec.method, metric=spec.metric, up=graph.up, down=graph.down,
        scores=scores.float().cpu().numpy(), clean_raw=clean_raw, corrupt_raw=corrupt_raw,
        clean_logit_diff=float(np.mean([x[0] for x in lds])), corrupt_logit_diff=float(np.mean([x[1] for x in lds])),
        clean_tokens=model.str_tokens(encoded[0].clean_ids), corrupt_tokens=model.str_tokens(encoded[0].corrupt_ids),
        n_pairs=len(encoded), n_edges=graph.n_edges)


# ---------------------------------------------------------------------------------------
# Circuits
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CircuitSpec(EdgeScoresSpec):
    """A circuit: the top_n edges by |score| (or those with |score| >= threshold when top_n is 0),
    minus the `removed` nodes ("A23.3", "M5", "input") and edges ("A23.3->logits"), pruned to
    the nodes on a path from input to logits. With method "acdc", `threshold` is ACDC's τ (the
    metric change below which an edge is removed, backend/analyses/acdc.py); top_n and
    ig_steps do not apply and are fixed to 0 and 5 so that one question has one key."""

    KIND = "circuit"
    ALLOWED_METHODS: ClassVar[tuple[str, ...]] = CIRCUIT_METHODS
    top_n: int = 50
    threshold: float = 0.0
    removed: tuple = ()

    MAX_TOP_N: ClassVar[int] = 5000

    def validate(self):
        if self.method in EXTRA_METHODS:
            EXTRA_METHODS[self.method]["validate"](self)
            return
        super().validate()
        self._validate_selection()

    def _validate_selection(self):
        if not isinstance(self.top_n, int) or not 0 <= self.top_n <= self.MAX_TOP_N:
            raise InvalidSpec(f"top_n must be 0–{self.MAX_TOP_N} edges, got {self.top_n!r}.")
        if not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise InvalidSpec(f"threshold must be ≥ 0, got {self.threshold!r}.")
        if self.top_n == 0 and self.threshold <= 0:
            raise InvalidSpec("Give top_n > 0 (the number of edges kept) or a threshold > 0 on |score|.")
        self._validate_removed()

    def _validate_removed(self):
        if isinstance(self.removed, str) or not isinstance(self.removed, tuple) \
                or not all(isinstance(r, str) for r in self.removed):
            raise InvalidSpec("removed must be a list of node names ('A23.3', 'M5') or edges ('A23.3->logits').")
        seen = tuple(dict.fromkeys(r.strip() for r in self.removed if r.strip()))
        object.__setattr__(self, "removed", seen)

    def scores_spec(self) -> EdgeScoresSpec:
        return self.as_task(EdgeScoresSpec)

    def replace(self, **kw) -> "CircuitSpec":
        return CircuitSpec(**{**self.fields(), **kw})


@dataclass(frozen=True)
class CircuitResult(Result):
    method: str
    metric: str
    top_n: int
    threshold: float
    removed: list[str]
    nodes: list[str]             # nodes of the circuit (after removal and pruning)
    edge_from: np.ndarray        # [E] str
    edge_to: np.ndarray          # [E] str
    edge_score: np.ndarray       # [E] float32, sorted by |score| descending
    n_selected: int              # edges picked by top_n / threshold, before removal and pruning
    n_edges_total: int
    faithfulness: float          # (M(circuit) - M(corrupt)) / (M(clean) - M(corrupt)), raw metric
    clean_metric: float          # on the spec's metric scale (logit_diff_norm: 1)
    corrupt_metric: float        # (logit_diff_norm: 0)
    circuit_metric: float
    clean_logit_diff: float
    corrupt_logit_diff: float
    n_pairs: int
    scores_run_key: str          # the run the edges came from: edge scores, or the ACDC search
    clean_tokens: list[str]
    corrupt_tokens: list[str]
    forward_passes: int = 0      # ACDC: the runs its search needed (0 for EAP / EAP-IG)
    overlaps: list | None = None  # ACDC: [{method, metric, top_n, edges, jaccard, faithfulness, run_key}]


def select_edges(scores: np.ndarray, valid: np.ndarray, top_n: int, threshold: float) -> np.ndarray:
    """Boolean [U D] mask of the top_n edges by |score| (ties by index), or |score| >= threshold."""
    a = np.where(valid, np.abs(scores.astype(np.float64)), -1.0)
    keep = np.zeros(a.shape, bool)
    if top_n > 0:
        flat = np.argsort(-a, axis=None, kind="stable")[:top_n]
        keep.flat[flat] = True
    else:
        keep = a >= threshold
    return keep & valid


def apply_removed(mask: np.ndarray, up: list[str], down: list[str], removed) -> np.ndarray:
    """Take removed nodes (all their edges) and edges "u->d" out of a [U D] mask."""
    mask = mask.copy()
    ui, di = {n: i for i, n in enumerate(up)}, {n: i for i, n in enumerate(down)}
    for r in removed:
        if "->" in r:
            u, d = (x.strip() for x in r.split("->", 1))
            if u not in ui or d not in di:
                raise InvalidSpec(f"Removed edge {r!r} is not an edge of the graph (nodes like 'A23.3', "
                                  "'M5', 'input', 'logits').")
            mask[ui[u], di[d]] = False
        else:
            if r not in ui and r not in di:
                raise InvalidSpec(f"Removed node {r!r} is not a node of the graph (e.g. 'A23.3', 'M5').")
            if r in ui:
                mask[ui[r], :] = False
            if r in di:
                mask[:, di[r]] = False
    return mask


def prune(mask: np.ndarray, up: list[str], down: list[str]) -> np.ndarray:
    """Keep only edges on a path input -> ... -> logits (dangling nodes dropped).

    Exact for faithfulness: a node with no kept input edge outputs its corrupted value, and a
    node with no path to the logits changes nothing they read, so its edges change nothing."""
    ui, di = {n: i for i, n in enumerate(up)}, {n: i for i, n in enumerate(down)}
    # forward reachability from input: nodes are processed in topological order (up / down order)
    reach = {"input"}
    for d in down:                       # down is topologically ordered
        if any(mask[ui[u], di[d]] for u in reach if u in ui):
            reach.add(d)
    # backward reachability to logits
    to_logits = {"logits"}
    for u in reversed(up):
        if any(mask[ui[u], di[d]] for d in to_logits if d in di):
            to_logits.add(u)
    alive = reach & to_logits
    keep_u = np.array([n in alive for n in up])
    keep_d = np.array([n in alive for n in down])
    return mask & keep_u[:, None] & keep_d[None, :]


@analysis(CircuitSpec, CircuitResult)
def compute_circuit(spec: CircuitSpec, model: LoadedModel, progress=None, store=None) -> CircuitResult:
    from ..runner import run

    if spec.method in EXTRA_METHODS:
        return EXTRA_METHODS[spec.method]["circuit"](spec, model, progress, store)
    sc_out = run(spec.scores_spec(), store=store, progress=progress)
    sc = sc_out.result
    graph = _graph(model)
    valid = graph.valid.numpy()
    sel = select_edges(sc.scores, valid, spec.top_n, spec.threshold)
    mask = prune(apply_removed(sel, sc.up, sc.down, spec.removed), sc.up, sc.down)
    return circuit_result(spec, model, graph, mask, sc.scores, int(sel.sum()), sc, sc_out.run_key, progress)


def circuit_result(spec, model: LoadedModel, graph, mask: np.ndarray, scores: np.ndarray, n_selected: int, src,
                   run_key: str, progress=None, **extra) -> CircuitResult:
    """Run the circuit `mask` [U D] (pruned) for its faithfulness and report it, edges sorted by
    |scores| [U D]; `src` (edge scores or an ACDC search) gives the baselines and tokens."""
    import torch

    from kernels import circuits as kc

    encoded, fm, clean, corrupt = _task(spec, model)
    with model.lock:
        if progress:
            progress(f"Running the circuit ({int(mask.sum())} edges)…")
        metric = _kernel_metric(model, fm, encoded, spec.metric)
        cr = kc.corrupt_run(fm, corrupt, metric, graph)
        m_circ = float(kc.run_circuits(fm, clean, cr, torch.as_tensor(mask)[None], metric, graph).mean())
    clean_raw, corrupt_raw = src.clean_raw, src.corrupt_raw
    faith = (m_circ - corrupt_raw) / _gap(clean_raw, corrupt_raw)
    norm = spec.metric == "logit_diff_norm"
    up, down = src.up, src.down
    u_idx, d_idx = np.nonzero(mask)
    vals = scores[u_idx, d_idx]
    order = np.argsort(-np.abs(vals), kind="stable")
    u_idx, d_idx, vals = u_idx[order], d_idx[order], vals[order]
    nodes = sorted({up[i] for i in u_idx} | {down[i] for i in d_idx}, key=_node_order(graph))
    return CircuitResult(
        method=spec.method, metric=spec.metric, top_n=spec.top_n, threshold=float(spec.threshold),
        removed=list(spec.removed), nodes=nodes,
        edge_from=np.array([up[i] for i in u_idx], dtype=str),
        edge_to=np.array([down[i] for i in d_idx], dtype=str),
        edge_score=vals.astype(np.float32), n_selected=n_selected, n_edges_total=graph.n_edges,
        faithfulness=float(faith), clean_metric=1.0 if norm else clean_raw, corrupt_metric=0.0 if norm else corrupt_raw,
        circuit_metric=float(faith) if norm else m_circ,
        clean_logit_diff=src.clean_logit_diff, corrupt_logit_diff=src.corrupt_logit_diff, n_pairs=src.n_pairs,
        scores_run_key=run_key, clean_tokens=src.clean_tokens, corrupt_tokens=src.corrupt_tokens, **extra)


def _node_order(graph):
    order = {"input": -1, "logits": len(graph.up) + 1}
    for i, n in enumerate(graph.up):
        order.setdefault(n, i)
    return lambda n: order.get(n, 0)


def edge_list(r: CircuitResult) -> list[dict]:
    return [{"from": str(u), "to": str(d), "score": float(s)}
            for u, d, s in zip(r.edge_from, r.edge_to, r.edge_score)]


def faithfulness_curve(spec: EdgeScoresSpec, top_ns: list[int], model: LoadedModel | None = None) -> dict:
    """Faithfulness of the top-n circuits (pruned) for several n, all run in one batch."""
    import torch

    from kernels import circuits as kc

    from ..runner import run

    model = model or load_model(spec.model)
    sc = run(spec.scores_spec() if isinstance(spec, CircuitSpec) else spec).result
    graph = _graph(model)
    valid = graph.valid.numpy()
    masks = [prune(select_edges(sc.scores, valid, n, 0.0), sc.up, sc.down) for n in top_ns]
    encoded, fm, clean, corrupt = _task(spec, model)
    with model.lock:
        metric = _kernel_metric(model, fm, encoded, spec.metric)
        cr = kc.corrupt_run(fm, corrupt, metric, graph)
        vals = kc.run_circuits(fm, clean, cr, torch.as_tensor(np.stack(masks)), metric, graph).mean(1)
    gap = _gap(sc.clean_raw, sc.corrupt_raw)
    return {"top_n": list(top_ns), "edges_after_prune": [int(m.sum()) for m in masks],
            "faithfulness": [float((v - sc.corrupt_raw) / gap) for v in vals.tolist()]}


# ---------------------------------------------------------------------------------------
# Faithfulness every way: ablation x metric x direction (Miller et al. 2024)
# ---------------------------------------------------------------------------------------
ABLATIONS = ("resample", "mean", "zero")
TABLE_METRICS = ("logit_diff", "prob", "kl")


@dataclass(frozen=True)
class CircuitAblationsSpec(CircuitSpec):
    """The faithfulness of a circuit (any CircuitSpec: EAP, EAP-IG, ACDC, saved) under every
    ablation of the edges outside it x metric x direction:
    - ablation: resample (each pair's corrupted run, as the circuit itself is measured), mean
      (every node's output averaged over the task's corrupted prompts), zero;
    - metric (raw, mean over pairs): logit difference, probability of the answer, KL(clean || run);
    - denoising: only the circuit's edges carry the clean run,
      F = (M(circuit) - M(ablated)) / (M(clean) - M(ablated)) (what the circuit suffices for);
      noising: only the circuit's edges are ablated,
      F = (M(clean) - M(without circuit)) / (M(clean) - M(ablated)) (how much of the effect needs it).
    resample / denoising / logit difference is the circuit's own faithfulness."""

    KIND = "circuit_ablations"

    def circuit_spec(self) -> CircuitSpec:
        return CircuitSpec(**self.fields())


@dataclass(frozen=True)
class CircuitAblationsResult(Result):
    rows: list[dict]             # 18 x {ablation, metric, direction, faithfulness (None if undefined)}
    values: list[dict]           # per ablation x metric: M(clean), M(ablated), M(circuit), M(without circuit)
    n_edges: int
    n_reference: int             # corrupted prompts the mean ablation averages over
    circuit_run_key: str


def _edge_mask(r: CircuitResult, graph) -> np.ndarray:
    mask = np.zeros((len(graph.up), len(graph.down)), bool)
    for u, d in zip(r.edge_from.tolist(), r.edge_to.tolist()):
        mask[graph.up_index[u], graph.down_index[d]] = True
    return mask


@analysis(CircuitAblationsSpec, CircuitAblationsResult)
def compute_ablations(spec: CircuitAblationsSpec, model: LoadedModel, progress=None, store=None) -> CircuitAblationsResult:
    import torch

    from kernels import circuits as kc

    from ..runner import run

    c_out = run(spec.circuit_spec(), store=store, progress=progress)
    graph = _graph(model)
    mask = torch.as_tensor(_edge_mask(c_out.result, graph))
    valid = graph.valid
    masks = torch.stack([mask, valid & ~mask, valid, torch.zeros_like(mask)])    # circuit, complement, all, none
    encoded, fm, clean, corrupt = _task(spec, model)
    B = len(encoded)
    rows, values = [], []
    with model.lock:
        if progress:
            progress("Faithfulness under 3 ablations x 3 metrics x 2 directions…")
        metrics = {m: _kernel_metric(model, fm, encoded, m) for m in TABLE_METRICS}
        cr = kc.corrupt_run(fm, corrupt, metrics["logit_diff"], graph)
        with torch.inference_mode():
            clean_final = kc.run_full(fm, fm.embed(torch.as_tensor(clean, device=fm.W_U.device)), metrics["kl"],
                                      graph).inputs[-1][:, -1]
        for ablation in ABLATIONS:
            ab = kc.ablated_run(cr, ablation, B)
            finals = kc.circuit_finals(fm, clean, ab, masks, graph)                     # [4 B d]
            for name, metric in metrics.items():
                with torch.inference_mode():
                    m = metric.repeat(4)(fm, finals.reshape(4 * B, -1)).view(4, B).double().mean(1).tolist()
                    m_clean = float(metric(fm, clean_final).double().mean())
                    m_abl = (float(metric(fm, cr.final[:, -1]).double().mean()) if ablation == "resample" else m[3])
                gap = m_clean - m_abl
                ok = abs(gap) > 1e-9
                values.append({"ablation": ablation, "metric": name, "clean": m_clean, "ablated": m_abl,
                               "circuit": m[0], "without_circuit": m[1]})
                rows.append({"ablation": ablation, "metric": name, "direction": "denoising",
                             "faithfulness": (m[0] - m_abl) / gap if ok else None})
                rows.append({"ablation": ablation, "metric": name, "direction": "noising",
                             "faithfulness": (m_clean - m[1]) / gap if ok else None})
    return CircuitAblationsResult(rows=rows, values=values, n_edges=int(mask.sum()), n_reference=B,
                                  circuit_run_key=c_out.run_key)


# ---------------------------------------------------------------------------------------
# Saved circuits
# ---------------------------------------------------------------------------------------
def save_circuit(name: str, spec: CircuitSpec, faithfulness: float, link: dict | None = None, store=None) -> str:
    """Save a circuit under a name; returns its id (a hash of name and spec). Same name and spec: same id.

    `link` is the page's query parameters (the app passes them so the saved link reopens the view)."""
    from ..store import default_store

    name = (name or "").strip()
    if not name:
        raise InvalidSpec("Give the circuit a name to save it.")
    if len(name) > 120:
        raise InvalidSpec("A circuit name is at most 120 characters.")
    store = store or default_store()
    cid = "c" + hashlib.sha256((name + "\0" + spec.key()).encode()).hexdigest()[:12]
    with store.locked():
        store.cursor().execute(
            "INSERT OR REPLACE INTO saved_circuits(circuit_id, name, run_key, spec, faithfulness, link) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [cid, name, spec.key(), spec.to_json(), float(faithfulness), json.dumps({**(link or {}), "circuit": cid})])
    return cid


def saved_circuits(store=None, model: str | None = None) -> list[dict]:
    """Saved circuits, newest first: id, name, run_key, spec (a CircuitSpec), faithfulness, created."""
    from ..store import default_store

    store = store or default_store()
    sql = "SELECT circuit_id, name, run_key, spec, faithfulness, created, link FROM saved_circuits"
    args = []
    if model:
        sql += " WHERE json_extract_string(spec, '$.model') = ?"
        args.append(model)
    rows = store.cursor().execute(sql + " ORDER BY created DESC", args).fetchall()
    return [{"id": r[0], "name": r[1], "run_key": r[2], "spec": Spec.from_dict(json.loads(r[3])),
             "faithfulness": r[4], "created": str(r[5]), "link": json.loads(r[6]) if r[6] else {}}
            for r in rows]


def saved_circuit(cid: str, store=None) -> dict | None:
    return next((c for c in saved_circuits(store) if c["id"] == cid), None)


# ---------------------------------------------------------------------------------------
# Command line: python -m backend circuit ...
# ---------------------------------------------------------------------------------------
def add_cli_args(p) -> None:
    from .patching import add_task_args

    add_task_args(p)
    p.add_argument("--metric", default=None, help="one of " + ", ".join(CIRCUIT_METRICS)
                   + " (default logit_diff_norm; kl for acdc)")
    p.add_argument("--method", default="eap", help="eap, eap-ig or acdc")
    p.add_argument("--ig-steps", type=int, default=5)
    p.add_argument("--top-n", type=int, default=50, help="edges kept (0: use --threshold)")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="keep edges with |score| >= this; for acdc: τ, remove an edge when the metric changes by less")
    p.add_argument("--ablations", action="store_true",
                   help="also the faithfulness table: resample/mean/zero x logit diff/prob/KL x noising/denoising")
    p.add_argument("--remove", action="append", default=[],
                   help="a node ('A23.3', 'M5') or edge ('A23.3->logits') to remove; repeatable")


def spec_from_args(a) -> CircuitSpec:
    from .patching import spec_from_args as task_spec

    metric = a.metric or ("kl" if a.method == "acdc" else "logit_diff_norm")
    return task_spec(CircuitSpec, a, metric=metric, method=a.method, ig_steps=a.ig_steps, top_n=a.top_n,
                     threshold=a.threshold, removed=tuple(a.remove))


def run_cli(a) -> dict:
    import sys

    from ..runner import run

    spec = spec_from_args(a)
    out = run(spec, progress=lambda m: print(m, file=sys.stderr))
    r = out.result
    payload = {"run_key": out.run_key, "from_store": out.from_store,
               "compute_seconds": round(out.compute_seconds, 4), "read_seconds": round(out.read_seconds, 4),
               "model": spec.model, "method": r.method, "metric": r.metric, "top_n": r.top_n,
               "threshold": r.threshold, "removed": r.removed, "nodes": r.nodes, "edges": edge_list(r),
               "n_selected": r.n_selected, "n_edges_total": r.n_edges_total,
               "faithfulness": round(r.faithfulness, 6), "clean_metric": r.clean_metric,
               "corrupt_metric": r.corrupt_metric, "circuit_metric": r.circuit_metric,
               "clean_logit_diff": r.clean_logit_diff, "corrupt_logit_diff": r.corrupt_logit_diff,
               "n_pairs": r.n_pairs, "scores_run_key": r.scores_run_key}
    if r.method in EXTRA_METHODS:
        payload.update(EXTRA_METHODS[r.method]["cli"](r))
    if a.ablations:
        ab = run(spec.as_task(CircuitAblationsSpec), progress=lambda m: print(m, file=sys.stderr)).result
        payload["ablations"] = ab.rows
    return payload
