"""Generation with a KV cache and interventions that see absolute positions.

An intervention is `(hook_name, fn)` with `fn(activation, positions, hook) -> activation`:
`positions` is a LongTensor of the absolute positions of the activation's position axis
(axis 1 for [batch pos ...] hooks). With a cache the prompt runs once (positions 0..P-1) and
each new token runs alone (position P+t), so an intervention keyed on positions gives the
same tokens with and without the cache; a hook that looks only at the sequence length, as
some tutorials do, would steer the prompt and miss every generated token.

Greedy when temperature is 0 (argmax, first index on ties); otherwise sampled from
softmax(logits / temperature) with a torch.Generator seeded with `seed`, drawing one number
per row per step, so two calls with the same seed draw the same random stream.
"""

from __future__ import annotations

from typing import Callable, Sequence


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             seed: int = 0, interventions: Sequence[tuple[str, Callable]] = (), use_cache: bool = True,
             stop_at_eos: bool = True) -> list[list[int]]:
    import torch

    rows = [list(map(int, p)) for p in prompts]
    if not rows or len({len(r) for r in rows}) != 1 or not rows[0]:
        raise ValueError("generate needs one or more non-empty prompts of equal length")
    bridge = model.bridge
    state = {"start": 0}

    def wrap(fn):
        def hook(x, hook):
            pos = torch.arange(state["start"], state["start"] + x.shape[1], device=x.device)
            return fn(x, pos, hook)
        return hook

    hooks = [(name, wrap(fn)) for name, fn in interventions]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    eos = model.eos_token_id
    seqs = model.tensor(rows)                                   # [B P]
    done = torch.zeros(len(rows), dtype=torch.bool)
    out: list[list[int]] = [[] for _ in rows]
    cache = None
    with model.lock, torch.inference_mode(), bridge.hooks(fwd_hooks=hooks):
        for _ in range(max_new_tokens):
            if use_cache:
                if cache is None:
                    state["start"] = 0
                    logits, cache = bridge(seqs, return_type="logits_and_cache", use_cache=True)
                else:
                    state["start"] = seqs.shape[1] - 1
                    logits, cache = bridge(seqs[:, -1:], return_type="logits_and_cache", use_cache=True,
                                           past_key_values=cache)
            else:
                state["start"] = 0
                logits = bridge(seqs)
            last = logits[:, -1].float()                        # [B d_vocab]
            if temperature and temperature > 0:
                probs = torch.softmax(last / temperature, dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
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
