"""Sparse training step of a per-layer transcoder (BatchTopK, skip connection, aux-k loss).

A transcoder reads an MLP's input x (the post-attention norm's output) and predicts the MLP's
output y through sparse features: f = act(W_enc x + b_enc), y_hat = f W_dec + b_dec + W_skip x.
It is trained as a BatchTopK dictionary (the n*k largest positive pre-activations of a batch of
n rows are kept; Bussmann et al. 2024) and stored as a JumpReLU whose threshold is the running
mean of the smallest kept value, as SAELens stores its BatchTopK SAEs: that is the activation
circuit-tracer loads (`activation_function.threshold`).

Only the n*k chosen pre-activations carry gradient, so no [n d_tc] gradient is ever formed:
the choice comes from one no-grad bfloat16 product, the chosen values are recomputed exactly
(a sampled product at the chosen entries), and every gradient is a sparse product:

    reference_loss(tc, x, y, chosen, aux)     dense autograd, the same choice (tests)
    sparse_step(tc, x, y, chosen, aux)        the same loss, the gradients written to .grad

Layouts are circuit-tracer's: W_enc [d_tc d_in], W_dec [d_tc d_out], W_skip [d_out d_in].
Everything runs on whichever device the tensors are on (CSR products exist on CPU and CUDA).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


class Transcoder(torch.nn.Module):
    """Parameters of one transcoder being trained (normalised units: x and y scaled so that
    their mean squared norm is their width; the scales are folded in on export)."""

    def __init__(self, d_in: int, d_out: int, d_tc: int, skip: bool = True, generator=None,
                 device=None, dtype=torch.float32):
        super().__init__()
        W = torch.randn(d_tc, d_out, generator=generator, dtype=dtype).to(device)
        W = W / W.norm(dim=-1, keepdim=True) * 0.1                     # small unit-direction rows
        self.W_dec = torch.nn.Parameter(W)
        self.W_enc = torch.nn.Parameter(W.clone() if d_in == d_out else
                                        torch.randn(d_tc, d_in, generator=generator, dtype=dtype).to(device) * 0.1 / d_in ** 0.5)
        self.b_enc = torch.nn.Parameter(torch.zeros(d_tc, dtype=dtype, device=device))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device))
        self.W_skip = torch.nn.Parameter(torch.zeros(d_out, d_in, dtype=dtype, device=device)) if skip else None

    @property
    def d_tc(self) -> int:
        return self.W_enc.shape[0]


@dataclass
class Chosen:
    """Entries (row, col) of the [n d_tc] feature matrix, grouped by row (rows non-decreasing;
    the order within a row does not matter to any product here)."""
    rows: torch.Tensor     # [nnz] long
    cols: torch.Tensor     # [nnz] long
    n: int

    def csr(self, vals: torch.Tensor, n_cols: int) -> torch.Tensor:
        crow = torch.zeros(self.n + 1, dtype=torch.long, device=vals.device)
        crow[1:] = torch.bincount(self.rows, minlength=self.n).cumsum(0)
        return torch.sparse_csr_tensor(crow, self.cols, vals, (self.n, n_cols), check_invariants=False)

    def csr_t(self, vals: torch.Tensor, n_cols: int) -> torch.Tensor:
        """The transpose [n_cols n] as CSR (entries regrouped by column; the grouping is
        computed once per choice, every gradient product reuses it)."""
        if getattr(self, "_t", None) is None:
            order = torch.argsort(self.cols)
            crow = torch.zeros(n_cols + 1, dtype=torch.long, device=vals.device)
            crow[1:] = torch.bincount(self.cols, minlength=n_cols).cumsum(0)
            self._t = (order, crow, self.rows[order])
        order, crow, rows = self._t
        return torch.sparse_csr_tensor(crow, rows, vals[order], (n_cols, self.n), check_invariants=False)

    def sampled(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(a @ b.T)[rows, cols] without forming the product ([nnz])."""
        pattern = self.csr(torch.zeros(len(self.rows), dtype=a.dtype, device=a.device), b.shape[0])
        return torch.sparse.sampled_addmm(pattern, a, b.t()).values()


def choose(tc: Transcoder, x: torch.Tensor, k: int, dead: torch.Tensor | None, k_aux: int,
           select_dtype=torch.bfloat16, cap: int = 4) -> tuple[Chosen, Chosen | None]:
    """BatchTopK: the n*k largest positive pre-activations of the batch (at most cap*k per
    row), and the top k_aux pre-activations per row among the dead latents (None when there
    are none): from one no-grad product in select_dtype."""
    n, m = len(x), tc.d_tc
    with torch.no_grad():
        pre = torch.addmm(tc.b_enc.to(select_dtype), x.to(select_dtype), tc.W_enc.to(select_dtype).t())
        cand = pre.topk(min(cap * k, m), dim=-1)
        flat = cand.values.flatten().float()
        top = flat.topk(min(n * k, len(flat)))
        keep = torch.sort(top.indices[top.values > 0]).values       # row-major positions: grouped by row
        chosen = Chosen(keep // cand.values.shape[1], cand.indices.flatten()[keep], n)
        aux = None
        if dead is not None and k_aux and bool(dead.any()):
            dcols = dead.nonzero()[:, 0]
            ka = min(k_aux, len(dcols))
            sub = pre.index_select(1, dcols).topk(ka, dim=-1).indices
            aux = Chosen(torch.arange(n, device=x.device).repeat_interleave(ka), dcols[sub.flatten()], n)
    return chosen, aux


def _aux_scale(n_dead: int, k_aux_full: int, coef: float) -> float:
    return coef * min(n_dead / k_aux_full, 1.0)


def reference_loss(tc: Transcoder, x, y, chosen: Chosen, aux: Chosen | None = None, n_dead: int = 0,
                   aux_coef: float = 0.25):
    """(mse, aux) by dense autograd: the chosen entries' pre-activations decoded (aux: the dead
    latents' raw pre-activations predicting the detached residual), SAELens's TopK losses."""
    n, m = len(x), tc.d_tc
    pre = x @ tc.W_enc.t() + tc.b_enc
    mask = torch.zeros(n, m, dtype=torch.bool, device=x.device)
    mask[chosen.rows, chosen.cols] = True
    y_hat = (pre * mask) @ tc.W_dec + tc.b_dec
    if tc.W_skip is not None:
        y_hat = y_hat + x @ tc.W_skip.t()
    mse = (y_hat - y).pow(2).sum(-1).mean()
    aux_loss = pre.new_zeros(())
    if aux is not None:
        amask = torch.zeros(n, m, dtype=torch.bool, device=x.device)
        amask[aux.rows, aux.cols] = True
        r = (y - y_hat).detach()
        aux_loss = _aux_scale(n_dead, x.shape[1] // 2, aux_coef) * ((pre * amask) @ tc.W_dec - r).pow(2).sum(-1).mean()
    return mse, aux_loss


def sparse_step(tc: Transcoder, x, y, chosen: Chosen, aux: Chosen | None = None, n_dead: int = 0,
                aux_coef: float = 0.25, skip_dtype=None) -> dict:
    """reference_loss's values, its gradients accumulated into the parameters' .grad by sparse
    products; returns {"mse", "aux", "acts" (the chosen activations [nnz])}. skip_dtype (e.g.
    bfloat16) runs the two dense skip products (x W_skip^T and its weight gradient) in that
    dtype, ~3x faster on CPUs with bfloat16 matmuls; None keeps x's dtype (exact)."""
    n, m = len(x), tc.d_tc
    with torch.no_grad():
        a = chosen.sampled(x, tc.W_enc) + tc.b_enc[chosen.cols]                 # [nnz]
        y_hat = torch.sparse.mm(chosen.csr(a, m), tc.W_dec) + tc.b_dec
        xs = x if skip_dtype is None else x.to(skip_dtype)
        if tc.W_skip is not None:
            y_hat = y_hat + (xs @ tc.W_skip.to(xs.dtype).t()).to(x.dtype)
        e = y_hat - y
        mse = e.pow(2).sum(-1).mean()
        G = e * (2.0 / n)                                                          # d mse / d y_hat
        grads = {"W_dec": torch.sparse.mm(chosen.csr_t(a, m), G), "b_dec": G.sum(0)}
        if tc.W_skip is not None:
            grads["W_skip"] = (G.to(xs.dtype).t() @ xs).to(x.dtype)
        d_a = chosen.sampled(G, tc.W_dec)
        grads["W_enc"] = torch.sparse.mm(chosen.csr_t(d_a, m), x)
        grads["b_enc"] = torch.zeros(m, dtype=x.dtype, device=x.device).index_add_(0, chosen.cols, d_a)
        aux_loss = torch.zeros((), dtype=x.dtype, device=x.device)
        if aux is not None:
            c = _aux_scale(n_dead, x.shape[1] // 2, aux_coef)
            pa = aux.sampled(x, tc.W_enc) + tc.b_enc[aux.cols]
            diff = torch.sparse.mm(aux.csr(pa, m), tc.W_dec) + e                 # r_hat - (y - y_hat)
            aux_loss = c * diff.pow(2).sum(-1).mean()
            Ga = diff * (2.0 * c / n)
            grads["W_dec"] += torch.sparse.mm(aux.csr_t(pa, m), Ga)
            d_pa = aux.sampled(Ga, tc.W_dec)
            grads["W_enc"] += torch.sparse.mm(aux.csr_t(d_pa, m), x)
            grads["b_enc"].index_add_(0, aux.cols, d_pa)
        for name, g in grads.items():
            p = getattr(tc, name)
            p.grad = g if p.grad is None else p.grad + g
    return {"mse": float(mse), "aux": float(aux_loss), "acts": a}


def encode_jumprelu(W_enc, b_enc, threshold, x):
    """circuit-tracer's JumpReLU encode: pre * (pre > threshold), [n d_tc]."""
    pre = x @ W_enc.t() + b_enc
    return pre * (pre > threshold)


__all__ = ["Transcoder", "Chosen", "choose", "reference_loss", "sparse_step", "encode_jumprelu"]
