"""Layer-wise relevance propagation for the transformer block, as a modified gradient.

LRP's rules for a transformer (AttnLRP, Achtibat et al. 2024; CP-LRP, Ali et al. 2022) can all
be written as "gradient x input" through a forward whose values are unchanged but whose
backward is altered with `detach()`: relevance of a tensor = tensor * (modified gradient of
the output with respect to it). The forward here is kernels.forward.DenseModel's block over
the canonical weights (Llama-style models and Gemma-3), rewritten with these rules:

- **normalisation** (RMSNorm, q/k norms, post-norms, final norm): identity through the
  denominator, x * rsqrt(mean x^2 + eps).detach() * w: the norm is linear in x for the backward.
- **element-wise nonlinearity** (the gate's SiLU / GELU): the identity rule, act(g) =
  g * (act(g) / g).detach(): relevance passes through unchanged.
- **products of two activations** (the gated MLP's act(g) * u, the attention's q . k and
  probs @ v, and the rotary x * cos + rot(x) * sin): the uniform rule, each factor gets half,
  0.5 * (a * b.detach() + a.detach() * b).
- **softmax**: AttnLRP's rule R_j = x_j (R_j' - s_j sum_i R_i') is exactly gradient x input
  of the softmax, so the softmax is differentiated as it is (mode "attnlrp"); mode "cp" treats
  the gates as constants (CP-LRP, as LXT writes it: the attention weights, so no relevance into
  queries and keys at all, and the MLP's gate act(g), so all of the MLP's relevance goes to the
  up projection).
- **positions** (the seed "Revisiting LRP: Positional Attribution as the Missing Ingredient"):
  rotary embeddings multiply queries and keys by cos / sin of the position; under the uniform
  rule half of each product's relevance goes to that positional factor. The cos / sin tables
  of every block are leaves of the backward, so the relevance they receive, summed over the
  blocks and heads that read position t, is position t's positional relevance. In mode "cp"
  it is 0 (queries and keys get nothing).

Conservation. Without bias terms (Llama, Gemma-3 have none) and in mode "cp", every operation
is linear in the input for the backward (norms and attention weights frozen, products split
by the uniform rule), so the token relevances add up to the output exactly (float rounding
apart): a test. In mode "attnlrp" the softmax rule is not conservative (relevance
x_j s_j sum R leaks to the softmax's shift invariance) and the gap is reported, never hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .forward import DenseModel

MODES = ("attnlrp", "cp")


def uniform(a: torch.Tensor, b: torch.Tensor, op=torch.mul) -> torch.Tensor:
    """op(a, b) with the backward of the uniform rule: each factor gets half the relevance."""
    return 0.5 * (op(a, b.detach()) + op(a.detach(), b))


def identity_rule(act, g: torch.Tensor) -> torch.Tensor:
    """act(g) with relevance passed through unchanged: g * (act(g) / g) with the ratio frozen
    (0.5 where g is ~0: the slope of SiLU and GELU there)."""
    with torch.no_grad():
        small = g.abs() < 1e-6
        ratio = torch.where(small, torch.full_like(g, 0.5), act(g) / torch.where(small, torch.ones_like(g), g))
    return g * ratio


class LRPModel(DenseModel):
    """DenseModel (float32) whose backward is the LRP rules of the module docstring."""

    def __init__(self, weights, mode: str = "attnlrp", positions: bool = True):
        """positions=False: the rotary rotation passes all relevance to the queries and keys (no
        positional share), as LXT's AttnLRP does (its attention patch sees rotated q and k)."""
        if mode not in MODES:
            raise ValueError(f"LRP mode {mode!r}: one of {MODES}")
        super().__init__(weights)
        if self.attn_softcap or self.final_softcap:
            raise NotImplementedError("LRP rules for softcapped logits are not written")
        self.mode = mode
        self.positions = positions
        self.pos_leaves: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- rules ---------------------------------------------------------------------------
    def _rms(self, x, w, eps=None):
        xf = x.float()
        eps = self.eps if eps is None else eps
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps).detach()).to(x.dtype)

    def _positions(self, j: int, T: int):
        """Block j's cos / sin [T d_head] as leaves of the backward (their relevance is positional)."""
        cos, sin = self.rope(T, j)
        if j not in self.pos_leaves or self.pos_leaves[j][0].shape[0] != T:
            self.pos_leaves[j] = (cos.detach().clone().float().requires_grad_(True),
                                  sin.detach().clone().float().requires_grad_(True))
        return self.pos_leaves[j]

    def _rot_lrp(self, t, cos, sin):                      # t [B heads T d_head]
        half = t.shape[-1] // 2
        rot = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
        if not self.positions:
            return t * cos.detach() + rot * sin.detach()
        return uniform(t, cos) + uniform(rot, sin)

    def attention(self, j, x, hooks, keep, want, cache=None, start=0):
        if cache is not None or start:
            raise NotImplementedError("LRP runs whole sequences")
        L, H, KV, D = self.layers[j], self.n_heads, self.n_kv, self.d_head
        B, T, _ = x.shape
        h = self._rms(x, L["ln1"])
        q = self._lin(h, L["wq"], L["bq"]).view(B, T, H, D)
        k = self._lin(h, L["wk"], L["bk"]).view(B, T, KV, D)
        v = self._lin(h, L["wv"], L["bv"]).view(B, T, KV, D).transpose(1, 2)
        if L["q_norm"] is not None:
            q, k = self._rms(q, L["q_norm"]), self._rms(k, L["k_norm"])
        cos, sin = self._positions(j, T)
        q, k = self._rot_lrp(q.transpose(1, 2), cos, sin), self._rot_lrp(k.transpose(1, 2), cos, sin)
        rep = H // KV
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        mask = self.causal_mask(T, j)
        if self.mode == "cp":
            with torch.no_grad():
                probs = (q @ k.transpose(-1, -2) * L["scale"] + mask).softmax(-1)
            z = probs @ v
        else:
            s = uniform(q, k.transpose(-1, -2), torch.matmul) * L["scale"]
            probs = (s + mask).softmax(-1)
            z = uniform(probs, v, torch.matmul)
        out = self._lin(z.transpose(1, 2).reshape(B, T, H * D), L["wo"], L["bo"])
        if L["ln1_post"] is not None:
            out = self._rms(out, L["ln1_post"])
        return out

    def mlp_dense(self, j, x, hooks, keep, want):
        L = self.layers[j]
        h = self._rms(x, L["ln2"])
        if self.mode == "cp":                      # the gate is a constant: all relevance to the up projection
            post = self.act(self._lin(h, L["wg"])).detach() * self._lin(h, L["wu"], L["bu"])
        else:
            g = identity_rule(self.act, self._lin(h, L["wg"]))
            post = uniform(g, self._lin(h, L["wu"], L["bu"]))
        out = self._lin(post, L["wd"], L["bd"])
        if L["ln2_post"] is not None:
            out = self._rms(out, L["ln2_post"])
        return out


def relevance(lm: LRPModel, x: torch.Tensor, readout, layers: bool = False) -> dict:
    """LRP of `readout` (kernels.token_attribution.Readout) at the last position for the token
    embeddings x [T d_model] (the value at hook_embed): {"f", "tokens" [T] (content relevance
    of each input token), "positions" [T] (relevance of the rotary position factors read at
    each position, summed over blocks), "layers" [n_layers T] (relevance of the residual
    stream entering each block, if asked)}, float64."""
    lm.pos_leaves.clear()
    with torch.enable_grad():
        x0 = x.detach().float()[None].requires_grad_(True)
        h, keep = x0, []
        for j in range(lm.n_layers):
            if layers:
                keep.append(h)
            h = h + lm.attention(j, h, {}, {}, set())
            h = h + lm.mlp_dense(j, h, {}, {}, set())
        ids = torch.as_tensor(readout.ids, device=h.device)
        sel = F.linear(lm.final_norm(h[:, -1]), lm.W_U[ids], None if lm.b_U is None else lm.b_U[ids])
        f = readout.from_selected(sel)[0]
        leaves = [t for j in sorted(lm.pos_leaves) for t in lm.pos_leaves[j]]
        grads = torch.autograd.grad(f, [x0, *keep[1:], *leaves], allow_unused=True)
    gx, gk, gl = grads[0], grads[1:len(keep)], grads[len(keep) if keep else 1:]
    tokens = (x0.detach().double() * gx.double()).sum(-1)[0]
    pos = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for leaf, g in zip(leaves, gl):
        if g is not None:
            pos += (leaf.detach().double() * g.double()).sum(-1)
    out = {"f": float(f.detach()), "tokens": tokens, "positions": pos}
    if layers:
        rows = [tokens] + [(k.detach().double() * g.double()).sum(-1)[0] for k, g in zip(keep[1:], gk)]
        out["layers"] = torch.stack(rows)
    lm.pos_leaves.clear()
    return out


_models: dict = {}


def lrp_model(model, mode: str = "attnlrp") -> LRPModel | None:
    """The LRP forward of a LoadedModel (float32), once per mode; None when the model's block is
    not one kernels.forward covers (then LRP is not available for it)."""
    key = (id(model), mode)
    if key not in _models:
        try:
            _models[key] = LRPModel(model.weights(), mode)
        except NotImplementedError:
            _models[key] = None
    return _models[key]
