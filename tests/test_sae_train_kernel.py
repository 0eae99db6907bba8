"""The sparse TopK training step (kernels/sae_train.py) equals SAELens's own
TopKTrainingSAE.training_forward_pass: loss terms, latents and every parameter gradient,
with and without dead latents (aux-k loss), decoder-norm rescale on and off; and a short
SAETrainer run with it follows the dense run step for step. No model is loaded."""

from __future__ import annotations

import pytest
import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

from kernels import sae_train
from kernels.sae_train import sparse_topk_training_sae, sparse_training_forward


def _sae(width=768, d_in=96, k=16, rescale=True, apply_b_dec=True, seed=0):
    torch.manual_seed(seed)
    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=width, k=k, dtype="float64", device="cpu",
                                aux_loss_coefficient=0.25, rescale_acts_by_decoder_norm=rescale,
                                apply_b_dec_to_input=apply_b_dec)
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():   # away from the symmetric initialisation: biases, unequal decoder norms
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
        sae.W_dec.mul_(torch.rand(width, 1, dtype=torch.float64) + 0.5)
    return sae


def _grads(sae, fn, step_input):
    sae.zero_grad(set_to_none=True)
    out = fn(step_input)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("dead_share", [0.0, 0.004, 0.3])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("dense_from", [1, 10**9])   # both routes of the decode's backward
def test_loss_latents_and_gradients_equal_saelens(dead_share, rescale, dense_from, monkeypatch):
    monkeypatch.setattr(sae_train, "DENSE_FROM", dense_from)
    sae = _sae(rescale=rescale)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 96, generator=g, dtype=torch.float64) * 3
    dead = torch.rand(768, generator=g) < dead_share
    step = TrainStepInput(sae_in=x, dead_neuron_mask=dead, coefficients={}, n_training_steps=0,
                          is_logging_step=False)
    ref, g_ref = _grads(sae, sae.training_forward_pass, step)
    fast, g_fast = _grads(sae, lambda s: sparse_training_forward(sae, s), step)
    assert torch.allclose(fast.loss, ref.loss, rtol=1e-12)
    for name in ("mse_loss", "auxiliary_reconstruction_loss"):
        assert torch.allclose(fast.losses[name], ref.losses[name], rtol=1e-12, atol=1e-12), name
    if dead_share:
        assert float(ref.losses["auxiliary_reconstruction_loss"]) > 0   # the aux path is exercised
    assert torch.allclose(fast.feature_acts, ref.feature_acts, atol=1e-12)
    assert torch.allclose(fast.sae_out, ref.sae_out, atol=1e-10)
    assert set(g_fast) == set(g_ref) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in g_ref:
        assert torch.allclose(g_fast[name], g_ref[name], rtol=1e-9, atol=1e-11), name


def test_b_dec_not_applied_to_input():
    sae = _sae(apply_b_dec=False)
    x = torch.randn(64, 96, dtype=torch.float64)
    step = TrainStepInput(sae_in=x, dead_neuron_mask=torch.zeros(768, dtype=torch.bool),
                          coefficients={}, n_training_steps=0, is_logging_step=False)
    _, g_ref = _grads(sae, sae.training_forward_pass, step)
    _, g_fast = _grads(sae, lambda s: sparse_training_forward(sae, s), step)
    for name in g_ref:
        assert torch.allclose(g_fast[name], g_ref[name], rtol=1e-9, atol=1e-11), name


def test_trainer_run_follows_the_dense_run(tmp_path):
    """Eight SAETrainer steps (Adam, clipping, dead-latent bookkeeping) from the same start:
    the weights after the sparse run equal those after SAELens's dense run."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    def run(make):
        torch.manual_seed(3)
        cfg = TopKTrainingSAEConfig(d_in=48, d_sae=384, k=8, dtype="float64", device="cpu",
                                    aux_loss_coefficient=0.25)
        sae = make(cfg)
        start = sae.W_enc.detach().clone()
        data = torch.randn(8 * 32, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        tcfg = SAETrainerConfig(total_training_samples=8 * 32, train_batch_size_samples=32, lr=3e-3,
                                lr_end=3e-4, lr_scheduler_name="constant", lr_warm_up_steps=2,
                                lr_decay_steps=2, device="cpu", dead_feature_window=3,
                                feature_sampling_window=4, n_checkpoints=0,
                                checkpoint_path=str(tmp_path / "ckpt"),
                                logger=LoggingConfig(log_to_wandb=False), autocast=False,
                                n_batches_for_norm_estimate=2)
        trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(data.split(32) * 2))
        return start, trainer.fit()

    start, dense = run(TopKTrainingSAE)
    _, fast = run(sparse_topk_training_sae)
    assert type(fast).__name__ == "SparseTopKTrainingSAE" and isinstance(fast, TopKTrainingSAE)
    for (name, p), q in zip(dense.state_dict().items(), fast.state_dict().values()):
        assert torch.allclose(p, q, rtol=1e-7, atol=1e-9), name
    moved = float((dense.W_enc - start).norm() / start.norm())
    assert moved > 1e-3, moved    # the runs trained (a comparison of untouched weights proves nothing)
