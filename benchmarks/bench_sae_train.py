"""Sparse TopK training step (kernels/sae_train.py) vs SAELens's dense training forward, side
by side on the same weights and batch: forward + backward + Adam step, per width.

    .venv/bin/python benchmarks/bench_sae_train.py [--widths 4608,16384] [--batch 512]
                                                   [--dead 0.0,0.01] [--repeats 5] [--threads 1]

d_in 576 and k 64 as the shipped SAEs of the default model. `--dead`: shares of latents
marked dead (the aux-k loss runs on up to d_in/2 of them per row). Reports medians in ms,
samples/s and the ratio; the loss and the largest relative gradient difference show that
both paths computed the same thing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import torch
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    from kernels.sae_train import sparse_training_forward

    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="4608,16384")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--dead", default="0.0,0.01")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch threads {a.threads}, batch {a.batch}, d_in 576, k 64")
    print(f"{'width':>6} {'dead':>5} {'dense ms':>9} {'sparse ms':>9} {'ratio':>6} {'sparse samples/s':>17}  check")
    for width in (int(w) for w in a.widths.split(",")):
        torch.manual_seed(0)
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=576, d_sae=width, k=64, dtype="float32",
                                                    device="cpu", aux_loss_coefficient=0.25))
        opt = torch.optim.Adam(sae.parameters(), lr=0.0)   # lr 0: the step costs, weights stay
        x = torch.randn(a.batch, 576) * 2
        for share in (float(s) for s in a.dead.split(",")):
            dead = torch.rand(width, generator=torch.Generator().manual_seed(1)) < share
            step = TrainStepInput(sae_in=x, dead_neuron_mask=dead, coefficients={},
                                  n_training_steps=0, is_logging_step=False)
            paths = {"dense": sae.training_forward_pass,
                     "sparse": lambda s: sparse_training_forward(sae, s)}
            times, grads, losses = {}, {}, {}
            for name, fn in paths.items():
                ts = []
                for r in range(a.repeats + 1):
                    t = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    out = fn(step)
                    out.loss.backward()
                    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
                    opt.step()
                    if r:
                        ts.append(time.perf_counter() - t)
                times[name] = statistics.median(ts)
                grads[name] = {n: p.grad.clone() for n, p in sae.named_parameters()}
                losses[name] = float(out.loss.detach())
            diff = max(float((grads["sparse"][n] - g).norm() / g.norm().clamp_min(1e-30))
                       for n, g in grads["dense"].items())
            d, s = times["dense"], times["sparse"]
            print(f"{width:>6} {share:>5.2f} {d * 1e3:>9.1f} {s * 1e3:>9.1f} {d / s:>5.2f}x "
                  f"{a.batch / s:>17.0f}  loss {losses['dense']:.4g} = {losses['sparse']:.4g}, "
                  f"max rel grad diff {diff:.1e}")


if __name__ == "__main__":
    main()
