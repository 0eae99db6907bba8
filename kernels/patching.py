"""Exact activation patching: a plain reference and a fast batched sweep, tested equal.

Activation patching runs a model on a *base* prompt while one activation (a residual
stream vector, an attention or MLP output, one head's output) is replaced by its value on a
*source* prompt, and measures how the answer changes. Denoising patches the clean
activation into the corrupted run; noising patches the corrupted one into the clean run.

`reference_sweep` does exactly that: one hooked forward of the model per patch.
`sweep` gives the same numbers (float32 rounding apart) many times faster, using what a
patch leaves unchanged:

1. A patch at layer k and position p changes nothing before layer k, and (attention is
   causal) nothing at positions before p. So each patched run starts at layer k from the
   base run's cached residual stream, carries only the rows of positions >= p, and reads
   the keys and values of positions < p from the base run's cache.
2. All patches go through the layers in one pass: at layer k the patches that start there
   join the batch, so every weight matrix is read once per layer and the matmuls are tall.
3. The metric needs only the last position: the final norm there, then a dot with
   W_U[answer] - W_U[wrong] for a logit difference; full logits only for probabilities/KL.
4. Where the source activation is bitwise equal to the base one (torch.equal), the patch
   is the identity and its value is the base metric, exactly.

The fast path implements the block described by the model's canonical weights
(backend/model/weights.py: RMSNorm with Gemma's (1 + w) offset, rotary attention with
grouped-query heads, q/k norms, a rotary base and sliding window per layer, post-attention and
post-MLP norms, a gated MLP with SiLU or tanh-GELU, the embedding scale), so Llama-style models
and Gemma-3 take it; SmolLM2 has 9 query heads sharing 3 key/value heads (query head h reads kv
head h // 3), Gemma-3-270M 4 sharing 1. Where a model has post-norms (Gemma), hook_attn_out and
hook_mlp_out are the normed outputs (what is added to the residual), and that is what is
patched. Architectures without canonical weights use the reference.

Sites (`SITES`, from the one table in backend/patch_sites.py): resid_pre, attn_out, mlp_out by [layer pos]; head_out (every head's
attention output, hook_z, at all positions) by [layer head]; head_out_pos by [layer pos head];
head_q and head_pattern (one query head's queries / attention pattern, all positions) by
[layer head]; head_k and head_v (one key/value head's keys / values, all positions) by
[layer kv_head]: with grouped-query attention a key/value head serves n_heads / n_kv query
heads, and patching it changes all of them, as TransformerLens's hook_k / hook_v patching
does. A q/k/v/pattern patch changes only the z of the heads it feeds at that layer, so its
seed is the head_out seed with those heads' z recomputed from the mixed q, K, V or pattern.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from backend.patch_sites import SITE_AXES, SITE_COMPONENT, SITES, TABLE
from backend.sites import Component, Site, hook_name

# ---------------------------------------------------------------------------------------
# Metrics: functions of the last position only
# ---------------------------------------------------------------------------------------
class Metric:
    """A number per run from the last position: `from_logits` [B d_vocab] -> [B]."""

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def from_resid(self, fm: "FastModel", resid: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """[B d_model] final residual (before the final norm) -> [B]."""
        return torch.cat([self.from_logits(fm.logits(resid[i:i + chunk]))
                          for i in range(0, resid.shape[0], chunk)])


@dataclass
class LogitDiff(Metric):
    answer: int
    wrong: int

    def from_logits(self, logits):
        return logits[:, self.answer] - logits[:, self.wrong]

    def from_resid(self, fm, resid, chunk=256):
        if fm.final_softcap:          # the softcap is not linear: go through the logits
            return super().from_resid(fm, resid, chunk)
        w = fm.W_U[self.answer] - fm.W_U[self.wrong]                         # [d_model]
        b = (fm.b_U[self.answer] - fm.b_U[self.wrong]) if fm.b_U is not None else 0.0
        return fm.final_norm(resid) @ w + b


@dataclass
class AnswerProb(Metric):
    answer: int

    def from_logits(self, logits):
        return logits.float().softmax(-1)[:, self.answer]


@dataclass
class KLFromClean(Metric):
    """KL(clean || run) of the next-token distributions, in nats."""

    clean_logprobs: torch.Tensor   # [d_vocab]

    def from_logits(self, logits):
        lp = logits.float().log_softmax(-1)
        return (self.clean_logprobs.exp() * (self.clean_logprobs - lp)).sum(-1)


# ---------------------------------------------------------------------------------------
# The block, from the model's canonical weights (backend/model/weights.py)
# ---------------------------------------------------------------------------------------
_ACT = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
        "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}


class FastModel:
    """A model's block math over its canonical weights (model.weights(), see
    backend/model/weights.py): RMSNorm with its offset, grouped-query rotary attention with
    optional q/k norms, per-layer rotary base and sliding window, optional post-attention and
    post-MLP norms, a gated MLP, sequential residual. Llama-style models and Gemma-3."""

    def __init__(self, weights):
        W = weights
        if W.norm != "rms" or W.parallel or W.mlp != "gated" or W.act not in _ACT:
            raise NotImplementedError(f"no fast patching path for {W.architecture!r}")
        self.weights = W
        self.n_layers, self.n_heads, self.n_kv, self.d_head = W.n_layers, W.n_heads, W.n_kv, W.d_head
        self.eps = W.eps
        self.act = _ACT[W.act]
        self.attn_softcap, self.final_softcap = W.attn_softcap, W.final_softcap
        off = W.norm_offset

        def scale(w):   # the multiplier of a norm: w, or (1 + w) for Gemma (in float32)
            return None if w is None else (w if not off else w.float() + off)
        self.layers = []
        for lw in W.layers:
            self.layers.append(dict(
                ln1=scale(lw.norm1), wq=lw.wq, bq=lw.bq, wk=lw.wk, bk=lw.bk, wv=lw.wv, bv=lw.bv,
                wo=lw.wo, bo=lw.bo, q_norm=scale(lw.q_norm), k_norm=scale(lw.k_norm),
                ln1_post=scale(lw.attn_post_norm), ln2=scale(lw.norm2), wg=lw.w_gate, wu=lw.w_in,
                bu=lw.b_in, wd=lw.w_out, bd=lw.b_out, ln2_post=scale(lw.mlp_post_norm),
                inv_freq=lw.rope_inv_freq, rope_scaling=lw.rope_scaling, scale=lw.attn_scale,
                window=lw.sliding_window))
        self.ln_f = scale(W.final_norm)
        self.W_E = W.embed
        self.embed_scale = (None if W.embed_scale == 1.0
                            else torch.tensor(W.embed_scale, dtype=W.embed.dtype, device=W.embed.device))
        self.W_U = W.W_U                                                  # [d_vocab d_model]
        self.b_U = W.b_U
        self.scale = self.layers[0]["scale"]
        self._rope: dict = {}   # rotary cos/sin and causal masks by length (and layer kind)

    # -- pieces ------------------------------------------------------------------------
    def _rms(self, x, w, eps=None):
        xf = x.float()
        eps = self.eps if eps is None else eps
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    @staticmethod
    def _lin(x, w, b=None):
        return torch.nn.functional.linear(x, w, b)

    def final_norm(self, x):
        return self._rms(x, self.ln_f)

    def logits(self, x):
        out = self._lin(self.final_norm(x), self.W_U, self.b_U)
        if self.final_softcap:
            out = torch.tanh(out / self.final_softcap) * self.final_softcap
        return out

    def rope(self, T: int, j: int = 0):
        """cos, sin [T d_head] of positions 0..T-1 for block j's rotary frequencies (as
        Hugging Face computes them: float32 position x inverse frequency)."""
        L = self.layers[j]
        key = (T, id(L["inv_freq"]))
        if key not in self._rope:
            pos = torch.arange(T, device=self.W_U.device)[None, :]
            freqs = pos[..., None].float() * L["inv_freq"].to(device=pos.device, dtype=torch.float)
            emb = torch.cat((freqs, freqs), dim=-1)
            dt = self.W_U.dtype
            self._rope[key] = ((emb.cos() * L["rope_scaling"]).to(dt)[0], (emb.sin() * L["rope_scaling"]).to(dt)[0])
        return self._rope[key]

    def causal_mask(self, T: int, j: int | None = None) -> torch.Tensor:
        """[T T] additive mask: -inf above the diagonal and, for a sliding-window layer j,
        where query - key >= window."""
        w = self.layers[j]["window"] if j is not None else None
        if ("mask", T, w) not in self._rope:
            m = torch.full((T, T), float("-inf"), device=self.W_U.device).triu(1)
            if w is not None and w < T:
                m = m + torch.full((T, T), float("-inf"), device=m.device).tril(-w)
            self._rope[("mask", T, w)] = m
        return self._rope[("mask", T, w)]

    def scores(self, j: int, q, k):
        """Attention logits of block j before the mask: q k^T * scale (softcapped if set)."""
        s = q @ k * self.layers[j]["scale"]
        if self.attn_softcap:
            s = torch.tanh(s / self.attn_softcap) * self.attn_softcap
        return s

    @staticmethod
    def _rotate(x, cos, sin):                                 # x [N heads d_head], cos [N d_head]
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)

    def qk(self, j: int, h, rt, T: int, which: str):
        """Post-norm, post-rotary queries ("q") or keys ("k") [N heads d_head] of block j from
        normed rows h [N d_model] at positions rt [N] (all < T)."""
        L = self.layers[j]
        n = self.n_heads if which == "q" else self.n_kv
        x = self._lin(h, L["w" + which], L["b" + which]).view(h.shape[0], n, self.d_head)
        if L[which + "_norm"] is not None:
            x = self._rms(x, L[which + "_norm"])
        cos, sin = self.rope(T, j)
        return self._rotate(x, cos[rt], sin[rt])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.embedding(ids, self.W_E)
        return x if self.embed_scale is None else x * self.embed_scale

    def o_proj(self, j: int, z: torch.Tensor) -> torch.Tensor:   # z [N head d_head] -> [N d_model]
        """What block j's attention adds to the residual (hook_attn_out) from its z rows."""
        L = self.layers[j]
        out = self._lin(z.reshape(z.shape[0], -1), L["wo"], L["bo"])
        return out if L["ln1_post"] is None else self._rms(out, L["ln1_post"])

    def attn(self, j, x, rb, rt, n_runs, K_base, V_base, T, last_only=False):
        """Attention of block j for packed rows.

        x [N d_model]: rows of `n_runs` runs; row i is run rb[i] at position rt[i]. Keys
        and values of the positions a run does not carry come from K_base/V_base
        [kv_head T d_head] (the base run's, post-rotary). Returns (resid_mid rows, z rows,
        attn_out rows, k rows, v rows); with last_only, only rows at position T-1 are kept
        after the keys and values are formed.
        """
        L, H, KV, D = self.layers[j], self.n_heads, self.n_kv, self.d_head
        N = x.shape[0]
        h = self._rms(x, L["ln1"])
        k = self.qk(j, h, rt, T, "k")                                           # [N kv D]
        v = self._lin(h, L["wv"], L["bv"]).view(N, KV, D)
        Kf = K_base.unsqueeze(0).repeat(n_runs, 1, 1, 1)                    # [R kv T D]
        Vf = V_base.unsqueeze(0).repeat(n_runs, 1, 1, 1)
        Kf[rb, :, rt] = k
        Vf[rb, :, rt] = v
        if last_only:
            keep = rt == T - 1
            x, h, rb, rt = x[keep], h[keep], rb[keep], rt[keep]
            N = x.shape[0]
        q = self.qk(j, h, rt, T, "q")                                           # [N H D]
        Q = x.new_zeros(n_runs, H, T, D)
        Q[rb, :, rt] = q
        rep = H // KV                                         # query head h reads kv head h // rep
        scores = self.scores(j, Q.view(n_runs, KV, rep, T, D), Kf.unsqueeze(2).transpose(-1, -2))
        probs = (scores + self.causal_mask(T, j)).softmax(-1, dtype=torch.float32).to(x.dtype)  # [R kv rep T T]
        z = (probs @ Vf.unsqueeze(2)).view(n_runs, H, T, D)[rb, :, rt]                  # [N H D]
        out = self.o_proj(j, z)
        return x + out, z, out, k, v, (rb, rt)

    def queries(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Post-rotary queries [T head d_head] of block j from its resid_pre rows [T d_model]."""
        L, T = self.layers[j], x.shape[0]
        return self.qk(j, self._rms(x, L["ln1"]), torch.arange(T, device=x.device), T, "q")

    def head_pattern(self, q: torch.Tensor, K: torch.Tensor, j: int = 0) -> torch.Tensor:
        """Attention probabilities [T T] of one head of block j from its queries [T D] and keys [T D]."""
        scores = self.scores(j, q, K.transpose(0, 1)) + self.causal_mask(q.shape[0], j)
        return scores.softmax(-1, dtype=torch.float32).to(q.dtype)

    def mlp_out(self, j, h):
        """The MLP's output (hook_mlp_out) from its normed input rows h."""
        L = self.layers[j]
        out = self._lin(self.act(self._lin(h, L["wg"])) * self._lin(h, L["wu"], L["bu"]), L["wd"], L["bd"])
        return out if L["ln2_post"] is None else self._rms(out, L["ln2_post"])

    def mlp(self, j, x):
        out = self.mlp_out(j, self._rms(x, self.layers[j]["ln2"]))
        return x + out, out


@dataclass
class RunStates:
    """Every activation a patch needs from one run [layer pos ...] (one prompt)."""

    ids: tuple[int, ...]
    pre: torch.Tensor      # [L+1 T d_model]: resid_pre of each block; pre[L] is the final residual
    mid: torch.Tensor      # [L T d_model]
    attn: torch.Tensor     # [L T d_model] attention outputs
    mlp: torch.Tensor      # [L T d_model] MLP outputs
    z: torch.Tensor        # [L T head d_head]
    K: torch.Tensor        # [L kv_head T d_head] keys after rotary
    V: torch.Tensor        # [L kv_head T d_head]


def run_states(fm: FastModel, ids: Sequence[int], emb: torch.Tensor | None = None) -> RunStates:
    """Every activation of one run; `emb` [T d_model] replaces the token embeddings (a run whose
    embeddings were corrupted with noise, Gaussian corruption)."""
    T = len(ids)
    dev = fm.W_U.device
    x = fm.embed(torch.as_tensor([list(ids)], device=dev))[0] if emb is None else emb.to(dev, fm.W_U.dtype)
    rb = torch.zeros(T, dtype=torch.long, device=dev)
    rt = torch.arange(T, device=dev)
    pre, mid, attn, mlp, zs, Ks, Vs = [x], [], [], [], [], [], []
    empty = x.new_zeros(fm.n_kv, T, fm.d_head)
    for j in range(fm.n_layers):
        xm, z, a, k, v, _ = fm.attn(j, x, rb, rt, 1, empty, empty, T)
        x, m = fm.mlp(j, xm)
        pre.append(x), mid.append(xm), attn.append(a), mlp.append(m), zs.append(z)
        Ks.append(k.transpose(0, 1)), Vs.append(v.transpose(0, 1))
    st = torch.stack
    return RunStates(tuple(ids), st(pre), st(mid), st(attn), st(mlp), st(zs), st(Ks), st(Vs))


_fast_models: dict[int, FastModel | None] = {}
_states: "OrderedDict[tuple, RunStates]" = OrderedDict()
_STATES_KEPT = 16


def fast_model(model) -> FastModel | None:
    """The fast path for a LoadedModel (from model.weights()), or None when its architecture
    has no canonical weights or a block this kernel does not implement."""
    key = id(model)
    if key not in _fast_models:
        try:
            _fast_models[key] = FastModel(model.weights())
        except NotImplementedError:
            _fast_models[key] = None
    return _fast_models[key]


def states(fm: FastModel, ids: Sequence[int]) -> RunStates:
    """Cached (per process, a few prompts) activations of one run: repeat clicks are cheap."""
    key = (id(fm), tuple(ids))
    if key in _states:
        _states.move_to_end(key)
        return _states[key]
    with torch.inference_mode():
        s = run_states(fm, ids)
    _states[key] = s
    while len(_states) > _STATES_KEPT:
        _states.popitem(last=False)
    return s


# ---------------------------------------------------------------------------------------
# Cells and seeds
# ---------------------------------------------------------------------------------------
def cells(site: str, n_layers: int, T: int, n_heads: int, n_kv: int | None = None) -> list[tuple[int, ...]]:
    """Every cell of a site in row-major order of its axes (SITE_AXES)."""
    sizes = {"layer": n_layers, "pos": T, "head": n_heads, "kv_head": n_kv or n_heads}
    out: list[tuple[int, ...]] = [()]
    for axis in SITE_AXES[site]:
        out = [c + (i,) for c in out for i in range(sizes[axis])]
    return out


@dataclass
class Seed:
    """A patched run, as it enters the shared pass: at `stage`, rows of positions p..T-1."""

    stage: int             # 2j: before block j's attention; 2j+1: before its MLP; 2L: final
    p: int
    rows: torch.Tensor     # [T-p d_model]


def make_seed(fm: FastModel, base: RunStates, src: RunStates, site: str, cell: tuple[int, ...],
              force: bool = False) -> Seed | None:
    """The seed of one patch, or None when the patch is the identity (bitwise) unless forced."""
    def equal(a, b):
        return not force and torch.equal(a, b)

    if site not in TABLE:
        raise ValueError(f"unknown site {site!r}; known: {', '.join(SITES)}")
    kind = TABLE[site].seed
    if kind == "resid_pre":
        k, p = cell
        if equal(src.pre[k, p], base.pre[k, p]):
            return None
        rows = base.pre[k, p:].clone()
        rows[0] = src.pre[k, p]
        return Seed(2 * k, p, rows)
    if kind == "attn_out":
        k, p = cell
        if equal(src.attn[k, p], base.attn[k, p]):
            return None
        rows = base.mid[k, p:].clone()
        rows[0] = base.pre[k, p] + src.attn[k, p]
        return Seed(2 * k + 1, p, rows)
    if kind == "mlp_out":
        k, p = cell
        if equal(src.mlp[k, p], base.mlp[k, p]):
            return None
        rows = base.pre[k + 1, p:].clone()
        rows[0] = base.mid[k, p] + src.mlp[k, p]
        return Seed(2 * k + 2, p, rows)
    if kind == "z":
        k, h = cell
        if equal(src.z[k, :, h], base.z[k, :, h]):
            return None
        z = base.z[k].clone()
        z[:, h] = src.z[k, :, h]
        return Seed(2 * k + 1, 0, base.pre[k] + fm.o_proj(k, z))
    if kind == "z_pos":
        k, p, h = cell
        if equal(src.z[k, p, h], base.z[k, p, h]):
            return None
        z = base.z[k, p].clone()
        z[h] = src.z[k, p, h]
        rows = base.mid[k, p:].clone()
        rows[0] = base.pre[k, p] + fm.o_proj(k, z.unsqueeze(0))[0]
        return Seed(2 * k + 1, p, rows)
    if kind == "qkv":
        k, h = cell
        rep = fm.n_heads // fm.n_kv
        comp = TABLE[site].component
        if comp is Component.Q:
            q_src, q_base = fm.queries(k, src.pre[k])[:, h], fm.queries(k, base.pre[k])[:, h]
            if equal(q_src, q_base):
                return None
            g = h // rep
            new = {h: fm.head_pattern(q_src, base.K[k, g], k) @ base.V[k, g]}
        elif comp is Component.PATTERN:
            q_src, q_base = fm.queries(k, src.pre[k])[:, h], fm.queries(k, base.pre[k])[:, h]
            g = h // rep
            p_src = fm.head_pattern(q_src, src.K[k, g], k)
            if equal(p_src, fm.head_pattern(q_base, base.K[k, g], k)):
                return None
            new = {h: p_src @ base.V[k, g]}
        else:   # h is a key/value head: every query head of its group reads the patched K or V
            is_k = comp is Component.K
            which = src.K if is_k else src.V
            if equal(which[k, h], (base.K if is_k else base.V)[k, h]):
                return None
            K = src.K[k, h] if is_k else base.K[k, h]
            V = base.V[k, h] if is_k else src.V[k, h]
            qs = fm.queries(k, base.pre[k])
            new = {qh: fm.head_pattern(qs[:, qh], K, k) @ V for qh in range(h * rep, (h + 1) * rep)}
        z = base.z[k].clone()
        for qh, zh in new.items():
            z[:, qh] = zh
        return Seed(2 * k + 1, 0, base.pre[k] + fm.o_proj(k, z))
    raise ValueError(f"unknown site {site!r}; known: {', '.join(SITES)}")


def propagate(fm: FastModel, base: RunStates, seeds: list[Seed]) -> torch.Tensor:
    """Run every seeded patch to the end in one pass; final residual at the last position [S d_model]."""
    T, L = base.pre.shape[1], fm.n_layers
    dev = base.pre.device
    order = sorted(range(len(seeds)), key=lambda i: seeds[i].stage)   # run ids in order of entry
    seeds = [seeds[i] for i in order]
    x = base.pre.new_zeros(0, base.pre.shape[-1])
    rb = torch.zeros(0, dtype=torch.long, device=dev)
    rt = torch.zeros(0, dtype=torch.long, device=dev)
    n, nxt = 0, 0
    for stage in range(seeds[0].stage if seeds else 2 * L, 2 * L + 1):
        new = []
        while nxt < len(seeds) and seeds[nxt].stage == stage:
            new.append(seeds[nxt])
            nxt += 1
        if new:
            x = torch.cat([x] + [s.rows for s in new])
            rb = torch.cat([rb] + [torch.full((T - s.p,), n + i, device=dev) for i, s in enumerate(new)])
            rt = torch.cat([rt] + [torch.arange(s.p, T, device=dev) for s in new])
            n += len(new)
        if stage == 2 * L:
            break
        j, half = divmod(stage, 2)
        if half == 0:
            x, _, _, _, _, (rb, rt) = fm.attn(j, x, rb, rt, n, base.K[j], base.V[j], T,
                                              last_only=(j == L - 1))
        else:
            x, _ = fm.mlp(j, x)
    last = rt == T - 1
    out = x.new_empty(len(seeds), x.shape[-1])
    out[rb[last]] = x[last]
    inverse = torch.empty(len(order), dtype=torch.long, device=dev)
    inverse[torch.as_tensor(order, device=dev)] = torch.arange(len(order), device=dev)
    return out[inverse]


@dataclass
class SweepOut:
    values: torch.Tensor    # [*axes] metric of every patched run
    base: float             # metric of the unpatched base run
    source: float           # metric of the source run
    n_identity: int         # patches that were the identity (value = base exactly)


def sweep(fm: FastModel, base_ids: Sequence[int], source_ids: Sequence[int], site: str,
          metric: Metric, cell_list=None, max_rows: int = 6144, skip_identity: bool = True) -> SweepOut:
    """Exact patching of every cell of `site` [*axes], or of the cells given (values flat
    [cells]), fast (see the module docstring). Patches run in chunks of about max_rows rows."""
    if len(base_ids) != len(source_ids):
        raise ValueError("base and source runs must have the same length")
    with torch.inference_mode():
        return sweep_states(fm, states(fm, base_ids), states(fm, source_ids), site, metric, cell_list,
                            max_rows, skip_identity)


def sweep_states(fm: FastModel, base: RunStates, src: RunStates, site: str, metric: Metric, cell_list=None,
                 max_rows: int = 6144, skip_identity: bool = True) -> SweepOut:
    """`sweep` between two runs given by their states (e.g. a run with noised embeddings)."""
    T = base.pre.shape[1]
    with torch.inference_mode():
        base_val = metric.from_resid(fm, base.pre[-1, -1:])
        src_val = metric.from_resid(fm, src.pre[-1, -1:])
        sizes = dict(layer=fm.n_layers, pos=T, head=fm.n_heads, kv_head=fm.n_kv)
        if cell_list is None:
            all_cells = cells(site, fm.n_layers, T, fm.n_heads, fm.n_kv)
            shape = [sizes[a] for a in SITE_AXES[site]]
        else:
            all_cells, shape = [tuple(c) for c in cell_list], [len(cell_list)]
        values = base_val.expand(len(all_cells)).clone()
        max_runs = max(1, 2 ** 25 // (fm.n_heads * T * T))   # bounds the [runs head T T] scores
        todo, batch, rows = [], [], 0
        for i, c in enumerate(all_cells):
            s = make_seed(fm, base, src, site, c, force=not skip_identity)
            if s is None:
                continue
            batch.append((i, s))
            rows += s.rows.shape[0]
            if rows >= max_rows or len(batch) >= max_runs:
                todo.append(batch)
                batch, rows = [], 0
        if batch:
            todo.append(batch)
        n_run = 0
        for chunk in todo:
            final = propagate(fm, base, [s for _, s in chunk])
            idx = torch.as_tensor([i for i, _ in chunk], device=values.device)
            values[idx] = metric.from_resid(fm, final).to(values.dtype)
            n_run += len(chunk)
    return SweepOut(values.view(shape), float(base_val), float(src_val), len(all_cells) - n_run)


def patch_logits(fm: FastModel, base_ids, source_ids, site: str, cell: tuple[int, ...]) -> torch.Tensor:
    """Final logits [d_vocab] at the last position of one patched run (click-to-patch)."""
    return patch_logits_states(fm, states(fm, base_ids), states(fm, source_ids), site, cell)


def patch_logits_states(fm: FastModel, base: RunStates, src: RunStates, site: str, cell: tuple[int, ...]) -> torch.Tensor:
    """patch_logits between two runs given by their states."""
    with torch.inference_mode():
        seed = make_seed(fm, base, src, site, cell)
        final = base.pre[-1, -1:] if seed is None else propagate(fm, base, [seed])
        return fm.logits(final)[0]


def base_logits(fm: FastModel, ids) -> torch.Tensor:
    with torch.inference_mode():
        return fm.logits(states(fm, ids).pre[-1, -1:])[0]


# ---------------------------------------------------------------------------------------
# Reference: one hooked forward of the TransformerBridge per patch
# ---------------------------------------------------------------------------------------
def _setter(site: str, cell: tuple[int, ...]) -> Callable:
    """put(act, src): the source run's values copied into the hooked activation at the cell."""
    if site not in TABLE:
        raise ValueError(f"unknown site {site!r}; known: {', '.join(SITES)}")
    return lambda act, src: TABLE[site].put(act, src, cell)


def reference_logits(model, base_ids, source_ids, site: str, cell_list) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Last-position logits of the base run, the source run and each patched run (one
    hooked forward of the LoadedModel per cell) [d_vocab], [d_vocab], [[d_vocab] per cell]."""
    base_t, src_t = model.tensor(list(base_ids)), model.tensor(list(source_ids))
    comp = SITE_COMPONENT[site]
    names = {c[0]: hook_name(Site(comp, c[0])) for c in cell_list}
    with torch.inference_mode():
        src_logits, cache = model.run_with_cache(src_t, set(names.values()))
        base_out = model.logits(base_t)[0, -1]
        outs = []
        for c in cell_list:
            put, src = _setter(site, c), cache[names[c[0]]]

            def hook(act, hook, put=put, src=src):
                act = act.clone()
                put(act, src)
                return act
            outs.append(model.run_with_hooks(base_t, fwd_hooks=[(names[c[0]], hook)])[0, -1])
    return base_out, src_logits[0, -1], outs


def reference_sweep(model, base_ids, source_ids, site: str, metric: Metric, n_layers: int,
                    n_heads: int, cell_list=None, n_kv: int | None = None) -> SweepOut:
    """Patching by one hooked forward per cell. With cell_list, values is flat [cells]."""
    T = len(base_ids)
    full = cell_list is None
    cell_list = cells(site, n_layers, T, n_heads, n_kv) if full else list(cell_list)
    base, src, outs = reference_logits(model, base_ids, source_ids, site, cell_list)
    with torch.inference_mode():
        values = metric.from_logits(torch.stack(outs)) if outs else torch.zeros(0)
        b, s = metric.from_logits(base[None])[0], metric.from_logits(src[None])[0]
    if full:
        sizes = dict(layer=n_layers, pos=T, head=n_heads, kv_head=n_kv or n_heads)
        values = values.view([sizes[a] for a in SITE_AXES[site]])
    return SweepOut(values, float(b), float(s), 0)


__all__ = ["SITES", "SITE_AXES", "Metric", "LogitDiff", "AnswerProb", "KLFromClean", "FastModel",
           "fast_model", "states", "sweep", "sweep_baselines", "patch_logits", "base_logits", "reference_sweep",
           "reference_logits", "cells"]


def sweep_baselines(fm: FastModel, base_ids, source_ids, metric: Metric) -> tuple[float, float]:
    """The metric of the unpatched base and source runs, from the cached states."""
    with torch.inference_mode():
        return tuple(float(metric.from_resid(fm, states(fm, ids).pre[-1, -1:])[0]) for ids in (base_ids, source_ids))
