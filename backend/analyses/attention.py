"""Attention patterns of every head of one layer for a prompt."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidSpec
from ..model import LoadedModel
from ..runner import analysis
from ..sites import Component, Site, hook_name
from ..spec import Result, Spec, check_text


@dataclass(frozen=True)
class AttentionSpec(Spec):
    KIND = "attention"
    text: str = ""
    layer: int = 0

    def validate(self):
        check_text(self.text)
        if self.layer < 0:
            raise InvalidSpec("The layer must be ≥ 0.")


@dataclass(frozen=True)
class AttentionResult(Result):
    tokens: list[str]
    layer: int
    pattern: np.ndarray   # [head q_pos k_pos], rows sum to 1


@analysis(AttentionSpec, AttentionResult)
def compute(spec: AttentionSpec, model: LoadedModel, progress=None) -> AttentionResult:
    import torch

    site = Site(Component.PATTERN, spec.layer).check(model.info.n_layers, model.info.n_heads)
    ids = model.encode(spec.text)
    name = hook_name(site)
    with model.lock, torch.inference_mode():
        _, cache = model.run_with_cache(ids, [name])
    return AttentionResult(tokens=model.str_tokens(ids), layer=spec.layer,
                           pattern=cache[name][0].float().cpu().numpy())
