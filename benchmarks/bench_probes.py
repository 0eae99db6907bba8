"""Probe-study activations: the whole statements set in batched, right-padded passes that stop after
the deepest layer needed (backend/analyses/probes/activations.py) against one forward per
statement (the same early-stopping capture, batch of one), side by side, and the two equal.

    .venv/bin/python benchmarks/bench_probes.py [--n 256] [--layers all|0,15] [--batch 32] [--threads 0]

--threads 0 keeps torch's default; on a shared, loaded machine --threads 1 gives steadier figures, and
the CPU-time ratio (process time) is the one to read when other processes take the cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import numpy as np
    import torch

    from backend.analyses.probes import saplma as S
    from backend.analyses.probes.activations import collect
    from backend.model import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=256, help="statements (a seeded sample of the shipped set)")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(a.model)
    layers = S.parse_layers(a.layers) or tuple(range(model.info.n_layers))
    rows = S.read_statements(S.SHIPPED)
    pick = np.random.default_rng(0).choice(len(rows), min(a.n, len(rows)), replace=False)
    ids = [model.encode(rows[i]["text"]) for i in pick]
    last = [[-1]] * len(ids)
    collect(model, ids[:4], last[:4], layers, batch_size=4)                     # warm-up

    t, c = time.perf_counter(), time.process_time()
    batched = collect(model, ids, last, layers, batch_size=a.batch)
    t_batched, c_batched = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    single = np.concatenate([collect(model, [i], [[-1]], layers, batch_size=1) for i in ids], axis=1)
    t_single, c_single = time.perf_counter() - t, time.process_time() - c
    rel = float(np.max(np.linalg.norm(batched - single, axis=-1) / np.linalg.norm(single, axis=-1)))
    print(json.dumps({"model": a.model, "statements": len(ids), "tokens": int(sum(map(len, ids))),
                      "layers": len(layers), "deepest": max(layers), "batch": a.batch,
                      "threads": torch.get_num_threads(), "batched_s": round(t_batched, 2),
                      "one_per_statement_s": round(t_single, 2), "ratio": round(t_single / t_batched, 2),
                      "batched_cpu_s": round(c_batched, 2), "one_per_statement_cpu_s": round(c_single, 2),
                      "cpu_ratio": round(c_single / c_batched, 2),
                      "max_rel_diff": rel}, indent=1))


if __name__ == "__main__":
    main()
