"""Massive activations, found by reducing the residual stream on the fly.

Sun et al. (2024), "Massive Activations in Large Language Models": a few scalars of the
residual stream are orders of magnitude larger than the rest (|value| ≥ 100 and ≥ 1000×
the layer's median |value| in the paper), sit in a few fixed dimensions, at the first
token and at delimiters, and pull attention onto their tokens.

Finding them needs, per layer, a handful of numbers, not the activations themselves. So
`scan` hangs one forward hook on the residual stream leaving every block (hook_resid_post)
and, optionally, on every attention pattern; each hook reduces its tensor to small
summaries at once and lets it go. Memory is that of a plain forward plus O(layers × pos)
numbers, whatever the number of hooks; `scan_reference` does the same with
`run_with_cache` and numpy, and the tests hold the two equal.

Summaries per sequence b and layer l (resid_post of block l, x: [pos d_model]):
    top_values/positions/dims [k]   the k largest |x|, value signed, largest first
    median                          median of |x| over (pos, dim); the lower middle
                                    value for an even count (torch.median's convention)
    pos_max [pos]                   max over dims of |x|: the layer × token heatmap
    dims [n_dims]                   the n_dims dims with the largest max over pos of |x|
    dim_values [n_dims pos]         x at those dims, signed: the token × dim spikes
    rest_max [pos]                  max |x| over all other dims: the floor they rise from
    massive                         every (pos, dim) with |x| ≥ max(abs, ratio × median)
and, with attention=True, per head the attention each key position receives, averaged over
the queries that have a choice (q ≥ 1; query 0 can only attend to itself).

Sequences in a batch must have equal length (no padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from backend.sites import Component, Site, hook_name

MAX_MASSIVE_PER_LAYER = 4096  # a threshold so low that more qualify is not "massive"


@dataclass
class ResidScan:
    """Per-layer summaries of the residual stream; B sequences, L layers, P positions."""

    top_values: np.ndarray      # [B L k] float32, signed, by |value| descending
    top_positions: np.ndarray   # [B L k] int64
    top_dims: np.ndarray        # [B L k] int64
    median: np.ndarray          # [B L] float32, median |value| of the layer
    pos_max: np.ndarray         # [B L P] float32, max |value| over dims
    dims: np.ndarray            # [B L N] int64, dims with the largest max |value|
    dim_values: np.ndarray      # [B L N P] float32, signed values at those dims
    rest_max: np.ndarray        # [B L P] float32, max |value| over the other dims
    massive: np.ndarray         # [M 4] int64: (batch, layer, pos, dim), sorted
    massive_values: np.ndarray  # [M] float32, signed
    massive_truncated: bool     # some layer had more than MAX_MASSIVE_PER_LAYER
    attn_received: np.ndarray | None = None  # [B L H P] float32
    abs_threshold: float = 100.0
    ratio_threshold: float = 1000.0


def _check(model, tokens, top_k: int, n_dims: int):
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be [batch pos] with pos ≥ 1, got {tuple(tokens.shape)}")
    p, d = tokens.shape[1], model.info.d_model
    if not 1 <= top_k <= p * d or not 1 <= n_dims <= d:
        raise ValueError(f"top_k must be in 1..{p * d} and n_dims in 1..{d}")


def resid_hook_names(n_layers: int) -> list[str]:
    return [hook_name(Site(Component.RESID_POST, layer)) for layer in range(n_layers)]


def pattern_hook_names(n_layers: int) -> list[str]:
    return [hook_name(Site(Component.PATTERN, layer)) for layer in range(n_layers)]


def scan(model, tokens, *, top_k: int = 3, n_dims: int = 8, abs_threshold: float = 100.0,
         ratio_threshold: float = 1000.0, attention: bool = False,
         extra_hooks: Sequence[tuple[str, Callable]] = (), keep_logits: bool = False):
    """Reduce the residual stream of one forward on the fly → (ResidScan, logits or None).

    tokens: [batch pos] long tensor. extra_hooks run before the reducing hooks (at the
    same hook point they see, and change, what the reducer sees): a planted spike or an
    ablation shows up in the scan. Logits are kept only if asked ([batch pos d_vocab]);
    otherwise only the last position is unembedded.
    """
    import torch

    _check(model, tokens, top_k, n_dims)
    n_layers = model.info.n_layers
    out: dict[str, list] = {k: [None] * n_layers for k in (
        "tv", "tp", "td", "med", "pmax", "dims", "dvals", "rest", "mass", "mval", "attn")}
    truncated = [False]

    def reduce_resid(layer: int):
        def hook(x, hook):  # x: [B P D]
            x = x.detach()
            b, p, d = x.shape
            a = x.abs().float()                                      # [B P D]
            flat = a.reshape(b, p * d)
            tv, ti = flat.topk(top_k, dim=1)                         # [B k]
            med = flat.median(dim=1).values                          # [B]
            out["tv"][layer] = x.reshape(b, p * d).gather(1, ti).float().cpu()
            out["tp"][layer] = (ti // d).cpu()
            out["td"][layer] = (ti % d).cpu()
            out["med"][layer] = med.cpu()
            out["pmax"][layer] = a.amax(dim=2).cpu()                # [B P]
            dims = a.amax(dim=1).topk(n_dims, dim=1).indices         # [B N]
            out["dims"][layer] = dims.cpu()
            idx = dims[:, None, :].expand(b, p, n_dims)              # [B P N]
            out["dvals"][layer] = x.gather(2, idx).transpose(1, 2).float().cpu()  # [B N P]
            thr = torch.clamp(med * ratio_threshold, min=abs_threshold)  # [B]
            mask = a >= thr[:, None, None]
            n = int(mask.sum())
            if n > MAX_MASSIVE_PER_LAYER:  # keep the largest ones
                truncated[0] = True
                keep = torch.zeros(b * p * d, dtype=torch.bool, device=a.device)
                keep[(a * mask).reshape(-1).topk(MAX_MASSIVE_PER_LAYER).indices] = True
                mask = keep.reshape(b, p, d)
            nz = mask.nonzero()                                      # [m 3] (b, pos, dim)
            out["mass"][layer] = nz.cpu()
            out["mval"][layer] = x[mask].float().cpu()
            a.scatter_(2, idx, 0.0)                                  # drop the kept dims
            out["rest"][layer] = a.amax(dim=2).cpu()
        return hook

    def reduce_pattern(layer: int):
        def hook(pattern, hook):  # [B H Q K]
            q = pattern.shape[2]
            recv = (pattern[:, :, 1:, :].float().mean(dim=2) if q > 1
                    else torch.zeros_like(pattern[:, :, 0, :], dtype=torch.float32))
            out["attn"][layer] = recv.detach().cpu()                 # [B H K]
        return hook

    reducers = dict(zip(resid_hook_names(n_layers), map(reduce_resid, range(n_layers))))
    if attention:
        reducers.update(zip(pattern_hook_names(n_layers), map(reduce_pattern, range(n_layers))))
    kw = {} if keep_logits else {"logits_to_keep": 1}
    with model.lock, torch.inference_mode():
        # One filter hook dispatching on the hook point: the bridge rebuilds its alias table
        # for every hook added by name (~7 ms each here), which would cost more than the scan.
        points = model.hook_points()
        by_point = {id(points[name]): fn for name, fn in reducers.items()}

        def dispatch(x, hook):
            return by_point[id(hook)](x, hook)

        hooks = list(extra_hooks) + [(lambda name: name in reducers, dispatch)]
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits", **kw)
    missing = [layer for layer in range(n_layers) if out["tv"][layer] is None
               or (attention and out["attn"][layer] is None)]
    if missing:  # a hook that did not fire would make a silent, wrong answer
        raise RuntimeError(f"reducing hooks did not fire at layers {missing}")

    def stack(key, axis=1):
        return torch.stack(out[key], dim=axis).numpy()

    mass_rows, mass_vals = [], []
    for layer in range(n_layers):
        nz = out["mass"][layer].numpy()
        mass_rows.append(np.column_stack([nz[:, 0], np.full(len(nz), layer), nz[:, 1], nz[:, 2]]))
        mass_vals.append(out["mval"][layer].numpy())
    massive = np.concatenate(mass_rows).astype(np.int64).reshape(-1, 4)
    values = np.concatenate(mass_vals).astype(np.float32)
    order = np.lexsort(massive.T[::-1])  # by batch, layer, pos, dim
    result = ResidScan(
        top_values=stack("tv"), top_positions=stack("tp").astype(np.int64),
        top_dims=stack("td").astype(np.int64), median=stack("med"), pos_max=stack("pmax"),
        dims=stack("dims").astype(np.int64), dim_values=stack("dvals"), rest_max=stack("rest"),
        massive=massive[order], massive_values=values[order], massive_truncated=truncated[0],
        attn_received=stack("attn") if attention else None,
        abs_threshold=float(abs_threshold), ratio_threshold=float(ratio_threshold))
    return result, (logits if keep_logits else None)


def scan_reference(model, tokens, *, top_k: int = 3, n_dims: int = 8, abs_threshold: float = 100.0,
                   ratio_threshold: float = 1000.0, attention: bool = False,
                   cache_all: bool = False) -> ResidScan:
    """The same summaries from run_with_cache and plain numpy (slow, holds every activation).

    cache_all caches every hook point of the model, as a bare run_with_cache does (for the
    benchmark); otherwise only the hooks the summaries read.
    """
    import torch

    _check(model, tokens, top_k, n_dims)
    n_layers = model.info.n_layers
    names = resid_hook_names(n_layers) + (pattern_hook_names(n_layers) if attention else [])
    with model.lock, torch.inference_mode():
        _, cache = model.run_with_cache(tokens, None if cache_all else names, logits_to_keep=1)
    resid = np.stack([cache[h].float().cpu().numpy() for h in resid_hook_names(n_layers)], axis=1)
    bsz, _, p, d = resid.shape                          # [B L P D]
    a = np.abs(resid)
    flat = a.reshape(bsz, n_layers, p * d)
    order = np.argsort(-flat, axis=2, kind="stable")[..., :top_k]
    signed = np.take_along_axis(resid.reshape(bsz, n_layers, p * d), order, axis=2)
    srt = np.sort(flat, axis=2)
    median = srt[..., (p * d - 1) // 2]
    dmax = a.max(axis=2)                                 # [B L D]
    dims = np.argsort(-dmax, axis=2, kind="stable")[..., :n_dims]
    dim_values = np.take_along_axis(resid, dims[:, :, None, :], axis=3).transpose(0, 1, 3, 2)
    rest = a.copy()
    np.put_along_axis(rest, dims[:, :, None, :].repeat(p, axis=2), 0.0, axis=3)
    massive, values = [], []
    for b in range(bsz):
        for layer in range(n_layers):
            thr = max(np.float32(abs_threshold), np.float32(ratio_threshold) * median[b, layer])
            for pos, dim in zip(*np.nonzero(a[b, layer] >= thr)):
                massive.append((b, layer, pos, dim))
                values.append(resid[b, layer, pos, dim])
    attn = None
    if attention:
        pats = np.stack([cache[h].float().cpu().numpy() for h in pattern_hook_names(n_layers)], axis=1)
        attn = pats[:, :, :, 1:, :].mean(axis=3) if p > 1 else np.zeros_like(pats[:, :, :, 0, :])
    return ResidScan(
        top_values=signed.astype(np.float32), top_positions=order // d, top_dims=order % d,
        median=median.astype(np.float32), pos_max=a.max(axis=3), dims=dims,
        dim_values=dim_values.astype(np.float32), rest_max=rest.max(axis=3),
        massive=np.array(massive, dtype=np.int64).reshape(-1, 4),
        massive_values=np.array(values, dtype=np.float32), massive_truncated=False,
        attn_received=attn, abs_threshold=float(abs_threshold), ratio_threshold=float(ratio_threshold))
