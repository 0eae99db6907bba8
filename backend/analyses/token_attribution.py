"""Which input tokens made this output: gradient attributions to the input token embeddings.

The output is f = the logit of a target token at the last position (default: the model's top
next token), or the logit difference target - against (`contrast`). The score of input token
t is, per method:

- ``saliency``: ||df/de_t||_2, the L2 norm over d_model of the gradient with respect to the
  token's embedding e_t. Unsigned (>= 0), no baseline, nothing to add up to.
- ``input-x-gradient``: sum_d e_t,d * df/de_t,d (gradient times input, summed over d_model).
- ``integrated-gradients``: sum_d (e_t - b_t)_d * int_0^1 df/de_t,d (b + a (e - b)) da, the
  straight-line path from a baseline b to the input e in embedding space, integrated by
  Gauss-Legendre quadrature on [0, 1] (numpy.polynomial.legendre.leggauss: nodes (t + 1) / 2,
  weights w / 2, as captum's method="gausslegendre"). All the steps of one round go through
  the model as one batch (kernels.token_attribution, chunked for memory).
- ``deeplift``: sum_d m_t,d * (e_t - b_t)_d with DeepLIFT's multipliers m from one forward of
  the input and the reference b (the same baselines as IG, position 0 held the same way) and one
  modified backward over the canonical weights (kernels/deeplift.py: the rescale rule on the
  gate's SiLU / GELU; the symmetric split for products of two activations; RMSNorm decomposed;
  the softmax's Jacobian averaged over the segment between reference and input). The gap
  sum(scores) - (f(e) - f(b)) is reported as it is (float rounding and the softmax's quadrature).

"The embedding" is the value at `hook_embed`: for Gemma-3 that is after the sqrt(d_model)
scale (the scaled embedding module's output), so gradient and input are both taken at that
one point and their product does not depend on where the scale is put.

Completeness. IG's scores add up to f(e) - f(b) when the integral is exact; the result
reports `completeness_gap` = sum(scores) - (f(e) - f(b)) and `completeness_gap_rel` =
|gap| / |f(e) - f(b)|. On SmolLM2 the straight path from a zero or token baseline is not
smooth: the first position's massive activation switches on abruptly along it and the gap
stays in the hundreds of % even at 1,024 steps (FINDINGS: "Integrated Gradients on
SmolLM2"). So by default position 0 is held at its own embedding (baseline = input there, its
score is exactly 0); ``interpolate_first`` interpolates it too. SmolLM2 prepends no BOS, so
its position 0 is the first word of the prompt: that word gets no IG score by default.
With ``steps`` None ("auto", the default) the steps double from 16 until the gap is <= 1 %
or the cap of 512 is reached; `steps_used`, `converged` and every round's gap are reported.

Baselines (at hook_embed, position 0 held unless interpolate_first): ``zero`` (zero
vectors), ``pad`` (the pad token's embedding, else eos's: SmolLM2 has pad = eos =
<|im_end|>), ``mask`` (the mean embedding over the whole vocabulary).

Layer view (``layers``): the same method applied to the residual stream entering every block
(resid_pre), per position: gradient norm (saliency), gradient x activation (input x
gradient), or IG on the straight line from the baseline run's resid_pre at that layer to the
real one, continued through the later blocks (with its own completeness gap and steps; the
end points f(e) and f(b) are those of the embedding-level path). `layer_scores`
[n_layers pos]; for Llama-style models row 0 equals `scores` (resid_pre 0 is the embedding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import IdenticalAnswers, InvalidSpec, NotSingleToken, OutOfRange
from ..model import LoadedModel
from ..runner import analysis
from ..spec import Result, Spec, check_text
from .token_lens import single_token_id

METHODS = ("saliency", "input-x-gradient", "integrated-gradients", "lrp", "lrp-cp", "deeplift")
LRP_MODES = {"lrp": "attnlrp", "lrp-cp": "cp"}   # kernels/lrp.py
REFERENCE_METHODS = ("integrated-gradients", "deeplift")   # take a baseline (and the position-0 choice)
BASELINES = ("zero", "pad", "mask")
MAX_STEPS = 512          # --steps N must be 1..MAX_STEPS; auto stops there
AUTO_START = 16          # auto: 16, 32, 64, ... MAX_STEPS
TOLERANCE = 0.01         # auto stops at |gap| <= 1 % of |f(x) - f(baseline)|
TOP_NEXT = 10            # top next tokens reported (a target picker)


@dataclass(frozen=True)
class TokenAttributionSpec(Spec):
    """Which input tokens made the output. `target` / `target_id` / `contrast` (at most one):
    the output to explain; none = the model's top next token. steps None = auto.
    For saliency, input-x-gradient and LRP, steps / baseline / interpolate_first do not apply and
    are reset to their defaults (so they do not split the store key); DeepLIFT keeps baseline and
    interpolate_first (its reference) and resets steps."""

    KIND = "token_attribution"
    text: str = ""
    method: str = "integrated-gradients"
    target: str = ""
    target_id: int | None = None
    contrast: tuple | None = None      # (preferred, dispreferred): f = logit difference
    steps: int | None = None
    baseline: str = "zero"
    interpolate_first: bool = False
    layers: bool = False

    def validate(self):
        check_text(self.text)
        if self.method not in METHODS:
            raise InvalidSpec(f"Unknown attribution method {self.method!r}: choose one of {', '.join(METHODS)}.")
        chosen = [n for n, v in (("target", self.target), ("target_id", self.target_id),
                                 ("contrast", self.contrast)) if v not in ("", None)]
        if len(chosen) > 1:
            raise InvalidSpec(f"Give at most one of target, target_id and contrast (got {', '.join(chosen)}).")
        if not isinstance(self.target, str):
            raise InvalidSpec(f"target must be a token string, got {self.target!r}.")
        if self.target_id is not None and (not isinstance(self.target_id, int) or isinstance(self.target_id, bool)
                                           or self.target_id < 0):
            raise OutOfRange(f"target_id must be a token id >= 0, got {self.target_id!r}.")
        if self.contrast is not None:
            c = self.contrast
            if (not isinstance(c, (tuple, list)) or len(c) != 2
                    or not all(isinstance(t, str) and t != "" for t in c)):
                raise InvalidSpec("contrast takes two tokens: the preferred one and the dispreferred one, "
                                  "e.g. (' Paris', ' London').")
            object.__setattr__(self, "contrast", tuple(c))
            if c[0] == c[1]:
                raise IdenticalAnswers(f"The two tokens of the contrast are the same ({c[0]!r}): "
                                       "their logit difference is always 0.")
        if self.steps is not None and (not isinstance(self.steps, int) or isinstance(self.steps, bool)
                                       or not 1 <= self.steps <= MAX_STEPS):
            raise OutOfRange(f"steps must be 'auto' or an integer 1–{MAX_STEPS}, got {self.steps!r}.")
        if self.baseline not in BASELINES:
            raise InvalidSpec(f"Unknown baseline {self.baseline!r}: choose one of {', '.join(BASELINES)}.")
        if not isinstance(self.interpolate_first, bool) or not isinstance(self.layers, bool):
            raise InvalidSpec("interpolate_first and layers are true or false.")
        if self.method != "integrated-gradients":     # checked above, then not part of the question
            for name, default in (("steps", None), ("baseline", "zero"), ("interpolate_first", False)):
                if name == "steps" or self.method not in REFERENCE_METHODS:
                    object.__setattr__(self, name, default)


@dataclass(frozen=True)
class TokenAttributionResult(Result):
    tokens: list[str]
    token_ids: list[int]
    method: str
    target: dict                       # {"token", "id"}
    against: dict | None               # {"token", "id"} for a contrast, else None
    target_logit: float                # f(x): the target's logit, or the logit difference
    baseline_logit: float | None       # f(baseline) (IG), else None
    completeness_gap: float | None     # sum(scores) - (f(x) - f(baseline)) (IG), else None
    completeness_gap_rel: float | None  # |gap| / |f(x) - f(baseline)|
    steps_used: int | None             # IG: the steps of the reported round
    steps_requested: str | int | None  # "auto" or N (IG)
    steps_cap: int | None
    converged: bool | None             # IG: completeness_gap_rel <= 1 %
    rounds: list                       # IG: [{"steps", "gap", "gap_rel"}] in order
    baseline: str | None
    held_positions: list[int]          # positions whose baseline is the input itself (score 0)
    top_next: list                     # [{"token", "id", "prob", "logit"}] at the last position
    engine: str                        # "dense" (canonical weights) or "hooks" (reference)
    scores: np.ndarray                 # [pos] float64
    layer_scores: np.ndarray | None = None      # [n_layers pos] float64 (layers=True)
    layer_gap_rel: np.ndarray | None = None     # [n_layers] IG completeness per layer
    layer_steps: np.ndarray | None = None       # [n_layers] IG steps used per layer
    position_scores: np.ndarray | None = None   # LRP: [pos] relevance of the rotary position factors read there

    def payload(self) -> dict:
        """The JSON-able fields (the CLI's answer)."""
        d = {k: getattr(self, k) for k in (
            "tokens", "token_ids", "method", "target", "against", "target_logit", "baseline_logit",
            "completeness_gap", "completeness_gap_rel", "steps_used", "steps_requested", "steps_cap",
            "converged", "rounds", "baseline", "held_positions", "top_next", "engine")}
        d["scores"] = [float(s) for s in self.scores]
        if self.position_scores is not None:
            d["position_scores"] = [float(s) for s in self.position_scores]
            tot = np.abs(self.scores) + np.abs(self.position_scores)
            d["position_share"] = [float(p / t) if t > 0 else 0.0
                                   for p, t in zip(np.abs(self.position_scores), tot)]
        if self.layer_scores is not None:
            d["layer_scores"] = self.layer_scores.tolist()
            if self.layer_gap_rel is not None:
                d["layer_completeness_gap_rel"] = self.layer_gap_rel.tolist()
                d["layer_steps_used"] = [int(s) for s in self.layer_steps]
        return d


# ---------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------
def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of n-point Gauss-Legendre quadrature on [0, 1] (float64)."""
    t, w = np.polynomial.legendre.leggauss(n)
    return (t + 1.0) / 2.0, w / 2.0


def _rel(gap: float, delta: float) -> float:
    """|gap| / |delta| (finite: a zero delta counts as 1e-12, so a nonzero gap never converges)."""
    return abs(gap) / max(abs(delta), 1e-12)


def _token_id(model: LoadedModel, token: str) -> int:
    try:
        return single_token_id(model, token)
    except InvalidSpec as e:          # the same message, the specific type
        raise NotSingleToken(str(e)) from None


def readout_of(spec: TokenAttributionSpec, model: LoadedModel, top_logits):
    """(Readout, target dict, against dict or None) of a spec; typed errors for bad tokens."""
    from kernels.token_attribution import Readout

    if spec.contrast is not None:
        a, b = (_token_id(model, t) for t in spec.contrast)
        if a == b:
            raise IdenticalAnswers(f"{spec.contrast[0]!r} and {spec.contrast[1]!r} are the same token: "
                                   "their logit difference is always 0.")
        return (Readout(a, b), {"token": model.str_tokens([a])[0], "id": a},
                {"token": model.str_tokens([b])[0], "id": b})
    if spec.target_id is not None:
        if spec.target_id >= model.info.d_vocab:
            raise OutOfRange(f"target_id {spec.target_id} is outside the vocabulary (0–{model.info.d_vocab - 1}).")
        t = spec.target_id
    elif spec.target:
        t = _token_id(model, spec.target)
    else:
        t = int(top_logits.argmax())
    return Readout(t), {"token": model.str_tokens([t])[0], "id": t}, None


def baseline_embeddings(eng, model: LoadedModel, x, kind: str, interpolate_first: bool):
    """The baseline [T d] at hook_embed; position 0 = x[0] unless interpolate_first."""
    import torch

    T = x.shape[0]
    if kind == "zero":
        b = torch.zeros_like(x)
    elif kind == "pad":
        pad = model.tokenizer.pad_token_id
        pad = model.eos_token_id if pad is None else pad
        if pad is None:
            raise InvalidSpec(f"{model.info.model_id} has neither a pad nor an eos token: use the zero or mask baseline.")
        b = eng.embed([pad] * T).to(x.dtype)
    else:
        b = eng.mean_embedding().to(x.dtype)[None].expand(T, -1).clone()
    if not interpolate_first:
        b[0] = x[0]
    return b


def integrated_gradients(eng, x, b, start: int, readout, f_x: float, f_b: float, steps: int | None,
                         progress=None, label: str = ""):
    """(scores [T] float64 numpy, rounds) of straight-line IG from b to x [T d] entering block
    `start`, steps fixed (one round) or auto (16, 32, ... MAX_STEPS until the gap is <= 1 %)."""
    import torch

    plan = [steps] if steps is not None else []
    n = AUTO_START
    while steps is None and n <= MAX_STEPS:
        plan.append(n)
        n *= 2
    xd, bd = x.double(), b.double()
    diff = xd - bd
    if not diff.any():             # e.g. a one-token prompt with position 0 held: nothing to integrate
        return np.zeros(x.shape[0]), [{"steps": 0, "gap": 0.0, "gap_rel": 0.0}]
    rounds, scores = [], None
    for n in plan:
        alphas, weights = gauss_legendre(n)
        a = torch.as_tensor(alphas, dtype=torch.float64)[:, None, None]
        X = (bd + a * diff).to(x.dtype)                                 # [n T d]
        _, G = eng.grads(X, start, readout, torch.as_tensor(weights, dtype=torch.float64))
        scores = (diff * G).sum(-1).cpu().numpy()
        gap = float(scores.sum() - (f_x - f_b))
        rounds.append({"steps": n, "gap": gap, "gap_rel": _rel(gap, f_x - f_b)})
        if progress:
            progress(f"Integrated gradients{label}: {n} steps, completeness gap {rounds[-1]['gap_rel']:.2%}")
        if rounds[-1]["gap_rel"] <= TOLERANCE:
            break
    return scores, rounds


# ---------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------
def attribute(spec: TokenAttributionSpec, model: LoadedModel, progress=None, prefer: str = "dense"
              ) -> TokenAttributionResult:
    """The computation of a spec; `prefer="hooks"` takes the reference engine (tests)."""
    import torch

    from kernels.token_attribution import engine

    ids = model.encode(spec.text)
    T = len(ids)
    if spec.method in LRP_MODES:
        return _lrp(spec, model, ids)
    if spec.method == "deeplift":
        return _deeplift(spec, model, ids)
    with model.lock:
        eng = engine(model, ids, prefer)
        x = eng.embed(ids)                                              # [T d] at hook_embed
        ig = spec.method == "integrated-gradients"
        b = baseline_embeddings(eng, model, x, spec.baseline, spec.interpolate_first) if ig else None
        X0 = torch.stack([x, b]) if ig else x[None]
        logits, _, resid = eng.run(X0, resid=spec.layers and ig)
        readout, target, against = readout_of(spec, model, logits[0])
        f_all = readout.from_logits(logits).double()
        f_x = float(f_all[0])
        f_b = float(f_all[1]) if ig else None
        if ig and torch.equal(x, b):        # the baseline is the input (one token, held): f(b) = f(x) exactly
            f_b = f_x
        probs = logits[0].float().softmax(-1)
        top = probs.topk(min(TOP_NEXT, probs.shape[0]))
        top_next = [{"token": model.str_tokens([int(i)])[0], "id": int(i), "prob": float(p),
                     "logit": float(logits[0, int(i)])} for p, i in zip(top.values, top.indices)]

        layer_scores = layer_gap = layer_steps = None
        rounds: list = []
        if ig:
            scores, rounds = integrated_gradients(eng, x, b, 0, readout, f_x, f_b, spec.steps, progress)
            if spec.layers:
                rows, gaps, used = [], [], []
                for layer in range(eng.n_layers):
                    xl, bl = resid[layer, 0].clone(), resid[layer, 1].clone()
                    if not spec.interpolate_first:
                        bl[0] = xl[0]
                    if torch.equal(xl, x) and torch.equal(bl, b):            # resid_pre 0 is the embedding
                        s, r = scores, rounds
                    else:
                        s, r = integrated_gradients(eng, xl, bl, layer, readout, f_x, f_b, spec.steps,
                                                    progress, f" at layer {layer}")
                    rows.append(s)
                    gaps.append(r[-1]["gap_rel"])
                    used.append(r[-1]["steps"])
                layer_scores, layer_gap, layer_steps = np.stack(rows), np.array(gaps), np.array(used)
        else:
            if spec.layers:
                _, acts, grads = eng.layer_grads(x[None], readout)
                layer_scores = (grads.norm(dim=-1) if spec.method == "saliency"
                                else (acts * grads).sum(-1)).cpu().numpy()
            _, g = eng.grads(x[None], 0, readout, torch.ones(1, dtype=torch.float64))
            scores = (g.norm(dim=-1) if spec.method == "saliency" else (x.double() * g).sum(-1)).cpu().numpy()

    last = rounds[-1] if rounds else None
    gap = last["gap"] if last else None
    return TokenAttributionResult(
        tokens=model.str_tokens(ids), token_ids=list(ids), method=spec.method, target=target, against=against,
        target_logit=f_x, baseline_logit=f_b, completeness_gap=gap,
        completeness_gap_rel=last["gap_rel"] if last else None,
        steps_used=last["steps"] if last else None,
        steps_requested=("auto" if spec.steps is None else spec.steps) if ig else None,
        steps_cap=(MAX_STEPS if spec.steps is None else spec.steps) if ig else None,
        converged=bool(last["gap_rel"] <= TOLERANCE) if last else None, rounds=rounds,
        baseline=spec.baseline if ig else None,
        held_positions=[0] if ig and not spec.interpolate_first and T > 0 else [],
        top_next=top_next, engine=eng.name, scores=np.asarray(scores, dtype=np.float64),
        layer_scores=None if layer_scores is None else np.asarray(layer_scores, dtype=np.float64),
        layer_gap_rel=None if layer_gap is None else layer_gap.astype(np.float64),
        layer_steps=None if layer_steps is None else layer_steps.astype(np.int64))


def _lrp(spec: TokenAttributionSpec, model: LoadedModel, ids: list[int]) -> TokenAttributionResult:
    """LRP (kernels/lrp.py): token relevances, the rotary positions' share, and conservation:
    completeness_gap = sum(scores) + sum(position_scores) - f(x) (0 up to rounding for lrp-cp)."""
    import torch

    from kernels.lrp import lrp_model, relevance
    from kernels.token_attribution import DenseEngine

    with model.lock:
        lm = lrp_model(model, LRP_MODES[spec.method])
        if lm is None:
            raise InvalidSpec(f"LRP is written over the canonical-weight block (Llama-style models and Gemma-3); "
                              f"{model.info.model_id} has another block: use integrated-gradients.")
        eng = DenseEngine(lm)
        x = eng.embed(ids)
        logits, _, _ = eng.run(x[None])
        readout, target, against = readout_of(spec, model, logits[0])
        r = relevance(lm, x, readout, layers=spec.layers)
    probs = logits[0].float().softmax(-1)
    top = probs.topk(min(TOP_NEXT, probs.shape[0]))
    top_next = [{"token": model.str_tokens([int(i)])[0], "id": int(i), "prob": float(p),
                 "logit": float(logits[0, int(i)])} for p, i in zip(top.values, top.indices)]
    f_x = float(readout.from_logits(logits).double()[0])
    scores, pos = r["tokens"].cpu().numpy(), r["positions"].cpu().numpy()
    gap = float(scores.sum() + pos.sum() - f_x)
    return TokenAttributionResult(
        tokens=model.str_tokens(ids), token_ids=list(ids), method=spec.method, target=target, against=against,
        target_logit=f_x, baseline_logit=None, completeness_gap=gap, completeness_gap_rel=_rel(gap, f_x),
        steps_used=None, steps_requested=None, steps_cap=None, converged=None, rounds=[], baseline=None,
        held_positions=[], top_next=top_next, engine="lrp", scores=np.asarray(scores, dtype=np.float64),
        layer_scores=None if "layers" not in r else r["layers"].cpu().numpy().astype(np.float64),
        position_scores=np.asarray(pos, dtype=np.float64))


def _deeplift(spec: TokenAttributionSpec, model: LoadedModel, ids: list[int]) -> TokenAttributionResult:
    """DeepLIFT (kernels/deeplift.py, rules "exact"): the reference is the baseline at the
    embeddings (position 0 held unless interpolate_first), one forward of input and reference,
    one backward of the multipliers; completeness_gap = sum(scores) - (f(x) - f(x_ref)), reported
    as it is. No steps (steps_used None)."""
    import torch

    from kernels.deeplift import attribute as deeplift, deeplift_model
    from kernels.token_attribution import DenseEngine

    T = len(ids)
    with model.lock:
        dl = deeplift_model(model)
        if dl is None:
            raise InvalidSpec(f"DeepLIFT is written over the canonical-weight block (Llama-style models and "
                              f"Gemma-3); {model.info.model_id} has another block: use integrated-gradients.")
        eng = DenseEngine(dl)
        x = eng.embed(ids)
        b = baseline_embeddings(eng, model, x, spec.baseline, spec.interpolate_first)
        logits, _, _ = eng.run(x[None])
        readout, target, against = readout_of(spec, model, logits[0])
        r = deeplift(dl, x, b, readout, layers=spec.layers)
    probs = logits[0].float().softmax(-1)
    top = probs.topk(min(TOP_NEXT, probs.shape[0]))
    top_next = [{"token": model.str_tokens([int(i)])[0], "id": int(i), "prob": float(p),
                 "logit": float(logits[0, int(i)])} for p, i in zip(top.values, top.indices)]
    f_x, f_b = r["f"], r["f_ref"]
    if torch.equal(x, b):              # the reference is the input: nothing to explain
        f_b = f_x
    scores = r["tokens"].cpu().numpy()
    gap = float(scores.sum() - (f_x - f_b))
    return TokenAttributionResult(
        tokens=model.str_tokens(ids), token_ids=list(ids), method=spec.method, target=target, against=against,
        target_logit=f_x, baseline_logit=f_b, completeness_gap=gap, completeness_gap_rel=_rel(gap, f_x - f_b),
        steps_used=None, steps_requested=None, steps_cap=None, converged=None, rounds=[], baseline=spec.baseline,
        held_positions=[0] if not spec.interpolate_first and T > 0 else [], top_next=top_next, engine="deeplift",
        scores=np.asarray(scores, dtype=np.float64),
        layer_scores=None if "layers" not in r else r["layers"].cpu().numpy().astype(np.float64))


@analysis(TokenAttributionSpec, TokenAttributionResult)
def compute(spec: TokenAttributionSpec, model: LoadedModel, progress=None) -> TokenAttributionResult:
    return attribute(spec, model, progress)


# ---------------------------------------------------------------------------------------
# Command line: python -m backend attribute ...
# ---------------------------------------------------------------------------------------
def add_cli_args(p) -> None:
    from ..model import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--text", required=True)
    p.add_argument("--target", default="", help="one token, e.g. ' Paris' (default: the top next token)")
    p.add_argument("--target-id", type=int, default=None)
    p.add_argument("--contrast", nargs=2, default=None, metavar=("PREFERRED", "DISPREFERRED"),
                   help="attribute the logit difference PREFERRED - DISPREFERRED")
    p.add_argument("--method", default="integrated-gradients", help="|".join(METHODS))
    p.add_argument("--steps", default="auto", help=f"auto (16, 32, ... {MAX_STEPS} until the gap is <= 1 %%) or N")
    p.add_argument("--baseline", default="zero", help="|".join(BASELINES))
    p.add_argument("--interpolate-first", action="store_true",
                   help="interpolate position 0 too (default: held at its own embedding)")
    p.add_argument("--layers", action="store_true",
                   help="also attribute to every layer's resid_pre (layer_scores [n_layers pos]; costs more)")


def spec_from_args(a) -> TokenAttributionSpec:
    steps = a.steps
    if isinstance(steps, str):
        if steps.strip().lower() == "auto":
            steps = None
        else:
            try:
                steps = int(steps)
            except ValueError:
                raise OutOfRange(f"--steps must be 'auto' or an integer 1–{MAX_STEPS}, got {a.steps!r}.") from None
    return TokenAttributionSpec(model=a.model, text=a.text, method=a.method, target=a.target or "",
                                target_id=a.target_id, contrast=tuple(a.contrast) if a.contrast else None,
                                steps=steps, baseline=a.baseline, interpolate_first=a.interpolate_first,
                                layers=a.layers)


def run_cli(a) -> dict:
    import sys

    from ..runner import run

    spec = spec_from_args(a)
    out = run(spec, progress=lambda m: print(m, file=sys.stderr))
    return {"run_key": out.run_key, "from_store": out.from_store,
            "compute_seconds": round(out.compute_seconds, 4), "read_seconds": round(out.read_seconds, 4),
            "model": a.model, "text": a.text, "interpolate_first": spec.interpolate_first,
            **out.result.payload()}
