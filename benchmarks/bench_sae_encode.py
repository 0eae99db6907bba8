"""Fused sparse TopK encode (kernels/sae_encode.py) vs SAELens's encode, side by side.

    .venv/bin/python benchmarks/bench_sae_encode.py [--rows 4096] [--repeats 7] [--sae ID]

SAELens: sae.encode(x) → dense [n d_sae] (what every caller of SAELens gets), then the
top-k of it to obtain the sparse code the dashboard stores. Fused: fused_encode(sae, x)
→ (values, indices) directly. Medians over several runs; peak extra memory is estimated
from the largest tensor each path allocates.
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

    from backend.saes import list_saes, load_sae
    from kernels.sae_encode import ROW_BLOCK, fused_encode

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sae", default=None)
    a = ap.parse_args()
    shipped = [s["sae_id"] for s in list_saes()]
    sid = a.sae or (shipped[0] if shipped else None)
    if sid is None:
        from sae_lens import TopKSAE, TopKSAEConfig
        sae, sid = TopKSAE(TopKSAEConfig(d_in=576, d_sae=4608, k=32,
                                          rescale_acts_by_decoder_norm=True)).eval(), "random 576x4608 k32"
    else:
        sae = load_sae(sid)
        if sae.cfg.reshape_activations == "hook_z":
            sae.turn_off_forward_pass_hook_z_reshaping()
    torch.manual_seed(0)
    x = torch.randn(a.rows, sae.cfg.d_in) * 3
    k = int(getattr(sae.cfg, "k", 32))

    def saelens():
        with torch.inference_mode():
            return sae.encode(x).topk(k, dim=-1)

    def fused():
        return fused_encode(sae, x)

    for f in (saelens, fused):   # warm-up
        f()
    times = {}
    for name, f in (("saelens", saelens), ("fused", fused)):
        ts = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        times[name] = statistics.median(ts)
    dense_mb = a.rows * sae.cfg.d_sae * 4 / 2**20
    block_mb = min(a.rows, ROW_BLOCK) * sae.cfg.d_sae * 4 / 2**20
    print(f"SAE {sid}: d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}, k {k}; {a.rows} rows, "
          f"{torch.get_num_threads()} threads, median of {a.repeats}")
    print(f"  SAELens encode + topk : {times['saelens'] * 1e3:8.1f} ms   "
          f"(dense latents {dense_mb:.0f} MB, + pre-activations of the same size)")
    print(f"  fused sparse encode   : {times['fused'] * 1e3:8.1f} ms   (one block buffer {block_mb:.1f} MB)")
    print(f"  ratio SAELens / fused : {times['saelens'] / times['fused']:.2f}x")


if __name__ == "__main__":
    main()
