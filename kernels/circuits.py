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


def run_circuits(fm: FastModel, clean_ids, corrupt: CorruptRun, masks: torch.Tensor, metric: PairMetric,
                 graph: Graph) -> torch.Tensor:
    """The metric of each circuit on each pair: masks [C U D] (1 = edge in the circuit) ->
    values [C B]. Rows of a batch are circuit-major (C*B rows)."""
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
        return metric.repeat(C)(fm, xf[:, -1]).view(C, B)


# ---------------------------------------------------------------------------------------
# Reference: a plain per-node loop over one pair, with the bridge's cached activations
# ---------------------------------------------------------------------------------------
def reference_circuit_metric(model, fm: FastModel, clean_ids: Sequence[int], corrupt_ids: Sequence[int],
                             edges: set[tuple[str, str]], metric: PairMetric, graph: Graph) -> float:
    """The metric of one circuit on one pair, node by node in topological order.

    Corrupt outputs come from a hooked run of the model (hook_embed, hook_z projected through
    each head's W_O slice and, with a post-attention norm, scaled by the rms of hook_z's full
    projection; hook_mlp_out); each node's input is summed edge by edge in a Python loop; a
    head's output is block j's full-layer attention (kernels.patching.FastModel.attn, tested
    equal to the model) on that head's input, keeping head h's z.
    """
    from backend.sites import Component, Site, hook_name

    dev = fm.W_U.device
    H, D = fm.n_heads, fm.d_head
    T = len(clean_ids)
    names = {hook_name(Site(Component.EMBED))} | {hook_name(Site(c, j)) for j in range(fm.n_layers)
                                                  for c in (Component.Z, Component.MLP_OUT)}
    with torch.inference_mode():
        _, cache = model.run_with_cache([list(corrupt_ids)], names)
        corrupt_out = {"input": cache[hook_name(Site(Component.EMBED))][0]}

        def shares(j, raw):                                  # raw [T H d] -> each head's share
            post = fm.layers[j]["ln1_post"]
            if post is None:
                return raw
            r = torch.rsqrt(raw.sum(1).float().pow(2).mean(-1, keepdim=True) + fm.eps)   # [T 1]
            return post * (raw * r[:, None]).to(raw.dtype)
        for j in range(fm.n_layers):
            z = cache[hook_name(Site(Component.Z, j))][0]                                   # [T H D]
            raw = torch.stack([z[:, h] @ fm.layers[j]["wo"][:, h * D:(h + 1) * D].T for h in range(H)], 1)
            sh = shares(j, raw)
            for h in range(H):
                corrupt_out[f"A{j}.{h}"] = sh[:, h]
            corrupt_out[f"M{j}"] = cache[hook_name(Site(Component.MLP_OUT, j))][0]
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
