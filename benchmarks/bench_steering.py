"""Steering speed, reference and ours side by side in one run (the machine may be shared:
medians of a few runs, compare the ratios).

1. Steered greedy generation, 32 new tokens from a 20-token prompt, a direction added at
   every position of blocks.10.hook_resid_pre:
   - reference: token by token, a full TransformerLens (bridge) forward over the whole
     sequence with the hook at every step, no cache;
   - ours: LoadedModel.generate (KV cache through the wrapped Hugging Face model, hooks keyed
     on absolute positions), one row; and the page's call, default + steered rows in one batch.
   The tokens must be equal.
2. Difference of means over 64 + 64 prompts at every layer: one capture per prompt vs the
   batched right-padded pass of backend/analyses/directions.py (equal within float error).

    PYTHONPATH=. python benchmarks/bench_steering.py
"""

from __future__ import annotations

import statistics
import time

import torch

from backend.analyses import directions as D
from backend.model import load_model
from backend.sites import Component, Site, hook_name, hook_names

torch.set_num_threads(1)
REPEATS = 3


def timed(fn, repeats=REPEATS):
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def reference_generate(model, ids, n, hook, fn):
    seq = list(ids)
    out = []
    with torch.inference_mode():
        for _ in range(n):
            logits = model.run_with_hooks(model.tensor(seq), fwd_hooks=[(hook, fn)])
            t = int(logits[0, -1].argmax())
            out.append(t)
            seq.append(t)
    return out


def bench_generation(model):
    prompt = ("Yesterday I walked along the river to the old market, and on the way back the "
              "weather turned and")
    ids = model.encode(prompt)[:20]
    assert len(ids) == 20
    sets = D.shipped("sentiment")
    rows, read = D.prompt_rows(model, sets["positive"] + sets["negative"], False, "last")
    acts = D.site_activations(model, rows, read, "resid_pre")[10]
    vec = (acts[:16].mean(0) - acts[16:].mean(0)).float()
    hook = hook_name(Site(Component.RESID_PRE, 10))
    strength = 6.0

    def ref_fn(x, hook):
        return x + strength * vec

    def fn(x, pos, hook):
        return x + strength * vec

    def pair_fn(x, pos, hook):
        x = x.clone()
        x[1:] += strength * vec
        return x

    ref, t_ref = timed(lambda: reference_generate(model, ids, 32, hook, ref_fn))
    ours, t_ours = timed(lambda: model.generate([ids], 32, interventions=[(hook, fn)], stop_at_eos=False)[0])
    pair, t_pair = timed(lambda: model.generate([ids, ids], 32, interventions=[(hook, pair_fn)], stop_at_eos=False))
    assert ours == ref, "cached steered generation differs from the reference"
    assert pair[1] == ref
    print(f"steered generation, 32 tokens from 20: reference (full forward per token, no cache) {t_ref:.2f} s, "
          f"ours {t_ours:.2f} s -> {t_ref / t_ours:.1f}x; default + steered in one batch {t_pair:.2f} s "
          f"({2 * t_ref / t_pair:.1f}x against two reference runs); tokens equal")


def bench_diff_means(model):
    subjects = ["The film", "Our dinner", "The new phone", "This hotel", "The concert", "My holiday", "The book",
                "The lesson"]
    good = ["was wonderful", "made me very happy", "was a real delight", "was lovely", "felt great",
            "was brilliant", "was a joy", "was excellent"]
    bad = ["was awful", "made me very sad", "was a real disaster", "was horrible", "felt terrible",
           "was dreadful", "was a misery", "was appalling"]
    pos = [f"{s} {g}." for s in subjects for g in good]
    neg = [f"{s} {b}." for s in subjects for b in bad]
    assert len(pos) == len(neg) == 64
    names = hook_names(Component.RESID_PRE, model.info.n_layers)

    def reference():
        means = []
        for texts in (pos, neg):
            acc = 0
            for t in texts:
                ids = model.encode(t)
                a = model.capture(model.tensor(ids), names)
                acc = acc + torch.stack([a[n][0, -1] for n in names]).double()
            means.append(acc / len(texts))
        return means[0] - means[1]

    def batched():
        rp, rdp = D.prompt_rows(model, pos, False, "last")
        rn, rdn = D.prompt_rows(model, neg, False, "last")
        return D.site_activations(model, rp, rdp, "resid_pre").mean(1) - D.site_activations(model, rn, rdn, "resid_pre").mean(1)

    ref, t_ref = timed(reference, 1)
    ours, t_ours = timed(batched, 1)
    rel = float((ours - ref).norm() / ref.norm())      # layer 0 alone is 0 − 0: every prompt ends in "."
    print(f"diff-means 64 + 64 prompts, all {model.info.n_layers} layers: one capture per prompt {t_ref:.2f} s, "
          f"batched ({D.BATCH} rows) {t_ours:.2f} s -> {t_ref / t_ours:.1f}x; relative difference {rel:.1e}")


if __name__ == "__main__":
    m = load_model("smollm2-135m")
    bench_generation(m)
    import sys
    if "--no-diff-means" not in sys.argv:
        bench_diff_means(m)
