"""A batched forward over the canonical weights, for the corpus jobs' bulk work.

The corpus jobs run the same few things over hundreds of thousands of tokens: the residual
stream up to the deepest site an SAE reads (training caches, the feature index), and the
rest of the forward with one direction added at a hook (TokenChange). Through the
TransformerBridge each of these pays Python hooks per layer; here the block of
kernels.patching.FastModel (the model's canonical weights, backend/model/weights.py) runs as
plain batched tensor code with PyTorch's fused attention, and can run in bfloat16, where a
CPU with AMX (or any GPU) multiplies ~10x faster than in float32.

    dm = dense_model(model, torch.bfloat16, mixed=True)   # one per setting, cached
    got = run(dm, ids, capture=["blocks.5.hook_resid_pre", "blocks.23.attn.hook_z"])
    got = run(dm, resid, start=15, capture=[FINAL], hooks={"blocks.15.hook_resid_pre": add})

Hook points, named as backend/sites.py names them: `blocks.L.hook_resid_pre`,
`blocks.L.attn.hook_z` ([batch pos head d_head]), `blocks.L.hook_attn_out`,
`blocks.L.mlp.hook_in` (the MLP's input: the
pre-MLP norm's output), `blocks.L.mlp.hook_post` (the MLP's hidden activations), `blocks.L.hook_mlp_out`,
`blocks.L.hook_resid_post`, and FINAL (the residual entering the final norm). A hook is
`fn(activation) -> activation | None`. The forward stops after the last block any capture or
hook needs (FINAL: the whole stack).

Sequences of a batch are right-padded if their lengths differ: attention is causal, so a pad
never changes a real position. In float32 this equals the bridge's forward (rounding apart;
tests/test_forward_kernel.py). PRECISIONS: "bf16-mixed" multiplies in bfloat16 and keeps the
residual stream, norms, attention and activations in float32 (SmolLM2, 2 cores with AMX,
16 x 128 tokens to block 25: 2.1x the float32 speed, median relative error 0.5 % at block 5,
1.7 % at L23's z); "bf16" runs everything in bfloat16 (3.4x, errors 0.8-2.9 %). Only bulk
statistics use them (SAE training caches, TokenChange), and each caller records which.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from .patching import FastModel

FINAL = "final_resid"      # the residual stream entering the final norm
EMBED = "hook_embed"
_POINT = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|attn\.hook_z|hook_attn_out|hook_resid_mid|mlp\.hook_in|mlp\.hook_post|"
                    r"hook_mlp_out|hook_resid_post)$")


def point_layer(name: str, n_layers: int) -> tuple[int, str]:
    """(block, kind) of a hook point this kernel knows; FINAL is (n_layers, "final")."""
    if name == FINAL:
        return n_layers, "final"
    if name == EMBED:
        return 0, "embed"
    m = _POINT.match(name)
    if not m or int(m.group(1)) >= n_layers:
        raise KeyError(f"no dense hook point {name!r}")
    return int(m.group(1)), m.group(2)


def _cast(weights, dtype: torch.dtype):
    """A copy of canonical weights with every floating tensor in `dtype` (rotary frequencies
    stay float32: positions x frequencies are formed in float32, as Hugging Face does)."""
    def c(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    layers = tuple(dataclasses.replace(lw, **{f.name: c(getattr(lw, f.name)) for f in dataclasses.fields(lw)
                                             if f.name != "rope_inv_freq"}) for lw in weights.layers)
    return dataclasses.replace(weights, layers=layers, embed=c(weights.embed), final_norm=c(weights.final_norm),
                               W_U=c(weights.W_U), b_U=c(weights.b_U))


class DenseModel(FastModel):
    """FastModel's block, run on whole [batch pos] sequences."""

    def __init__(self, weights, dtype: torch.dtype | None = None, mixed: bool = False):
        super().__init__(weights if dtype is None or dtype == weights.W_U.dtype else _cast(weights, dtype))
        self.mixed = mixed and self.W_U.dtype != torch.float32
        self.dtype = torch.float32 if self.mixed else self.W_U.dtype   # the residual stream's

    def _lin(self, x, w, b=None):          # mixed: matmuls in the weights' dtype, the rest float32
        if not self.mixed:
            return F.linear(x, w, b)
        return F.linear(x.to(w.dtype), w, b).float()

    def _rms(self, x, w, eps=None):         # the norm in float32, the result in x's dtype
        return super()._rms(x, w, eps).to(x.dtype)

    def _rot(self, t, cos, sin):
        cos, sin = cos.to(t.dtype), sin.to(t.dtype)                              # t [B heads T d_head]
        half = t.shape[-1] // 2
        return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin

    def _mask(self, j: int, start: int, T: int, total: int) -> torch.Tensor | None:
        """Additive mask [T total] of queries at positions start.. over keys 0..total-1: causal
        and, for a sliding-window layer, within the window; None when nothing is masked."""
        w = self.layers[j]["window"]
        if T == 1 and (w is None or w >= total):
            return None
        if start == 0:
            return self.causal_mask(T, j)
        qp = torch.arange(start, start + T, device=self.W_U.device)[:, None]
        kp = torch.arange(total, device=self.W_U.device)[None, :]
        bad = (kp > qp) if w is None else (kp > qp) | (qp - kp >= w)
        return torch.zeros(T, total, device=qp.device).masked_fill(bad, float("-inf"))

    def attention(self, j: int, x: torch.Tensor, hooks: Mapping[str, Callable], keep: dict, want: set,
                  cache: "KVCache | None" = None, start: int = 0) -> torch.Tensor:
        """Block j's attention for x [B T d_model] at positions start..start+T-1 (with a cache:
        after the cached positions, whose keys and values it reads and extends); returns what
        it adds to the residual."""
        L, H, KV, D = self.layers[j], self.n_heads, self.n_kv, self.d_head
        B, T, _ = x.shape
        total = start + T
        h = self._rms(x, L["ln1"])
        q = self._lin(h, L["wq"], L["bq"]).view(B, T, H, D)
        k = self._lin(h, L["wk"], L["bk"]).view(B, T, KV, D)
        v = self._lin(h, L["wv"], L["bv"]).view(B, T, KV, D)
        if L["q_norm"] is not None:
            q, k = self._rms(q, L["q_norm"]), self._rms(k, L["k_norm"])
        cos, sin = self.rope(total, j)
        cos, sin = cos[start:total], sin[start:total]
        q, k = self._rot(q.transpose(1, 2), cos, sin), self._rot(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        if cache is not None:
            if j in cache.k:
                k, v = torch.cat([cache.k[j], k], 2), torch.cat([cache.v[j], v], 2)
            cache.k[j], cache.v[j] = k, v
        rep = H // KV
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        mask = self._mask(j, start, T, total)
        if self.attn_softcap:                                  # no fused kernel for a softcap
            s = self.scores(j, q, k.transpose(-1, -2))
            probs = (s if mask is None else s + mask).softmax(-1, dtype=torch.float32)
            z = probs.to(q.dtype) @ v
        elif mask is None or (start == 0 and (L["window"] is None or L["window"] >= T)):
            z = F.scaled_dot_product_attention(q, k, v, is_causal=mask is not None, scale=L["scale"])
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=L["scale"])
        z = _point(f"blocks.{j}.attn.hook_z", z.transpose(1, 2), hooks, keep, want)       # [B T H D]
        out = self._lin(z.reshape(B, T, H * D), L["wo"], L["bo"])
        if L["ln1_post"] is not None:
            out = self._rms(out, L["ln1_post"])
        return _point(f"blocks.{j}.hook_attn_out", out, hooks, keep, want)

    def mlp_dense(self, j: int, x: torch.Tensor, hooks: Mapping[str, Callable], keep: dict, want: set) -> torch.Tensor:
        L = self.layers[j]
        h = _point(f"blocks.{j}.mlp.hook_in", self._rms(x, L["ln2"]), hooks, keep, want)
        post = _point(f"blocks.{j}.mlp.hook_post", self.act(self._lin(h, L["wg"])) * self._lin(h, L["wu"], L["bu"]),
                      hooks, keep, want)
        out = self._lin(post, L["wd"], L["bd"])
        if L["ln2_post"] is not None:
            out = self._rms(out, L["ln2_post"])
        return _point(f"blocks.{j}.hook_mlp_out", out, hooks, keep, want)


def _point(name: str, x: torch.Tensor, hooks: Mapping[str, Callable], keep: dict, want: set) -> torch.Tensor:
    fn = hooks.get(name)
    if fn is not None:
        y = fn(x)
        if y is not None:
            x = y
    if name in want:
        keep[name] = x
    return x


class KVCache:
    """Keys and values (after rotary, one entry per block) of the positions run so far."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}


_dense: dict = {}


PRECISIONS = {"float32": (None, False), "bf16-mixed": (torch.bfloat16, True), "bf16": (torch.bfloat16, False)}


def dense_model(model, dtype: torch.dtype | None = None, mixed: bool = False) -> DenseModel | None:
    """The dense forward of a LoadedModel in `dtype` (None: the model's own; mixed: matmuls in
    dtype, the residual stream and everything else in float32), once per setting; None when
    the model has no canonical weights or a block FastModel does not implement."""
    key = (id(model), dtype, mixed)
    if key not in _dense:
        try:
            _dense[key] = DenseModel(model.weights(), dtype, mixed)
        except NotImplementedError:
            _dense[key] = None
    return _dense[key]


def run(dm: DenseModel, x: torch.Tensor, *, start: int = 0, capture: Iterable[str] = (),
        hooks: Mapping[str, Callable] | None = None, cache: KVCache | None = None,
        position: int = 0) -> dict[str, torch.Tensor]:
    """{point: activation} for `capture`, from token ids x [B T] (start = 0) or from the
    residual stream entering block `start` [B T d_model]; stops after the last block that a
    capture or hook needs. With a `cache`, x holds the positions from `position` on and the
    cache the ones before (generation: the prompt once, then one token per call)."""
    hooks = dict(hooks or {})
    want = set(capture)
    stops = [point_layer(n, dm.n_layers) for n in want | set(hooks)]
    if any(b < start for b, _ in stops):
        raise KeyError(f"a hook point lies before block {start}")
    last = max((b for b, _ in stops), default=dm.n_layers - 1)
    if cache is not None:
        last = max(last, dm.n_layers - 1)        # every block's keys and values go in the cache
    keep: dict = {}
    with torch.inference_mode():
        if start == 0 and not x.is_floating_point():
            x = _point(EMBED, dm.embed(x.to(dm.W_U.device)), hooks, keep, want)
        x = x.to(device=dm.W_U.device, dtype=dm.dtype)
        for j in range(start, min(last + 1, dm.n_layers)):
            x = _point(f"blocks.{j}.hook_resid_pre", x, hooks, keep, want)
            if j == last and all(k == "hook_resid_pre" for b, k in stops if b == j) and cache is None:
                break
            x = _point(f"blocks.{j}.hook_resid_mid", x + dm.attention(j, x, hooks, keep, want, cache, position),
                       hooks, keep, want)
            x = x + dm.mlp_dense(j, x, hooks, keep, want)
            x = _point(f"blocks.{j}.hook_resid_post", x, hooks, keep, want)
        if last == dm.n_layers:
            keep[FINAL] = _point(FINAL, x, hooks, {}, set())
    missing = want - set(keep)
    if missing:
        raise KeyError(f"points {sorted(missing)} were not reached")
    return keep


_bulk: list[str] = []


def bulk_precision() -> str:
    """The precision for bulk statistics on this machine: DASHBOARD_BULK_PRECISION if set;
    "bf16" on a GPU, or on a CPU where a bfloat16 matmul is at least twice as fast as a float32
    one (AMX, AVX512-BF16; measured once, ~0.1 s); else "float32" (bfloat16 is emulated and
    slow on other CPUs)."""
    import os
    import time

    env = os.environ.get("DASHBOARD_BULK_PRECISION")
    if env:
        if env not in PRECISIONS:
            raise ValueError(f"DASHBOARD_BULK_PRECISION must be one of {sorted(PRECISIONS)}, not {env!r}")
        return env
    if not _bulk:
        from backend.settings import device

        if device().startswith("cuda"):
            _bulk.append("bf16")
        else:
            def best(dt):
                a, b = torch.randn(1024, 576, dtype=dt), torch.randn(576, 1536, dtype=dt)
                a @ b
                t = time.perf_counter()
                for _ in range(5):
                    a @ b
                return time.perf_counter() - t
            _bulk.append("bf16" if best(torch.bfloat16) * 2 <= best(torch.float32) else "float32")
    return _bulk[0]
