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
  For Llama-architecture models (SmolLM2) and interventions at the sites below, a lean
  forward (`_LeanLlama`) runs the same weights as plain tensor operations with its own
  cache and calls each intervention where the bridge's hook point would fire:
  hook_embed, resid_pre, attn.hook_z, attn_out, resid_mid, mlp.hook_post, mlp_out,
  resid_post. It skips the ~30 wrapper modules and hook points per block whose Python cost
  dominated one-token steps. Otherwise the wrapped Hugging Face model runs with a
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


class _LeanLlama:
    """A Llama forward over the bridge's own parameters with a KV cache, calling interventions
    by hook name (the points listed in the module docstring). Equal to the bridge's forward
    within float rounding (tests/test_steering.py compares tokens with the uncached path)."""

    COMPONENTS = ("resid_pre", "z", "attn_out", "resid_mid", "mlp_post", "mlp_out", "resid_post")

    def __init__(self, model):
        from types import SimpleNamespace

        from ..sites import Component, Site, hook_name

        hf = model.bridge.original_model
        cfg = hf.config
        self.P = {n.replace("._original_component", ""): p for n, p in hf.named_parameters()}
        self.n_layers, self.H, self.dh = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
        self.KV = cfg.num_key_value_heads
        self.eps = cfg.rms_norm_eps
        rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", 10000.0)}
        self.theta = float(rope["rope_theta"])
        self.names = {("embed", None): hook_name(Site(Component.EMBED))}
        for layer in range(self.n_layers):
            for c in self.COMPONENTS:
                self.names[(c, layer)] = hook_name(Site(Component(c), layer))
        self.points = {n: SimpleNamespace(name=n) for n in self.names.values()}
        self.cache = []

    @staticmethod
    def supports(model, names) -> bool:
        hf = getattr(model.bridge, "original_model", None)
        cfg = getattr(hf, "config", None)
        rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}) if cfg else {}
        if cfg is None or getattr(cfg, "model_type", "") != "llama" or rope.get("rope_type", "default") != "default":
            return False
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False) or cfg.hidden_act != "silu":
            return False
        from ..sites import Component, Site, hook_name

        ok = {hook_name(Site(Component.EMBED))} | {hook_name(Site(Component(c), layer))
                                                   for c in _LeanLlama.COMPONENTS for layer in range(cfg.num_hidden_layers)}
        return set(names) <= ok

    def _norm(self, x, w):
        import torch

        v = x.float().pow(2).mean(-1, keepdim=True)
        return w * (x.float() * torch.rsqrt(v + self.eps)).to(x.dtype)

    def _cos_sin(self, pos, dtype):              # pos [p] -> cos, sin [p dh], as Hugging Face computes them
        import torch

        inv = 1.0 / (self.theta ** (torch.arange(0, self.dh, 2, dtype=torch.int64).to(pos.device).float() / self.dh))
        freqs = pos.float()[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def _rope(x, cos, sin):                      # x [B h p dh]
        import torch

        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def forward(self, ids, start: int, hooks: dict):
        """Last-position logits [B d_vocab] of ids [B p] at absolute positions start.. (cache kept)."""
        import torch
        import torch.nn.functional as F

        P, H, KV, dh = self.P, self.H, self.KV, self.dh
        B, p = ids.shape
        pos = torch.arange(start, start + p, device=ids.device)
        cos, sin = self._cos_sin(pos, P["model.embed_tokens.weight"].dtype)

        def fire(key, x):
            name = self.names[key]
            for fn in hooks.get(name, ()):
                x = fn(x, pos, self.points[name])
            return x

        x = fire(("embed", None), F.embedding(ids, P["model.embed_tokens.weight"]))
        for layer in range(self.n_layers):
            pre = f"model.layers.{layer}."
            x = fire(("resid_pre", layer), x)
            h = self._norm(x, P[pre + "input_layernorm.weight"])
            q = F.linear(h, P[pre + "self_attn.q_proj.weight"]).view(B, p, H, dh).transpose(1, 2)
            k = F.linear(h, P[pre + "self_attn.k_proj.weight"]).view(B, p, KV, dh).transpose(1, 2)
            v = F.linear(h, P[pre + "self_attn.v_proj.weight"]).view(B, p, KV, dh).transpose(1, 2)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            if start == 0:                                                     # the prompt: a fresh cache
                self.cache.append((k, v))
            else:
                k0, v0 = self.cache[layer]
                k, v = torch.cat([k0, k], 2), torch.cat([v0, v], 2)
                self.cache[layer] = (k, v)
            kk = k.repeat_interleave(H // KV, dim=1)
            vv = v.repeat_interleave(H // KV, dim=1)
            scores = torch.matmul(q, kk.transpose(2, 3)) * dh ** -0.5          # [B H p T]
            if p > 1:
                T = kk.shape[2]
                mask = torch.arange(T, device=ids.device)[None, :] > pos[:, None]
                scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            z = fire(("z", layer), torch.matmul(probs, vv).transpose(1, 2))    # [B p H dh]
            attn = fire(("attn_out", layer), F.linear(z.reshape(B, p, H * dh), P[pre + "self_attn.o_proj.weight"]))
            x = fire(("resid_mid", layer), x + attn)
            h = self._norm(x, P[pre + "post_attention_layernorm.weight"])
            act = F.silu(F.linear(h, P[pre + "mlp.gate_proj.weight"])) * F.linear(h, P[pre + "mlp.up_proj.weight"])
            act = fire(("mlp_post", layer), act)
            mlp = fire(("mlp_out", layer), F.linear(act, P[pre + "mlp.down_proj.weight"]))
            x = fire(("resid_post", layer), x + mlp)
        x = self._norm(x[:, -1:], P["model.norm.weight"])[:, 0]
        W = P.get("lm_head.weight", P["model.embed_tokens.weight"])
        return F.linear(x, W, P.get("lm_head.bias"))


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
    if use_cache and _LeanLlama.supports(model, [name for name, _ in interventions]):
        return _generate_lean(model, seqs, max_new_tokens, temperature, gens, interventions, stop_at_eos, out, done)
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


def _generate_lean(model, seqs, max_new_tokens, temperature, gens, interventions, stop_at_eos, out, done):
    import torch

    lean = _LeanLlama(model)
    hooks: dict = {}
    for name, fn in interventions:
        hooks.setdefault(name, []).append(fn)
    eos = model.eos_token_id if stop_at_eos else None
    with model.lock, torch.inference_mode():
        last = lean.forward(seqs, 0, hooks)
        for step in range(max_new_tokens):
            nxt = _pick(last, temperature, gens)
            if _record(nxt, out, done, eos) or step == max_new_tokens - 1:
                break
            last = lean.forward(nxt.to(seqs.device)[:, None], seqs.shape[1] + step, hooks)
    return out
