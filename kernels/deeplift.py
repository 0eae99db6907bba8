"""DeepLIFT for the transformer block: reference differences with multipliers, as a modified
gradient over the canonical weights (backend/analyses/token_attribution.py, method "deeplift").

DeepLIFT (Shrikumar et al. 2017, the seed "Not Just a Black Box") explains f(x) - f(x_ref) by
multipliers m = d(delta out) / d(delta in) chained like gradients; a token's score is
sum_d m_x[t, d] * (x - x_ref)[t, d]. Its rescale rule gives the multiplier of a one-input
elementwise map f: m = (f(a) - f(a_ref)) / (a - a_ref) (f'(a) where |a - a_ref| < 1e-6, the
limit). Linear maps keep their weights. That is all the paper defines; the rescale rule has no
multiplier for a map of two activations (the gated MLP's act(g) * u, q . k, attention weights
x values, RMSNorm's x * 1/rms(x), the softmax's exp(s) / sum exp(s)). So DeepLIFT is not defined
for these blocks as written, and a rule for those maps is a choice. Two sets here (`rules`):

- ``"exact"`` (the default, what the analysis uses): one principle, the multiplier of every map
  is its Jacobian averaged over the straight segment from the reference's value to the input's
  value at that map. For a one-input elementwise map that average *is* the rescale rule's
  secant; for a linear map it is the weights; for a product of two activations it is the
  symmetric split a*b - a'*b' = (a + a')/2 * (b - b') + (a - a')/2 * (b + b') (each factor's
  multiplier is the mean of the other factor at input and reference: exact for any bilinear map,
  matmuls included; the Shapley value of the two factors). RMSNorm is decomposed into x^2
  (multiplier x + x_ref), the mean (linear), rsqrt (rescale) and the product x * rsqrt(...)
  (split). The softmax, a map of many inputs with no closed-form average, gets its Jacobian
  averaged by Gauss-Legendre quadrature (SOFTMAX_NODES nodes) over the segment of its logits.
  (Decomposing the softmax instead into exp, sum, reciprocal and a split product is exact too,
  but on SmolLM2 with a zero reference it gives scores in the hundreds that cancel: the
  reference's row sums are tiny, so the reciprocal's multiplier is huge.) Every map then sums
  to its delta (the softmax to quadrature accuracy), so the token scores add up to f(x) -
  f(x_ref) up to float rounding and quadrature: the completeness gap measures those, and is
  reported as it is.
- ``"linear"``: only the gate's activation (SiLU / GELU) is rescaled; RMSNorm, the softmax and
  the products are differentiated as they are at the actual input (linearised there). The gap
  this leaves is the nonlinearity the rescale rule does not reach.

The rotary rotation multiplies by cos / sin tables that are the same for input and reference
(both are at the same positions): a linear map. Attention is computed explicitly (no fused
kernel: the softmax's pieces need their own multipliers). The reference input is a baseline at
the embeddings with position 0 held at its own embedding by default (as for IG), so position
0's difference is 0 all the way through and it gets no score.

Multipliers are computed in float64 from the float32 endpoints (the secant of two nearby float32
values is well conditioned in float64), then used in the model's dtype.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .forward import DenseModel

SMALL = 1e-6          # |a - a_ref| below this: the derivative at a instead of the secant
RULES = ("exact", "linear")
SOFTMAX_NODES = 32     # Gauss-Legendre nodes of the softmax's mean Jacobian


def _deriv(f, a: torch.Tensor) -> torch.Tensor:
    """f'(a) elementwise, float64."""
    with torch.enable_grad():
        t = a.detach().double().requires_grad_(True)
        g, = torch.autograd.grad(f(t).sum(), t)
    return g


def multiplier(f, a: torch.Tensor, a_ref: torch.Tensor) -> torch.Tensor:
    """The rescale multiplier (f(a) - f(a_ref)) / (a - a_ref), f'(a) where |a - a_ref| < SMALL;
    float64, computed from the two endpoints as given."""
    with torch.no_grad():
        ad, rd = a.detach().double(), a_ref.detach().double()
        d = ad - rd
        small = d.abs() < SMALL
        m = (f(ad) - f(rd)) / torch.where(small, torch.ones_like(d), d)
        if small.any():
            m = torch.where(small, _deriv(f, ad), m)
    return m


def rescale(f, a: torch.Tensor, a_ref: torch.Tensor):
    """(f(a), f(a_ref)) with the backward of the rescale rule: d out / d a = the multiplier."""
    m = multiplier(f, a, a_ref).to(a.dtype)
    return f(a.detach()) + (a - a.detach()) * m, f(a_ref)


def product(a, a_ref, b, b_ref, op=torch.mul):
    """(op(a, b), op(a_ref, b_ref)) for a bilinear op with the backward of the symmetric split:
    d out / d a through the mean of b and b_ref, d out / d b through the mean of a and a_ref."""
    a0, b0 = a.detach(), b.detach()
    am, bm = (a0 + a_ref) / 2, (b0 + b_ref) / 2
    return op(a0, b0) + op(a - a0, bm) + op(am, b - b0), op(a_ref, b_ref)


def square(a, a_ref):
    """(a^2, a_ref^2): the rescale multiplier of the square is exactly a + a_ref."""
    a0 = a.detach()
    return a0 * a0 + (a - a0) * (a0 + a_ref), a_ref * a_ref


def _segment_nodes(n: int, dtype, device):
    t, w = np.polynomial.legendre.leggauss(n)
    return (torch.as_tensor((t + 1) / 2, dtype=dtype, device=device),
            torch.as_tensor(w / 2, dtype=dtype, device=device))


class _SegmentSoftmax(torch.autograd.Function):
    """softmax(s) over the kept entries of the last axis; backward: the softmax's Jacobian
    averaged over the segment from s_ref to s (Gauss-Legendre, SOFTMAX_NODES nodes), the
    many-input form of the rescale multiplier (module docstring)."""

    @staticmethod
    def forward(ctx, s, s_ref, keep):
        ctx.save_for_backward(s, s_ref, keep)
        return s.masked_fill(~keep, float("-inf")).softmax(-1)

    @staticmethod
    def backward(ctx, g):
        s, s_ref, keep = ctx.saved_tensors
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        a, b = torch.where(keep, s_ref, zero), torch.where(keep, s - s_ref, zero)
        out = torch.zeros_like(s)
        for t, w in zip(*_segment_nodes(SOFTMAX_NODES, s.dtype, s.device)):
            p = (a + t * b).masked_fill(~keep, float("-inf")).softmax(-1)
            out += w * p * (g - (p * g).sum(-1, keepdim=True))
        return out, None, None


class DeepLiftModel(DenseModel):
    """DenseModel whose forward carries (input, reference) pairs and whose backward is DeepLIFT's
    multipliers under `rules` (module docstring). Float32 (the offline models' weights)."""

    def __init__(self, weights, rules: str = "exact", dtype: torch.dtype | None = None):
        if rules not in RULES:
            raise ValueError(f"DeepLIFT rules {rules!r}: one of {RULES}")
        super().__init__(weights, dtype)
        if self.attn_softcap or self.final_softcap:
            raise NotImplementedError("DeepLIFT rules for softcapped logits are not written")
        self.rules = rules

    # -- pieces over pairs ---------------------------------------------------------------
    def _norm(self, x, xr, w):
        if self.rules == "linear":
            return self._rms_plain(x, w), self._rms_plain(xr, w)
        sq, sqr = square(x, xr)
        s, sr = sq.mean(-1, keepdim=True) + self.eps, sqr.mean(-1, keepdim=True) + self.eps
        r, rr = rescale(torch.rsqrt, s, sr)
        y, yr = product(x, xr, r, rr)
        return w * y, w * yr

    def _rms_plain(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _mul(self, a, ar, b, br, op=torch.mul):
        if self.rules == "linear":
            return op(a, b), op(ar, br)
        return product(a, ar, b, br, op)

    def _softmax(self, s, sr, keep):
        """Softmax over the last axis of attention logits s [B H T T] where `keep` [T T] is True."""
        if self.rules == "linear":
            return s.masked_fill(~keep, float("-inf")).softmax(-1), sr.masked_fill(~keep, float("-inf")).softmax(-1)
        return _SegmentSoftmax.apply(s, sr.detach(), keep), sr.masked_fill(~keep, float("-inf")).softmax(-1)

    def _rot_pair(self, t, tr, cos, sin):
        return self._rot(t, cos, sin), self._rot(tr, cos, sin)

    def attention_pair(self, j, x, xr):
        L, H, KV, D = self.layers[j], self.n_heads, self.n_kv, self.d_head
        B, T, _ = x.shape
        h, hr = self._norm(x, xr, L["ln1"])
        q, qr = (self._lin(t, L["wq"], L["bq"]).view(B, T, H, D) for t in (h, hr))
        k, kr = (self._lin(t, L["wk"], L["bk"]).view(B, T, KV, D) for t in (h, hr))
        v, vr = (self._lin(t, L["wv"], L["bv"]).view(B, T, KV, D).transpose(1, 2) for t in (h, hr))
        if L["q_norm"] is not None:
            q, qr = self._norm(q, qr, L["q_norm"])
            k, kr = self._norm(k, kr, L["k_norm"])
        cos, sin = self.rope(T, j)
        q, qr = self._rot_pair(q.transpose(1, 2), qr.transpose(1, 2), cos, sin)
        k, kr = self._rot_pair(k.transpose(1, 2), kr.transpose(1, 2), cos, sin)
        rep = H // KV
        if rep > 1:
            k, kr, v, vr = (t.repeat_interleave(rep, 1) for t in (k, kr, v, vr))
        s, sr = self._mul(q, qr, k.transpose(-1, -2), kr.transpose(-1, -2), torch.matmul)
        s, sr = s * L["scale"], sr * L["scale"]
        keep = torch.isfinite(self.causal_mask(T, j))
        p, pr = self._softmax(s, sr, keep)
        z, zr = self._mul(p, pr, v, vr, torch.matmul)
        out, outr = (self._lin(t.transpose(1, 2).reshape(B, T, H * D), L["wo"], L["bo"]) for t in (z, zr))
        if L["ln1_post"] is not None:
            out, outr = self._norm(out, outr, L["ln1_post"])
        return out, outr

    def mlp_pair(self, j, x, xr):
        L = self.layers[j]
        h, hr = self._norm(x, xr, L["ln2"])
        g, gr = rescale(self.act, self._lin(h, L["wg"]), self._lin(hr, L["wg"]))
        u, ur = self._lin(h, L["wu"], L["bu"]), self._lin(hr, L["wu"], L["bu"])
        post, postr = self._mul(g, gr, u, ur)
        out, outr = self._lin(post, L["wd"], L["bd"]), self._lin(postr, L["wd"], L["bd"])
        if L["ln2_post"] is not None:
            out, outr = self._norm(out, outr, L["ln2_post"])
        return out, outr

    def readout_pair(self, h, hr, readout):
        ids = torch.as_tensor(readout.ids, device=h.device)
        W, b = self.W_U[ids], None if self.b_U is None else self.b_U[ids]
        n, nr = self._norm(h[:, -1], hr[:, -1], self.ln_f)
        return readout.from_selected(F.linear(n, W, b)), readout.from_selected(F.linear(nr, W, b))


def attribute(dl: DeepLiftModel, x: torch.Tensor, x_ref: torch.Tensor, readout, layers: bool = False) -> dict:
    """DeepLIFT of `readout` (kernels.token_attribution.Readout) at the last position, input
    embeddings x [T d_model] against reference embeddings x_ref [T d_model] (values at hook_embed):
    one forward of the pair (the reference's without a graph) and one backward.
    {"f", "f_ref", "tokens" [T] (sum_d multiplier * (x - x_ref)), "gap" (sum(tokens) - (f - f_ref)),
    "layers" [n_layers T] (the same at the residual entering each block, if asked)}, float64."""
    with torch.enable_grad():
        x0 = x.detach().to(dl.dtype)[None].requires_grad_(True)
        h, hr = x0, x_ref.detach().to(dl.dtype)[None]
        keep = []
        for j in range(dl.n_layers):
            if layers:
                keep.append((h, hr))
            a, ar = dl.attention_pair(j, h, hr)
            h, hr = h + a, hr + ar
            m, mr = dl.mlp_pair(j, h, hr)
            h, hr = h + m, hr + mr
        f, fr = dl.readout_pair(h, hr, readout)
        grads = torch.autograd.grad(f[0], [x0, *[k[0] for k in keep[1:]]])
    diff = x0.detach().double() - x_ref.detach().double()[None]
    tokens = (grads[0].double() * diff).sum(-1)[0].detach()
    f_x, f_r = float(f.detach()[0]), float(fr.detach()[0])
    out = {"f": f_x, "f_ref": f_r, "tokens": tokens, "gap": float(tokens.sum()) - (f_x - f_r)}
    if layers:
        rows = [tokens] + [(g.double() * (k[0].detach().double() - k[1].detach().double())).sum(-1)[0]
                           for k, g in zip(keep[1:], grads[1:])]
        out["layers"] = torch.stack(rows).detach()
    return out


_models: dict = {}


def deeplift_model(model, rules: str = "exact") -> DeepLiftModel | None:
    """The DeepLIFT forward of a LoadedModel (its weights' dtype, float32 for the offline models),
    once per rule set; None when the model's block is not one kernels.forward covers."""
    key = (id(model), rules)
    if key not in _models:
        try:
            _models[key] = DeepLiftModel(model.weights(), rules)
        except NotImplementedError:
            _models[key] = None
    return _models[key]
