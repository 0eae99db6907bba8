"""Generation with a KV cache and interventions that see absolute positions.

An intervention is `(hook_name, fn)` with `fn(activation, positions, hook) -> activation`:
`positions` is a LongTensor of the absolute positions of the activation's position axis
(axis 1 for [batch pos ...] hooks). With a cache the prompt runs once (positions 0..P-1) and
each new token runs alone (position P+t), so an intervention keyed on positions gives the
same tokens with and without the cache; a hook that looks only at the sequence length, as
some tutorials do, would steer the prompt and miss every generated token.

Two paths, tested equal token for token (tests/test_steering.py):
- `use_cache=False`, the reference: every step is a full TransformerBridge forward over the
  whole sequence with the hooks on.
- `use_cache=True`: the prompt runs once, then one token per step with a Hugging Face
  DynamicCache. The bridge wraps the Hugging Face modules in place, so calling the wrapped
  model directly fires the same hook points (same names, same tensors); it skips the
  bridge's top-level forward, whose fixed cost (~0.2 s here) dominated one-token steps, and
  `logits_to_keep=1` skips the unembedding of every prompt position but the last.
  Models whose wrapped Hugging Face model is not reachable fall back to the bridge's own
  cached forward.

Greedy when temperature is 0 (argmax, first index on ties); otherwise sampled from
softmax(logits / temperature), each row with its own torch.Generator seeded with `seed`
(one draw per row per step), so a row samples the same tokens alone or in a batch, and two
calls with the same seed draw the same stream.
"""

from __future__ import annotations

from typing import Callable, Sequence


def _cached_forward(bridge):
    """fn(ids [B p], cache | None) -> (last logits [B d_vocab], cache)."""
    hf = getattr(bridge, "original_model", None)
    if hf is not None:
        from transformers import DynamicCache

        def step(ids, cache):
            cache = DynamicCache() if cache is None else cache
            out = hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1], cache
        return step

    def bridge_step(ids, cache):
        if cache is None:
            logits, cache = bridge(ids, return_type="logits_and_cache", use_cache=True)
        else:
            logits, cache = bridge(ids, return_type="logits_and_cache", use_cache=True, past_key_values=cache)
        return logits[:, -1], cache
    return bridge_step


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             seed: int = 0, interventions: Sequence[tuple[str, Callable]] = (), use_cache: bool = True,
             stop_at_eos: bool = True) -> list[list[int]]:
    import torch

    rows = [list(map(int, p)) for p in prompts]
    if not rows or len({len(r) for r in rows}) != 1 or not rows[0]:
        raise ValueError("generate needs one or more non-empty prompts of equal length")
    bridge = model.bridge
    points = bridge.hook_dict
    unknown = [name for name, _ in interventions if name not in points]
    if unknown:   # an intervention that matches no hook would silently do nothing
        raise ValueError(f"interventions on hooks that do not exist: {unknown}")
    state = {"start": 0}

    def wrap(fn):
        def hook(x, hook):
            pos = torch.arange(state["start"], state["start"] + x.shape[1], device=x.device)
            return fn(x, pos, hook)
        return hook

    hooks = [(name, wrap(fn)) for name, fn in interventions]
    gens = [torch.Generator(device="cpu").manual_seed(int(seed)) for _ in rows]
    eos = model.eos_token_id
    seqs = model.tensor(rows)                                   # [B P]
    done = torch.zeros(len(rows), dtype=torch.bool)
    out: list[list[int]] = [[] for _ in rows]
    step = _cached_forward(bridge) if use_cache else None
    cache = None
    with model.lock, torch.inference_mode(), bridge.hooks(fwd_hooks=hooks):
        for _ in range(max_new_tokens):
            if use_cache:
                state["start"] = 0 if cache is None else seqs.shape[1] - 1
                last, cache = step(seqs if cache is None else seqs[:, -1:], cache)
            else:
                state["start"] = 0
                last = bridge(seqs)[:, -1]
            last = last.float()                                 # [B d_vocab]
            if temperature and temperature > 0:
                probs = torch.softmax(last / temperature, dim=-1).cpu()
                nxt = torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(gens)])
            else:
                nxt = last.argmax(-1).cpu()
            for b, t in enumerate(nxt.tolist()):
                if not done[b]:
                    out[b].append(t)
                    if stop_at_eos and eos is not None and t == eos:
                        done[b] = True
            if bool(done.all()):
                break
            seqs = torch.cat([seqs, nxt.to(seqs.device)[:, None]], dim=1)
    return out
