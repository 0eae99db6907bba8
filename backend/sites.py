"""Hook locations: a typed site becomes a TransformerLens hook name here, and only here.

A site is (component, layer, head). The head is not part of a hook name (heads are an
axis of the activation), but it is validated here so a wrong head never reaches a hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .errors import InvalidSite


class Component(str, Enum):
    EMBED = "embed"              # token embeddings                  [batch pos d_model]
    RESID_PRE = "resid_pre"      # residual stream entering block L  [batch pos d_model]
    RESID_MID = "resid_mid"      # after attention, before the MLP   [batch pos d_model]
    RESID_POST = "resid_post"    # residual stream leaving block L   [batch pos d_model]
    ATTN_OUT = "attn_out"        # attention output of block L      [batch pos d_model]
    MLP_OUT = "mlp_out"          # MLP output of block L            [batch pos d_model]
    MLP_PRE = "mlp_pre"          # MLP gate pre-activation          [batch pos d_mlp]
    MLP_POST = "mlp_post"        # MLP hidden units (neurons)       [batch pos d_mlp]
    Q = "q"                      # queries                          [batch pos head d_head]
    K = "k"                      # keys                             [batch pos kv_head d_head]
    V = "v"                      # values                           [batch pos kv_head d_head]
    Z = "z"                      # attention-weighted values        [batch pos head d_head]
    PATTERN = "pattern"          # attention probabilities          [batch head q_pos k_pos]
    ATTN_SCORES = "attn_scores"  # attention logits                 [batch head q_pos k_pos]
    RESULT = "result"            # per-head output (needs use_attn_result)
    FINAL_NORM = "final_norm"    # after the final norm             [batch pos d_model]
    LN1_IN = "ln1_in"            # input of block L's attention norm (reads resid_pre only) [batch pos d_model]
    LN2_IN = "ln2_in"            # input of block L's MLP norm (reads resid_mid only)        [batch pos d_model]
    FINAL_IN = "final_in"        # input of the final norm (the final residual)             [batch pos d_model]


_BLOCK = {
    Component.RESID_PRE: "hook_resid_pre",
    Component.RESID_MID: "hook_resid_mid",
    Component.RESID_POST: "hook_resid_post",
    Component.ATTN_OUT: "hook_attn_out",
    Component.MLP_OUT: "hook_mlp_out",
    Component.MLP_PRE: "mlp.hook_pre",
    Component.MLP_POST: "mlp.hook_post",
    Component.Q: "attn.hook_q",
    Component.K: "attn.hook_k",
    Component.V: "attn.hook_v",
    Component.Z: "attn.hook_z",
    Component.PATTERN: "attn.hook_pattern",
    Component.ATTN_SCORES: "attn.hook_attn_scores",
    Component.RESULT: "attn.hook_result",
    Component.LN1_IN: "ln1.hook_in",
    Component.LN2_IN: "ln2.hook_in",
}
_GLOBAL = {Component.EMBED: "hook_embed", Component.FINAL_NORM: "ln_final.hook_normalized",
           Component.FINAL_IN: "ln_final.hook_in"}
HEADED = {Component.Q, Component.Z, Component.PATTERN, Component.ATTN_SCORES, Component.RESULT,
          Component.K, Component.V}


@dataclass(frozen=True)
class Site:
    component: Component
    layer: int | None = None
    head: int | None = None

    def __post_init__(self):
        try:
            object.__setattr__(self, "component", Component(self.component))
        except ValueError:
            names = ", ".join(c.value for c in Component)
            raise InvalidSite(f"Unknown site component {self.component!r}; known: {names}.") from None
        if self.component in _GLOBAL and self.layer is not None:
            raise InvalidSite(f"Site {self.component.value!r} has no layer.")
        if self.component in _BLOCK and self.layer is None:
            raise InvalidSite(f"Site {self.component.value!r} needs a layer.")
        if self.head is not None and self.component not in HEADED:
            raise InvalidSite(f"Site {self.component.value!r} has no head axis.")

    def check(self, n_layers: int, n_heads: int, n_kv_heads: int | None = None) -> "Site":
        """Raise InvalidSite unless this site exists in a model of these dimensions."""
        if self.layer is not None and not 0 <= self.layer < n_layers:
            raise InvalidSite(f"Layer {self.layer} does not exist: the model has layers 0–{n_layers - 1}.")
        if self.head is not None:
            limit = n_kv_heads if self.component in (Component.K, Component.V) and n_kv_heads else n_heads
            if not 0 <= self.head < limit:
                raise InvalidSite(f"Head {self.head} does not exist: this site has heads 0–{limit - 1}.")
        return self


def hook_name(site: Site) -> str:
    """The TransformerLens hook name of a site (legacy names, compatibility mode)."""
    if site.component in _GLOBAL:
        return _GLOBAL[site.component]
    return f"blocks.{site.layer}.{_BLOCK[site.component]}"


def hook_names(component: Component | str, n_layers: int) -> list[str]:
    """The hook names of one component at every layer, in layer order."""
    return [hook_name(Site(Component(component), layer)) for layer in range(n_layers)]
