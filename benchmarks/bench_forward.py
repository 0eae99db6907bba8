"""The dense kernel (kernels/forward.py) against the bridge, side by side in one run.

    .venv/bin/python benchmarks/bench_forward.py [--model smollm2-135m] [--threads 2]

1. Training-cache capture: 16 windows x 128 tokens, the four shipped SAE sites, stopping after
   block 25: LoadedModel.capture (bridge, float32) vs the kernel in float32, bf16-mixed, bf16.
2. TokenChange's continued forward: 512 rows x 16 tokens from block 15 to the final norm:
   LoadedModel.run_from vs the kernel in each precision.
3. KV-cached greedy generation, 32 new tokens from a 20-token prompt: the kernel's cache vs the
   wrapped Hugging Face model with a DynamicCache (the fallback path).
Prints seconds, tokens/s and the ratio to the bridge, and the median relative error of each
precision against the float32 bridge.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def best(fn, repeat: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    from backend.model import load_model
    from backend.model import generate as gen
    from kernels import forward as kf

    torch.set_num_threads(a.threads)
    m = load_model(a.model)
    n = m.info.n_layers
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(200, m.info.d_vocab - 200, (16, 128), generator=g)
    sites = [f"blocks.{min(5, n - 1)}.hook_resid_pre", f"blocks.{n // 2}.hook_resid_pre",
             f"blocks.{n - 5}.hook_resid_pre", f"blocks.{n - 7}.attn.hook_z"]
    print(f"{a.model}, {a.threads} threads, bulk precision here: {kf.bulk_precision()}")

    def rel(ref, got):
        r, x = ref.flatten(2)[:, 1:].float(), got.flatten(2)[:, 1:].float()
        return float(((r - x).norm(dim=-1) / r.norm(dim=-1)).median())

    print("\n1. capture 16 x 128 tokens at", ", ".join(sites))
    ref = m.capture(ids, sites, flatten_heads=True)
    t_ref = best(lambda: m.capture(ids, sites, flatten_heads=True))
    print(f"  bridge capture      {t_ref:6.2f} s {ids.numel() / t_ref:7.0f} tok/s")
    for p in kf.PRECISIONS:
        dm = kf.dense_model(m, *kf.PRECISIONS[p])
        t = best(lambda dm=dm: kf.run(dm, ids, capture=sites))
        got = kf.run(dm, ids, capture=sites)
        err = max(rel(ref[s], got[s]) for s in sites)
        print(f"  kernel {p:11s}  {t:6.2f} s {ids.numel() / t:7.0f} tok/s  {t_ref / t:4.2f}x   max median rel. error {err:.4f}")

    start = n // 2
    rows = torch.randint(200, m.info.d_vocab - 200, (512, 16), generator=g)
    pre = f"blocks.{start}.hook_resid_pre"
    resid = m.capture(rows, [pre])[pre]
    print(f"\n2. continue 512 x 16 tokens from block {start} to the final norm")
    from backend.jobs.features.scores import _final_in

    fin = _final_in()
    ref2 = m.run_from(start, resid, [fin])[fin]
    t_ref = best(lambda: m.run_from(start, resid, [fin]), 2)
    print(f"  bridge run_from     {t_ref:6.2f} s {rows.numel() / t_ref:7.0f} tok/s")
    for p in kf.PRECISIONS:
        dm = kf.dense_model(m, *kf.PRECISIONS[p])
        t = best(lambda dm=dm: kf.run(dm, resid, start=start, capture=[kf.FINAL]), 2)
        got = kf.run(dm, resid, start=start, capture=[kf.FINAL])[kf.FINAL]
        print(f"  kernel {p:11s}  {t:6.2f} s {rows.numel() / t:7.0f} tok/s  {t_ref / t:4.2f}x   "
              f"median rel. error {rel(ref2, got):.4f}")

    print("\n3. greedy generation, 32 tokens from a 20-token prompt, KV cache")
    prompt = ids[0, :20].tolist()
    t_dense = best(lambda: m.generate([prompt], 32, stop_at_eos=False), 2)
    real = gen._dense
    try:
        gen._dense = lambda model, names: None          # the fallback: Hugging Face + DynamicCache
        t_hf = best(lambda: m.generate([prompt], 32, stop_at_eos=False), 2)
        same = m.generate([prompt], 32, stop_at_eos=False)
    finally:
        gen._dense = real
    print(f"  HF DynamicCache     {t_hf:6.2f} s {32 / t_hf:7.1f} tok/s")
    print(f"  kernel cache        {t_dense:6.2f} s {32 / t_dense:7.1f} tok/s  {t_hf / t_dense:4.2f}x   "
          f"same tokens: {m.generate([prompt], 32, stop_at_eos=False) == same}")


if __name__ == "__main__":
    main()
