"""Harmfulness and refusal as two directions ("LLMs Encode Harmfulness and Refusal Separately").

With the shipped harmful-style and harmless instructions (data/directions/harmful.txt,
harmless.txt; every 4th held out, as the directions page splits them), each wrapped as a user
message in the model's chat template:

- **t_inst** is the instruction's last token (the token before the template's post-instruction
  tokens, found as directions.post_instruction_length finds them); **t_post-inst** is the last
  post-instruction token (the last token of the prompt, where the answer starts).
- At every layer's block output (resid_post), the **harmfulness direction** is the difference of
  means (harmful − harmless, float64) at t_inst and the **refusal direction** the difference of
  means at t_post-inst, over the training instructions. Their cosine per layer says how far
  apart they are; the midpoint rule's held-out accuracy says how well each separates the sets.
- **Projections**: every instruction's t_inst state on the unit harmfulness direction and its
  t_post-inst state on the unit refusal direction, at every layer (the page draws one layer as a
  scatter; held-out instructions marked).
- **Steering**: the two directions at the study's layer go into the directions table as derived
  directions (directions.DERIVERS, parts "harm" and "refusal", or "harm@L" / "refusal@L" for
  another layer); each is then added (strength × the raw diff-means vector at every position) on
  the held-out instructions by the existing refusal evaluation (steering_eval.RefusalSpec:
  greedy completions, refusal by phrase match; it also reports the direction's ablation on the
  harmful-style ones), so the two directions' refusal rates sit side by side.

`run_study(spec)` does all of it, each piece stored and looked up by its own key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ...errors import InvalidSite, OutOfRange
from ...model import LoadedModel
from ...runner import analysis
from ...spec import Result, Spec
from ..directions import DERIVERS, Derived, post_instruction_length, prompt_rows, shipped
from ..steering import check_strength
from .activations import ProbeSetError, collect

SITE = "resid_post"
MIN_PER_CLASS = 10
MAX_PER_SET = 512
PARTS = ("harm", "refusal")


@dataclass(frozen=True)
class HarmRefusalSpec(Spec):
    KIND = "probe-harm-refusal"
    harmful: tuple[str, ...] = ()            # the directions are made from these two …
    harmless: tuple[str, ...] = ()
    heldout_harmful: tuple[str, ...] = ()    # … and projected / steered on these
    heldout_harmless: tuple[str, ...] = ()
    layer: int = -1                          # the layer of the two directions put in the table (-1: middle)
    strength: float = 4.0                    # steering: strength × raw vector added at every position
    max_new_tokens: int = 24
    source: str = ""

    def validate(self):
        for name, items, least in (("harmful", self.harmful, MIN_PER_CLASS), ("harmless", self.harmless, MIN_PER_CLASS),
                                   ("held-out harmful", self.heldout_harmful, 1),
                                   ("held-out harmless", self.heldout_harmless, 1)):
            if len(items) < least:
                raise ProbeSetError(f"The {name} set has {len(items)} instructions; at least {least} are needed"
                                    + (" per class for a difference of means." if least > 1 else "."))
            if len(items) > MAX_PER_SET:
                raise ProbeSetError(f"At most {MAX_PER_SET} instructions per set ({name}: {len(items)}).")
            if any(not isinstance(t, str) or not t.strip() for t in items):
                raise ProbeSetError(f"An instruction of the {name} set is empty.")
        if set(self.harmful) == set(self.harmless):
            raise ProbeSetError("The harmful and harmless sets are the same instructions: one class only.")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < -1:
            raise InvalidSite(f"Layer {self.layer!r} does not exist (-1: the middle layer).")
        check_strength(self.strength)
        if not 1 <= self.max_new_tokens <= 64:
            raise OutOfRange("max_new_tokens must be in 1–64.")


@dataclass(frozen=True)
class HarmRefusalResult(Result):
    layer: int                     # the layer of the stored directions
    layers: list[int]
    cosine: np.ndarray             # [L] cos(harm_L, refusal_L)
    harm_vectors: np.ndarray       # [L d] diff-means at t_inst (float32 of a float64 mean)
    refusal_vectors: np.ndarray    # [L d] diff-means at t_post-inst
    harm_accuracy: np.ndarray      # [L] held-out midpoint-rule accuracy at t_inst
    refusal_accuracy: np.ndarray   # [L] … at t_post-inst
    proj_harm: np.ndarray          # [L n] t_inst state · unit harmfulness direction
    proj_refusal: np.ndarray       # [L n] t_post-inst state · unit refusal direction
    texts: list[str]               # [n] every instruction (training then held-out)
    label: np.ndarray              # [n] 1 harmful-style, 0 harmless
    heldout: np.ndarray            # [n] 1 held out
    made: dict                     # positions, tokens, counts


def resolve_layer(layer: int, n_layers: int) -> int:
    if layer == -1:
        return n_layers // 2
    if not 0 <= layer < n_layers:
        raise InvalidSite(f"Layer {layer} does not exist: the model has layers 0–{n_layers - 1}.")
    return layer


def read_positions(model: LoadedModel, texts) -> tuple[list[list[int]], list[list[int]]]:
    """Chat-template ids of each instruction and its two read positions [t_inst, t_post-inst]
    (from the post-instruction position mode of the directions)."""
    rows, post = prompt_rows(model, texts, chat=True, position="post-instruction")
    return rows, [[p[0] - 1, p[-1]] for p in post]


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-30)


@analysis(HarmRefusalSpec, HarmRefusalResult)
def compute(spec: HarmRefusalSpec, model: LoadedModel, progress=None) -> HarmRefusalResult:
    L = model.info.n_layers
    layer = resolve_layer(spec.layer, L)
    texts = list(spec.harmful + spec.harmless + spec.heldout_harmful + spec.heldout_harmless)
    label = np.array([1] * len(spec.harmful) + [0] * len(spec.harmless) + [1] * len(spec.heldout_harmful)
                     + [0] * len(spec.heldout_harmless), np.int64)
    held = np.array([0] * (len(spec.harmful) + len(spec.harmless))
                    + [1] * (len(spec.heldout_harmful) + len(spec.heldout_harmless)), np.int64)
    rows, pos = read_positions(model, texts)
    acts = collect(model, rows, pos, range(L), site=SITE, progress=progress).astype(np.float64)   # [L n 2 d]
    pos_tr, neg_tr = (label == 1) & (held == 0), (label == 0) & (held == 0)
    vecs = acts[:, pos_tr].mean(1) - acts[:, neg_tr].mean(1)                                   # [L 2 d]
    harm, refusal = vecs[:, 0], vecs[:, 1]
    nh, nr = np.linalg.norm(harm, axis=-1), np.linalg.norm(refusal, axis=-1)
    cosine = (harm * refusal).sum(-1) / np.maximum(nh * nr, 1e-30)
    proj_h = np.einsum("lnd,ld->ln", acts[:, :, 0], _unit(harm))
    proj_r = np.einsum("lnd,ld->ln", acts[:, :, 1], _unit(refusal))

    def midpoint_accuracy(proj):
        mid = (proj[:, pos_tr].mean(1) + proj[:, neg_tr].mean(1)) / 2                         # [L]
        te = held == 1
        return ((proj[:, te] > mid[:, None]) == (label[te] == 1)).mean(1)

    n_post = post_instruction_length(model)
    made = {"site": SITE, "positions": {"t_inst": "the instruction's last token",
                                        "t_post_inst": "the last post-instruction token"},
            "post_instruction_tokens": model.str_tokens(rows[0][len(rows[0]) - n_post:]),
            "t_inst_example": model.str_tokens([rows[0][pos[0][0]]])[0],
            "n_harmful": len(spec.harmful), "n_harmless": len(spec.harmless),
            "n_heldout": int(held.sum()), "source": spec.source}
    return HarmRefusalResult(layer=layer, layers=list(range(L)), cosine=cosine,
                             harm_vectors=harm.astype(np.float32), refusal_vectors=refusal.astype(np.float32),
                             harm_accuracy=midpoint_accuracy(proj_h), refusal_accuracy=midpoint_accuracy(proj_r),
                             proj_harm=proj_h, proj_refusal=proj_r, texts=texts, label=label, heldout=held, made=made)


# -- the two directions in the directions table --------------------------------------------
def _derive(run_key: str, part: str, store) -> Derived:
    """Direction `part` ("harm" | "refusal", optionally "@layer") of a stored study."""
    from ..directions import UnknownDirection

    rec = store.get(run_key)
    if rec is None or rec["kind"] != HarmRefusalSpec.KIND:
        raise UnknownDirection(f"No harmfulness/refusal study with key {run_key!r} in the store.")
    r = HarmRefusalResult.from_record(rec["meta"], rec["arrays"])
    name, _, at = part.partition("@")
    if name not in PARTS:
        raise UnknownDirection(f"A harmfulness/refusal study has directions {', '.join(PARTS)}, not {part!r}.")
    layer = r.layer
    if at:
        try:
            layer = int(at)
        except ValueError:
            raise UnknownDirection(f"Bad layer in {part!r}.") from None
        if not 0 <= layer < len(r.layers):
            raise InvalidSite(f"Layer {layer} does not exist: the study has layers 0–{len(r.layers) - 1}.")
    vec = (r.harm_vectors if name == "harm" else r.refusal_vectors)[layer]
    pos = "t_inst (the instruction's last token)" if name == "harm" else "t_post-inst (the last template token)"
    return Derived(vector=np.asarray(vec, np.float32), site=SITE, layer=layer, shape=(len(vec),),
                   made={"direction": "harmfulness" if name == "harm" else "refusal", "method": "diff-means",
                         "position": pos, "chat": True, "n_positive": rec["meta"]["made"]["n_harmful"],
                         "n_negative": rec["meta"]["made"]["n_harmless"]})


DERIVERS[HarmRefusalSpec.KIND] = _derive


# -- the whole study -----------------------------------------------------------------------
@dataclass
class Study:
    main: object                   # Outcome of the HarmRefusalSpec
    harm: object                   # Outcome of the derived harmfulness direction
    refusal: object                # … and of the refusal direction
    steering: dict                 # {"harm" | "refusal": Outcome of a RefusalSpec}


def steering_spec(spec: HarmRefusalSpec, direction_key: str):
    from ..steering_eval import RefusalSpec

    return RefusalSpec(model=spec.model, direction=direction_key, harmful=spec.heldout_harmful,
                       harmless=spec.heldout_harmless, strength=spec.strength, max_new_tokens=spec.max_new_tokens,
                       source=f"harm-refusal study, held out ({spec.source})")


def run_study(spec: HarmRefusalSpec, store=None, progress=None, steer: bool = True) -> Study:
    """The study, its two directions in the directions table, and their refusal evaluations;
    each stored under its own key and read back when already there."""
    from ...runner import run
    from ..directions import derive

    main = run(spec, store=store, progress=progress)
    harm = derive(spec.model, spec.KIND, main.run_key, "harm", store)
    refusal = derive(spec.model, spec.KIND, main.run_key, "refusal", store)
    steering = {}
    if steer:
        for name, d in (("harm", harm), ("refusal", refusal)):
            if progress:
                progress(f"steering with the {name} direction")
            steering[name] = run(steering_spec(spec, d.run_key), store=store, progress=progress)
    return Study(main, harm, refusal, steering)


def spec_of(model: str, layer: int = -1, strength: float = 4.0, max_new_tokens: int = 24,
            harmful_file: str | None = None, harmless_file: str | None = None) -> HarmRefusalSpec:
    """The study on the shipped sets (or on two files, every 4th line held out)."""
    from ..directions import read_prompts

    if bool(harmful_file) != bool(harmless_file):
        raise ProbeSetError("Give both --harm-harmful-file and --harm-harmless-file, or neither.")
    if harmful_file:
        pos, neg = read_prompts(harmful_file), read_prompts(harmless_file)
        cut = lambda xs, h: [x for i, x in enumerate(xs) if (i % 4 == 3) == h]   # noqa: E731
        sets = {"harmful": cut(pos, False), "harmless": cut(neg, False),
                "heldout_harmful": cut(pos, True), "heldout_harmless": cut(neg, True)}
        source = f"files:{harmful_file},{harmless_file}"
    else:
        tr, te = shipped("refusal"), shipped("refusal", "heldout")
        sets = {"harmful": tr["positive"], "harmless": tr["negative"],
                "heldout_harmful": te["positive"], "heldout_harmless": te["negative"]}
        source = "shipped:refusal"
    return HarmRefusalSpec(model=model, layer=layer, strength=strength, max_new_tokens=max_new_tokens, source=source,
                           **{k: tuple(v) for k, v in sets.items()})


def steering_summary(out) -> dict:
    r = out.result
    return {"run_key": out.run_key, "conditions": list(r.conditions),
            "harmless_refusal_rate": {c: float(v) for c, v in zip(r.conditions, r.harmless_rate)},
            "harmful_refusal_rate": {c: float(v) for c, v in zip(r.conditions, r.harmful_rate)},
            "harmless_completions": {c: [str(t) for t in r.harmless_text[:, i]] for i, c in enumerate(r.conditions)}}


def payload(study: Study) -> dict:
    out, r = study.main, study.main.result
    held = np.flatnonzero(r.heldout == 1)
    li = r.layer
    return {"run_key": out.run_key, "from_store": out.from_store, "model": out.spec.model, "layer": li,
            "site": SITE, "harm_direction_key": study.harm.run_key, "refusal_direction_key": study.refusal.run_key,
            "layers": [{"layer": int(k), "cosine": round(float(c), 4), "harm_norm":
                        round(float(np.linalg.norm(r.harm_vectors[k])), 4),
                        "refusal_norm": round(float(np.linalg.norm(r.refusal_vectors[k])), 4),
                        "harm_accuracy": round(float(r.harm_accuracy[k]), 4),
                        "refusal_accuracy": round(float(r.refusal_accuracy[k]), 4)}
                       for k, c in zip(r.layers, r.cosine)],
            "projections": {"layer": li, "items": [
                {"text": r.texts[i], "harmful": bool(r.label[i]), "heldout": bool(r.heldout[i]),
                 "harm_projection": round(float(r.proj_harm[li, i]), 4),
                 "refusal_projection": round(float(r.proj_refusal[li, i]), 4)} for i in held]},
            "steering": {"strength": out.spec.strength,
                         **{k: steering_summary(v) for k, v in study.steering.items()}},
            "compute_seconds": round(out.compute_seconds, 2), "made": r.made}


def add_options(p) -> None:
    p.add_argument("--harm-layer", type=int, default=-1, help="harm-refusal: the directions' layer (-1: middle)")
    p.add_argument("--harm-strength", type=float, default=4.0,
                   help="harm-refusal: steering adds strength × the raw diff-means vector (default 4)")
    p.add_argument("--harm-max-new-tokens", type=int, default=24)
    p.add_argument("--harm-harmful-file", default=None, help="harm-refusal: instructions, one per line")
    p.add_argument("--harm-harmless-file", default=None)
    p.add_argument("--harm-no-steer", action="store_true", help="harm-refusal: skip the steering evaluation")


def run_cli(a) -> dict:
    import sys

    spec = spec_of(a.model, a.harm_layer, a.harm_strength, a.harm_max_new_tokens, a.harm_harmful_file,
                   a.harm_harmless_file)
    t = time.perf_counter()
    d = payload(run_study(spec, progress=lambda m: print(m, file=sys.stderr), steer=not a.harm_no_steer))
    d["total_seconds"] = round(time.perf_counter() - t, 2)
    return d
