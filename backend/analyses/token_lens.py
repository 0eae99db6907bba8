"""Logit lens for one chosen token: its probability (and rank) at every layer and position."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidSpec
from ..model import LoadedModel
from ..runner import analysis
from ..spec import Result, Spec, check_text
from .prompt import residual_stack


@dataclass(frozen=True)
class TokenLensSpec(Spec):
    KIND = "token_lens"
    text: str = ""
    token: str = ""

    def validate(self):
        check_text(self.text)
        if not self.token:
            raise InvalidSpec("Choose a token to follow across layers.")


@dataclass(frozen=True)
class TokenLensResult(Result):
    tokens: list[str]
    token_id: int
    layer_labels: list[str]
    probs: np.ndarray   # [n_layers + 1, pos]
    ranks: np.ndarray   # [n_layers + 1, pos] 0 = top token


def single_token_id(model: LoadedModel, token: str) -> int:
    """The id of a string that is exactly one token, else InvalidSpec naming its pieces."""
    ids = model.tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        pieces = model.str_tokens(ids)
        raise InvalidSpec(f"{token!r} is not a single token: it splits into {pieces}. "
                          "Pick one token (mind the leading space, e.g. ' Paris').")
    return ids[0]


@analysis(TokenLensSpec, TokenLensResult)
def compute(spec: TokenLensSpec, model: LoadedModel, progress=None) -> TokenLensResult:
    import torch

    target = single_token_id(model, spec.token)
    ids = model.encode(spec.text)
    _, resid = residual_stack(model, ids)
    probs, ranks = [], []
    with model.lock, torch.inference_mode():
        for layer_resid in resid:
            logits = model.logits_from_resid(layer_resid)               # [pos d_vocab]
            probs.append(logits.softmax(-1)[:, target])
            ranks.append((logits > logits[:, target:target + 1]).sum(-1))
    return TokenLensResult(
        tokens=model.str_tokens(ids), token_id=target,
        layer_labels=["embed"] + [str(layer) for layer in range(model.info.n_layers)],
        probs=torch.stack(probs).float().cpu().numpy(), ranks=torch.stack(ranks).cpu().numpy())
