"""Sparse TopK SAE training step: SAELens's loss and gradients without [batch d_sae] backward.

SAELens's TopKTrainingSAE.training_forward_pass (the reference) builds the dense latent
matrix [batch d_sae], decodes it with a dense matmul and lets autograd differentiate both
matmuls densely, although only k of d_sae latents per row are non-zero; the aux-k loss does
the same again for the dead latents. On a CPU that is ~5 dense [batch d_in d_sae] matmuls
per step, most of them multiplying zeros.

Here one dense matmul remains: the pre-activations, computed without autograd, only to
choose the top k (and the top k_aux dead latents). The chosen values are then recomputed
from gathered encoder columns with autograd on, and decoded from gathered decoder rows, so
every gradient is a gather / index-add of size [batch k d_in]:

    reference: sae.training_forward_pass(step_input)            (SAELens, dense)
    fast:      sparse_training_forward(sae, step_input)         (same loss, same gradients)

`SparseTopKTrainingSAE` is SAELens's TopKTrainingSAE with this forward; SAETrainer,
checkpoints, saving and the folder format are SAELens's own. Sparse products use torch's
CSR / COO matrices, which exist on CPU and CUDA alike.
"""

from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

DENSE_FROM = 128   # chosen latents per row from which one dense matmul beats gathering their rows

def _csr(vals: torch.Tensor, idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    """[n m] values at columns idx as a CSR matrix [n n_cols] (m entries per row)."""
    n, m = idx.shape
    crow = torch.arange(0, n * m + 1, m, device=idx.device)
    return torch.sparse_csr_tensor(crow, idx.reshape(-1), vals.reshape(-1), (n, n_cols),
                                   check_invariants=False)


def _csr_t_mm(vals: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor, n_cols: int,
              dense: torch.Tensor) -> torch.Tensor:
    """S^T @ dense for the sparse S [len(dense) n_cols] with entries vals at (rows, cols):
    [n_cols d], rows of latents never chosen stay 0."""
    coo = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (n_cols, len(dense)),
                                  check_invariants=False)
    return torch.sparse.mm(coo.coalesce().to_sparse_csr(), dense)


def _gather_dot(a: torch.Tensor, M: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out[i, j] = a[i] . M[idx[i, j]] without materialising more than [n m d] once."""
    return torch.bmm(M.index_select(0, idx.reshape(-1)).view(*idx.shape, -1), a[:, :, None])[..., 0]


class _ChosenPre(torch.autograd.Function):
    """pre[i, j] = (x[i] - b_dec) . W_enc[:, idx[i, j]] (the values come from the dense
    no-grad matmul that chose them). Backward: d W_enc = sae_in^T @ csr(g) and, since
    sae_in = x - b_dec, d b_dec = -W_enc @ (g summed per latent); no [n d_in] gradient."""

    @staticmethod
    def forward(ctx, sae_in, b_dec, W_enc, idx, values):
        ctx.save_for_backward(sae_in, W_enc, idx)
        return values

    @staticmethod
    def backward(ctx, g):
        sae_in, W_enc, idx = ctx.saved_tensors
        d_b = d_W = None
        if ctx.needs_input_grad[1]:
            per_latent = torch.zeros(W_enc.shape[1], dtype=g.dtype, device=g.device)
            per_latent.index_add_(0, idx.reshape(-1), g.reshape(-1))
            d_b = -(W_enc @ per_latent)
        if ctx.needs_input_grad[2]:
            d_W = torch.mm(sae_in.t(), _csr(g, idx, W_enc.shape[1]))
        return None, d_b, d_W, None, None


class _SparseDecode(torch.autograd.Function):
    """Several sparse codes decoded in one product: rows of block b are
    sum_j acts_b[i, j] W_dec[idx_b[i, j]], blocks stacked ([sum n_b, d_in]). Backward:
    d acts = the output gradient dotted with the chosen rows (a gather for small m, one dense
    matmul then a gather for large m), d W_dec = csr(acts)^T @ g for all blocks at once."""

    @staticmethod
    def forward(ctx, W_dec, idxs, *acts):
        ctx.idxs = idxs
        ctx.save_for_backward(W_dec, *acts)
        return torch.sparse.mm(_stacked_csr(acts, idxs, W_dec.shape[0]), W_dec)

    @staticmethod
    def backward(ctx, g):
        W_dec, *acts = ctx.saved_tensors
        d_acts, start = [], 0
        for a, idx in zip(acts, ctx.idxs):
            gb = g[start:start + len(idx)]
            start += len(idx)
            if idx.shape[1] >= DENSE_FROM:
                d_acts.append((gb @ W_dec.t()).gather(1, idx))
            else:
                d_acts.append(_gather_dot(gb, W_dec, idx))
        d_W = _csr_t_mm(torch.cat([a.reshape(-1) for a in acts]),
                        torch.cat([i.reshape(-1) for i in ctx.idxs]),
                        torch.cat([torch.arange(len(i), device=g.device).repeat_interleave(i.shape[1]) + off
                                   for i, off in zip(ctx.idxs, _offsets(ctx.idxs))]),
                        W_dec.shape[0], g)
        return (d_W, None, *d_acts)


def _offsets(idxs):
    out, o = [], 0
    for i in idxs:
        out.append(o)
        o += len(i)
    return out


def _stacked_csr(acts, idxs, n_cols: int) -> torch.Tensor:
    crows, o = [], 0
    for i in idxs:
        n, m = i.shape
        crows.append(torch.arange(0 if not crows else 1, n + 1, device=i.device) * m + o)
        o += n * m
    return torch.sparse_csr_tensor(torch.cat(crows), torch.cat([i.reshape(-1) for i in idxs]),
                                   torch.cat([a.reshape(-1) for a in acts]),
                                   (sum(len(i) for i in idxs), n_cols), check_invariants=False)


def _select(sae, sae_in: torch.Tensor, dead: torch.Tensor | None, k: int, k_aux: int):
    """The top k latents per row of the (decoder-norm rescaled, as SAELens ranks them)
    pre-activations, and the top k_aux dead ones: indices and raw pre-activations
    x . W_enc + b_enc at them, from one dense matmul without autograd."""
    with torch.no_grad():
        pre = torch.addmm(sae.b_enc, sae_in, sae.W_enc)
        ranked = pre * sae.W_dec.norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else pre
        idx = ranked.topk(k, dim=-1, sorted=False).indices
        aux_idx = None
        if k_aux:
            cols = dead.nonzero()[:, 0]
            aux_idx = cols[ranked.index_select(1, cols).topk(k_aux, dim=-1, sorted=False).indices]
        return idx, pre.gather(1, idx), aux_idx, (pre.gather(1, aux_idx) if k_aux else None)


def _chosen(sae, sae_in, idx, raw):
    """Pre-activations at the chosen latents [n m] with autograd, rescaled like SAELens."""
    b_dec = sae.b_dec if sae.cfg.apply_b_dec_to_input else sae.b_dec.detach()
    return _ChosenPre.apply(sae_in, b_dec, sae.W_enc, idx, raw - sae.b_enc.detach()[idx]) + sae.b_enc[idx]


def sparse_training_forward(sae, step_input):
    """TopKTrainingSAE.training_forward_pass with sparse gradients: the same
    TrainStepOutput (loss = summed-over-d_in MSE, mean over rows, + aux-k loss), feature_acts
    and hidden_pre dense but detached (SAETrainer counts firing latents from them)."""
    from sae_lens.saes.sae import TrainStepOutput

    with torch.no_grad():
        sae_in = sae.process_sae_in(step_input.sae_in)
    k = int(sae.cfg.k)
    dead = step_input.dead_neuron_mask
    num_dead = int(dead.sum()) if dead is not None else 0
    k_aux_full = sae_in.shape[-1] // 2
    k_aux = min(k_aux_full, num_dead)
    idx, raw, aux_idx, aux_raw = _select(sae, sae_in, dead, k, k_aux)

    # the top-k and the aux-k latents' pre-activations in one product, decoded in one product
    both = torch.cat([idx, aux_idx], 1) if k_aux else idx
    pre = _chosen(sae, sae_in, both, torch.cat([raw, aux_raw], 1) if k_aux else raw)
    if sae.cfg.rescale_acts_by_decoder_norm:
        norms = sae.W_dec.norm(dim=-1)[both]
        pre = pre * norms
    acts = pre[:, :k].relu()
    codes = [acts / norms[:, :k] if sae.cfg.rescale_acts_by_decoder_norm else acts]
    if k_aux:   # SAELens keeps the aux-k values as they are (no ReLU)
        codes.append(pre[:, k:] / norms[:, k:] if sae.cfg.rescale_acts_by_decoder_norm else pre[:, k:])
    decoded = _SparseDecode.apply(sae.W_dec, (idx, aux_idx) if k_aux else (idx,), *codes)
    n = len(idx)
    out = sae.run_time_activation_norm_fn_out(decoded[:n] + sae.b_dec)
    sae_out = sae.reshape_fn_out(out, sae.d_head)
    mse = sae.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
    losses = {"mse_loss": mse}
    loss = mse
    if k_aux:
        residual = (step_input.sae_in - sae_out).detach()
        recons = sae.reshape_fn_out(decoded[n:], sae.d_head)
        aux = (recons - residual).pow(2).sum(dim=-1).mean()
        aux = sae.cfg.aux_loss_coefficient * min(num_dead / k_aux_full, 1.0) * aux
    else:
        aux = sae_out.new_tensor(0.0)
    losses["auxiliary_reconstruction_loss"] = aux
    loss = loss + aux
    with torch.no_grad():
        dense = torch.zeros(len(idx), sae.cfg.d_sae, dtype=acts.dtype, device=acts.device)
        dense.scatter_(-1, idx, acts.detach())
    return TrainStepOutput(sae_in=step_input.sae_in, sae_out=sae_out, feature_acts=dense,
                           hidden_pre=dense, loss=loss, losses=losses)


def sparse_topk_training_sae(cfg):
    """A TopKTrainingSAE (SAELens's class: its init, checkpoints, saving, folder format)
    whose training forward is sparse_training_forward."""
    from sae_lens import TopKTrainingSAE

    class SparseTopKTrainingSAE(TopKTrainingSAE):
        def training_forward_pass(self, step_input):
            return sparse_training_forward(self, step_input)

    return SparseTopKTrainingSAE(cfg)


__all__ = ["sparse_training_forward", "sparse_topk_training_sae"]
