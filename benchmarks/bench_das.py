"""DAS training speed: the run-from-site engine vs pyvene's training loop, same task and batch.

    .venv/bin/python benchmarks/bench_das.py [--site resid_pre] [--layer 16] [--batch 16] [--steps 8] [--repeats 3]

Same model (SmolLM2-135M, float32), same IOI examples (the built-in task), same site, layer and
position (the last token), same K = 1, same optimiser (Adam) and loss (cross-entropy on the
expected token at the last position). One training step = forward with the interchange
intervention, backward to the subspace's parameters, optimiser step.

- ours: kernels.das.SiteEngine: the frozen model runs once up to the site (with a key/value
  cache), then each step runs only the later blocks at the positions from the site on (one row
  per example at the last position) and differentiates with respect to the rotation only.
- pyvene: IntervenableModel with RotatedSpaceIntervention (low_rank_dimension 1 via
  set_interchange_dim) on the project's Hugging Face copy of the model (eager attention,
  reference_hf_model()) with the model's parameters frozen (requires_grad False), as its
  tutorials train: the whole base and source prompts through every block each step.
- hooks: our reference engine (a hooked forward of the whole base prompt per step), for scale.

Runs are interleaved (ours, pyvene, hooks, ...) so a busy machine affects them alike; medians
of --repeats. Prints one JSON line with steps/s and the ratios (target: ours >= 2x pyvene).
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

from backend.analyses.das import DASSpec, Subspace, examples, make_engine  # noqa: E402
from backend.model import load_model  # noqa: E402
from kernels.das import site_width  # noqa: E402

PYVENE = {"resid_pre": "block_input", "attn_z": "attention_value_output",
          "mlp_post": "model.layers[{L}].mlp.down_proj.input"}


def _ours(eng, ex, width, batches, steps):
    sub = Subspace(width, 1, False, 0)
    opt = torch.optim.Adam(sub.params, lr=0.01)
    target = torch.as_tensor(ex.expected)
    t = time.perf_counter()
    for s in range(steps):
        idx = batches[s % len(batches)]
        with torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(eng.logits(idx, sub.rot.weight), target[idx])
            grads = torch.autograd.grad(loss, sub.params)
        for p, g in zip(sub.params, grads):
            p.grad = g
        opt.step()
    return steps / (time.perf_counter() - t)


def _pyvene(ivm, iv, ex, pos_b, pos_s, batches, steps):
    opt = torch.optim.Adam(iv.parameters(), lr=0.01)
    base, source = torch.as_tensor(ex.base), torch.as_tensor(ex.source)
    target = torch.as_tensor(ex.expected)
    t = time.perf_counter()
    for s in range(steps):
        idx = torch.as_tensor(batches[s % len(batches)])
        n = len(idx)
        _, out = ivm({"input_ids": base[idx]}, [{"input_ids": source[idx]}],
                     {"sources->base": ([[[pos_s]] * n], [[[pos_b]] * n])})
        loss = torch.nn.functional.cross_entropy(out.logits[:, -1], target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--site", default="resid_pre")
    ap.add_argument("--layer", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import pyvene as pv

    model = load_model("smollm2-135m")
    spec = DASSpec(model="smollm2-135m", task="ioi", n=48, site=a.site, layer=a.layer, pos=-1)
    ex = examples(model, spec)
    width = site_width(a.site, model.info)
    rng = np.random.default_rng(0)
    batches = [list(rng.choice(ex.train, size=min(a.batch, len(ex.train)), replace=False)) for _ in range(a.steps)]
    t = time.perf_counter()
    eng = make_engine(model, ex, a.site, a.layer, -1)
    setup = time.perf_counter() - t
    hook_eng = make_engine(model, ex, a.site, a.layer, -1, prefer="hooks")

    hf = model.reference_hf_model()
    for p in hf.parameters():
        p.requires_grad_(False)
    ivm = pv.IntervenableModel(pv.IntervenableConfig(representations=[{
        "layer": a.layer, "component": PYVENE[a.site].format(L=a.layer), "unit": "pos", "max_number_of_units": 1,
        "intervention": pv.RotatedSpaceIntervention(embed_dim=width)}]), hf)
    iv = list(ivm.interventions.values())[0]
    iv = iv[0] if isinstance(iv, tuple) else iv
    iv.set_interchange_dim(1)
    Tb, Ts = len(ex.base[0]), len(ex.source[0])

    _ours(eng, ex, width, batches[:1], 1)                      # warm-up
    _pyvene(ivm, iv, ex, Tb - 1, Ts - 1, batches[:1], 1)
    ours, pyv, hooks = [], [], []
    for _ in range(a.repeats):
        ours.append(_ours(eng, ex, width, batches, a.steps))
        pyv.append(_pyvene(ivm, iv, ex, Tb - 1, Ts - 1, batches, a.steps))
        hooks.append(_ours(hook_eng, ex, width, batches, max(2, a.steps // 2)))
    o, p, h = statistics.median(ours), statistics.median(pyv), statistics.median(hooks)
    print(json.dumps({"bench": "das_training", "model": "smollm2-135m", "site": a.site, "layer": a.layer,
                      "batch": a.batch, "tokens": Tb, "steps": a.steps, "repeats": a.repeats,
                      "threads": torch.get_num_threads(), "ours_steps_per_s": round(o, 3),
                      "pyvene_steps_per_s": round(p, 3), "hooks_steps_per_s": round(h, 3),
                      "ratio_vs_pyvene": round(o / p, 2), "ratio_vs_hooks": round(o / h, 2),
                      "ours_setup_seconds": round(setup, 2), "target_ratio": 2.0}))


if __name__ == "__main__":
    main()
