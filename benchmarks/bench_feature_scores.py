"""Feature scores: the batched output score (each feature one row of a batch continuing from
the prompt's resid_pre at the hook's block) against one full forward per feature with a plain
hook, features/s and the ratio, with the two results compared; TokenChange features/s and what
all features of the shipped SAEs take.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_feature_scores.py [--sae ID] [--n 64] [--tc 8]

The machine is shared: both paths run in this one process, alternately, and medians are quoted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def reference_output_scores(model, sae, feats, rows, lens, a_max: float) -> np.ndarray:
    """One full forward per feature, OUT_SCALE · a_max · row added at the last position."""
    from backend.jobs.features import scores as S

    ids = model.tokenize(S.PROMPT)
    hook = sae.cfg.metadata.hook_name
    out = []
    for j, f in enumerate(feats):
        d = S.OUT_SCALE * a_max * rows[f]

        def add(x, hook, d=d):
            x = x.clone()
            x[:, -1] += d.reshape(x.shape[2:])
            return x
        with torch.inference_mode():
            logits = model.run_with_hooks(ids, fwd_hooks=[(hook, add)])[:, -1]
        out.append(S.score_from_logits(logits, lens[j:j + 1])[0][0])
    return np.array(out)


def main() -> None:
    from backend.jobs.features import scores as S
    from backend.model import load_model
    from backend.saes import list_saes, load_sae

    ap = argparse.ArgumentParser()
    ap.add_argument("--sae", default="smollm2-135m-L15-resid_pre")
    ap.add_argument("--n", type=int, default=128, help="features per measurement (one batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tc", type=int, default=8, help="features for the TokenChange rate (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model("smollm2-135m")
    sae = load_sae(a.sae)
    rows = S.decoder_rows(sae)
    dirs = S.residual_directions(model, sae, rows)
    feats = np.arange(a.n)
    lens = S.vocab_logits(model, dirs[:a.n]).topk(S.LENS_K, dim=-1).indices
    st = S.prompt_state(model, sae)
    fast_t, ref_t = [], []
    for _ in range(a.repeats):
        t = time.perf_counter()
        fast = S.output_scores(model, sae, feats, rows, lens, st)["score"]
        fast_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = reference_output_scores(model, sae, feats, rows, lens, st["a_max"])
        ref_t.append(time.perf_counter() - t)
    f_med, r_med = statistics.median(fast_t), statistics.median(ref_t)
    print(f"output score, {a.sae}, {a.n} features, prompt {len(st['ids'])} tokens, hook block {st['layer']}:")
    print(f"  batched (rows from the hook's block on): {f_med:.2f} s = {a.n / f_med:.1f} features/s")
    print(f"  one full forward per feature:            {r_med:.2f} s = {a.n / r_med:.1f} features/s")
    print(f"  ratio {r_med / f_med:.1f}x; max |score difference| {np.abs(fast - ref).max():.2e}")
    n_all = sum(int(s["d_sae"]) for s in list_saes("smollm2-135m"))
    print(f"  all {n_all:,} features of the shipped SAEs at this rate: {n_all / (a.n / f_med) / 60:.1f} min")
    if a.tc:
        wins = S.heldout_windows("smollm2-135m")
        ws = S.windows_state(model, sae, wins)
        c, _ = S.strengths(None, a.sae, rows, None, ws["codes"])
        t = time.perf_counter()
        S.token_change(model, sae, np.arange(a.tc), rows, c[:a.tc], ws)
        dt = time.perf_counter() - t
        rate = a.tc / dt
        n_sae = int(sae.cfg.d_sae)
        print(f"TokenChange, {a.sae}: {S.TC_WINDOWS} windows x {S.TC_LEN} tokens x 2 signs per feature, "
              f"{S.TC_CHUNK} features per forward: {rate:.2f} features/s -> {n_sae / rate / 3600:.1f} h for its "
              f"{n_sae:,} features (deeper hooks are cheaper: only the blocks from the hook's on run)")
    print(f"(machine shared by other jobs: load {open('/proc/loadavg').read().split()[0]})")


if __name__ == "__main__":
    main()
