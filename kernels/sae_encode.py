"""Sparse SAE encode: per token the active latents as (indices, values), never [n d_sae].

SAELens's encode returns the dense latent matrix [n d_sae] (for a TopK SAE: a full
pre-activation matrix, a top-k, then a scatter into zeros). Everything downstream here
(per-token top features, corpus encoding into DuckDB) wants only the k active latents.

    reference_encode(sae, x)  SAELens encode, then the top-k of the dense result (the spec)
    fused_encode(sae, x)      rows in blocks: pre-activations of one block (matmul, bias
                              added in place), the decoder-norm rescale in place, top-k, ReLU; the
                              [block d_sae] buffer is reused, nothing of size [n d_sae] exists
    sparse_decode(sae, idx, val)  reconstruction from the sparse code (gather of W_dec rows)

Both encodes return (values [n k], indices [n k]) sorted by value, descending; for a TopK
SAE k is always its own k (the active latents). For other architectures (JumpReLU, ReLU,
gated) fused_encode falls back to SAELens's encode on row blocks and keeps the top k (k
given, default 64); inactive slots carry 0.
Inputs are flat activations [n d_in] (hook_z with heads concatenated).
"""

from __future__ import annotations

import torch

ROW_BLOCK = 2048   # rows per block: small blocks make the matmul slow on CPU (256: 2x slower)


def _is_topk(sae) -> bool:
    return sae.cfg.architecture() == "topk"


def _k_of(sae, k: int | None) -> int:
    """A TopK SAE has exactly cfg.k active latents per token: that is its k, whatever is asked."""
    return int(sae.cfg.k) if _is_topk(sae) else int(k or 64)


def _sorted_topk(dense: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    v, i = dense.topk(min(k, dense.shape[-1]), dim=-1, sorted=True)
    return v, i


def _flat_sae_in(sae, x: torch.Tensor) -> torch.Tensor:
    """SAELens's input processing without the hook_z reshape (x is already flat)."""
    x = x.to(sae.dtype)
    x = sae.run_time_activation_norm_fn_in(x)
    return x - sae.b_dec * sae.cfg.apply_b_dec_to_input


def reference_encode(sae, x: torch.Tensor, k: int | None = None):
    """SAELens's own encode (dense), then its top k, sorted: the reference."""
    reshaping = getattr(sae, "hook_z_reshaping_mode", False)
    if reshaping:
        sae.turn_off_forward_pass_hook_z_reshaping()
    try:
        with torch.inference_mode():
            dense = sae.encode(x)
    finally:
        if reshaping:
            sae.turn_on_forward_pass_hook_z_reshaping()
    return _sorted_topk(dense, _k_of(sae, k))


@torch.inference_mode()
def fused_encode(sae, x: torch.Tensor, k: int | None = None, row_block: int = ROW_BLOCK):
    """Top-k latents of each row of x [n d_in] → (values [n k], indices [n k])."""
    k = _k_of(sae, k)
    n = x.shape[0]
    values = torch.empty(n, k, dtype=sae.W_enc.dtype, device=x.device)
    indices = torch.empty(n, k, dtype=torch.long, device=x.device)
    if not _is_topk(sae) or getattr(sae.cfg, "normalize_activations", "none") not in ("none",):
        for s in range(0, n, row_block):
            v, i = reference_encode(sae, x[s:s + row_block], k)
            values[s:s + row_block], indices[s:s + row_block] = v, i
        return values, indices
    W, b = sae.W_enc, sae.b_enc
    scale = sae.W_dec.norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else None
    buf = torch.empty(min(row_block, n), W.shape[1], dtype=W.dtype, device=x.device)  # [block d_sae]
    for s in range(0, n, row_block):
        xb = _flat_sae_in(sae, x[s:s + row_block])                    # [b d_in]
        pre = buf[:xb.shape[0]]
        torch.matmul(xb, W, out=pre)                                   # [b d_sae]
        pre.add_(b)                                                    # SAELens's order of ops
        if scale is not None:
            pre.mul_(scale)
        v, i = pre.topk(k, dim=-1, sorted=False)                       # [b k]
        v, order = v.sort(dim=-1, descending=True)                     # sort k, not d_sae
        values[s:s + row_block] = v.relu_()
        indices[s:s + row_block] = i.gather(1, order)
    return values, indices


@torch.inference_mode()
def sparse_decode(sae, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Reconstruction [n d_in] (flat) from a sparse code, as SAELens's decode computes it."""
    if getattr(sae.cfg, "normalize_activations", "none") != "none" or not hasattr(sae, "W_dec"):
        dense = to_dense(values, indices, sae.cfg.d_sae)
        reshaping = getattr(sae, "hook_z_reshaping_mode", False)
        if reshaping:
            sae.turn_off_forward_pass_hook_z_reshaping()
        try:
            return sae.decode(dense)
        finally:
            if reshaping:
                sae.turn_on_forward_pass_hook_z_reshaping()
    W = sae.W_dec
    v = values
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        v = v / W.norm(dim=-1)[indices]
    return torch.einsum("nk,nkd->nd", v, W[indices]) + sae.b_dec


def to_dense(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    return torch.zeros(values.shape[0], d_sae, dtype=values.dtype).scatter_(1, indices, values)
