"""Circuits on the default model, IOI pair: EAP / EAP-IG time against exact edge patching of a
sample of edges (each edge corrupted alone, batched, extrapolated to all 44,371 edges), the time
of verifying one circuit, and faithfulness at several top-n for EAP vs EAP-IG.

    .venv/bin/python benchmarks/bench_circuits.py [--repeats 3] [--sample 64]
Medians over repeats. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample", type=int, default=64)
    ap.add_argument("--top-n", type=int, nargs="*", default=[50, 100, 200, 400, 800, 1600])
    a = ap.parse_args()
    from backend.analyses.circuits import EdgeScoresSpec, _kernel_metric, faithfulness_curve, prune, select_edges
    from backend.model import load_model
    from backend.tasks import encode_pairs
    from kernels import circuits as kc
    from kernels import patching as kp

    model = load_model("smollm2-135m")
    fm = kp.fast_model(model)
    g = kc.Graph(model.info.n_layers, model.info.n_heads)
    e = encode_pairs(model, [(CLEAN, CORRUPT, " Mary", " John")])
    metric = _kernel_metric(model, fm, e, "logit_diff")
    clean, corrupt = [e[0].clean_ids], [e[0].corrupt_ids]
    res = {"threads": torch.get_num_threads()}
    res["eap_s"], sc = median_time(lambda: kc.edge_scores(fm, clean, corrupt, metric, g, "eap"), a.repeats)
    res["eap_ig5_s"], _ = median_time(lambda: kc.edge_scores(fm, clean, corrupt, metric, g, "eap-ig", 5), a.repeats)
    # exact edge patching: each sampled edge corrupted alone (full circuit minus that edge)
    U, D = len(g.up), len(g.down)
    valid = g.valid.nonzero().tolist()
    rng = np.random.default_rng(0)
    pick = [valid[i] for i in rng.choice(len(valid), a.sample, replace=False)]
    masks = torch.ones(a.sample, U, D)
    for k, (u, d) in enumerate(pick):
        masks[k, u, d] = 0

    def exact():
        cr = kc.corrupt_run(fm, corrupt, metric, g)
        return torch.cat([kc.run_circuits(fm, clean, cr, masks[i:i + 16], metric, g)[:, 0]
                          for i in range(0, a.sample, 16)])
    t_exact, vals = median_time(exact, a.repeats)
    clean_m = float(sc.clean_metric[0])
    exact_delta = (vals - clean_m).double()
    eap = torch.tensor([float(sc.scores[u, d]) for u, d in pick], dtype=torch.float64)
    res.update(exact_sample_edges=a.sample, exact_sample_s=t_exact,
               exact_all_edges_s_extrapolated=t_exact / a.sample * g.n_edges,
               eap_vs_exact_all_ratio=(t_exact / a.sample * g.n_edges) / res["eap_s"],
               pearson_eap_vs_exact_sample=float(np.corrcoef(eap.numpy(), exact_delta.numpy())[0, 1]))
    # verification: one circuit run (corrupt run + masked forward)
    mask = torch.as_tensor(prune(select_edges(sc.scores.float().numpy(), g.valid.numpy(), 200, 0.0), g.up, g.down))

    def verify():
        cr = kc.corrupt_run(fm, corrupt, metric, g)
        return kc.run_circuits(fm, clean, cr, mask[None], metric, g)
    res["verify_one_circuit_s"], _ = median_time(verify, a.repeats)
    print(json.dumps(res))
    # faithfulness vs top-n, EAP vs EAP-IG (logit_diff; through the runner and store)
    for method in ("eap", "eap-ig"):
        spec = EdgeScoresSpec(model="smollm2-135m", clean=CLEAN, corrupt=CORRUPT, answer=" Mary", wrong=" John",
                              metric="logit_diff", method=method)
        print(json.dumps({"method": method, **faithfulness_curve(spec, a.top_n, model)}))


if __name__ == "__main__":
    main()
