"""Attribution graph of one prediction: transcoder features, error nodes, tokens and logits.

    python -m backend graph --model smollm2-135m --text "The capital of France is" --format json

The graph (kernels/graph.py) has one node per active transcoder feature (positions >= 1), one
error node per layer and position, one per input token and one per logit target (the top
tokens until their probability reaches desired_logit_prob, at most max_logits); an edge is a
direct effect in the local replacement model. Pruning and the two scores follow circuit-tracer
(`prune_graph`, `compute_graph_scores`), written here over the dense adjacency:

- influence: with |A| row-normalised to Â, a node's influence on the logits is
  w (Â + Â² + ...) with w the logit targets' probabilities;
- pruning: keep the nodes carrying node_threshold of the total influence (tokens and logits
  always), then the edges carrying edge_threshold of the edge influence, then drop nodes
  left without an outgoing (and, for features, an incoming) edge until nothing changes;
- replacement score: the share of the tokens' and errors' influence that belongs to tokens;
  completeness score: the influence-weighted share of each node's inputs that are not errors.

The stored result holds the pruned nodes and edges and both scores for the pruned and the
unpruned graph; the unpruned adjacency (features² floats) is recomputed when exported
(`export graph`), from the same spec, by the same deterministic code.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidSpec, OutOfRange, PromptTooLong
from ..model import LoadedModel
from ..runner import analysis
from ..spec import Result, Spec, check_text

MAX_GRAPH_TOKENS = 48            # prompt tokens (BOS included)
MAX_ADJACENCY_BYTES = 6e9        # the dense float32 adjacency must fit in this


@dataclass(frozen=True)
class GraphSpec(Spec):
    KIND = "graph"
    text: str = ""
    transcoders: str = ""          # a set id under data/transcoders or a folder; "" = the model's shipped set
    max_logits: int = 10
    desired_logit_prob: float = 0.95
    node_threshold: float = 0.8
    edge_threshold: float = 0.98

    def validate(self):
        check_text(self.text)
        _pin_transcoders(self)
        if not 1 <= self.max_logits <= 50:
            raise OutOfRange(f"max_logits must lie in 1–50, not {self.max_logits}.")
        for name in ("desired_logit_prob", "node_threshold", "edge_threshold"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise OutOfRange(f"{name} must lie in (0, 1], not {v}.")


def _pin_transcoders(spec) -> None:
    """Replace the spec's transcoder name by "<set>@<fingerprint>" (its key then changes with
    the weights); a model without any set says which models have one."""
    from .. import transcoders as tc

    try:
        object.__setattr__(spec, "transcoders", tc.reference(spec.transcoders, spec.model))
    except tc.UnknownTranscoders:
        if spec.transcoders:
            raise
        have = tc.models_with_sets()
        raise tc.UnknownTranscoders(f"{spec.model} has no transcoders; models with a shipped set: "
                                    f"{', '.join(have) or 'none'}.") from None


@dataclass(frozen=True)
class GraphResult(Result):
    tokens: list[str]
    token_ids: list[int]
    transcoders: str
    logits: list[dict]                  # [{token, token_id, prob}] the logit targets
    nodes: list[dict]                   # pruned: id, kind, layer, pos, feature, activation, influence
                                        # (share of the total), cumulative (circuit-tracer's score), label
    edge_source: np.ndarray             # [E] indices into nodes
    edge_target: np.ndarray             # [E]
    edge_weight: np.ndarray             # [E] direct effect
    scores: dict                        # replacement / completeness, pruned and unpruned
    n_active_features: int
    n_nodes_unpruned: int
    seconds: float


# -- influence, pruning, scores (circuit-tracer's definitions) --------------------------------
def _normalized(A):
    import torch

    M = A.abs()
    return M / M.sum(1, keepdim=True).clamp(min=1e-10)


def influence(M, w, max_iter: int = 1000):
    """w M + w M² + ... for a nilpotent (acyclic) M."""
    cur = w @ M
    total = cur.clone()
    for _ in range(max_iter):
        if not cur.any():
            return total
        cur = cur @ M
        total += cur
    raise RuntimeError("influence did not converge: the graph has a cycle")


def _threshold(scores, share: float):
    import torch

    s = torch.sort(scores, descending=True).values
    cum = torch.cumsum(s, 0) / s.sum()
    i = min(int(torch.searchsorted(cum, share)), len(cum) - 1)
    return s[i]


def prune(A, n_features: int, n_tokens: int, n_logits: int, probs, node_threshold: float, edge_threshold: float):
    """(node_mask, edge_mask, node_influence) as circuit-tracer's prune_graph."""
    import torch

    w = torch.zeros(A.shape[0])
    w[-n_logits:] = probs
    node_inf = influence(_normalized(A), w)
    node_mask = node_inf >= _threshold(node_inf, node_threshold)
    node_mask[-n_logits - n_tokens:] = True
    P = A.clone()
    P[~node_mask] = 0
    P[:, ~node_mask] = 0
    Mp = _normalized(P)
    edge_scores = Mp * (influence(Mp, w) + w)[:, None]
    edge_mask = edge_scores >= _threshold(edge_scores.flatten(), edge_threshold)
    old = node_mask.clone()
    src = slice(0, A.shape[0] - n_logits - n_tokens)

    def trim():
        node_mask[src] &= edge_mask[:, src].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)
    trim()
    while not torch.equal(node_mask, old):
        old[:] = node_mask
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        trim()
    return node_mask, edge_mask, node_inf


def graph_scores(A, n_features: int, n_layers: int, n_tokens: int, n_logits: int, probs) -> tuple[float, float]:
    """(replacement_score, completeness_score) as circuit-tracer's compute_graph_scores."""
    import torch

    w = torch.zeros(A.shape[0])
    w[-n_logits:] = probs
    M = _normalized(A)
    inf = influence(M, w)
    e0, e1 = n_features, n_features + n_tokens * n_layers
    tok, err = inf[e1:e1 + n_tokens].sum(), inf[e0:e1].sum()
    replacement = float(tok / (tok + err))
    non_error = 1 - M[:, e0:e1].sum(-1)
    out = inf + w
    return replacement, float((non_error * out).sum() / out.sum())


# -- the whole graph ------------------------------------------------------------------------
@dataclass
class FullGraph:
    """The unpruned graph: what `export graph` writes."""
    ids: list[int]
    nodes: object                      # kernels.graph.Nodes
    adjacency: object                  # [N N] torch
    n_layers: int
    tset: object                       # the loaded transcoder set
    seconds: float


def transcoders_for(spec, model: LoadedModel):
    """The loaded set of a spec's pinned reference (GraphSpec, GraphInterventionSpec)."""
    from .. import transcoders as tc

    return tc.load_reference(spec.transcoders, n_layers=model.info.n_layers, d_model=model.info.d_model)


def graph_ids(model: LoadedModel, text: str) -> list[int]:
    """The prompt's tokens with a special token in front, as circuit-tracer tokenises: position 0
    holds no feature or error node (the first token's massive activations), so a content token
    there would lose its features. The model's BOS (else pad, else EOS) unless one is there."""
    ids = model.encode(text)
    tok = model.tokenizer
    if ids and ids[0] in set(tok.all_special_ids):
        return ids
    first = next((t for t in (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, *tok.all_special_ids)
                  if t is not None), None)
    return ids if first is None else [first] + ids


def full_graph(spec: GraphSpec, model: LoadedModel, progress=None) -> FullGraph:
    import torch

    from kernels import graph as kg
    from kernels.patching import fast_model

    t0 = time.perf_counter()
    tset = transcoders_for(spec, model)
    fm = fast_model(model)
    if fm is None:
        raise InvalidSpec(f"Attribution graphs need a Llama-style model; {spec.model} is not one.")
    ids = graph_ids(model, spec.text)
    if len(ids) > MAX_GRAPH_TOKENS:
        raise PromptTooLong(f"The prompt has {len(ids)} tokens; attribution graphs take at most {MAX_GRAPH_TOKENS} "
                            "(the dense adjacency grows with tokens × active features squared).")
    with model.lock, torch.inference_mode():
        try:
            gi = kg.graph_inputs(fm, ids)
        except NotImplementedError as e:          # post-norms or softcaps: not in the kernel
            raise InvalidSpec(f"Attribution graphs of {spec.model}: {e}.") from None
        nodes = kg.active_nodes(tset, gi, fm.W_U, spec.max_logits, spec.desired_logit_prob)
        n = len(nodes.layer) + fm.n_layers * len(ids) + len(ids) + len(nodes.logit_ids)
        if 4.0 * n * n > MAX_ADJACENCY_BYTES:
            raise PromptTooLong(f"{len(nodes.layer)} active features on {len(ids)} tokens: the adjacency "
                                f"({n}² floats, {4 * n * n / 1e9:.1f} GB) exceeds {MAX_ADJACENCY_BYTES / 1e9:.0f} GB; "
                                "use a shorter prompt.")
        last = [0.0]

        def tick(done, total):
            if progress and time.perf_counter() - last[0] > 2:
                last[0] = time.perf_counter()
                progress(f"graph rows {done}/{total}")
        A = kg.adjacency(fm, gi, nodes, tset.W_skip, progress=tick)
    return FullGraph(ids, nodes, A, fm.n_layers, tset, time.perf_counter() - t0)


def _feature_labels(model: LoadedModel, tset, layers, feats, k: int = 3) -> list[str]:
    """A readable label per feature from its decoder row through the final norm's scale and
    W_U: its top promoted tokens (a logit-lens label, until corpus labels exist for
    transcoder features)."""
    import torch

    from kernels.patching import fast_model

    fm = fast_model(model)
    out = []
    with torch.inference_mode():
        for l, f in zip(layers, feats):
            top = (fm.W_U @ (tset.W_dec[l][f] * fm.ln_f)).topk(k).indices.tolist()
            out.append(" ".join(repr(t) for t in model.str_tokens(top)))
    return out


@analysis(GraphSpec, GraphResult)
def compute(spec: GraphSpec, model: LoadedModel, progress=None) -> GraphResult:
    import torch

    g = full_graph(spec, model, progress)
    nd, A = g.nodes, g.adjacency
    F, K, T, L = len(nd.layer), len(nd.logit_ids), len(g.ids), g.n_layers
    probs = nd.logit_probs.float()
    node_mask, edge_mask, node_inf = prune(A, F, T, K, probs, spec.node_threshold, spec.edge_threshold)
    Ap = A * edge_mask
    rep_u, comp_u = graph_scores(A, F, L, T, K, probs)
    rep_p, comp_p = graph_scores(Ap, F, L, T, K, probs)
    keep = node_mask.nonzero()[:, 0].tolist()
    tset = g.tset
    toks = model.str_tokens(g.ids)
    feat_keep = [i for i in keep if i < F]
    labels = dict(zip(feat_keep, _feature_labels(model, tset, nd.layer[feat_keep].tolist(), nd.feature[feat_keep].tolist())))
    total_inf = float(node_inf.sum()) or 1.0
    order = torch.argsort(node_inf, descending=True)
    cumulative = torch.zeros_like(node_inf)
    cumulative[order] = torch.cumsum(node_inf[order], 0) / total_inf
    nodes = []
    for i in keep:
        common = {"influence": round(float(node_inf[i]) / total_inf, 6), "cumulative": round(float(cumulative[i]), 6)}
        if i < F:
            l, p, f = int(nd.layer[i]), int(nd.pos[i]), int(nd.feature[i])
            nodes.append({"id": f"{l}_{f}_{p}", "kind": "feature", "layer": l, "pos": p, "feature": f,
                          "activation": round(float(nd.activation[i]), 5), **common, "label": labels[i]})
        elif i < F + L * T:
            l, p = divmod(i - F, T)
            nodes.append({"id": f"err_{l}_{p}", "kind": "error", "layer": l, "pos": p, "feature": None,
                          "activation": round(float(nd.errors[l, p].norm()), 5), **common,
                          "label": f"MLP {l} error at {toks[p]!r}"})
        elif i < F + L * T + T:
            p = i - F - L * T
            nodes.append({"id": f"E_{g.ids[p]}_{p}", "kind": "embedding", "layer": -1, "pos": p,
                          "feature": int(g.ids[p]), "activation": None, **common, "label": toks[p]})
        else:
            k = i - F - L * T - T
            tid = int(nd.logit_ids[k])
            nodes.append({"id": f"{L + 1}_{tid}_{T - 1}", "kind": "logit", "layer": L, "pos": T - 1, "feature": tid,
                          "activation": round(float(nd.logit_probs[k]), 6), **common,
                          "label": model.str_tokens([tid])[0]})
    where = {n: j for j, n in enumerate(keep)}
    t_idx, s_idx = edge_mask.nonzero(as_tuple=True)
    ok = torch.tensor([where.get(int(t), -1) >= 0 and where.get(int(s), -1) >= 0 for t, s in zip(t_idx, s_idx)],
                      dtype=torch.bool) if len(t_idx) else torch.zeros(0, dtype=torch.bool)
    t_idx, s_idx = t_idx[ok], s_idx[ok]
    logits = [{"token": model.str_tokens([int(i)])[0], "token_id": int(i), "prob": round(float(p), 6)}
              for i, p in zip(nd.logit_ids, nd.logit_probs)]
    return GraphResult(
        tokens=toks, token_ids=list(map(int, g.ids)), transcoders=g.tset.id, logits=logits, nodes=nodes,
        edge_source=np.array([where[int(s)] for s in s_idx], dtype=np.int32),
        edge_target=np.array([where[int(t)] for t in t_idx], dtype=np.int32),
        edge_weight=A[t_idx, s_idx].numpy().astype(np.float32),
        scores={"replacement_score": rep_p, "completeness_score": comp_p,
                "replacement_score_unpruned": rep_u, "completeness_score_unpruned": comp_u},
        n_active_features=F, n_nodes_unpruned=int(A.shape[0]), seconds=round(g.seconds, 2))


def edge_list(r: GraphResult) -> list[dict]:
    ids = [n["id"] for n in r.nodes]
    return [{"source": ids[s], "target": ids[t], "weight": float(w)}
            for s, t, w in zip(r.edge_source.tolist(), r.edge_target.tolist(), r.edge_weight.tolist())]


# -- export ---------------------------------------------------------------------------------
def export_circuit_tracer(spec: GraphSpec, path, model: LoadedModel | None = None) -> dict:
    """The unpruned graph as circuit-tracer's Graph file (`Graph.from_pt` loads it): recomputed
    from the spec (the store keeps the pruned graph only). Logit targets are written as a
    tensor of token ids, the form from_pt converts; cfg as a transformers config
    with circuit-tracer's field names, importable wherever circuit-tracer is."""
    import torch

    from ..model import load_model

    model = model or load_model(spec.model)
    g = full_graph(spec, model)
    nd = g.nodes
    info = model.info
    hf_cfg = model.hf_config()
    # a fresh config of the model's own class with the basic fields only: the class exists
    # under the same name in the transformers circuit-tracer pins (4.57), unlike the base
    # class (renamed PreTrainedConfig in 5.x), and carries nothing version-specific
    cfg = type(hf_cfg)(num_hidden_layers=info.n_layers, hidden_size=info.d_model, head_dim=info.d_head,
                       num_attention_heads=info.n_heads, intermediate_size=info.d_mlp, vocab_size=info.d_vocab,
                       num_key_value_heads=info.n_kv_heads, architectures=list(hf_cfg.architectures or []))
    cfg.name_or_path = info.hf_name
    F = len(nd.layer)
    d = {"input_string": model.decode(g.ids), "adjacency_matrix": g.adjacency.contiguous(), "cfg": cfg,
         "active_features": torch.stack([nd.layer, nd.pos, nd.feature], 1),
         "logit_targets": nd.logit_ids.clone(), "logit_probabilities": nd.logit_probs.float().clone(),
         "vocab_size": info.d_vocab, "input_tokens": torch.tensor(g.ids), "selected_features": torch.arange(F),
         "activation_values": nd.activation.clone(), "scan": f"{spec.model}/{g.tset.id}"}
    torch.save(d, str(path))
    return {"path": str(path), "format": "circuit-tracer", "nodes": int(g.adjacency.shape[0]), "n_active_features": F}


def neuronpedia_json(spec: GraphSpec, r: GraphResult, slug: str) -> dict:
    """The pruned graph as the JSON circuit-tracer's and Neuronpedia's graph frontends read
    (circuit_tracer.utils.create_graph_files): metadata, qParams, nodes, links."""
    L = max((n["layer"] for n in r.nodes if n["kind"] == "logit"), default=0)
    top = max((n["activation"] or 0 for n in r.nodes if n["kind"] == "logit"), default=0)
    out_nodes, rename = [], {}
    for n in r.nodes:
        k, l, p = n["kind"], n["layer"], n["pos"]
        if k == "feature":
            nid, js = n["id"], f"{l}_{n['feature']}-0"
            extra = {"feature": (l + n["feature"]) * (l + n["feature"] + 1) // 2 + n["feature"], "layer": str(l),
                     "feature_type": "cross layer transcoder", "activation": n["activation"], "clerp": n["label"]}
        elif k == "error":
            nid, js = f"0_{l}_{p}", f"{l}_{p}-0"
            extra = {"feature": -1, "layer": str(l), "feature_type": "mlp reconstruction error"}
        elif k == "embedding":
            nid, js = n["id"], f"E_{n['feature']}-{p}"
            extra = {"feature": p, "layer": "E", "feature_type": "embedding"}
        else:
            nid, js = n["id"], f"L_{n['feature']}-{p}"
            extra = {"feature": n["feature"], "layer": str(L + 1), "feature_type": "logit", "token_prob": n["activation"],
                     "is_target_logit": n["activation"] == top, "clerp": f'Output "{n["label"]}" (p={n["activation"]:.3f})'}
        rename[n["id"]] = nid
        out_nodes.append({"node_id": nid, "jsNodeId": js, "ctx_idx": p, "run_idx": 0, "reverse_ctx_idx": 0,
                          "influence": n["cumulative"], "token_prob": 0.0, "is_target_logit": False, "clerp": "",
                          "activation": None, **extra})
    links = [{"source": rename[e["source"]], "target": rename[e["target"]], "weight": e["weight"]} for e in edge_list(r)]
    meta = {"slug": slug, "scan": f"{spec.model}/{r.transcoders}", "transcoder_list": [], "prompt_tokens": r.tokens,
            "prompt": spec.text, "node_threshold": spec.node_threshold, "schema_version": 1}
    return {"metadata": meta, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                                          "sg_pos": ""}, "nodes": out_nodes, "links": links}


# -- CLI ----------------------------------------------------------------------------------
def add_cli_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", required=True)
    p.add_argument("--transcoders", default="", help="set id or folder (default: the model's shipped set)")
    p.add_argument("--max-logits", type=int, default=10)
    p.add_argument("--desired-logit-prob", type=float, default=0.95)
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)


def spec_from_args(a) -> GraphSpec:
    return GraphSpec(model=a.model, text=a.text, transcoders=a.transcoders, max_logits=a.max_logits,
                     desired_logit_prob=a.desired_logit_prob, node_threshold=a.node_threshold,
                     edge_threshold=a.edge_threshold)


def run_cli(a) -> dict:
    from ..runner import run

    out = run(spec_from_args(a), progress=lambda m: print(m, file=sys.stderr))
    r = out.result
    return {"run_key": out.run_key, "from_store": out.from_store, "model": a.model, "tokens": r.tokens,
            "transcoders": r.transcoders, "logits": r.logits, "nodes": r.nodes, "edges": edge_list(r),
            **{k: round(v, 6) for k, v in r.scores.items()}, "n_active_features": r.n_active_features,
            "n_nodes_unpruned": r.n_nodes_unpruned, "seconds": r.seconds,
            "compute_seconds": round(out.compute_seconds, 3)}
