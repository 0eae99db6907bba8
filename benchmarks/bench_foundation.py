"""Foundation timings: model load, forward (ours vs Hugging Face), analysis compute, store read-back.

    .venv/bin/python benchmarks/bench_foundation.py

Prints medians over repeated runs; the store read-back is the time to reopen a cached view.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def median_time(fn, repeat: int = 7) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from backend import AttentionSpec, PromptSpec, lookup, run
    from backend.model import OFFLINE_MODELS, converted_dir, load_model
    from backend.store import Store

    t = time.perf_counter()
    model = load_model("smollm2-135m")
    print(f"model load (converted checkpoint cached): {time.perf_counter() - t:.2f} s")
    hf = AutoModelForCausalLM.from_pretrained(converted_dir(OFFLINE_MODELS["smollm2-135m"]),
                                              dtype=torch.float32, attn_implementation="eager")
    text = "When Mary and John went to the store, John gave a drink to"
    ids = model.tensor(model.encode(text))
    with torch.inference_mode():
        ours = median_time(lambda: model.logits(ids))
        ref = median_time(lambda: hf(ids))
    print(f"forward 1x{ids.shape[1]}: bridge {ours * 1000:.0f} ms, Hugging Face {ref * 1000:.0f} ms, "
          f"ratio {ours / ref:.2f}")

    store = Store(Path(tempfile.mkdtemp()) / "bench.duckdb")
    spec = PromptSpec(model="smollm2-135m", text=text)
    out = run(spec, store)
    print(f"prompt analysis (tokens, top-k, logit lens) compute: {out.compute_seconds:.2f} s")
    read = median_time(lambda: lookup(spec, store), repeat=20)
    print(f"prompt view read-back from the store: {read * 1000:.1f} ms "
          f"({out.compute_seconds / read:.0f}x faster than computing)")
    aspec = AttentionSpec(model="smollm2-135m", text=text, layer=5)
    aout = run(aspec, store)
    aread = median_time(lambda: lookup(aspec, store), repeat=20)
    print(f"attention view: compute {aout.compute_seconds * 1000:.0f} ms, read-back {aread * 1000:.1f} ms")


if __name__ == "__main__":
    main()
