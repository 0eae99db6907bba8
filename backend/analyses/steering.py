"""Uses of a direction (backend/analyses/directions.py): read it, add it, ablate it.

- **Read** (ProjectionSpec): the projection of the activation on the unit direction at every
  layer and token of a prompt (at the direction's own component; hook_z directions at their
  layer only), and for a probe its score sigmoid(x·w + b) per token.
- **Add** (SteerSpec, mode "add"): generate from a prompt with and without `strength ×
  vector` added at the direction's hook, side by side: the two rows run as one batch (same
  seed, each row its own generator) and the intervention touches row 1 only. Positions:
  `all` (every prompt and generated position), `from-instruction` (from the end of the
  user's instruction on: the chat template's post-instruction tokens and every generated
  token, as CAA does; without the chat template, from the prompt's last token on) or
  `prefix` (ActAdd: its per-position vectors at the first k positions; other directions:
  the prompt's positions only). Interventions are keyed on absolute positions, so the KV
  cache changes nothing (tests/test_steering.py). The strength is also reported relative
  to the mean activation norm at that hook over the prompt (position 0 left out: it carries
  the massive activations), so strengths compare across methods. `preserve_norm` (GrAInS,
  Nguyen et al. 2025) rescales every steered activation back to its norm before the
  addition, x ← (x + s·v)·‖x‖/‖x + s·v‖: the steer turns the activation and does not grow it.
- **Ablate** (mode "ablate", Arditi et al. 2024): the unit direction r̂ is projected out,
  x ← x − (x·r̂) r̂, of every block input (resid_pre), every attention output and every MLP
  output, at every position. This equals orthogonalising the weights that write into the
  residual stream — the embedding, each attention output matrix W_O and each MLP output
  matrix — against r̂ (W ← W − r̂ r̂ᵀ W): tests/test_steering.py checks it (logits within
  1e-3). SmolLM2 ties its embedding and unembedding (one matrix). Orthogonalising the
  tied matrix would also orthogonalise the unembedding, W_U ← W_U (I − r̂ r̂ᵀ), so the logits
  would stop reading the r̂ component of the *normalised* final residual; that component is
  not zero after ablation (RMSNorm's per-dimension scale turns the ablated residual
  back towards r̂), so the tied edit is NOT the hook ablation. The equivalent edit unties
  first: orthogonalise a copy of the embedding and keep the unembedding as it was.
- **Evaluate**: behaviour probability for CAA sets (p(matching letter) / (p(A) + p(B))
  against multipliers), refusal rate by substring match (baseline / ablated / added) on
  held-out instructions, and side effects of a steer (KL on neutral text, cross-entropy on
  held-out corpus windows or the shipped neutral text): backend/analyses/steering_eval.py.

Every use is a stored result; a direction is referenced by its key (a stored
DirectionSpec's run key), or given as an SAE feature (its decoder row at the SAE's hook).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import InvalidSite, InvalidSpec, OutOfRange
from ..model import LoadedModel
from ..runner import analysis
from ..sites import Component, Site, hook_names
from ..spec import Result, Spec, check_text
from .directions import (RESID_SITES, DirectionMismatch, _sae_direction, load_direction, post_instruction_length,
                         sae_spec, user_chat)

MODES = ("add", "ablate")
POSITION_MODES = ("all", "from-instruction", "prefix")
MAX_NEW_TOKENS = 256
ABLATION_COMPONENTS = (Component.RESID_PRE, Component.ATTN_OUT, Component.MLP_OUT)


def check_target_fields(direction: str, sae: str, feature: int) -> None:
    if bool(direction) == bool(sae):
        raise InvalidSpec("Give either a direction key or an SAE and a feature.")
    if sae and feature < 0:
        raise OutOfRange("An SAE feature index must be ≥ 0.")


def check_strength(strength: float, name: str = "strength") -> None:
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise OutOfRange(f"The {name} must be a finite number, not {strength!r}.")
    if abs(strength) > 1e6:
        raise OutOfRange(f"The {name} {strength:g} is too large (|{name}| ≤ 1e6).")


@dataclass(frozen=True)
class SteerSpec(Spec):
    KIND = "steer"
    prompt: str = ""
    direction: str = ""            # a stored direction's key
    sae: str = ""                  # or an SAE feature's decoder row
    feature: int = -1
    strength: float = 1.0          # ignored (stored as 0) when ablating
    mode: str = "add"
    positions: str = "all"
    chat: bool = False             # wrap the prompt as a user message in the chat template
    max_new_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0
    preserve_norm: bool = False    # add: rescale each steered activation to its norm before the steer
    KEY_NEUTRAL: ClassVar[dict] = {"preserve_norm": False}

    def validate(self):
        check_text(self.prompt)
        check_target_fields(self.direction, self.sae, self.feature)
        check_strength(self.strength)
        if self.mode not in MODES:
            raise InvalidSpec(f"Unknown mode {self.mode!r}; known: {', '.join(MODES)}.")
        if self.positions not in POSITION_MODES:
            raise InvalidSpec(f"Unknown positions {self.positions!r}; known: {', '.join(POSITION_MODES)}.")
        if isinstance(self.max_new_tokens, bool) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise OutOfRange(f"max_new_tokens must be in 1–{MAX_NEW_TOKENS}, not {self.max_new_tokens}.")
        if not math.isfinite(self.temperature) or not 0 <= self.temperature <= 5:
            raise OutOfRange("The temperature must be in 0–5 (0: greedy).")
        if not isinstance(self.preserve_norm, bool):
            raise InvalidSpec("preserve_norm is true or false.")
        if self.mode == "ablate":   # one key per ablation, whatever strength was typed
            object.__setattr__(self, "strength", 0.0)
            object.__setattr__(self, "positions", "all")
            object.__setattr__(self, "preserve_norm", False)


@dataclass(frozen=True)
class SteerResult(Result):
    prompt_tokens: list[str]
    prompt_ids: list[int]
    default: str                   # text of the generated tokens, unsteered
    steered: str
    default_tokens: list[int]      # generated ids only
    steered_tokens: list[int]
    hook_name: str
    mode: str
    strength: float
    direction_norm: float
    mean_resid_norm: float         # mean ‖activation‖ at the hook over the prompt (position 0 left out)
    relative_strength: float       # strength × ‖vector‖ / mean_resid_norm
    steered_prompt_positions: list[int]
    steers_generated: bool
    direction_info: dict           # method, key, site, layer, how it was made
    preserve_norm: bool = False    # the steered activations were rescaled to their own norms


# -- the direction as a target -------------------------------------------------------------
@dataclass
class Target:
    hook: str
    component: Component
    layer: int
    shape: list[int]
    vector: object                 # torch [*shape]
    unit: object                   # torch [prod(shape)]
    norm: float
    position_vectors: object       # torch [k *shape] or None
    method: str
    info: dict
    bias: float | None = None      # probe


def target_of(model: LoadedModel, direction: str = "", sae: str = "", feature: int = -1, store=None) -> Target:
    """A stored direction (by key) or an SAE feature, checked against the model."""
    import torch

    from .. import settings

    if direction:
        dspec, r = load_direction(direction, store)
        if dspec.model != model.info.model_id:
            raise DirectionMismatch(f"Direction {direction} was made on {dspec.model!r}, not {model.info.model_id!r}.")
        key, made_from = direction, dspec.source
    else:
        dspec = sae_spec(model.info.model_id, sae, feature)
        r = _sae_direction(dspec, model)
        key, made_from = "", f"sae:{sae}#{feature}"
    info = model.info
    comp = Component(r.site)
    Site(comp, r.layer).check(info.n_layers, info.n_heads)
    width = info.n_heads * info.d_head if comp == Component.Z else info.d_model
    if r.d_model != info.d_model or int(np.prod(r.shape)) != width or r.vector.shape[0] != width:
        raise DirectionMismatch(f"The direction has width {r.vector.shape[0]} (d_model {r.d_model}); "
                                f"{r.hook_name} of {info.model_id} has width {width}.")
    dev = settings.device()
    vec = torch.as_tensor(r.vector, dtype=torch.float32, device=dev)
    pv = (torch.as_tensor(r.position_vectors, dtype=torch.float32, device=dev).reshape(-1, *r.shape)
          if len(r.position_vectors) else None)
    return Target(hook=r.hook_name, component=comp, layer=r.layer, shape=list(r.shape), vector=vec.reshape(r.shape),
                  unit=vec / max(r.norm, 1e-30), norm=r.norm, position_vectors=pv, method=r.method,
                  info={"key": key, "method": r.method, "site": r.site, "layer": r.layer, "source": made_from,
                        "made": r.made},
                  bias=r.made.get("bias") if r.method == "probe" else None)


# -- interventions: fn(x, positions, hook), rows = the batch rows they touch ---------------
def _added(x, v, preserve_norm: bool, n_axes: int):
    """x + v, or with preserve_norm that sum rescaled to ‖x‖ per activation (the norm over the
    direction's last n_axes axes: d_model, or heads × d_head for a hook_z direction)."""
    y = x + v
    if not preserve_norm:
        return y
    axes = tuple(range(-n_axes, 0))
    return y * (x.norm(dim=axes, keepdim=True) / y.norm(dim=axes, keepdim=True).clamp_min(1e-30))


def add_intervention(t: Target, strength: float, rows: slice = slice(None), start: int = 0,
                     end: int | None = None, prefix: bool = False, preserve_norm: bool = False):
    """(hook, fn) adding strength × vector at absolute positions [start, end) (prefix with
    per-position vectors: vector p at position p < k); with preserve_norm each steered
    activation is rescaled to its norm before the addition (GrAInS)."""
    v = t.vector * float(strength)
    pv = t.position_vectors * float(strength) if (prefix and t.position_vectors is not None) else None

    def fn(x, pos, hook):
        if pv is not None:
            sel = pos < pv.shape[0]
            if not bool(sel.any()):
                return x
            x = x.clone()
            x[rows, sel] = _added(x[rows, sel], pv[pos[sel]], preserve_norm, len(t.shape))
            return x
        sel = pos >= start
        if end is not None:
            sel &= pos < end
        if not bool(sel.any()):
            return x
        x = x.clone()
        x[rows, sel] = _added(x[rows, sel], v, preserve_norm, len(t.shape))
        return x
    return t.hook, fn


def ablation_interventions(model: LoadedModel, unit, rows: slice = slice(None)) -> list:
    """(hook, fn) projecting the unit direction out of every resid_pre, attn_out and mlp_out."""
    def fn(x, pos, hook):
        x = x.clone()
        xr = x[rows]
        x[rows] = xr - (xr @ unit)[..., None] * unit
        return x
    return [(name, fn) for comp in ABLATION_COMPONENTS for name in hook_names(comp, model.info.n_layers)]


def as_hooks(interventions) -> list:
    """Interventions as plain TransformerLens hooks for one full forward (positions 0..P-1)."""
    import torch

    def wrap(fn):
        return lambda x, hook: fn(x, torch.arange(x.shape[1], device=x.device), hook)
    return [(name, wrap(fn)) for name, fn in interventions]


def steer_window(model: LoadedModel, t: Target, positions: str, n_prompt: int, chat: bool) -> dict:
    """Where a steer adds: {"start", "end", "prefix"} in absolute positions."""
    if positions == "all":
        return {"start": 0, "end": None, "prefix": False}
    if positions == "from-instruction":
        start = n_prompt - post_instruction_length(model) if chat else n_prompt - 1
        return {"start": max(start, 0), "end": None, "prefix": False}
    if t.position_vectors is not None:
        return {"start": 0, "end": t.position_vectors.shape[0], "prefix": True}
    return {"start": 0, "end": n_prompt, "prefix": False}


def interventions_for(model: LoadedModel, t: Target, mode: str, strength: float, window: dict, rows: slice,
                      preserve_norm: bool = False):
    if mode == "ablate":
        if t.component.value not in RESID_SITES:
            raise InvalidSite("Ablation projects a residual-stream direction out; a "
                              f"{t.component.value} direction (e.g. a hook_z SAE feature) cannot be ablated.")
        return ablation_interventions(model, t.unit, rows)
    return [add_intervention(t, strength, rows, window["start"], window["end"], window["prefix"], preserve_norm)]


def mean_norm(model: LoadedModel, hook: str, ids: list[int]) -> float:
    x = model.capture(model.tensor(ids), [hook], flatten_heads=True)[hook][0].float()   # [P d]
    keep = x[1:] if x.shape[0] > 1 else x
    return float(keep.norm(dim=-1).mean())


def prompt_ids(model: LoadedModel, prompt: str, chat: bool) -> list[int]:
    return user_chat(model, prompt) if chat else model.encode(prompt)


@analysis(SteerSpec, SteerResult)
def compute(spec: SteerSpec, model: LoadedModel, progress=None, store=None) -> SteerResult:
    t = target_of(model, spec.direction, spec.sae, spec.feature, store)
    ids = prompt_ids(model, spec.prompt, spec.chat)
    window = steer_window(model, t, spec.positions, len(ids), spec.chat)
    hooks = interventions_for(model, t, spec.mode, spec.strength, window, slice(1, 2), spec.preserve_norm)
    default, steered = model.generate([ids, ids], spec.max_new_tokens, temperature=spec.temperature,
                                      seed=spec.seed, interventions=hooks)
    rn = mean_norm(model, t.hook, ids)
    end = len(ids) if window["end"] is None else min(window["end"], len(ids))
    return SteerResult(
        prompt_tokens=model.str_tokens(ids), prompt_ids=ids, default=model.decode(default),
        steered=model.decode(steered), default_tokens=default, steered_tokens=steered, hook_name=t.hook,
        mode=spec.mode, strength=spec.strength, direction_norm=t.norm, mean_resid_norm=rn,
        relative_strength=spec.strength * t.norm / max(rn, 1e-30) if spec.mode == "add" else 0.0,
        steered_prompt_positions=list(range(len(ids))) if spec.mode == "ablate" else list(range(window["start"], end)),
        steers_generated=spec.mode == "ablate" or window["end"] is None or window["end"] > len(ids),
        direction_info=t.info, preserve_norm=spec.preserve_norm)


# -- read ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProjectionSpec(Spec):
    KIND = "projection"
    direction: str = ""
    prompt: str = ""
    chat: bool = False

    def validate(self):
        check_text(self.prompt)
        if not self.direction:
            raise InvalidSpec("A direction key is required.")


@dataclass(frozen=True)
class ProjectionResult(Result):
    tokens: list[str]
    token_ids: list[int]
    hook_names: list[str]          # [rows]: the direction's component at every layer (its own hook for z)
    layers: list[int]
    projection: np.ndarray         # [rows P] x · r̂
    norms: np.ndarray              # [rows P] ‖x‖
    own_row: int                   # the row of the direction's own hook
    probe_score: np.ndarray        # [P] sigmoid(x·w + b) at the probe's hook; [0] for other methods
    direction_info: dict


@analysis(ProjectionSpec, ProjectionResult)
def compute_projection(spec: ProjectionSpec, model: LoadedModel, progress=None, store=None) -> ProjectionResult:
    import torch

    t = target_of(model, spec.direction, store=store)
    ids = prompt_ids(model, spec.prompt, spec.chat)
    if t.component.value in RESID_SITES:
        names, layers = hook_names(t.component, model.info.n_layers), list(range(model.info.n_layers))
    else:
        names, layers = [t.hook], [t.layer]
    acts = model.capture(model.tensor(ids), names, flatten_heads=True)
    x = torch.stack([acts[n][0] for n in names]).float()                # [rows P d]
    proj = x @ t.unit
    own = names.index(t.hook)
    score = np.zeros(0)
    if t.method == "probe":
        score = torch.sigmoid(x[own].double() @ t.vector.reshape(-1).double() + t.bias).numpy()
    return ProjectionResult(tokens=model.str_tokens(ids), token_ids=ids, hook_names=names, layers=layers,
                            projection=proj.numpy(), norms=x.norm(dim=-1).numpy(), own_row=own,
                            probe_score=score, direction_info=t.info)


# -- CLI -----------------------------------------------------------------------------------
def add_cli_args(p) -> None:
    from ..model import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--prompt", required=True)
    p.add_argument("--direction", default="", help="a stored direction's key (python -m backend direction …)")
    p.add_argument("--sae", default="")
    p.add_argument("--feature", type=int, default=-1)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--mode", choices=MODES, default="add")
    p.add_argument("--positions", choices=POSITION_MODES, default="all")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preserve-norm", action="store_true",
                   help="add: rescale each steered activation to its norm before the steer (GrAInS)")


def steer_payload(out) -> dict:
    r = out.result
    return {"run_key": out.run_key, "from_store": out.from_store, "compute_seconds": round(out.compute_seconds, 4),
            "model": out.spec.model, "prompt_tokens": r.prompt_tokens, "default": r.default, "steered": r.steered,
            "default_tokens": r.default_tokens, "steered_tokens": r.steered_tokens, "hook_name": r.hook_name,
            "mode": r.mode, "strength": r.strength, "relative_strength": r.relative_strength,
            "direction_norm": r.direction_norm, "mean_resid_norm": r.mean_resid_norm,
            "direction": r.direction_info, "preserve_norm": r.preserve_norm}


def run_cli(a) -> dict:
    import sys

    from ..runner import run

    if a.direction:            # a missing or foreign direction fails before the model loads
        dspec, _ = load_direction(a.direction)
        from ..model import canonical_id

        if dspec.model != canonical_id(a.model):
            raise DirectionMismatch(f"Direction {a.direction} was made on {dspec.model!r}, not {a.model!r}.")
    spec = SteerSpec(model=a.model, prompt=a.prompt, direction=a.direction, sae=a.sae, feature=a.feature,
                     strength=a.strength, mode=a.mode, positions=a.positions, chat=a.chat,
                     max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed,
                     preserve_norm=bool(a.preserve_norm))
    return steer_payload(run(spec, progress=lambda m: print(m, file=sys.stderr)))


__all__ = ["SteerSpec", "SteerResult", "ProjectionSpec", "ProjectionResult", "target_of", "add_intervention",
           "ablation_interventions", "as_hooks"]
