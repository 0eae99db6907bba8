"""Patch sites: everything about a patching site in one table (no torch, so pages read it too).

A site names which activation a patch replaces and how its cells are laid out. Each entry holds
- `axes`: the axes of the sweep's values, e.g. ("layer", "pos") or ("layer", "kv_head");
- `component`: the hooked activation (backend.sites), patched at the cell's layer;
- `index`: where a cell sits in that activation [batch ...] (the setter of the hooked reference
  copies the source run's values there): "pos" [:, p], "head" [:, :, h], "pattern" [:, h]
  ([batch head q_pos k_pos]), "pos_head" [:, p, h];
- `seed`: how kernels.patching starts the patched run inside its one-pass sweep ("resid_pre",
  "attn_out", "mlp_out": the residual at a position; "z": one head's z at every position;
  "z_pos": at one position; "qkv": the z of the heads a q/k/v/pattern patch feeds, recomputed);
- `atp`: whether plain AtP estimates it, `atp_star` whether AtP* does; `atp_sum`: which axes of
  an AtP elementwise product [pos ...] are summed to one value per cell ("d": the feature axis,
  giving [pos]; "pos_d": positions and d_head, giving [head]);
- `label`: how a page names it.

Heads: with grouped-query attention `kv_head` cells index key/value heads; patching one
changes every query head of its group, as TransformerLens's hook_k / hook_v patching does.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sites import Component


@dataclass(frozen=True)
class PatchSite:
    name: str
    axes: tuple[str, ...]
    component: Component
    index: str
    seed: str
    atp: bool
    atp_star: bool
    atp_sum: str
    label: str

    def put(self, act, src, cell: tuple[int, ...]) -> None:
        """Copy the source activation into `act` (both [batch ...] of this component) at the cell."""
        if self.index == "pos":
            act[:, cell[1]] = src[:, cell[1]]
        elif self.index == "head":
            act[:, :, cell[1]] = src[:, :, cell[1]]
        elif self.index == "pattern":
            act[:, cell[1]] = src[:, cell[1]]
        elif self.index == "pos_head":
            act[:, cell[1], cell[2]] = src[:, cell[1], cell[2]]
        else:
            raise ValueError(f"unknown cell index {self.index!r}")

    def atp_dims(self, batched: bool) -> tuple[int, ...]:
        """Axes of an AtP product [(row) pos d] or [(row) pos head d_head] summed per cell."""
        b = 1 if batched else 0
        return (-1,) if self.atp_sum == "d" else (b, b + 2)


_P, _H = ("layer", "pos"), ("layer", "head")
TABLE: dict[str, PatchSite] = {s.name: s for s in [
    PatchSite("resid_pre", _P, Component.RESID_PRE, "pos", "resid_pre", True, True, "d",
              "residual stream (resid_pre)"),
    PatchSite("attn_out", _P, Component.ATTN_OUT, "pos", "attn_out", True, True, "d", "attention output"),
    PatchSite("mlp_out", _P, Component.MLP_OUT, "pos", "mlp_out", True, True, "d", "MLP output"),
    PatchSite("head_out", _H, Component.Z, "head", "z", True, True, "pos_d", "each head's output (all positions)"),
    PatchSite("head_out_pos", ("layer", "pos", "head"), Component.Z, "pos_head", "z_pos", False, False, "",
              "each head's output, by position"),
    PatchSite("head_q", _H, Component.Q, "head", "qkv", False, True, "pos_d", "each head's queries"),
    PatchSite("head_k", ("layer", "kv_head"), Component.K, "head", "qkv", False, True, "pos_d",
              "each key/value head's keys"),
    PatchSite("head_v", ("layer", "kv_head"), Component.V, "head", "qkv", False, True, "pos_d",
              "each key/value head's values"),
    PatchSite("head_pattern", _H, Component.PATTERN, "pattern", "qkv", False, False, "",
              "each head's attention pattern"),
]}

SITES = tuple(TABLE)
SITE_AXES = {n: s.axes for n, s in TABLE.items()}
SITE_COMPONENT = {n: s.component for n, s in TABLE.items()}
SITE_LABELS = {n: s.label for n, s in TABLE.items()}
ATP_SITES = tuple(n for n, s in TABLE.items() if s.atp)
STAR_SITES = tuple(n for n, s in TABLE.items() if s.atp_star)
