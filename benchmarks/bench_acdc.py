"""ACDC on IOI (8 pairs, KL, τ) with the fast edge patching (kernels.circuits.acdc) against the
plain reference loop (kernels.circuits.reference_acdc: every trial a whole circuit run, node by
node over bridge-cached activations, one pair at a time), side by side.

The reference loop would need hours for the whole search, so its time per trial is measured on
the first `--ref-trials` trials of the same search (the edges into the logits, which the fast
kernel finds cheapest: the ratio there is the least favourable one) and multiplied by the
search's forward passes. Both take the model's default torch threads (set --threads 2 for the
two-core figure).

    .venv/bin/python benchmarks/bench_acdc.py [--pairs 8] [--tau 0.1] [--ref-trials 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import torch

    from backend.analyses.circuits import _kernel_metric
    from backend.model import load_model
    from backend.tasks import encode_pairs, generate
    from kernels import circuits as kc
    from kernels import patching as kp

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--ref-trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    m = load_model(a.model)
    e = encode_pairs(m, generate(m, "ioi", n=a.pairs, seed=0))
    fm = kp.fast_model(m)
    g = kc.Graph(m.info.n_layers, m.info.n_heads)
    metric = _kernel_metric(m, fm, e, "kl")
    clean, corrupt = [x.clean_ids for x in e], [x.corrupt_ids for x in e]
    t = time.perf_counter()
    out = kc.acdc(fm, clean, corrupt, metric, g, a.tau)
    fast = time.perf_counter() - t

    per_pair = [_kernel_metric(m, fm, [x], "kl") for x in e]
    outs = [kc.reference_node_outputs(m, fm, x.corrupt_ids) for x in e]
    edges = {(g.up[u], g.down[d]) for u, d in g.valid.nonzero().tolist()}
    t = time.perf_counter()
    for k, u in enumerate(reversed(g.up[:g.prefix("logits")])):
        if k >= a.ref_trials:
            break
        sum(kc.reference_circuit_metric(m, fm, x.clean_ids, None, edges - {(u, "logits")}, per_pair[i], g, outs[i])
            for i, x in enumerate(e))
    per_trial = (time.perf_counter() - t) / a.ref_trials
    ref = per_trial * out.forward_passes
    print(json.dumps({
        "model": a.model, "pairs": a.pairs, "tokens": len(clean[0]), "tau": a.tau, "metric": "kl",
        "threads": torch.get_num_threads(), "edges_total": g.n_edges, "edges_kept": int(out.mask.sum()),
        "forward_passes": out.forward_passes, "kernel_rows": out.kernel_rows,
        "fast_seconds": round(fast, 1), "fast_ms_per_pass": round(1000 * fast / out.forward_passes, 1),
        "reference_seconds_per_trial": round(per_trial, 2), "reference_seconds_estimated": round(ref),
        "speedup": round(ref / fast, 1)}, indent=1))


if __name__ == "__main__":
    main()
