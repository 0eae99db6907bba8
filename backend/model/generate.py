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
- `use_cache=True`: the prompt runs once, then one token per step with a KV cache.
  For models with canonical weights (Llama-style, Gemma-3) and interventions at the points
  the dense kernel knows (hook_embed, resid_pre, attn.hook_z, attn_out, resid_mid,
  mlp.hook_post, mlp_out, resid_post), kernels/forward.py runs the block of the fast kernels
  (one implementation, kernels.patching.FastModel's) with its KV cache and calls each
  intervention where the bridge's hook point would fire. It skips the ~30 wrapper modules
  and hook points per block whose Python cost dominated one-token steps. Otherwise the
  wrapped Hugging Face model runs with a
  DynamicCache: the bridge wraps the Hugging Face modules in place, so calling it directly
  fires the same hook points; it skips the bridge's top-level forward (~0.2 s here), and
  `logits_to_keep=1` skips the unembedding of every prompt position but the last.

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
    dm = _dense(model, [name for name, _ in interventions]) if use_cache else None
    if dm is not None:
        return _generate_dense(model, dm, seqs, max_new_tokens, temperature, gens, interventions, stop_at_eos,
                               out, done)
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
            nxt = _pick(last, temperature, gens)
            if _record(nxt, out, done, eos if stop_at_eos else None):
                break
            seqs = torch.cat([seqs, nxt.to(seqs.device)[:, None]], dim=1)
    return out


def _pick(last, temperature, gens):
    """The next token of each row: argmax, or a draw from each row's own generator."""
    import torch

    last = last.float()                                         # [B d_vocab]
    if temperature and temperature > 0:
        probs = torch.softmax(last / temperature, dim=-1).cpu()
        return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(gens)])
    return last.argmax(-1).cpu()


def _record(nxt, out, done, eos) -> bool:
    """Append each unfinished row's token; True when every row is done."""
    for b, t in enumerate(nxt.tolist()):
        if not done[b]:
            out[b].append(t)
            if eos is not None and t == eos:
                done[b] = True
    return bool(done.all())


def _dense(model, names):
    """The dense kernel of the model (kernels/forward.py) if it has one and knows every hooked
    point, else None."""
    from kernels import forward as kf

    dm = kf.dense_model(model)
    if dm is None:
        return None
    try:
        for n in names:
            kf.point_layer(n, dm.n_layers)
    except KeyError:
        return None
    return dm


def _generate_dense(model, dm, seqs, max_new_tokens, temperature, gens, interventions, stop_at_eos, out, done):
    from types import SimpleNamespace

    import torch

    from kernels import forward as kf

    by_name: dict = {}
    for name, fn in interventions:
        by_name.setdefault(name, []).append(fn)
    points = {n: SimpleNamespace(name=n) for n in by_name}
    cache = kf.KVCache()
    eos = model.eos_token_id if stop_at_eos else None

    def step(ids, position: int):
        pos = torch.arange(position, position + ids.shape[1], device=ids.device)

        def chain(x, fns, point):
            for fn in fns:
                x = fn(x, pos, point)
            return x
        hooks = {n: (lambda x, fns=fns, n=n: chain(x, fns, points[n])) for n, fns in by_name.items()}
        final = kf.run(dm, ids, capture=[kf.FINAL], hooks=hooks, cache=cache, position=position)[kf.FINAL]
        return dm.logits(final[:, -1])

    with model.lock, torch.inference_mode():
        last = step(seqs, 0)
        for i in range(max_new_tokens):
            nxt = _pick(last, temperature, gens)
            if _record(nxt, out, done, eos) or i == max_new_tokens - 1:
                break
            last = step(nxt.to(seqs.device)[:, None], seqs.shape[1] + i)
    return out
