"""Induction and previous-token scores of every head, on repeated random token sequences.

A sequence is r + r, where r is `seq_len` random tokens (after the BOS token when the model
prepends one). An induction head attends from a token in the second copy to the token just
after that token's first occurrence (key = query - seq_len + 1); a previous-token head
attends to key = query - 1. Scores are mean attention probabilities over the second copy
(induction) or over all positions after the first (previous token), and over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidSpec
from ..model import LoadedModel
from ..runner import analysis
from ..sites import Component, hook_names
from ..spec import Result, Spec


@dataclass(frozen=True)
class HeadScoresSpec(Spec):
    KIND = "head_scores"
    seq_len: int = 40
    n_seqs: int = 8
    seed: int = 0

    def validate(self):
        if not 4 <= self.seq_len <= 512 or not 1 <= self.n_seqs <= 64:
            raise InvalidSpec("seq_len must be in 4–512 and n_seqs in 1–64.")


@dataclass(frozen=True)
class HeadScoresResult(Result):
    induction: np.ndarray      # [layer head]
    prev_token: np.ndarray     # [layer head]
    seq_len: int
    n_seqs: int


def repeated_tokens(model: LoadedModel, seq_len: int, n_seqs: int, seed: int) -> np.ndarray:
    """[n_seqs, (bos) + 2*seq_len] ids: random ordinary tokens, repeated once."""
    rng = np.random.default_rng(seed)
    special = set(model.tokenizer.all_special_ids)
    pool = np.array([i for i in range(model.info.d_vocab) if i not in special and i < len(model.tokenizer)])
    half = rng.choice(pool, size=(n_seqs, seq_len))
    seqs = np.concatenate([half, half], axis=1)
    if model.info.prepend_bos:
        bos = model.tokenizer.bos_token_id
        seqs = np.concatenate([np.full((n_seqs, 1), bos), seqs], axis=1)
    return seqs


def score_patterns(pattern: np.ndarray, seq_len: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Induction and previous-token scores [head] from patterns [batch head q k].

    `offset` is 1 when a BOS token precedes the first copy, else 0.
    """
    q_ind = np.arange(offset + seq_len, offset + 2 * seq_len)
    induction = pattern[:, :, q_ind, q_ind - seq_len + 1].mean(axis=(0, 2))
    q_prev = np.arange(1, pattern.shape[-1])
    prev = pattern[:, :, q_prev, q_prev - 1].mean(axis=(0, 2))
    return induction, prev


@analysis(HeadScoresSpec, HeadScoresResult)
def compute(spec: HeadScoresSpec, model: LoadedModel, progress=None) -> HeadScoresResult:
    import torch

    seqs = repeated_tokens(model, spec.seq_len, spec.n_seqs, spec.seed)
    names = hook_names(Component.PATTERN, model.info.n_layers)
    with model.lock, torch.inference_mode():
        _, cache = model.run_with_cache(seqs.tolist(), names)
    scores = [score_patterns(cache[h].float().cpu().numpy(), spec.seq_len, int(model.info.prepend_bos))
              for h in names]
    return HeadScoresResult(induction=np.stack([s[0] for s in scores]),
                            prev_token=np.stack([s[1] for s in scores]),
                            seq_len=spec.seq_len, n_seqs=spec.n_seqs)
