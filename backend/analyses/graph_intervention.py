"""Interventions on transcoder features: switch features off, amplify them or set them, and
see what the model predicts.

    python -m backend graph-intervene --text "The capital of France is" --set 20_1234_5=0 --set 22_77_5=x3

As circuit-tracer's `feature_intervention`: the real model runs (nothing frozen); at each
intervened layer the transcoder reads the MLP's input of this run, and the MLP's output at the
feature's position gets (new - current activation) * W_dec[feature]. Upstream edits therefore
reach downstream features' current activations. `x k` multiplies the current activation,
a number sets it (0 switches the feature off). Setting a feature to its own activation adds
an exact zero: the logits are bitwise those of the unedited run.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidSpec, OutOfRange
from ..model import LoadedModel
from ..runner import analysis
from ..spec import Result, Spec, check_text

_EDIT = re.compile(r"^(\d+)_(\d+)_(\d+)=(x?)(-?\d+(?:\.\d+)?(?:e-?\d+)?)$")


def parse_edit(s: str) -> tuple[int, int, int, str, float]:
    """'layer_feature_pos=value' (set) or '...=xK' (scale) -> (layer, pos, feature, op, value)."""
    m = _EDIT.match(s.strip()) if isinstance(s, str) else None
    if not m:
        raise InvalidSpec(f"An intervention is LAYER_FEATURE_POS=VALUE or =xFACTOR (e.g. 20_1234_5=0, 20_1234_5=x3), "
                          f"not {s!r}.")
    layer, feat, pos = int(m.group(1)), int(m.group(2)), int(m.group(3))
    return layer, pos, feat, "scale" if m.group(4) else "set", float(m.group(5))


@dataclass(frozen=True)
class GraphInterventionSpec(Spec):
    KIND = "graph_intervention"
    text: str = ""
    transcoders: str = ""
    edits: tuple[str, ...] = ()          # "layer_feature_pos=value" / "=xK", node ids of the graph
    top_k: int = 10

    def validate(self):
        from .graph import _pin_transcoders

        check_text(self.text)
        _pin_transcoders(self)
        if not self.edits:
            raise InvalidSpec("Choose at least one feature to intervene on.")
        if len(self.edits) > 512:
            raise OutOfRange("At most 512 features per intervention.")
        for e in self.edits:
            parse_edit(e)
        if not 1 <= self.top_k <= 50:
            raise OutOfRange("top_k must lie in 1–50.")


@dataclass(frozen=True)
class GraphInterventionResult(Result):
    tokens: list[str]
    edits: list[dict]                   # layer, pos, feature, op, value, before (activation), after
    top_before: list[dict]              # token, token_id, prob, logit
    top_after: list[dict]
    target: dict                        # the clean top token: logit and prob before / after
    logits_before: np.ndarray           # [d_vocab] last position
    logits_after: np.ndarray


def intervene(model: LoadedModel, tset, ids: list[int], edits: list[tuple[int, int, int, str, float]]):
    """(clean logits [d_vocab], edited logits, [(current activation, new)] per edit) at the last
    position, from the dense float32 forward over the canonical weights."""
    import torch

    from kernels import forward as kf

    dm = kf.dense_model(model)
    if dm is None:
        raise InvalidSpec(f"Feature interventions need a Llama-style or Gemma-3 model; {model.info.model_id} is not one.")
    by_layer: dict[int, list[int]] = {}
    for i, (layer, pos, feat, op, value) in enumerate(edits):
        if not 0 <= layer < tset.n_layers or not 0 <= feat < tset.d_transcoder or not 0 <= pos < len(ids):
            raise OutOfRange(f"No feature {layer}_{feat}_{pos}: layers 0–{tset.n_layers - 1}, features "
                             f"0–{tset.d_transcoder - 1}, positions 0–{len(ids) - 1}.")
        by_layer.setdefault(layer, []).append(i)
    seen: list = [None] * len(edits)
    held: dict = {}
    hooks = {}
    for layer, which in by_layer.items():
        def keep(x, layer=layer):
            held[layer] = x

        def edit(y, layer=layer, which=which):
            x = held[layer][0]
            add = torch.zeros_like(y[0])
            for i in which:
                _, pos, feat, op, value = edits[i]
                cur = tset.encode(layer, x[pos])[feat]
                new = cur * value if op == "scale" else torch.tensor(value, dtype=cur.dtype)
                seen[i] = (float(cur), float(new))
                add[pos] += (new - cur) * tset.W_dec[layer][feat]
            return y + add
        hooks[f"blocks.{layer}.mlp.hook_in"], hooks[f"blocks.{layer}.hook_mlp_out"] = keep, edit
    t = torch.tensor([ids])
    with torch.inference_mode():
        clean = dm.logits(kf.run(dm, t, capture=[kf.FINAL])[kf.FINAL][0, -1:])[0]
        edited = dm.logits(kf.run(dm, t, capture=[kf.FINAL], hooks=hooks)[kf.FINAL][0, -1:])[0]
    return clean.float(), edited.float(), seen


def _top(model, logits, k):
    p = logits.softmax(-1)
    v, i = p.topk(k)
    return [{"token": model.str_tokens([int(t)])[0], "token_id": int(t), "prob": round(float(q), 6),
             "logit": round(float(logits[t]), 4)} for q, t in zip(v, i)]


@analysis(GraphInterventionSpec, GraphInterventionResult)
def compute(spec: GraphInterventionSpec, model: LoadedModel, progress=None) -> GraphInterventionResult:
    from .graph import graph_ids, transcoders_for

    tset = transcoders_for(spec, model)
    ids = graph_ids(model, spec.text)
    edits = [parse_edit(e) for e in spec.edits]
    with model.lock:
        clean, edited, seen = intervene(model, tset, ids, edits)
    top = int(clean.argmax())
    pc, pe = clean.softmax(-1), edited.softmax(-1)
    return GraphInterventionResult(
        tokens=model.str_tokens(ids),
        edits=[{"node": f"{l}_{f}_{p}", "layer": l, "pos": p, "feature": f, "op": op, "value": v,
                "before": round(s[0], 5), "after": round(s[1], 5)} for (l, p, f, op, v), s in zip(edits, seen)],
        top_before=_top(model, clean, spec.top_k), top_after=_top(model, edited, spec.top_k),
        target={"token": model.str_tokens([top])[0], "token_id": top, "logit_before": round(float(clean[top]), 5),
                "logit_after": round(float(edited[top]), 5), "prob_before": round(float(pc[top]), 6),
                "prob_after": round(float(pe[top]), 6)},
        logits_before=clean.numpy().astype(np.float32), logits_after=edited.numpy().astype(np.float32))


def add_cli_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", required=True)
    p.add_argument("--transcoders", default="")
    p.add_argument("--set", action="append", default=[], metavar="LAYER_FEATURE_POS=VALUE|xK",
                   help="a feature node and its new activation (0: off) or xK (scaled); repeatable")
    p.add_argument("--top-k", type=int, default=10)


def run_cli(a) -> dict:
    from ..runner import run

    out = run(GraphInterventionSpec(model=a.model, text=a.text, transcoders=a.transcoders, edits=tuple(a.set),
                                    top_k=a.top_k), progress=lambda m: print(m, file=sys.stderr))
    r = out.result
    return {"run_key": out.run_key, "from_store": out.from_store, "tokens": r.tokens, "edits": r.edits,
            "top_before": r.top_before, "top_after": r.top_after, "target": r.target}
