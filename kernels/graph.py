"""Attribution graphs: direct effects between transcoder features in the local replacement model.

For one prompt, every MLP is replaced by its transcoder plus an error term, and attention
patterns and normalisation scales are frozen at their values on the prompt (Ameisen et al.
2025). The model is then linear in the residual stream from the sources to each target:

    sources  feature f at (layer l, pos p): writes a_f * W_dec[f] into resid_post(l)[p]
             error (l, p): the MLP output the transcoder misses, mlp_out - reconstruction
             token p: its embedding
    targets  feature t at (l, p): its pre-activation W_enc[t] . ln2(resid_mid(l))[p]
             logit k: (W_U[k] - mean_v W_U[v]) . ln_f(final)[last]

The edge A[t, s] is the change of target t when source s is added: one backward pass of a
target's read vector through the frozen linear model (attention by its value/output path with
the patterns fixed, norms by their frozen scales, transcoder skip connections; never through
an MLP nonlinearity), contracted with every source vector. circuit-tracer does the same with
autograd over the whole model in batches of 512 rows (its `attribute`); here the backward is
written out over the canonical weights and batched by target layer and position, so a row
never passes a layer above its target nor a position after it:

    per layer, rows G [B T' d]:  contract sources of layer l with G            (edges)
                                 G += (G @ W_skip) * ln2 scale                 (skip path)
                                 inject the rows that target layer l
                                 G += ((P^T (G @ W_O)) @ W_V) * ln1 scale      (attention)

Position 0 carries no feature or error node (circuit-tracer's zero_positions: the first
token's massive activations are not what the transcoders learnt); its MLP outputs are
constants of the linearisation, like every bias. Node order is circuit-tracer's: features
sorted by (layer, pos, feature), errors layer-major, tokens, logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .patching import FastModel, run_states


@dataclass
class GraphInputs:
    ids: list[int]
    inv1: torch.Tensor          # [L T] 1/rms of each block's attention-norm input
    inv2: torch.Tensor          # [L T] 1/rms of each MLP-norm input (resid_mid)
    inv_f: torch.Tensor         # [T] 1/rms of the final residual
    patterns: torch.Tensor      # [L H T T] attention probabilities (query x key)
    mlp_in: torch.Tensor        # [L T d]
    mlp_out: torch.Tensor       # [L T d]
    logits: torch.Tensor        # [d_vocab] at the last position
    embeds: torch.Tensor        # [T d] the token embeddings (hook_embed)


def _inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps)


def graph_inputs(fm: FastModel, ids: Sequence[int]) -> GraphInputs:
    """One float32 forward over the canonical weights, keeping what the linearisation freezes."""
    if any(L["ln1_post"] is not None or L["ln2_post"] is not None for L in fm.layers) or fm.attn_softcap:
        raise NotImplementedError("attribution graphs cover pre-norm blocks without post-norms or softcaps")
    st = run_states(fm, ids)
    T = len(ids)
    pats = []
    for j in range(fm.n_layers):
        q = fm.queries(j, st.pre[j])                                      # [T H D]
        rep = fm.n_heads // fm.n_kv
        pats.append(torch.stack([fm.head_pattern(q[:, h], st.K[j, h // rep], j) for h in range(fm.n_heads)]))
    mlp_in = torch.stack([fm._rms(st.mid[j], fm.layers[j]["ln2"]) for j in range(fm.n_layers)])
    logits = fm.logits(st.pre[-1][T - 1:])[0]
    return GraphInputs(list(ids), _inv_rms(st.pre[:-1], fm.eps), _inv_rms(st.mid, fm.eps), _inv_rms(st.pre[-1], fm.eps),
                       torch.stack(pats), mlp_in, st.mlp, logits.float(), fm.embed(torch.as_tensor([list(ids)]))[0])


@dataclass
class Nodes:
    """Active features (sorted by layer, pos, feature) and the vectors the graph needs."""
    layer: torch.Tensor         # [F] long
    pos: torch.Tensor           # [F]
    feature: torch.Tensor       # [F]
    activation: torch.Tensor    # [F]
    enc: torch.Tensor           # [F d] encoder rows (read vectors, before the norm scale)
    dec: torch.Tensor           # [F d] a_f * W_dec[f]
    errors: torch.Tensor        # [L T d]; position 0 zero
    logit_ids: torch.Tensor     # [K]
    logit_probs: torch.Tensor   # [K]
    logit_vecs: torch.Tensor    # [K d] demeaned unembedding rows


def active_nodes(tset, gi: GraphInputs, W_U: torch.Tensor, max_logits: int, desired_prob: float,
                 first: int = 1) -> Nodes:
    """Transcoder activations at positions >= first, their error terms, and the logit targets:
    the top tokens until their probability sums to desired_prob (at most max_logits)."""
    L = gi.mlp_in.shape[0]
    layers, poss, feats, acts, encs, decs, errs = [], [], [], [], [], [], []
    for layer in range(L):
        x = gi.mlp_in[layer]
        a = tset.encode(layer, x)
        a[:first] = 0
        rec = tset.decode(layer, a, x)
        e = gi.mlp_out[layer] - rec
        e[:first] = 0
        errs.append(e)
        p, f = a.nonzero(as_tuple=True)                 # row-major: sorted by (pos, feature)
        layers.append(torch.full_like(p, layer)), poss.append(p), feats.append(f)
        acts.append(a[p, f])
        encs.append(tset.W_enc[layer][f])
        decs.append(tset.W_dec[layer][f] * a[p, f, None])
    probs = gi.logits.softmax(-1)
    top_p, top_i = probs.topk(max_logits)
    cut = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_prob, dtype=top_p.dtype))) + 1
    idx = top_i[:cut]
    vecs = W_U[idx].float() - W_U.float().mean(0, keepdim=True)
    cat = torch.cat
    return Nodes(cat(layers), cat(poss), cat(feats), cat(acts), cat(encs), cat(decs), torch.stack(errs),
                 idx, probs[idx], vecs)


def adjacency(fm: FastModel, gi: GraphInputs, nodes: Nodes, W_skip: Sequence[torch.Tensor | None],
              batch: int = 256, min_batch: int = 48, progress=None) -> torch.Tensor:
    """The dense adjacency [N N] (rows: targets, columns: sources) in circuit-tracer's node
    order: F features, L*T errors, T tokens, K logits; error and token rows are zero."""
    L, T, d = gi.mlp_in.shape
    F, K = len(nodes.layer), len(nodes.logit_ids)
    e0, t0, k0 = F, F + L * T, F + L * T + T
    N = k0 + K
    A = torch.zeros(N, N)
    # sources of each layer grouped by position: (columns, vectors)
    by_lp: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for layer in range(L):
        m = nodes.layer == layer
        cols = m.nonzero()[:, 0]
        by_lp.append([(cols[nodes.pos[cols] == p], nodes.dec[cols[nodes.pos[cols] == p]]) for p in range(T)])
    # target rows: (layer where injected (L: the final residual), row indices, positions,
    # read vectors at the residual stream, the frozen norm scale folded in)
    groups = [(L, torch.arange(k0, k0 + K), torch.full((K,), T - 1), nodes.logit_vecs * (fm.ln_f * gi.inv_f[T - 1]))]
    for layer in range(L):
        sel = (nodes.layer == layer).nonzero()[:, 0]
        order = sel[torch.argsort(nodes.pos[sel], stable=True)]
        # batches of rows at one position (a row's gradient lives at positions <= its own),
        # merged with the next positions until a batch has min_batch rows
        start = 0
        while start < len(order):
            end = start
            while end < len(order) and (end - start < min_batch or nodes.pos[order[end]] == nodes.pos[order[end - 1]]):
                end += 1
                if end - start >= batch:
                    break
            r = order[start:end]
            p = nodes.pos[r]
            groups.append((layer, r, p, nodes.enc[r] * fm.layers[layer]["ln2"] * gi.inv2[layer, p, None]))
            start = end
    done = 0
    for top, r, p, vec in groups:
        Tp = int(p.max()) + 1
        B = len(r)
        G = vec.new_zeros(B, Tp, d)
        bi = torch.arange(B)
        if top == L:
            G[bi, p] = vec
        for layer in range(min(top, L - 1), -1, -1):
            if layer < top:
                # G: gradient at resid_post(layer) -> edges from this layer's sources
                for pos in range(1, Tp):
                    cols, D = by_lp[layer][pos]
                    if len(cols):
                        A[r[:, None], cols[None, :]] = G[:, pos] @ D.t()
                A[r, e0 + layer * T:e0 + layer * T + Tp] = torch.einsum("btd,td->bt", G, nodes.errors[layer, :Tp])
                if W_skip[layer] is not None:
                    G = G + (G @ W_skip[layer]) * (fm.layers[layer]["ln2"] * gi.inv2[layer, :Tp, None])
            else:
                G[bi, p] = vec                          # the rows that read this layer's MLP input
            G = G + _attn_back(fm, gi, layer, G)
        A[r, t0:t0 + Tp] = torch.einsum("btd,td->bt", G, gi.embeds[:Tp])
        done += B
        if progress:
            progress(done, F + K)
    return A


def _attn_back(fm: FastModel, gi: GraphInputs, j: int, G: torch.Tensor) -> torch.Tensor:
    """What a gradient G [B T d] at resid_mid(j) sends to resid_pre(j) through block j's
    attention with its patterns and its norm scale frozen (value / output path only)."""
    Lw = fm.layers[j]
    B, T, _ = G.shape
    H, KV, D = fm.n_heads, fm.n_kv, fm.d_head
    dz = (G @ Lw["wo"]).view(B, T, H, D).transpose(1, 2)                       # [B H T D]
    dv = gi.patterns[j, :, :T, :T].transpose(-1, -2) @ dz                      # [B H T D] (keys)
    dv = dv.view(B, KV, H // KV, T, D).sum(2).transpose(1, 2).reshape(B, T, KV * D)
    return (dv @ Lw["wv"]) * (Lw["ln1"] * gi.inv1[j, :T, None])


def replacement_targets(fm: FastModel, gi: GraphInputs, nodes: Nodes, tset, scale: dict[str, torch.Tensor],
                        linear: bool = False):
    """Reference (plain autograd-free forward, for tests): every target's value in the local
    replacement model with each source multiplied by scale["features"] [F], scale["errors"]
    [L T], scale["tokens"] [T]. Frozen patterns and norm scales, MLP output = sum of scaled
    feature vectors + b_dec + skip + scaled error (position 0: the real MLP output). At scale 1
    the targets are the real pre-activations and logits; the model is affine in the scales, so
    setting one source's scale to 0 moves each target by minus its edge weight. linear=True
    drops every constant (biases, b_enc, b_dec, position 0's MLP output): the targets are then
    exactly the linear map, and scale = a one-hot source gives that source's edges without
    the cancellation of two full forwards (residual norms reach 1e4 at position 0)."""
    L, T, d = gi.mlp_in.shape
    x = gi.embeds * scale["tokens"][:, None]
    feat_pre = torch.zeros(len(nodes.layer))
    for j in range(L):
        Lw = fm.layers[j]
        h = x * Lw["ln1"] * gi.inv1[j, :, None]
        v = fm._lin(h, Lw["wv"], None if linear else Lw["bv"]).view(T, fm.n_kv, fm.d_head).transpose(0, 1)      # [KV T D]
        v = v.repeat_interleave(fm.n_heads // fm.n_kv, 0)                                  # [H T D]
        z = (gi.patterns[j] @ v).transpose(0, 1).reshape(T, -1)
        mid = x + fm._lin(z, Lw["wo"], None if linear else Lw["bo"])
        h2 = mid * Lw["ln2"] * gi.inv2[j, :, None]
        m = nodes.layer == j
        feat_pre[m] = (h2[nodes.pos[m]] * nodes.enc[m]).sum(-1) + (0 if linear else tset.b_enc[j][nodes.feature[m]])
        out = torch.zeros(T, d).index_add_(0, nodes.pos[m], nodes.dec[m] * scale["features"][m, None])
        out = out + nodes.errors[j] * scale["errors"][j, :, None] + (0 if linear else tset.b_dec[j])
        skip = h2 @ tset.W_skip[j].t() if tset.W_skip[j] is not None else torch.zeros_like(h2)
        out = out + skip
        if linear:                      # position 0: only the skip path is linear there
            out[0] = skip[0]
        else:                           # the real MLP output, moved by the skip path's change
            out[0] = gi.mlp_out[j, 0] + skip[0] - (gi.mlp_in[j, 0] @ tset.W_skip[j].t() if tset.W_skip[j] is not None else 0)
        x = mid + out
    final = x[T - 1] * fm.ln_f * gi.inv_f[T - 1]
    return feat_pre, final @ nodes.logit_vecs.t()


__all__ = ["replacement_targets", "GraphInputs", "graph_inputs", "Nodes", "active_nodes", "adjacency"]
