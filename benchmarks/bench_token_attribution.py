"""Integrated Gradients over input tokens: ours (all steps as one batch) vs captum's
LayerIntegratedGradients on the embedding layer, and the time --steps auto takes to a 1 % gap.

    .venv/bin/python benchmarks/bench_token_attribution.py [--steps 64] [--repeats 3] [--threads N]

Same model (SmolLM2-135M, float32), same ~20-token prompt, same target (the top next token),
same baseline (pad = eos embedding, position 0 held at the input's: captum gets the baseline
ids [x0, pad, pad, ...], whose embedding-layer output is exactly our baseline), same
Gauss-Legendre rule. Captum runs with its defaults (internal_batch_size=None: all steps in
one batch) and the forward a user writes, `hf(input_ids).logits[:, -1, target]`, on the
project's Hugging Face copy of the model (eager attention, reference_hf_model()) and, for
fairness, on a copy with PyTorch's fused attention (sdpa). Ours: the dense engine (canonical
weights, only the target's row of W_U) and the hook engine (the LoadedModel with a hook at
hook_embed). Runs are interleaved (ours, captum, ...) so a busy machine affects both alike;
medians of --repeats. Prints one JSON line.
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

from backend.analyses.token_attribution import TokenAttributionSpec, attribute  # noqa: E402
from backend.model import load_model  # noqa: E402

PROMPT = "When Mary and John went to the store on a cold winter morning, John handed the warm drink to"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-sdpa", action="store_true", help="skip captum on the sdpa copy")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from captum.attr import LayerIntegratedGradients
    from transformers import AutoModelForCausalLM

    model = load_model("smollm2-135m")
    ids = model.encode(PROMPT)
    T = len(ids)
    spec = TokenAttributionSpec(model="smollm2-135m", text=PROMPT, steps=a.steps, baseline="pad")
    warm = attribute(TokenAttributionSpec(model="smollm2-135m", text=PROMPT, steps=2, baseline="pad"), model)
    target = warm.target["id"]
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.eos_token_id

    hfs = {"eager": model.reference_hf_model()}
    if not a.no_sdpa:
        from backend.model.loading import OFFLINE_MODELS, converted_dir

        path = str(converted_dir(OFFLINE_MODELS["smollm2-135m"]))
        hfs["sdpa"] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    inp = torch.tensor([ids])
    base = torch.tensor([[ids[0]] + [pad] * (T - 1)])

    def captum(hf):
        def fwd(input_ids):
            return hf(input_ids=input_ids).logits[:, -1, target]
        lig = LayerIntegratedGradients(fwd, hf.get_input_embeddings())
        return lig.attribute(inputs=inp, baselines=base, n_steps=a.steps, method="gausslegendre")[0].sum(-1).detach().double().numpy()

    runs = {"dense": lambda: attribute(spec, model, prefer="dense").scores,
            "hooks": lambda: attribute(spec, model, prefer="hooks").scores,
            **{f"captum_{k}": (lambda hf=hf: captum(hf)) for k, hf in hfs.items()}}
    times: dict = {k: [] for k in runs}
    outs: dict = {}
    for _ in range(a.repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = outs["captum_eager"]
    scale = float(np.abs(ref).max())
    diffs = {k: float(np.abs(outs[k] - ref).max() / scale) for k in outs}

    t = time.perf_counter()
    auto = attribute(TokenAttributionSpec(model="smollm2-135m", text=PROMPT, baseline="pad"), model)
    auto_s = time.perf_counter() - t
    t = time.perf_counter()
    auto_zero = attribute(TokenAttributionSpec(model="smollm2-135m", text=PROMPT), model)
    auto_zero_s = time.perf_counter() - t

    print(json.dumps({
        "prompt_tokens": T, "steps": a.steps, "repeats": a.repeats, "torch_threads": torch.get_num_threads(),
        "target": warm.target, "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "all_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "ratio_captum_eager_over_dense": round(med["captum_eager"] / med["dense"], 2),
        **({"ratio_captum_sdpa_over_dense": round(med["captum_sdpa"] / med["dense"], 2)} if "captum_sdpa" in med else {}),
        "ratio_captum_eager_over_hooks": round(med["captum_eager"] / med["hooks"], 2),
        "max_rel_diff_vs_captum_eager": diffs,
        "auto_pad": {"seconds": round(auto_s, 2), "steps_used": auto.steps_used, "converged": auto.converged,
                     "gap_rel": auto.completeness_gap_rel, "rounds": [(r["steps"], round(r["gap_rel"], 5)) for r in auto.rounds]},
        "auto_zero": {"seconds": round(auto_zero_s, 2), "steps_used": auto_zero.steps_used,
                      "converged": auto_zero.converged, "gap_rel": auto_zero.completeness_gap_rel,
                      "rounds": [(r["steps"], round(r["gap_rel"], 5)) for r in auto_zero.rounds]},
    }))


if __name__ == "__main__":
    main()
