"""Attribution patching (AtP) vs our exact fast sweep, per site, on the IOI pair.

    .venv/bin/python benchmarks/bench_attribution.py [--repeats 3] [--threads N] [--sites resid_pre,head_out]

(TransformerLens's get_act_patch_resid_pre takes ~85 s per sweep here, see bench_patching.py;
it is not rerun.) Both sides go through the analyses' compute functions (no store), same
model, same pair, normalised logit difference, denoising. Prints medians, the ratio
exact / AtP, and the Pearson r and largest absolute difference between the two heatmaps.
On a busy machine (other processes on the 2 cores) use --threads 1 to keep both comparable.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backend.analyses import attribution as atp  # noqa: E402
from backend.analyses import patching  # noqa: E402
from backend.model import load_model  # noqa: E402

IOI = ("When Mary and John went to the store, John gave a drink to",
       "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")


def _median_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sites", default=",".join(atp.ATP_SITES))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model("smollm2-135m")
    c, k, ans, w = IOI
    kw = dict(model="smollm2-135m", clean=c, corrupt=k, answer=ans, wrong=w, metric="logit_diff_norm")
    with torch.inference_mode():      # warm-up
        model.logits(model.encode(c))
    print(f"IOI pair, {len(model.encode(c))} tokens, torch threads {torch.get_num_threads()}, "
          f"median of {a.repeats}")
    print(f"{'site':10s} {'AtP s':>8s} {'exact s':>8s} {'exact/AtP':>10s} {'pearson':>8s} {'max|diff|':>10s}")
    for site in a.sites.split(","):
        spec_a = atp.AtPSpec(site=site, **kw)
        spec_e = patching.PatchSpec(site=site, **kw)
        t_a, r_a = _median_time(lambda: atp.compute(spec_a, model), a.repeats)
        t_e, r_e = _median_time(lambda: patching.compute(spec_e, model), a.repeats)
        r = atp.correlation(r_a.values, r_e.values)
        diff = float(np.abs(r_a.values.astype(np.float64) - r_e.values).max())
        print(f"{site:10s} {t_a:8.2f} {t_e:8.2f} {t_e / t_a:10.2f} {r:8.3f} {diff:10.3f}", flush=True)


if __name__ == "__main__":
    main()
