"""Massive-activation scan: the on-the-fly kernel against run_with_cache, time and memory.

    .venv/bin/python benchmarks/bench_massive.py [--tokens 512] [--runs 5]

Methods, each producing the same summaries (top-k, median, per-position max, top dims,
massive entries, attention received) for every layer of one long prompt:
    kernel        kernels.massive.scan: hooks reduce resid_post and patterns on the fly
    cache-needed  run_with_cache over the 60 hooks read (resid_post + pattern), then numpy
    cache-all     run_with_cache over every hook point (a bare run_with_cache), then numpy
    forward       a plain forward with no hooks (the floor)
None of them forms the logits of every position (logits_to_keep=1): nothing here needs them.
Time: medians over --runs, methods interleaved so that load from other processes hits all
alike. Memory: each method in a fresh process run with MALLOC_MMAP_THRESHOLD_=65536, so every
tensor is its own mapping and is returned to the system when freed: RSS then follows the live
tensors. Reported: peak RSS during the call minus RSS just before (1 ms sampler thread), after
a warm-up forward of the same length; and the bytes the method keeps (cache or summaries).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("kernel", "cache-needed", "cache-all", "forward")
SENTENCES = [
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "def mean(xs):\n    return sum(xs) / len(xs)\n",
    "She walked along the river, counting the boats; there were eleven, or perhaps twelve.",
    "In 1969, the first humans landed on the Moon, and millions watched on television.",
    "Prices rose by 3.2% in March, the fastest increase since the autumn of 2008.",
    "\"Where are you going?\" he asked. \"Home,\" she said, and closed the door.",
]


def long_tokens(model, n: int):
    text, ids = "", []
    k = 0
    while len(ids) < n:
        text += SENTENCES[k % len(SENTENCES)] + " "
        k += 1
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]  # no BOS, as encode()
    return model.tensor(ids[:n])


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS above the level at entry, sampled every millisecond."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())
        self.delta = self.peak - self.base


def call(method: str, model, tokens):
    import torch

    from kernels.massive import scan, scan_reference

    kw = dict(attention=True)
    if method == "kernel":
        return scan(model, tokens, **kw)[0]
    if method == "cache-needed":
        return scan_reference(model, tokens, **kw)
    if method == "cache-all":
        return scan_reference(model, tokens, cache_all=True, **kw)
    with model.lock, torch.inference_mode():
        return model.logits(tokens, logits_to_keep=1)


def kept_bytes(method: str, model, tokens) -> tuple[int, int]:
    """(bytes kept, hooks) of a method: the cache's distinct tensors, or the summaries."""
    import numpy as np
    import torch

    from kernels.massive import pattern_hook_names, resid_hook_names, scan

    if method == "kernel":
        s = scan(model, tokens, attention=True)[0]
        arrays = [v for v in vars(s).values() if isinstance(v, np.ndarray)]
        return sum(a.nbytes for a in arrays), 2 * model.info.n_layers
    if method == "forward":
        return 0, 0
    names = set(resid_hook_names(model.info.n_layers) + pattern_hook_names(model.info.n_layers))
    with model.lock, torch.inference_mode():
        _, cache = model.run_with_cache(tokens, None if method == "cache-all" else names)
    seen, total = set(), 0
    for t in cache.values():
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total, len(cache)  # hook names cached (aliases included)


def child(method: str, n_tokens: int) -> None:
    """Fresh process: warm up on a short prompt, then measure one call on the long one."""
    import torch

    from backend.model import load_model

    torch.set_num_threads(2)
    model = load_model("smollm2-135m")
    tokens = long_tokens(model, n_tokens)
    call(method, model, tokens[:, :16])
    call("forward", model, tokens)
    with PeakRSS() as m:
        out = call(method, model, tokens)
    del out
    kept, hooks = kept_bytes(method, model, tokens)
    print(json.dumps({"method": method, "peak_delta": m.delta, "kept": kept, "hooks": hooks}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--child", choices=METHODS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.tokens)

    mem = {}
    for method in METHODS:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, __file__, "--child", method, "--tokens", str(a.tokens)],
                             capture_output=True, text=True, check=True, env=env)
        mem[method] = json.loads(out.stdout.strip().splitlines()[-1])

    import torch

    from backend.model import load_model

    model = load_model("smollm2-135m")
    tokens = long_tokens(model, a.tokens)
    for method in METHODS:
        call(method, model, tokens[:, :16])
    times = {m: [] for m in METHODS}
    for _ in range(a.runs):
        for method in METHODS:
            t = time.perf_counter()
            call(method, model, tokens)
            times[method].append(time.perf_counter() - t)
    med = {m: statistics.median(v) for m, v in times.items()}

    mb = 1 / 2**20
    print(f"SmolLM2-135M, {a.tokens} tokens, {model.info.n_layers} layers, torch threads "
          f"{torch.get_num_threads()}, medians of {a.runs} runs, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'method':<14}{'hooks':>7}{'time s':>9}{'vs kernel':>11}{'peak ΔRSS MB':>15}"
          f"{'vs kernel':>11}{'kept MB':>10}")
    k = mem["kernel"]
    for m in METHODS:
        r = mem[m]
        print(f"{m:<14}{r['hooks']:>7}{med[m]:>9.3f}{med[m] / med['kernel']:>10.2f}×"
              f"{r['peak_delta'] * mb:>15.1f}{r['peak_delta'] / max(k['peak_delta'], 1):>10.2f}×"
              f"{r['kept'] * mb:>10.2f}")
    extra = {m: (mem[m]["peak_delta"] - mem["forward"]["peak_delta"]) * mb for m in METHODS}
    print("peak above a plain forward (MB):", {m: round(v, 1) for m, v in extra.items()})
    print("runs (s):", {m: [round(x, 3) for x in v] for m, v in times.items()})


if __name__ == "__main__":
    main()
