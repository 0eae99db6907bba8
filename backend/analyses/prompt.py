"""Prompt overview: tokens, the top next tokens, and the logit lens.

The logit lens (nostalgebraist, 2020) reads each residual stream as if it were the last:
final norm, then unembedding. Row 0 is the embedding (resid_pre of block 0); row l+1 is
the output of block l, so the last row is the model's own prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidSpec
from ..model import LoadedModel
from ..runner import analysis
from ..sites import Component, Site, hook_name
from ..spec import Result, Spec, check_text


@dataclass(frozen=True)
class PromptSpec(Spec):
    KIND = "prompt"
    text: str = ""
    top_k: int = 10
    lens_k: int = 5

    def validate(self):
        check_text(self.text)
        if not 1 <= self.top_k <= 100 or not 1 <= self.lens_k <= 20:
            raise InvalidSpec("top_k must be in 1–100 and lens_k in 1–20.")


@dataclass(frozen=True)
class PromptResult(Result):
    tokens: list[str]          # [pos]
    token_ids: list[int]       # [pos]
    top_tokens: list[str]      # [top_k]
    top_ids: np.ndarray        # [top_k] int
    top_probs: np.ndarray      # [top_k] next-token probabilities, highest first
    layer_labels: list[str]    # [n_layers + 1]: "embed", "0", ..., "n-1"
    lens_ids: np.ndarray       # [n_layers + 1, pos, lens_k] int
    lens_probs: np.ndarray     # [n_layers + 1, pos, lens_k]
    lens_tokens: np.ndarray    # [n_layers + 1, pos, lens_k] str


def residual_stack(model: LoadedModel, ids: list[int]):
    """Logits [pos d_vocab] and the residual stream at every depth [n_layers+1 pos d_model]."""
    import torch

    n = model.info.n_layers
    names = [hook_name(Site(Component.RESID_PRE, 0))] + [
        hook_name(Site(Component.RESID_POST, layer)) for layer in range(n)]
    with model.lock, torch.inference_mode():
        logits, cache = model.run_with_cache(ids, names)
    return logits[0], torch.stack([cache[h][0] for h in names])


@analysis(PromptSpec, PromptResult)
def compute(spec: PromptSpec, model: LoadedModel, progress=None) -> PromptResult:
    import torch

    ids = model.encode(spec.text)
    logits, resid = residual_stack(model, ids)
    probs = logits[-1].softmax(-1)
    top = probs.topk(spec.top_k)
    lens_p, lens_i = [], []
    with model.lock, torch.inference_mode():
        for layer_resid in resid:  # one layer at a time: [pos d_vocab] stays small
            p = model.logits_from_resid(layer_resid).softmax(-1).topk(spec.lens_k)
            lens_p.append(p.values)
            lens_i.append(p.indices)
    lens_ids = torch.stack(lens_i).cpu().numpy()
    vocab = {int(i): model.tokenizer.decode([int(i)]) for i in np.unique(lens_ids)}
    return PromptResult(
        tokens=model.str_tokens(ids), token_ids=ids,
        top_tokens=model.str_tokens(top.indices.tolist()), top_ids=top.indices.cpu().numpy(),
        top_probs=top.values.float().cpu().numpy(),
        layer_labels=["embed"] + [str(layer) for layer in range(model.info.n_layers)],
        lens_ids=lens_ids, lens_probs=torch.stack(lens_p).float().cpu().numpy(),
        lens_tokens=np.vectorize(vocab.__getitem__, otypes=[object])(lens_ids),
    )
