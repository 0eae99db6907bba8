"""Edge-level circuits: the computational graph of a model with canonical weights (Llama-style,
Gemma-3; kernels.patching.FastModel), EAP / EAP-IG scores, and
running a circuit (edge patching), fast and batched, beside a plain per-node reference.

The graph (Conmy et al. 2023; Syed et al. 2023; Hanna et al. 2024):
- upstream nodes (they write to the residual stream): `input` (the token embeddings), every
  attention head `A{l}.{h}` (its output z_h @ W_O[h], one slice of the attention output) and
  every MLP `M{l}`;
- downstream nodes (they read from it): every head, every MLP and `logits`.
- an edge u -> d exists when u writes before d reads: into a head of layer l from `input` and
  every head and MLP of layers < l; into M{l} also from the heads of layer l; into `logits`
  from every upstream node.
A head's input is ONE node input (the residual stream it reads, before its RMSNorm, shared by
its query, key and value); q/k/v are not split. Each head gets its own copy of that input, so
edges into two heads of one layer are separate. A node's input is the sum of the outputs of
all upstream nodes (the residual stream, exactly: SmolLM2 and Gemma-3 have no attention/MLP biases).

Post-attention norms (Gemma): the layer adds norm(sum_h o_h) = sum_h o_h * w / rms(sum_h o_h), so
head h's output is its share o_h * w / rms(sum over the layer's heads of this run), with o_h
computed from its own input. The shares sum to the layer's attention output exactly, so every
edge still gives the clean run and none the corrupt run. A post-MLP norm lies inside the MLP node.

Running a circuit (standard edge patching): every node's input is
    sum over upstream u of  [out_u in this run  if u -> d is in the circuit  else  out_u in the corrupt run]
where out_input is the clean embedding. With every edge the run is the clean run; with none it
is the corrupt run. Computed as  in_d = corrupt_in_d + sum_u m[u, d] (out_u - corrupt_out_u).

EAP score of u -> d: (corrupt_out_u - clean_out_u) . dM/d in_d at the clean run, summed over
positions and averaged over pairs: the first-order estimate of the metric change when the edge
alone is corrupted. EAP-IG averages dM/d in_d over `steps` runs whose embeddings lie on the line
from the corrupt to the clean embeddings (alpha = 1/steps ... 1), as in Hanna et al. 2024.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .patching import FastModel


# ---------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------
class Graph:
    """Node names and the edge structure for n_layers x n_heads (upstream U, downstream D)."""

    def __init__(self, n_layers: int, n_heads: int):
        self.n_layers, self.n_heads = n_layers, n_heads
        self.up = ["input"]
        self.down = []
        for layer in range(n_layers):
            heads = [f"A{layer}.{h}" for h in range(n_heads)]
            self.up += heads + [f"M{layer}"]
            self.down += heads + [f"M{layer}"]
        self.down.append("logits")
        self.up_index = {n: i for i, n in enumerate(self.up)}
        self.down_index = {n: i for i, n in enumerate(self.down)}
        U = len(self.up)
        # upstream nodes available to each downstream node: a prefix of `up`
        self.n_before = torch.tensor([self.prefix(n) for n in self.down])
        self.valid = torch.arange(U)[:, None] < self.n_before[None, :]           # [U D] bool

    def prefix(self, down_name: str) -> int:
        """How many upstream nodes (a prefix of `up`) write before this downstream node reads."""
        H = self.n_heads
        if down_name == "logits":
            return len(self.up)
        layer = node_layer(down_name)
        return 1 + layer * (H + 1) + (H if down_name.startswith("M") else 0)

    def head_cols(self, layer: int) -> slice:
        s = layer * (self.n_heads + 1)
        return slice(s, s + self.n_heads)

    def mlp_col(self, layer: int) -> int:
        return layer * (self.n_heads + 1) + self.n_heads

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())


def node_layer(name: str) -> float:
    """x position of a node: input -1, A{l}.h / M{l} at l (MLP at l + 0.5), logits n_layers."""
    if name == "input":
        return -1
    if name == "logits":
        return float("inf")
    if name.startswith("A"):
        return int(name[1:].split(".")[0])
    return int(name[1:])


# ---------------------------------------------------------------------------------------
# Per-head attention: each head reads its own input
# ---------------------------------------------------------------------------------------
@dataclass
class HeadWeights:
    ln: torch.Tensor; eps: float
    wq: torch.Tensor; wk: torch.Tensor; wv: torch.Tensor   # [H D d_model] (k, v repeated per query head)
    wo: torch.Tensor                                        # [H d_model D]
    q_norm: torch.Tensor | None = None                      # [D] (Gemma-3)
    k_norm: torch.Tensor | None = None
    post: torch.Tensor | None = None                        # [d_model] post-attention norm scale


def head_weights(fm: FastModel, j: int) -> HeadWeights:
    L, H, KV, D = fm.layers[j], fm.n_heads, fm.n_kv, fm.d_head
    for b in ("bq", "bk", "bv", "bo"):
        if L[b] is not None:
            raise NotImplementedError("the circuit graph assumes attention without biases")
    kv_of = torch.arange(H) // (H // KV)                    # query head h reads kv head h // rep
    d = L["wq"].shape[1]
    return HeadWeights(L["ln1"], fm.eps, L["wq"].view(H, D, d), L["wk"].view(KV, D, d)[kv_of],
                       L["wv"].view(KV, D, d)[kv_of], L["wo"].view(d, H, D).permute(1, 0, 2),
                       L["q_norm"], L["k_norm"], L["ln1_post"])


def head_shares(fm: FastModel, raw: torch.Tensor, post: torch.Tensor | None, dim: int = 1) -> torch.Tensor:
    """Each head's share of the attention output from the raw per-head outputs o_h (heads on
    axis `dim`): o_h itself without a post-attention norm, else o_h * w / rms(sum_h o_h)."""
    if post is None:
        return raw
    total = raw.sum(dim).float()
    r = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + fm.eps).unsqueeze(dim)
    return post * (raw * r).to(raw.dtype)


def heads_forward(fm: FastModel, j: int, x: torch.Tensor, W: HeadWeights | None = None) -> torch.Tensor:
    """Outputs [B H T d_model] of the heads of block j, head h reading x[:, h] [B H T d_model]."""
    W = W or head_weights(fm, j)
    B, H, T, _ = x.shape
    cos, sin = (t.clone() for t in fm.rope(T, j))           # [T D] (the cache may hold inference tensors)
    h = fm._rms(x, W.ln, W.eps)
    q = torch.einsum("bhtk,hdk->bhtd", h, W.wq)
    k = torch.einsum("bhtk,hdk->bhtd", h, W.wk)
    v = torch.einsum("bhtk,hdk->bhtd", h, W.wv)
    if W.q_norm is not None:
        q, k = fm._rms(q, W.q_norm), fm._rms(k, W.k_norm)
    half = q.shape[-1] // 2

    def rot(a):
        return a * cos + torch.cat((-a[..., half:], a[..., :half]), -1) * sin
    scores = fm.scores(j, rot(q), rot(k).transpose(-1, -2)) + fm.causal_mask(T, j)  # [B H T T]
    z = scores.softmax(-1, dtype=torch.float32).to(x.dtype) @ v                      # [B H T D]
    return head_shares(fm, torch.einsum("bhtd,hkd->bhtk", z, W.wo), W.post)


def mlp_forward(fm: FastModel, j: int, x: torch.Tensor) -> torch.Tensor:
    return fm.mlp(j, x)[1]


# ---------------------------------------------------------------------------------------
# Metrics of a batch of runs (one pair per row), from the final residual at the last position
# ---------------------------------------------------------------------------------------
@dataclass
class PairMetric:
    kind: str                       # logit_diff | prob | kl  (raw: normalisation is the caller's)
    answer: torch.Tensor            # [B] long
    wrong: torch.Tensor             # [B] long
    clean_logprobs: torch.Tensor | None = None   # [B V] for kl

    def __call__(self, fm: FastModel, final: torch.Tensor) -> torch.Tensor:   # [B d_model] -> [B]
        if self.kind == "logit_diff" and not fm.final_softcap:
            w = fm.W_U[self.answer] - fm.W_U[self.wrong]
            b = 0.0 if fm.b_U is None else fm.b_U[self.answer] - fm.b_U[self.wrong]
            return (fm.final_norm(final) * w).sum(-1) + b
        logits = fm.logits(final).float()
        if self.kind == "logit_diff":
            return (logits.gather(-1, self.answer[:, None]) - logits.gather(-1, self.wrong[:, None]))[:, 0]
        if self.kind == "prob":
            return logits.softmax(-1).gather(-1, self.answer[:, None])[:, 0]
        lp = logits.log_softmax(-1)
        return (self.clean_logprobs.exp() * (self.clean_logprobs - lp)).sum(-1)

    def repeat(self, n: int) -> "PairMetric":
        """The metric of n consecutive copies of the batch (rows i*B..i*B+B-1 = pairs 0..B-1)."""
        r = (lambda t: None if t is None else t.repeat(n, *[1] * (t.dim() - 1)))
        return PairMetric(self.kind, r(self.answer), r(self.wrong), r(self.clean_logprobs))


# ---------------------------------------------------------------------------------------
# Forward over the graph
# ---------------------------------------------------------------------------------------
@dataclass
class GraphRun:
    outs: torch.Tensor                 # [B U T d_model] every upstream node's output
    inputs: list[torch.Tensor]         # per layer: head inputs [B H T d], MLP input [B T d]; then final [B T d]
    metric: torch.Tensor               # [B]


def run_full(fm: FastModel, emb: torch.Tensor, metric: PairMetric, graph: Graph) -> GraphRun:
    """The ordinary forward from embeddings [B T d], with every node's input kept as its own
    tensor (head inputs are per-head copies) so gradients wrt node inputs can be taken."""
    B, T, d = emb.shape
    H = fm.n_heads
    outs, inputs = [emb], []
    resid = emb
    for j in range(fm.n_layers):
        xh = resid.unsqueeze(1).repeat(1, H, 1, 1)                     # [B H T d]
        ho = heads_forward(fm, j, xh)                                  # [B H T d]
        resid = resid + ho.sum(1)
        xm = resid.clone()
        mo = mlp_forward(fm, j, xm)
        resid = resid + mo
        inputs += [xh, xm]
        outs += [ho.transpose(0, 1)[i] for i in range(H)] + [mo]
    final = resid.clone()
    inputs.append(final)
    return GraphRun(torch.stack(outs, 1), inputs, metric(fm, final[:, -1]))


def input_grads(run: GraphRun, graph: Graph) -> torch.Tensor:
    """dM/d in_d for every downstream node [B D T d] (M summed over the batch)."""
    grads = torch.autograd.grad(run.metric.sum(), run.inputs)
    out = []
    for j in range(graph.n_layers):
        out += [grads[2 * j].transpose(0, 1)[i] for i in range(graph.n_heads)] + [grads[2 * j + 1]]
    out.append(grads[-1])
    return torch.stack(out, 1)


@dataclass
class Scores:
    scores: torch.Tensor        # [U D] float64, 0 where no edge; averaged over pairs (raw metric)
    clean_metric: torch.Tensor  # [B]
    corrupt_metric: torch.Tensor


def edge_scores(fm: FastModel, clean_ids, corrupt_ids, metric: PairMetric, graph: Graph,
                method: str = "eap", steps: int = 5) -> Scores:
    """EAP or EAP-IG scores of every edge for a batch of pairs (ids [B T])."""
    dev = fm.W_U.device
    clean_ids = torch.as_tensor(clean_ids, device=dev)
    corrupt_ids = torch.as_tensor(corrupt_ids, device=dev)
    B = clean_ids.shape[0]
    with torch.inference_mode():
        e_clean, e_corrupt = fm.embed(clean_ids), fm.embed(corrupt_ids)
        corrupt = run_full(fm, e_corrupt, metric, graph)
        if method == "eap-ig":
            clean_run = run_full(fm, e_clean, metric, graph)
    corrupt_outs = corrupt.outs.clone()
    with torch.enable_grad():
        if method == "eap":
            run = run_full(fm, e_clean.clone().requires_grad_(True), metric, graph)
            grads = input_grads(run, graph)                               # [B D T d]
            clean_outs, clean_m = run.outs.detach(), run.metric.detach()
        elif method == "eap-ig":
            grads = 0
            for k in range(1, steps + 1):
                a = k / steps
                emb = (e_corrupt + a * (e_clean - e_corrupt)).clone().requires_grad_(True)
                run = run_full(fm, emb, metric, graph)
                grads = grads + input_grads(run, graph)
            grads = grads / steps
            clean_outs, clean_m = clean_run.outs.clone(), clean_run.metric.clone()
        else:
            raise ValueError(f"unknown method {method!r}")
    with torch.inference_mode():
        delta = (corrupt_outs - clean_outs).double()                    # [B U T d]
        s = torch.einsum("butk,bdtk->ud", delta, grads.double()) / B
        s = s * graph.valid.to(s.device)
    return Scores(s, clean_m, corrupt.metric.clone())


# ---------------------------------------------------------------------------------------
# Running circuits (edge patching), batched over circuits x pairs
# ---------------------------------------------------------------------------------------
@dataclass
class CorruptRun:
    outs: torch.Tensor          # [B U T d]
    head_in: list[torch.Tensor] # per layer [B T d] (the corrupt resid_pre)
    mlp_in: list[torch.Tensor]  # per layer [B T d] (the corrupt resid_mid)
    final: torch.Tensor         # [B T d]
    metric: torch.Tensor        # [B]


def corrupt_run(fm: FastModel, corrupt_ids, metric: PairMetric, graph: Graph) -> CorruptRun:
    with torch.inference_mode():
        r = run_full(fm, fm.embed(torch.as_tensor(corrupt_ids, device=fm.W_U.device)), metric, graph)
        return CorruptRun(r.outs, [x[:, 0] for x in r.inputs[0:-1:2]], r.inputs[1::2], r.inputs[-1], r.metric)


def run_circuits(fm: FastModel, clean_ids, corrupt: CorruptRun, masks: torch.Tensor, metric: PairMetric | None,
                 graph: Graph) -> torch.Tensor:
    """The metric of each circuit on each pair: masks [C U D] (1 = edge in the circuit) ->
    values [C B] (metric None: the final residual at the last position [C B d]). Rows of a
    batch are circuit-major (C*B rows)."""
    dev = fm.W_U.device
    clean_ids = torch.as_tensor(clean_ids, device=dev)
    C, B = masks.shape[0], clean_ids.shape[0]
    H = graph.n_heads
    with torch.inference_mode():
        m = (masks.to(dev, corrupt.outs.dtype) * graph.valid.to(dev)).repeat_interleave(B, 0)   # [CB U D]
        rep = lambda t: t.repeat(C, *[1] * (t.dim() - 1))                                      # noqa: E731
        c_outs = rep(corrupt.outs)                                                            # [CB U T d]
        N, U, T, d = c_outs.shape
        delta = torch.zeros_like(c_outs)
        delta[:, 0] = rep(fm.embed(clean_ids)) - c_outs[:, 0]
        n = 1                                                # upstream nodes computed so far

        def gather(cols, base):                              # inputs of downstream columns
            w = m[:, :n, cols]                                # [N n k]
            add = torch.bmm(w.transpose(1, 2), delta[:, :n].reshape(N, n, T * d)).view(N, -1, T, d)
            return base + add
        for j in range(fm.n_layers):
            hc = graph.head_cols(j)
            xh = gather(hc, rep(corrupt.head_in[j])[:, None])                                 # [N H T d]
            ho = heads_forward(fm, j, xh)
            delta[:, n:n + H] = ho - c_outs[:, n:n + H]
            n += H
            xm = gather(slice(graph.mlp_col(j), graph.mlp_col(j) + 1), rep(corrupt.mlp_in[j])[:, None])[:, 0]
            delta[:, n] = mlp_forward(fm, j, xm) - c_outs[:, n]
            n += 1
        xf = gather(slice(len(graph.down) - 1, len(graph.down)), rep(corrupt.final)[:, None])[:, 0]
        if metric is None:                                   # the final residual itself [C B d]
            return xf[:, -1].reshape(C, B, -1)
        return metric.repeat(C)(fm, xf[:, -1]).view(C, B)


# ---------------------------------------------------------------------------------------
# Reference: a plain per-node loop over one pair, with the bridge's cached activations
# ---------------------------------------------------------------------------------------
def _ref_shares(fm: FastModel, j: int, raw: torch.Tensor) -> torch.Tensor:
    """raw [T H d] per-head projections -> each head's share of block j's attention output."""
    post = fm.layers[j]["ln1_post"]
    if post is None:
        return raw
    r = torch.rsqrt(raw.sum(1).float().pow(2).mean(-1, keepdim=True) + fm.eps)   # [T 1]
    return post * (raw * r[:, None]).to(raw.dtype)


def reference_node_outputs(model, fm: FastModel, ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """Every upstream node's output [T d] on one prompt, from a hooked run of the model
    (hook_embed, hook_z projected through each head's W_O slice and, with a post-attention
    norm, scaled by the rms of hook_z's full projection; hook_mlp_out)."""
    from backend.sites import Component, Site, hook_name

    H, D = fm.n_heads, fm.d_head
    names = {hook_name(Site(Component.EMBED))} | {hook_name(Site(c, j)) for j in range(fm.n_layers)
                                                  for c in (Component.Z, Component.MLP_OUT)}
    with torch.inference_mode():
        _, cache = model.run_with_cache([list(ids)], names)
        out = {"input": cache[hook_name(Site(Component.EMBED))][0]}
        for j in range(fm.n_layers):
            z = cache[hook_name(Site(Component.Z, j))][0]                                   # [T H D]
            raw = torch.stack([z[:, h] @ fm.layers[j]["wo"][:, h * D:(h + 1) * D].T for h in range(H)], 1)
            sh = _ref_shares(fm, j, raw)
            for h in range(H):
                out[f"A{j}.{h}"] = sh[:, h]
            out[f"M{j}"] = cache[hook_name(Site(Component.MLP_OUT, j))][0]
    return out


def reference_circuit_metric(model, fm: FastModel, clean_ids: Sequence[int], corrupt_ids: Sequence[int] | None,
                             edges: set[tuple[str, str]], metric: PairMetric, graph: Graph,
                             ablated: dict[str, torch.Tensor] | None = None) -> float:
    """The metric of one circuit on one pair, node by node in topological order.

    Edges outside the circuit carry the corrupted prompt's outputs (reference_node_outputs), or
    the `ablated` outputs {node: [T d]} when given (a mean over prompts, zeros); each node's
    input is summed edge by edge in a Python loop; a head's output is block j's full-layer
    attention (kernels.patching.FastModel.attn, tested equal to the model) on that head's
    input, keeping head h's z.
    """
    dev = fm.W_U.device
    H = fm.n_heads
    T = len(clean_ids)
    corrupt_out = ablated if ablated is not None else reference_node_outputs(model, fm, corrupt_ids)
    shares = lambda j, raw: _ref_shares(fm, j, raw)   # noqa: E731
    with torch.inference_mode():
        D = fm.d_head
        out = {"input": fm.embed(torch.as_tensor([list(clean_ids)], device=dev))[0]}
        rb, rt = torch.zeros(T, dtype=torch.long, device=dev), torch.arange(T, device=dev)
        empty = out["input"].new_zeros(fm.n_kv, T, D)

        def node_input(d):
            x = torch.zeros_like(out["input"])
            for u in graph.up[:graph.prefix(d)]:
                x = x + (out[u] if (u, d) in edges else corrupt_out[u])
            return x
        for j in range(fm.n_layers):
            raw = []
            for h in range(H):
                _, z, _, _, _, _ = fm.attn(j, node_input(f"A{j}.{h}"), rb, rt, 1, empty, empty, T)
                keep = torch.zeros_like(z)
                keep[:, h] = z[:, h]
                raw.append(fm._lin(keep.reshape(T, -1), fm.layers[j]["wo"], fm.layers[j]["bo"]))
            sh = shares(j, torch.stack(raw, 1))
            for h in range(H):
                out[f"A{j}.{h}"] = sh[:, h]
            out[f"M{j}"] = fm.mlp(j, node_input(f"M{j}"))[1]
        final = node_input("logits")
        return float(metric(fm, final[-1:])[0])


# ---------------------------------------------------------------------------------------
# Circuits under other ablations: the ablated run of edges outside a circuit
# ---------------------------------------------------------------------------------------
def ablated_run(corrupt: CorruptRun, kind: str, n_pairs: int) -> CorruptRun:
    """What edges outside a circuit carry: "resample" the corrupted run of each pair itself;
    "mean" every node's output averaged over the corrupted prompts of the task (one reference
    set, broadcast to every pair); "zero" nothing at all (zero outputs, zero inputs). Node
    inputs are sums of upstream outputs, so the mean of the corrupted inputs is the input of
    the mean outputs."""
    if kind == "resample":
        return corrupt

    def f(t):
        m = t.mean(0, keepdim=True) if kind == "mean" else torch.zeros_like(t[:1])
        return m.expand(n_pairs, *t.shape[1:]).contiguous()
    if kind not in ("mean", "zero"):
        raise ValueError(f"unknown ablation {kind!r}")
    return CorruptRun(f(corrupt.outs), [f(x) for x in corrupt.head_in], [f(x) for x in corrupt.mlp_in],
                      f(corrupt.final), corrupt.metric)


def circuit_finals(fm: FastModel, clean_ids, corrupt: CorruptRun, masks: torch.Tensor, graph: Graph) -> torch.Tensor:
    """The final residual at the last position [C B d_model] of each circuit (masks [C U D]) run by
    edge patching against `corrupt` (any ablated run): the input of every metric."""
    return run_circuits(fm, clean_ids, corrupt, masks, None, graph)


# ---------------------------------------------------------------------------------------
# ACDC (Conmy et al. 2023) on the fast edge patching
# ---------------------------------------------------------------------------------------
@dataclass
class ACDCOut:
    mask: torch.Tensor                 # [U D] bool: the edges kept
    log: list[tuple[int, int, float, bool]]   # every visited or skipped edge in order: (u, d, change, removed)
    evaluated: list[bool]              # per log row: a forward pass measured it (False: its receiver
                                       # no longer reached the logits, the change is 0 exactly)
    forward_passes: int                # the algorithm's passes: one per measured edge, plus the start
    kernel_rows: int                   # trial runs the kernel computed (speculative ones included)
    clean_metric: torch.Tensor         # [B] raw metric of the clean run
    corrupt_metric: torch.Tensor       # [B]
    final_value: float                 # the minimised metric of the final circuit (mean over pairs)


class _ACDCState:
    """The current circuit's run: every node's output and input under the current mask."""

    def __init__(self, fm: FastModel, graph: Graph, clean: GraphRun, corrupt: CorruptRun):
        self.fm, self.g = fm, graph
        H = graph.n_heads
        self.c_out = corrupt.outs                                          # [B U T d]
        self.out = clean.outs.clone()                                      # [B U T d]
        ins = []
        for j in range(graph.n_layers):
            ins += [clean.inputs[2 * j][:, h] for h in range(H)] + [clean.inputs[2 * j + 1]]
        ins.append(clean.inputs[-1])
        self.inp = torch.stack(ins, 1)                                     # [B D T d]
        self.mask = graph.valid.clone().to(self.out.device)                # [U D] bool
        self.up_of_down = torch.tensor([graph.up_index.get(n, -1) for n in graph.down])
        self.weights = [head_weights(fm, j) for j in range(graph.n_layers)]

    def _heads(self, j: int, idx: list[int], x: torch.Tensor) -> torch.Tensor:
        """Outputs [N len(idx) T d] of heads idx of block j reading x [N len(idx) T d]. With a
        post-attention norm every head's share depends on all of them: idx must be every head."""
        W = self.weights[j]
        if W.post is not None or len(idx) == self.g.n_heads:
            return heads_forward(self.fm, j, x, W)
        t = torch.as_tensor(idx, device=x.device)
        sub = HeadWeights(W.ln, W.eps, W.wq[t], W.wk[t], W.wv[t], W.wo[t], W.q_norm, W.k_norm, None)
        return heads_forward(self.fm, j, x, sub)

    def evaluate(self, d: int, x_d: torch.Tensor, metric, commit: bool = False) -> torch.Tensor:
        """The metric rows [K*B] of K trial inputs x_d [K B T d] of downstream node d, with every
        node after d recomputed from its current input plus the change of its kept senders. With
        commit (K = 1) the recomputed outputs and inputs become the current state."""
        g, fm = self.g, self.fm
        K, B = x_d.shape[:2]
        H, L = g.n_heads, g.n_layers
        D = len(g.down)
        N = K * B
        rep = lambda t: t.unsqueeze(0).expand(K, *t.shape).reshape(N, *t.shape[1:])   # noqa: E731
        if d == D - 1:                                                     # logits: no node to recompute
            if commit:
                self.inp[:, d] = x_d[0]
            return metric.repeat(K)(fm, x_d.reshape(N, *x_d.shape[2:])[:, -1])
        changed: list[int] = []                                            # upstream indices
        diffs: list[torch.Tensor] = []                                     # [N T d] new - current output
        new_in: dict[int, torch.Tensor] = {d: x_d.reshape(N, *x_d.shape[2:])}

        def inputs_of(cols: list[int]) -> torch.Tensor:                    # [N len(cols) T d]
            base = rep(self.inp[:, cols])
            if not changed:
                return base
            m = self.mask[torch.as_tensor(changed)][:, cols].to(base.dtype)   # [nc k]
            return base + torch.einsum("nctk,ce->netk", torch.stack(diffs, 1), m)

        def record(ups: list[int], outs: torch.Tensor):                    # outs [N k T d]
            for i, u in enumerate(ups):
                changed.append(u)
                diffs.append(outs[:, i] - rep(self.out[:, u]))
        dname = g.down[d]
        start = int(node_layer(dname))
        for j in range(start, L):
            hc = list(range(*g.head_cols(j).indices(D)))
            cols = [c for c in hc if c >= d and (c == d or (changed and bool(self.mask[changed][:, c].any())))]
            if cols:
                if self.weights[j].post is not None:                       # the layer's shares move together
                    cols_all = hc
                else:
                    cols_all = cols
                x = inputs_of(cols_all)
                if d in cols_all:
                    x = x.clone()
                    x[:, cols_all.index(d)] = new_in[d]
                for c in cols_all:
                    new_in[c] = x[:, cols_all.index(c)]
                outs = self._heads(j, [c - hc[0] for c in cols_all], x)
                record([int(self.up_of_down[c]) for c in cols_all], outs)
            mc = g.mlp_col(j)
            if mc >= d and (mc == d or (changed and bool(self.mask[changed][:, mc].any()))):
                x = new_in[d] if mc == d else inputs_of([mc])[:, 0]
                new_in[mc] = x
                record([int(self.up_of_down[mc])], mlp_forward(fm, j, x)[:, None])
        final = inputs_of([D - 1])[:, 0]
        if commit:
            for c, x in new_in.items():
                self.inp[:, c] = x
            for u, df in zip(changed, diffs):
                self.out[:, u] += df
            self.inp[:, D - 1] = final
        return metric.repeat(K)(fm, final[:, -1])


def output_group(fm: FastModel, graph: Graph, name: str) -> list[str]:
    """The upstream nodes whose outputs move when node `name`'s input does: itself, or with a
    post-attention norm (Gemma-3) every head of its layer (the norm's scale is the rms of their
    sum, so each head's share depends on all of them). A node whose group has no outgoing edge
    left changes nothing downstream."""
    if name.startswith("A") and fm.layers[int(node_layer(name))]["ln1_post"] is not None:
        j = int(node_layer(name))
        return [f"A{j}.{h}" for h in range(graph.n_heads)]
    return [name]


def acdc(fm: FastModel, clean_ids, corrupt_ids, metric: PairMetric, graph: Graph, threshold: float,
         sign: float = 1.0, scale: float = 1.0, max_batch: int = 64) -> ACDCOut:
    """ACDC: visit downstream nodes from the logits back (reverse topological order) and, for
    each, its incoming edges from the latest sender to the earliest; remove an edge when the
    minimised metric v = sign * mean(metric) / scale (KL: sign 1; a logit difference or a
    probability: sign -1) changes by less than `threshold` when it is removed from the current
    circuit (change = v(without it) - v(current)), else keep it.

    Exact and fast:
    - while a node's incoming edges are visited, every node before it still has all its
      edges, so its senders carry their clean outputs, and only the node and the nodes it
      reaches through kept edges are recomputed for a trial;
    - a node that no longer reaches the logits through kept edges changes nothing: its edges
      are removed with change 0 exactly, without a pass (as ACDC drops such nodes); with a
      post-attention norm a head reaches nothing only when no head of its layer does
      (output_group);
    - trials run in batches that assume the edges before them in the batch are removed; the
      batch is read in order up to the first edge kept, and the next batch starts after it.
    """
    dev = fm.W_U.device
    clean_ids = torch.as_tensor(clean_ids, device=dev)
    corrupt_ids = torch.as_tensor(corrupt_ids, device=dev)
    B = clean_ids.shape[0]
    with torch.inference_mode():
        cr = corrupt_run(fm, corrupt_ids, metric, graph)
        cl = run_full(fm, fm.embed(clean_ids), metric, graph)
        st = _ACDCState(fm, graph, cl, cr)

        def value(rows):                                                   # [K*B] -> [K] float64
            return (sign * rows.double().view(-1, B).mean(1) / scale)
        D = len(graph.down)
        current = float(value(st.evaluate(D - 1, st.inp[None, :, D - 1], metric))[0])
        log, evaluated = [], []
        passes, rows = 1, 1
        K = 8
        for d in reversed(range(D)):
            senders = list(reversed(range(graph.prefix(graph.down[d]))))
            group = [graph.up_index[n] for n in output_group(fm, graph, graph.down[d])] if d < D - 1 else []
            if group and not bool(st.mask[group].any()):                  # reaches nothing: drop its inputs
                for u in senders:
                    st.mask[u, d] = False
                    log.append((u, d, 0.0, True))
                    evaluated.append(False)
                continue
            delta = st.out[:, senders] - st.c_out[:, senders]              # [B S T d]
            x_d = st.inp[:, d].clone()                                     # [B T d]
            i = 0
            while i < len(senders):
                k = min(K, len(senders) - i)
                trial = x_d[None] - delta[:, i:i + k].transpose(0, 1).cumsum(0)   # [k B T d]
                vals = value(st.evaluate(d, trial, metric)).tolist()
                rows += k
                prev, took, stop = current, 0, False
                for t in range(k):
                    change = vals[t] - prev
                    u = senders[i + t]
                    passes += 1
                    took += 1
                    evaluated.append(True)
                    if change < threshold:
                        st.mask[u, d] = False
                        log.append((u, d, change, True))
                        prev = vals[t]
                    else:
                        log.append((u, d, change, False))
                        stop = True
                        break
                removed = took - (1 if stop else 0)
                if removed:
                    x_d = x_d - delta[:, i:i + removed].sum(1)
                current = prev
                i += took
                K = min(max_batch, 2 * K) if not stop else max(4, min(max_batch, 2 * took))
            st.evaluate(d, x_d[None], metric, commit=True)
        return ACDCOut(st.mask.cpu(), log, evaluated, passes, rows, cl.metric.clone(), cr.metric.clone(), current)


def reference_acdc(model, fm: FastModel, pairs, metric_of, graph: Graph, threshold: float,
                   sign: float = 1.0, scale: float = 1.0):
    """ACDC as a plain loop: every trial is a whole circuit run per pair by
    reference_circuit_metric (bridge-cached corrupted outputs, node by node); same visiting
    order and rule as `acdc`, with no batching and no shortcut but the one ACDC itself takes
    (a node that reaches nothing, output_group, has its edges removed unmeasured). `pairs` [(clean_ids,
    corrupt_ids)], metric_of(i) the PairMetric of pair i (one row). Returns (edges kept, log)."""
    edges = {(graph.up[u], graph.down[d]) for u, d in graph.valid.nonzero().tolist()}
    corrupt_outs = [reference_node_outputs(model, fm, k) for _, k in pairs]

    def v(es):
        return sign * sum(reference_circuit_metric(model, fm, c, None, es, metric_of(i), graph, corrupt_outs[i])
                          for i, (c, k) in enumerate(pairs)) / len(pairs) / scale
    current = v(edges)
    log = []
    for d in reversed(graph.down):
        senders = list(reversed(graph.up[:graph.prefix(d)]))
        if d != "logits" and not any(e[0] in output_group(fm, graph, d) for e in edges):
            for u in senders:
                edges.discard((u, d))
                log.append((u, d, 0.0, True))
            continue
        for u in senders:
            trial = v(edges - {(u, d)})
            change = trial - current
            if change < threshold:
                edges.discard((u, d))
                current = trial
            log.append((u, d, change, change < threshold))
    return edges, log
