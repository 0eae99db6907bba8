"""Residual-stream activations of a whole set of prompts, for the probe studies.

Every probe study reads the same thing: the residual stream of many short inputs at a few
layers and a few positions per input. This module collects it in batched forwards:

    from backend.analyses.probes.activations import collect, collect_texts, last_positions

    acts = collect_texts(model, texts, layers=[3, 10, 20])          # last token of each text
    acts.shape == (3, len(texts), 1, model.info.d_model)             # [layer item position d_model]

    ids = [model.encode(t) for t in texts]
    pos = [[len(p) - 1, len(i) - 1] for p, i in zip(prompt_ids, ids)]  # two positions per item
    acts = collect(model, ids, pos, layers=range(model.info.n_layers), site="resid_post")

`collect(model, ids, positions, layers, site="resid_post", batch_size=64)` →
float32 numpy array [len(layers), n_items, n_positions_per_item, d_model]:
- `ids`: one token-id list per item (as `model.encode` / `model.chat_ids` give them; any
  lengths). Items are sorted by length, cut into batches of `batch_size`, right-padded, and
  the result is returned in the original item order.
- `positions`: one list per item, all of the same length; each entry indexes that item's own
  tokens (negative = from its end, so `[-1]` is the last token). Out of range → InvalidSpec.
- `layers`: block indices in any order, repeats allowed; axis 0 of the result follows them.
- `site`: "resid_post" (block L's output; Hugging Face `hidden_states[L + 1]`, except the last
  block, whose HF hidden state is after the final norm) or "resid_pre" (block L's input,
  `hidden_states[L]`); hook names come from backend/sites.py.

Each batch is one forward through the model interface's `capture`, which stops as soon as the
deepest requested hook has fired: no later block and no unembedding runs. Right padding is
exact: attention is causal and positions count from 0, so a pad after a sequence never
changes its real positions (tests/test_probe_activations.py checks batched = one at a time =
Hugging Face output_hidden_states within 1e-5).

`ProbeSetError` (an InvalidSpec) is the typed error for a bad probe set, shared by the studies.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from ...errors import InvalidSpec
from ...sites import Component, Site, hook_name

SITES = ("resid_post", "resid_pre")


class ProbeSetError(InvalidSpec):
    """A probe study's data cannot give a meaningful answer (one class, too few items, an
    empty topic, a target that is not one token, too few random items …)."""

    code = "bad_probe_set"


def last_positions(ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """[[last index]] for each item: the usual single read position."""
    return [[len(i) - 1] for i in ids]


def _resolve(ids: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]) -> np.ndarray:
    """Absolute positions [n_items n_pos] (negative entries counted from each item's end)."""
    if len(positions) != len(ids):
        raise InvalidSpec(f"{len(positions)} position lists for {len(ids)} items.")
    widths = {len(p) for p in positions}
    if len(widths) > 1 or widths == {0}:
        raise InvalidSpec("Every item needs the same (non-zero) number of read positions.")
    out = np.zeros((len(ids), widths.pop() if widths else 0), dtype=np.int64)
    for n, (item, pos) in enumerate(zip(ids, positions)):
        for k, p in enumerate(pos):
            a = int(p) + len(item) if int(p) < 0 else int(p)
            if not 0 <= a < len(item):
                raise InvalidSpec(f"Position {p} is outside item {n} ({len(item)} tokens).")
            out[n, k] = a
    return out


def collect(model, ids: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
            layers: Iterable[int], site: str = "resid_post", batch_size: int = 64,
            progress: Callable[[str], None] | None = None) -> np.ndarray:
    """Activations [len(layers) n_items n_positions d_model] (float32); see the module doc."""
    import torch

    layers = [int(x) for x in layers]
    if not ids:
        raise ProbeSetError("No items to read activations from.")
    if not layers:
        raise InvalidSpec("No layers requested.")
    if site not in SITES:
        raise InvalidSpec(f"Site {site!r}: one of {', '.join(SITES)}.")
    if any(len(i) == 0 for i in ids):
        raise InvalidSpec("An item has no tokens.")
    info = model.info
    names = [hook_name(Site(Component(site), layer).check(info.n_layers, info.n_heads)) for layer in layers]
    unique = list(dict.fromkeys(names))
    where = _resolve(ids, positions)                                      # [n_items n_pos]
    n, width = where.shape
    out = np.zeros((len(layers), n, width, info.d_model), dtype=np.float32)
    order = sorted(range(n), key=lambda i: len(ids[i]))
    pad = model.eos_token_id if model.eos_token_id is not None else 0
    done = 0
    for start in range(0, n, max(1, int(batch_size))):
        batch = order[start:start + batch_size]
        T = max(len(ids[i]) for i in batch)
        rows = [list(ids[i]) + [pad] * (T - len(ids[i])) for i in batch]
        got = model.capture(model.tensor(rows), unique)                   # {name: [B T d_model]}
        b_idx = torch.arange(len(batch))[:, None]
        p_idx = torch.as_tensor(where[batch])                             # [B n_pos]
        for li, name in enumerate(names):
            out[li, batch] = got[name][b_idx, p_idx.to(got[name].device)].float().cpu().numpy()
        done += len(batch)
        if progress:
            progress(f"activations: {done}/{n} items")
    return out


def collect_texts(model, texts: Sequence[str], layers: Iterable[int], site: str = "resid_post",
                  batch_size: int = 64, progress=None) -> np.ndarray:
    """`collect` at the last token of each text, encoded as every analysis encodes a prompt
    (`model.encode`: the model's BOS rule). Shape [len(layers) n_texts 1 d_model]."""
    ids = [model.encode(t) for t in texts]
    return collect(model, ids, last_positions(ids), layers, site, batch_size, progress)
