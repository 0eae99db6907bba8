"""Interchange interventions in a subspace, and DAS's inner loop run from the site onward.

An interchange intervention at a site (one activation vector x of a base run at position p)
replaces the component of x in a subspace by the source run's:

    x' = x_b + ((x_s - x_b) R^T * m) R          R [k w] orthonormal rows, m [k] a mask in [0, 1]

With m = 1 this is the projection swap x_b + P (x_s - x_b), P = R^T R (Geiger et al.'s
distributed interchange intervention; pyvene's RotatedSpaceIntervention with the first k
rotated coordinates swapped). Boundless DAS (Wu et al.) learns a soft m over a full rotation.

Two engines give the last position's logits of the intervened base runs [N d_vocab],
differentiable with respect to R and m (never the model's weights), tested equal:

- `HookEngine` (reference, any architecture): a hooked forward of the LoadedModel per call,
  the site's activation replaced at position p.
- `SiteEngine` (fast): the frozen model runs *once* per dataset up to the site (the dense
  forward of kernels.forward with a key/value cache); each training step then runs only from the
  site onward, and only the positions p.. (attention is causal: positions before p are the base
  run's, their keys and values are read from the cache). At the last position on SmolLM2 this is
  one row per example through the later blocks instead of the whole prompt through all of them.

Sites (backend/sites.py components): resid_pre (blocks.L.hook_resid_pre, [d_model]), mlp_post
(blocks.L.mlp.hook_post, [d_mlp], the MLP's hidden units), z (blocks.L.attn.hook_z, flattened
over heads: [n_heads * d_head], one subspace of all heads' z at the position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.sites import Component, Site, hook_name

SITE_COMPONENTS = {"resid_pre": Component.RESID_PRE, "mlp_post": Component.MLP_POST, "attn_z": Component.Z}


def site_hook(site: str, layer: int) -> str:
    return hook_name(Site(SITE_COMPONENTS[site], layer))


def site_width(site: str, info) -> int:
    return {"resid_pre": info.d_model, "mlp_post": info.d_mlp, "attn_z": info.n_heads * info.d_head}[site]


def interchange(xb: torch.Tensor, xs: torch.Tensor, R: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """x_b + ((x_s - x_b) R^T * m) R for rows [N w]; R [k w]; mask [k] or None (all ones)."""
    c = (xs - xb) @ R.T                                                  # [N k]
    if mask is not None:
        c = c * mask
    return xb + c @ R


@dataclass
class Batch:
    """Token ids of N base and N source prompts (each side one length), the site's position
    in each (base p_b, source p_s), and what each engine needs from them."""

    base: torch.Tensor      # [N Tb]
    source: torch.Tensor    # [N Ts]
    p_base: int
    p_source: int


class HookEngine:
    """Reference: hooked forwards of the LoadedModel (any architecture)."""

    name = "hooks"

    def __init__(self, model, site: str, layer: int, batch: Batch, hooks: dict | None = None):
        self.model, self.site, self.layer, self.b = model, site, layer, batch
        self.hook = site_hook(site, layer)
        # planted hooks (tests): dense-style fn(x) -> x | None, held in every forward
        self.plant = [(n, (lambda f: lambda act, hook: f(act))(f)) for n, f in (hooks or {}).items()]
        with model.hooks(fwd_hooks=self.plant):
            self.xs = model.capture(batch.source, [self.hook], flatten_heads=True)[self.hook][:, batch.p_source].clone()
            self.xb = model.capture(batch.base, [self.hook], flatten_heads=True)[self.hook][:, batch.p_base].clone()

    def site_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, source) activations at the site [N w]."""
        return self.xb, self.xs

    def logits(self, idx, R, mask=None, replace: torch.Tensor | None = None) -> torch.Tensor:
        """Last-position logits [n d_vocab] of base rows idx with the site intervened (or, with
        `replace` [n w], the site's vector set to it)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        p = self.b.p_base
        new = replace if replace is not None else interchange(self.xb[idx], self.xs[idx], R, mask)

        def put(act, hook):
            shape = act.shape
            flat = act.flatten(2) if act.ndim == 4 else act
            flat = torch.cat([flat[:, :p], new[:, None].to(flat.dtype), flat[:, p + 1:]], 1)
            return flat.view(shape)
        with self.model.hooks(fwd_hooks=self.plant + [(self.hook, put)]):
            return self.model.forward(self.b.base[idx], logits_to_keep=1)[:, -1]


class SiteEngine:
    """Fast path: the frozen model up to the site once, then the blocks from the site onward at
    positions p.. per call (see the module docstring). Needs canonical weights (float32)."""

    name = "run-from-site"

    def __init__(self, dm, site: str, layer: int, batch: Batch, hooks: dict | None = None):
        from .forward import KVCache, point_layer, run

        self.dm, self.site, self.layer, self.b = dm, site, layer, batch
        p = batch.p_base
        L = layer
        names = {"resid_pre": [f"blocks.{L}.hook_resid_pre"],
                 "attn_z": [f"blocks.{L}.hook_resid_pre", f"blocks.{L}.attn.hook_z"],
                 "mlp_post": [f"blocks.{L}.hook_resid_mid", f"blocks.{L}.mlp.hook_post"]}[site]
        hooks = dict(hooks or {})
        if any(point_layer(n, dm.n_layers)[0] > L for n in hooks):
            raise ValueError("planted hooks must lie at or before the site's block")
        kv = KVCache()
        got = run(dm, batch.base, capture=names, cache=kv, hooks=hooks)
        self.first = L if site == "resid_pre" else L + 1           # the first block run whole
        # clone out of inference mode: these are constants of a differentiated forward
        self.k = {j: kv.k[j][:, :, :p].clone() for j in range(self.first, dm.n_layers)}
        self.v = {j: kv.v[j][:, :, :p].clone() for j in range(self.first, dm.n_layers)}
        self.rest = got[names[0]][:, p:].clone()                    # the residual at positions p..
        act = got[names[-1]][:, p:].clone()
        self.act = act.flatten(2) if act.ndim == 4 else act          # [N T-p w] the site's rows
        hook = site_hook(site, layer)
        src = run(dm, batch.source, capture=[hook], hooks=hooks)[hook][:, batch.p_source]
        self.xs = (src.flatten(1) if src.ndim == 3 else src).clone()
        self.xb = self.act[:, 0]

    def site_values(self):
        return self.xb, self.xs

    def logits(self, idx, R, mask=None, replace: torch.Tensor | None = None) -> torch.Tensor:
        from .forward import KVCache

        dm, L, p = self.dm, self.layer, self.b.p_base
        _plain_tables(dm)
        idx = torch.as_tensor(idx, dtype=torch.long)
        new = replace if replace is not None else interchange(self.xb[idx], self.xs[idx], R, mask)
        act = torch.cat([new[:, None].to(self.act.dtype), self.act[idx, 1:]], 1)    # [n T-p w]
        x = self.rest[idx]
        if self.site == "attn_z":
            out = dm._lin(act, dm.layers[L]["wo"], dm.layers[L]["bo"])
            if dm.layers[L]["ln1_post"] is not None:
                out = dm._rms(out, dm.layers[L]["ln1_post"])
            x = x + out
            x = x + dm.mlp_dense(L, x, {}, {}, set())
        elif self.site == "mlp_post":
            out = dm._lin(act, dm.layers[L]["wd"], dm.layers[L]["bd"])
            if dm.layers[L]["ln2_post"] is not None:
                out = dm._rms(out, dm.layers[L]["ln2_post"])
            x = x + out
        else:
            x = act
        cache = KVCache()
        cache.k = {j: t[idx] for j, t in self.k.items()}
        cache.v = {j: t[idx] for j, t in self.v.items()}
        for j in range(self.first, dm.n_layers):
            x = x + dm.attention(j, x, {}, {}, set(), cache, p)
            x = x + dm.mlp_dense(j, x, {}, {}, set())
        return dm.logits(x[:, -1])


def _plain_tables(dm) -> None:
    """The dense model caches rotary tables and masks by length; one made under inference mode
    (by any no-grad forward) cannot enter a differentiated forward, so such entries are cloned."""
    for key, v in list(dm._rope.items()):
        ts = v if isinstance(v, tuple) else (v,)
        if any(t.is_inference() for t in ts):
            c = tuple(t.clone() for t in ts)
            dm._rope[key] = c if isinstance(v, tuple) else c[0]


def engine(model, site: str, layer: int, batch: Batch, prefer: str = "fast", hooks: dict | None = None):
    """The fast engine when the model has float32 canonical weights (and prefer == "fast"),
    else the hooked reference."""
    if prefer == "fast":
        from .forward import dense_model

        dm = dense_model(model)
        if dm is not None and dm.dtype == torch.float32:
            return SiteEngine(dm, site, layer, batch, hooks)
    return HookEngine(model, site, layer, batch, hooks)
