"""Activation patching: which activations carry the answer (Zhang & Nanda 2023; Heimersheim & Nanda 2024).

A PatchSpec names a task (one clean/corrupted pair with an answer and a wrong answer, or a
small dataset of such pairs), a site (resid_pre, attn_out, mlp_out by layer x position;
head_out by layer x head; head_out_pos by layer x position x head), a metric and a direction:

- denoising: the clean activation is patched into the corrupted run (what suffices?);
- noising: the corrupted activation is patched into the clean run (what is necessary?).

Metrics, at the last position:
- logit_diff: logit(answer) - logit(wrong);
- logit_diff_norm: (LD - LD_corrupted) / (LD_clean - LD_corrupted): 0 = corrupted, 1 = clean;
- prob: probability of the answer;
- kl: KL(clean || patched) of the next-token distribution, in nats.
Over a dataset the raw metric is averaged over pairs (normalisation uses the averaged baselines).

Sweeps run in kernels.patching: the fast exact sweep for models with canonical weights
(Llama-style, Gemma-3), the hooked reference otherwise. `intervene` runs one patch live (click-to-patch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import InvalidSite, InvalidSpec
from ..model import LoadedModel, load_model
from ..patch_sites import SITE_AXES, SITES
from ..runner import analysis
from ..spec import Result
from ..tasks import EncodedPair, PairTaskSpec, encode_pairs

METRICS = ("logit_diff_norm", "logit_diff", "prob", "kl")
DIRECTIONS = ("denoising", "noising")
CORRUPTIONS = ("tokens", "gaussian")
MAX_NOISE_SAMPLES = 64


def _check_choice(value, allowed, what, err=InvalidSpec):
    if value not in allowed:
        raise err(f"Unknown {what} {value!r}; known: {', '.join(allowed)}.")


@dataclass(frozen=True)
class PatchSpec(PairTaskSpec):
    KIND = "patch"
    ALLOWED_SITES: ClassVar[tuple[str, ...]] = SITES
    site: str = "resid_pre"
    metric: str = "logit_diff_norm"
    direction: str = "denoising"
    # Corruption (Zhang & Nanda 2023): "tokens" = symmetric token replacement, the corrupted prompt
    # of the pair; "gaussian" = the clean prompt with Gaussian noise (noise_scale x the std of the
    # embedding matrix's entries, seeded) added to the token embeddings at noise_positions (none
    # given: where the pair's prompts differ), values averaged over noise_samples draws.
    corruption: str = "tokens"
    noise_positions: tuple = ()
    noise_scale: float = 3.0
    noise_samples: int = 4
    noise_seed: int = 0

    # Fields added after results were stored: left out of the key (and the JSON) at their
    # defaults, so every key of a token-replacement run is what it was before they existed.
    KEY_NEUTRAL: ClassVar[dict] = {"corruption": "tokens", "noise_positions": (), "noise_scale": 3.0,
                                   "noise_samples": 4, "noise_seed": 0}

    def to_dict(self):
        d = super().to_dict()
        for name, default in self.KEY_NEUTRAL.items():
            if name in d and d[name] == default:
                del d[name]
        return d

    def validate(self):
        _check_choice(self.site, self.ALLOWED_SITES, "patching site", InvalidSite)
        _check_choice(self.metric, METRICS, "metric")
        _check_choice(self.direction, DIRECTIONS, "direction")
        self.validate_corruption()
        self.validate_pairs()

    def validate_corruption(self):
        _check_choice(self.corruption, CORRUPTIONS, "corruption")
        if self.corruption != "tokens" and self.KIND not in ("patch", "intervention"):
            raise InvalidSpec(f"{self.KIND} takes the pair's token replacement only (corruption 'tokens').")
        if isinstance(self.noise_positions, str) or not isinstance(self.noise_positions, tuple) or not all(
                isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in self.noise_positions):
            raise InvalidSpec("noise_positions must be a list of token positions (whole numbers ≥ 0).")
        object.__setattr__(self, "noise_positions", tuple(sorted(set(self.noise_positions))))
        if isinstance(self.noise_scale, bool) or not isinstance(self.noise_scale, (int, float)) \
                or not 0 < self.noise_scale <= 100:
            raise InvalidSpec(f"noise_scale must be in (0, 100] (times the embedding std), got {self.noise_scale!r}.")
        object.__setattr__(self, "noise_scale", float(self.noise_scale))
        if not isinstance(self.noise_samples, int) or not 1 <= self.noise_samples <= MAX_NOISE_SAMPLES:
            raise InvalidSpec(f"noise_samples must be 1–{MAX_NOISE_SAMPLES}, got {self.noise_samples!r}.")
        if not isinstance(self.noise_seed, int) or isinstance(self.noise_seed, bool):
            raise InvalidSpec(f"noise_seed must be a whole number, got {self.noise_seed!r}.")


@dataclass(frozen=True)
class PatchResult(Result):
    site: str
    metric: str
    direction: str
    axes: list[str]              # names of the axes of values, e.g. ["layer", "pos"]
    layers: list[int]
    positions: list[int]         # [] for head_out
    heads: list[int]             # [] for the layer x position sites
    values: np.ndarray           # [layer pos] | [layer head] | [layer pos head], float32
    clean_tokens: list[str]      # the first pair's prompts, as tokens
    corrupt_tokens: list[str]
    clean_metric: float          # the metric of the unpatched runs (averaged over pairs)
    corrupt_metric: float
    clean_logit_diff: float
    corrupt_logit_diff: float
    n_pairs: int
    method: str                  # "fast" or "reference"


def _metrics(model: LoadedModel, fm, e: EncodedPair, metric: str):
    """The kernel metric for one pair (raw: logit diff, prob or KL to the clean run)."""
    import torch
    from kernels import patching as kp

    if metric in ("logit_diff", "logit_diff_norm"):
        return kp.LogitDiff(e.answer_id, e.wrong_id)
    if metric == "prob":
        return kp.AnswerProb(e.answer_id)
    if fm is not None:
        clean_logits = kp.base_logits(fm, e.clean_ids)
    else:
        with torch.inference_mode():
            clean_logits = model.logits(e.clean_ids)[0, -1]
    return kp.KLFromClean(clean_logits.float().log_softmax(-1))


def noise_positions(spec: PatchSpec, e: EncodedPair) -> list[int]:
    """The positions whose embeddings Gaussian corruption noises: the spec's, or where the pair differs."""
    T = len(e.clean_ids)
    pos = list(spec.noise_positions) or [i for i, (a, b) in enumerate(zip(e.clean_ids, e.corrupt_ids)) if a != b]
    if not pos:
        raise InvalidSpec("Gaussian corruption needs token positions to noise: the clean and corrupted prompts "
                          "are identical, so give noise_positions.")
    if max(pos) >= T:
        raise InvalidSpec(f"noise position {max(pos)} is past the prompt's {T} tokens (positions 0–{T - 1}).")
    return pos


def embedding_noise(fm, T: int, positions: list[int], scale: float, seed: int, sample: int):
    """[T d_model] noise for sample `sample`: N(0, (scale * std)^2) at `positions`, 0 elsewhere, with
    std the standard deviation of the embeddings' entries (as the model adds them, Gemma's scale
    included); drawn on the CPU from a generator seeded by (seed, sample), so any device agrees."""
    import torch

    std = float(fm.W_E.detach().float().std()) * (1.0 if fm.embed_scale is None else float(fm.embed_scale))
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(sample))
    noise = torch.zeros(T, fm.W_E.shape[1])
    noise[positions] = torch.randn(len(positions), fm.W_E.shape[1], generator=g) * (scale * std)
    return noise


def _run_pair_gaussian(model: LoadedModel, fm, e: EncodedPair, spec: PatchSpec):
    """_run_pair with the corrupted run = the clean prompt with noised embeddings, averaged over samples."""
    import torch
    from kernels import patching as kp

    if fm is None:
        raise InvalidSpec(f"Gaussian corruption runs on the fast patching path; {model.info.model_id} "
                          "has no canonical weights: use token replacement.")
    pos = noise_positions(spec, e)
    metric = _metrics(model, fm, e, spec.metric)
    ld = kp.LogitDiff(e.answer_id, e.wrong_id)
    T = len(e.clean_ids)
    clean = kp.states(fm, e.clean_ids)
    total, cm, km, cl, kl = 0.0, 0.0, 0.0, 0.0, 0.0
    with torch.inference_mode():
        emb = fm.embed(torch.as_tensor([e.clean_ids], device=fm.W_U.device))[0]
        for s in range(spec.noise_samples):
            noise = embedding_noise(fm, T, pos, spec.noise_scale, spec.noise_seed, s).to(emb.device, emb.dtype)
            noised = kp.run_states(fm, e.clean_ids, emb + noise)
            base, src = (noised, clean) if spec.direction == "denoising" else (clean, noised)
            out = kp.sweep_states(fm, base, src, spec.site, metric)
            b_ld, s_ld = (float(ld.from_resid(fm, x.pre[-1, -1:])[0]) for x in (base, src))
            total = total + out.values.double()
            if spec.direction == "denoising":
                cm, km, cl, kl = cm + out.source, km + out.base, cl + s_ld, kl + b_ld
            else:
                cm, km, cl, kl = cm + out.base, km + out.source, cl + b_ld, kl + s_ld
    n = spec.noise_samples
    return total / n, cm / n, km / n, cl / n, kl / n


def _run_pair(model: LoadedModel, fm, e: EncodedPair, spec: PatchSpec):
    """(values tensor, clean metric, corrupt metric, clean LD, corrupt LD) of one pair."""
    from kernels import patching as kp

    if spec.corruption == "gaussian":
        return _run_pair_gaussian(model, fm, e, spec)

    base, src = ((e.corrupt_ids, e.clean_ids) if spec.direction == "denoising"
                 else (e.clean_ids, e.corrupt_ids))
    metric = _metrics(model, fm, e, spec.metric)
    ld = kp.LogitDiff(e.answer_id, e.wrong_id)
    if fm is not None:
        out = kp.sweep(fm, base, src, spec.site, metric)
        lds = kp.sweep_baselines(fm, base, src, ld)
    else:
        info = model.info
        out = kp.reference_sweep(model, base, src, spec.site, metric, info.n_layers, info.n_heads,
                                 n_kv=info.n_kv_heads)
        lds = kp.reference_sweep(model, base, src, spec.site, ld, info.n_layers, info.n_heads,
                                 cell_list=[])
        lds = (lds.base, lds.source)
    if spec.direction == "denoising":   # base = corrupted
        return out.values, out.source, out.base, lds[1], lds[0]
    return out.values, out.base, out.source, lds[0], lds[1]


def normalising_gap(clean_m: float, corrupt_m: float) -> float:
    """LD(clean) - LD(corrupted), the denominator of the normalised logit difference; InvalidSpec
    when the corruption does not move the logit difference."""
    gap = clean_m - corrupt_m
    if abs(gap) < 1e-6:
        raise InvalidSpec("The clean and corrupted prompts give the same logit difference "
                          f"({clean_m:.4f}), so the normalised logit difference is undefined: "
                          "pick another metric or a corruption that changes the answer.")
    return gap


@analysis(PatchSpec, PatchResult)
def compute(spec: PatchSpec, model: LoadedModel, progress=None) -> PatchResult:
    from kernels import patching as kp

    encoded = encode_pairs(model, spec.pairs())
    fm = kp.fast_model(model)
    info = model.info
    total, clean_m, corrupt_m, clean_ld, corrupt_ld = 0.0, 0.0, 0.0, 0.0, 0.0
    with model.lock:
        for i, e in enumerate(encoded):
            if progress and len(encoded) > 1:
                progress(f"Patching pair {i + 1} of {len(encoded)}…")
            v, cm, km, cl, kl = _run_pair(model, fm, e, spec)
            total = total + v.double()
            clean_m, corrupt_m, clean_ld, corrupt_ld = clean_m + cm, corrupt_m + km, clean_ld + cl, corrupt_ld + kl
    n = len(encoded)
    values = (total / n).cpu().numpy()
    clean_m, corrupt_m, clean_ld, corrupt_ld = clean_m / n, corrupt_m / n, clean_ld / n, corrupt_ld / n
    if spec.metric == "logit_diff_norm":
        values = (values - corrupt_m) / normalising_gap(clean_m, corrupt_m)
    T = len(encoded[0].clean_ids)
    axes = list(SITE_AXES[spec.site])
    return PatchResult(
        site=spec.site, metric=spec.metric, direction=spec.direction, axes=axes,
        layers=list(range(info.n_layers)), positions=list(range(T)) if "pos" in axes else [],
        heads=(list(range(info.n_heads)) if "head" in axes
               else list(range(info.n_kv_heads)) if "kv_head" in axes else []),
        values=values.astype(np.float32),
        clean_tokens=model.str_tokens(encoded[0].clean_ids),
        corrupt_tokens=model.str_tokens(encoded[0].corrupt_ids),
        clean_metric=float(1.0 if spec.metric == "logit_diff_norm" else clean_m),
        corrupt_metric=float(0.0 if spec.metric == "logit_diff_norm" else corrupt_m),
        clean_logit_diff=float(clean_ld), corrupt_logit_diff=float(corrupt_ld),
        n_pairs=n, method="fast" if fm is not None else "reference")


# ---------------------------------------------------------------------------------------
# Click-to-patch: one intervention, live
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Intervention(Result):
    site: str
    cell: dict                   # {"layer": 12, "pos": 9} or {"layer": 23, "head": 3} ...
    direction: str
    metric: str
    before: float                # the metric of the unpatched base run (first pair)
    after: float                 # the metric of the patched run
    top_before: list[dict]       # [{"token", "token_id", "prob"}] of the base run
    top_after: list[dict]        # same, patched run
    seconds: float


def _top(model: LoadedModel, logits, k: int) -> list[dict]:
    p = logits.float().softmax(-1).topk(k)
    return [{"token": t, "token_id": int(i), "prob": float(v)}
            for t, i, v in zip(model.str_tokens(p.indices.tolist()), p.indices.tolist(), p.values.tolist())]


def intervene(spec: PatchSpec, layer: int, pos: int | None = None, head: int | None = None,
              top_k: int = 10, model: LoadedModel | None = None) -> Intervention:
    """Run one patch of spec.site at (layer, pos/head) on the first pair of the spec.

    `before`/`after` use spec.metric (normalised against the first pair's baselines);
    the top next tokens are the base run's and the patched run's. Nothing is stored.
    """
    import torch
    from kernels import patching as kp

    t0 = time.perf_counter()
    model = model or load_model(spec.model)
    info = model.info
    e = encode_pairs(model, spec.pairs()[:1])[0]
    T = len(e.clean_ids)
    coords = {"layer": layer, "pos": pos, "head": head, "kv_head": head}
    axes = SITE_AXES[spec.site]
    limits = {"layer": info.n_layers, "pos": T, "head": info.n_heads, "kv_head": info.n_kv_heads}
    for a in axes:
        v = coords[a]
        if not isinstance(v, int) or not 0 <= v < limits[a]:
            raise InvalidSite(f"Site {spec.site} needs {a} in 0–{limits[a] - 1}, got {v!r}.")
    cell = tuple(coords[a] for a in axes)
    base, src = ((e.corrupt_ids, e.clean_ids) if spec.direction == "denoising"
                 else (e.clean_ids, e.corrupt_ids))
    with model.lock:
        fm = kp.fast_model(model)
        metric = _metrics(model, fm, e, spec.metric)
        if spec.corruption == "gaussian":          # the first noise sample's corrupted run
            if fm is None:
                raise InvalidSpec("Gaussian corruption runs on the fast patching path; use token replacement.")
            with torch.inference_mode():
                emb = fm.embed(torch.as_tensor([e.clean_ids], device=fm.W_U.device))[0]
                noise = embedding_noise(fm, T, noise_positions(spec, e), spec.noise_scale, spec.noise_seed, 0)
                noised = kp.run_states(fm, e.clean_ids, emb + noise.to(emb.device, emb.dtype))
            clean = kp.states(fm, e.clean_ids)
            b_st, s_st = (noised, clean) if spec.direction == "denoising" else (clean, noised)
            after_logits = kp.patch_logits_states(fm, b_st, s_st, spec.site, cell)
            with torch.inference_mode():
                base_l, src_l = fm.logits(b_st.pre[-1, -1:])[0], fm.logits(s_st.pre[-1, -1:])[0]
        elif fm is not None:
            after_logits = kp.patch_logits(fm, base, src, spec.site, cell)
            base_l, src_l = kp.base_logits(fm, base), kp.base_logits(fm, src)
        else:
            base_l, src_l, outs = kp.reference_logits(model, base, src, spec.site, [cell])
            after_logits = outs[0]
    with torch.inference_mode():
        vals = metric.from_logits(torch.stack([base_l, src_l, after_logits])).tolist()
    before, source, after = vals
    if spec.metric == "logit_diff_norm":
        clean_v, corrupt_v = (source, before) if spec.direction == "denoising" else (before, source)
        gap = clean_v - corrupt_v
        before, after = ((before - corrupt_v) / gap, (after - corrupt_v) / gap) if abs(gap) > 1e-6 \
            else (float("nan"), float("nan"))
    return Intervention(site=spec.site, cell={a: coords[a] for a in axes}, direction=spec.direction,
                        metric=spec.metric, before=float(before), after=float(after),
                        top_before=_top(model, base_l, top_k), top_after=_top(model, after_logits, top_k),
                        seconds=time.perf_counter() - t0)


@dataclass(frozen=True)
class InterventionSpec(PatchSpec):
    """One click: a patch of `site` at (layer, pos / head) on the spec's first pair, stored like
    every result, so the link of a clicked cell reopens it from the store."""

    KIND = "intervention"
    layer: int = 0
    pos: int = -1                # -1: the site has no position axis
    head: int = -1               # -1: the site has no head axis

    def validate(self):
        super().validate()
        for name in ("layer", "pos", "head"):
            if not isinstance(getattr(self, name), int):
                raise InvalidSite(f"{name} must be a whole number.")

    def patch_spec(self) -> PatchSpec:
        return self.as_task(PatchSpec)


@analysis(InterventionSpec, Intervention)
def compute_intervention(spec: InterventionSpec, model: LoadedModel, progress=None) -> Intervention:
    return intervene(spec.patch_spec(), spec.layer, None if spec.pos < 0 else spec.pos,
                     None if spec.head < 0 else spec.head, model=model)


# ---------------------------------------------------------------------------------------
# Command line: python -m backend patch ...
# ---------------------------------------------------------------------------------------
def add_task_args(p) -> None:
    """Options naming a prompt-pair task: one pair, or a generated dataset (patch, atp, circuit)."""
    from ..model import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--clean", default="", help="clean prompt")
    p.add_argument("--corrupt", default="", help="corrupted prompt (same token length)")
    p.add_argument("--answer", default="", help="the clean answer, one token, e.g. ' Mary'")
    p.add_argument("--wrong", default="", help="the wrong answer, one token, e.g. ' John'")
    p.add_argument("--task", choices=["ioi", "induction", "facts"], default=None,
                   help="generate a dataset of pairs instead of --clean/--corrupt")
    p.add_argument("--n-pairs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def add_cli_args(p, sites=SITES, default_metric: str = "logit_diff_norm") -> None:
    """Options of a sweep over a prompt-pair task (shared by `patch`, `atp` and `atp-star`)."""
    add_task_args(p)
    p.add_argument("--site", default="resid_pre", help="one of " + ", ".join(sites))
    p.add_argument("--metric", default=default_metric, help="one of " + ", ".join(METRICS))
    p.add_argument("--direction", default="denoising", help="one of " + ", ".join(DIRECTIONS))


def add_corruption_args(p) -> None:
    """`patch` only: how the corrupted run is made."""
    p.add_argument("--corruption", default="tokens", help="tokens (the pair's corrupted prompt) or gaussian "
                   "(noise on the clean prompt's token embeddings)")
    p.add_argument("--noise-positions", type=int, nargs="*", default=[],
                   help="token positions to noise (default: where the pair's prompts differ)")
    p.add_argument("--noise-scale", type=float, default=3.0, help="noise std in units of the embedding std")
    p.add_argument("--noise-samples", type=int, default=4, help="noise draws averaged")
    p.add_argument("--noise-seed", type=int, default=0)


def add_patch_args(p) -> None:
    add_cli_args(p)
    add_corruption_args(p)


def spec_from_args(cls, a, **kw):
    """A spec with PatchSpec's task fields (PatchSpec, AtPSpec, CircuitSpec...) from the options
    of add_task_args; `kw` are its other fields (default: the sweep options of add_cli_args)."""
    kw = kw or dict(site=a.site, metric=a.metric, direction=a.direction)
    if a.task:
        from ..tasks import generate

        return cls.from_pairs(a.model, generate(load_model(a.model), a.task, n=a.n_pairs, seed=a.seed), **kw)
    return cls(model=a.model, clean=a.clean, corrupt=a.corrupt, answer=a.answer, wrong=a.wrong, **kw)


def sweep_payload(spec, out) -> dict:
    """The JSON of a sweep-shaped outcome (exact or AtP)."""
    r = out.result
    return {"run_key": out.run_key, "from_store": out.from_store,
            "compute_seconds": round(out.compute_seconds, 4), "read_seconds": round(out.read_seconds, 4),
            "model": spec.model, "site": r.site, "metric": r.metric, "direction": r.direction,
            "axes": r.axes, "layers": r.layers, "positions": r.positions, "heads": r.heads,
            "values": np.round(r.values.astype(np.float64), 6).tolist(),
            "clean_tokens": r.clean_tokens, "corrupt_tokens": r.corrupt_tokens,
            "clean_metric": r.clean_metric, "corrupt_metric": r.corrupt_metric,
            "clean_logit_diff": r.clean_logit_diff, "corrupt_logit_diff": r.corrupt_logit_diff,
            "n_pairs": r.n_pairs, "method": r.method}


def run_cli(a) -> dict:
    import sys

    from ..runner import run

    spec = spec_from_args(PatchSpec, a, site=a.site, metric=a.metric, direction=a.direction,
                          corruption=a.corruption, noise_positions=tuple(a.noise_positions),
                          noise_scale=a.noise_scale, noise_samples=a.noise_samples, noise_seed=a.noise_seed)
    out = sweep_payload(spec, run(spec, progress=lambda m: print(m, file=sys.stderr)))
    if spec.corruption != "tokens":
        out.update(corruption=spec.corruption, noise_positions=list(spec.noise_positions),
                   noise_scale=spec.noise_scale, noise_samples=spec.noise_samples, noise_seed=spec.noise_seed)
    return out
