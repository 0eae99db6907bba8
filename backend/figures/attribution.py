"""Figures of the token attribution page: plain arrays in, Plotly figures out (no Streamlit, no torch).

Signed methods (input × gradient, integrated gradients) get a diverging scale centred at 0
(blue raises the explained logit, red lowers it, as on the patching and neuron heatmaps);
saliency, a gradient norm, is unsigned and gets a sequential scale from 0.
"""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from . import DIVERGING, _layout, click_layer, fmt_token, token_ticks

METHOD_LABELS = {"saliency": "saliency ‖∂f/∂e‖", "input-x-gradient": "input × gradient",
                 "integrated-gradients": "integrated gradients", "lrp": "LRP (AttnLRP, with positions)",
                 "lrp-cp": "LRP (attention weights constant, CP-LRP)"}
LRP = ("lrp", "lrp-cp")
UNSIGNED = ("saliency",)


def pct(rel: float) -> str:
    """A completeness gap as a percentage that is never rounded across the 1 % line: 1.004 %
    reads "1.004 %", not "1.0 %"; small ones keep two significant digits."""
    p = 100 * rel
    if p < 1:
        return f"{p:.2g} %"
    for d in range(1, 8):
        s = f"{p:.{d}f}"
        if p <= 1 or float(s) > 1:
            return f"{s} %"
    return f"{p!r} %"


def explained_of(target: dict, against: dict | None) -> str:
    """What is explained: logit(target), or logit(target) − logit(against)."""
    t = f"logit({fmt_token(target['token'])})"
    return f"{t} − logit({fmt_token(against['token'])})" if against else t


def _scale(method: str, z: np.ndarray, bound: float) -> dict:
    if method in UNSIGNED:
        return dict(colorscale="Blues", zmin=0, zmax=bound)
    return dict(colorscale=DIVERGING, zmid=0, zmin=-bound, zmax=bound)


def token_scores(tokens: list[str], scores: np.ndarray, method: str, explained: str,
                 held: list[int] = ()) -> go.Figure:
    """The prompt's tokens as one row of cells shaded by their score, the token and its score
    written in each cell; hover gives the exact value."""
    n = len(tokens)
    scores = np.asarray(scores, dtype=float)
    bound = float(np.abs(scores).max()) if n else 0.0
    bound = bound or 1.0
    labels = [html.escape(fmt_token(t)) for t in tokens]
    text = [[f"{labels[i]}<br>{scores[i]:+.2f}" for i in range(n)]]
    notes = [[" (held at its own embedding: 0 by construction)" if i in held else "" for i in range(n)]]
    fig = go.Figure(go.Heatmap(
        z=[scores.tolist()], x=list(range(n)), y=[0], **_scale(method, scores, bound), text=text,
        texttemplate="%{text}", textfont=dict(size=13, family="monospace"), xgap=2,
        customdata=np.stack([np.array([labels]), np.array(notes)], -1),
        colorbar=dict(title=dict(text="score", side="right"), thickness=12),
        hovertemplate="pos %{x} %{customdata[0]}<br>score %{z:.4f}%{customdata[1]}<extra></extra>"))
    fig.update_xaxes(tickmode="array", tickvals=list(range(n)), ticktext=[str(i) for i in range(n)])
    fig.update_yaxes(visible=False)
    return _layout(fig, f"{METHOD_LABELS.get(method, method)}: attribution of {html.escape(explained)} to each "
                   "input token", "position (the tokens are in the cells)", "", height=240)


def content_and_position(tokens: list[str], content: np.ndarray, position: np.ndarray, explained: str) -> go.Figure:
    """LRP: each token's relevance split into what its content (the embedding) and its position
    (the rotary factors read there) received; grouped bars, signed, hover with both."""
    labels = [f"{i} {html.escape(fmt_token(t))}" for i, t in enumerate(tokens)]
    fig = go.Figure()
    for name, vals, colour in (("content (token embedding)", content, "#4c72b0"),
                               ("position (rotary factors)", position, "#dd8452")):
        fig.add_trace(go.Bar(x=list(range(len(tokens))), y=[float(v) for v in vals], name=name, marker_color=colour,
                             customdata=labels, hovertemplate="%{customdata}<br>" + name + ": %{y:+.4f}<extra></extra>"))
    fig.update_layout(barmode="group")
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(tokens))), ticktext=labels)
    return _layout(fig, f"LRP relevance of {html.escape(explained)}: content vs position per token",
                   "position and token", "relevance", height=320)


def layer_heatmap(tokens: list[str], layer_scores: np.ndarray, method: str, explained: str,
                  layer_gap_rel: np.ndarray | None = None, layer_steps: np.ndarray | None = None) -> go.Figure:
    """Layer × token attribution to the residual stream entering each block (resid_pre), one
    selectable square marker per cell (a click opens the logit lens at that position).

    The colour range is symmetric around 0 and set by positions ≥ 1 when position 0 is more
    than twice as large (it carries the massive activation); the hover gives every value."""
    z = np.asarray(layer_scores, dtype=float)
    n_layers, n = z.shape
    bound = float(np.abs(z).max()) if z.size else 1.0
    note = ""
    if n > 1:
        rest = float(np.abs(z[:, 1:]).max())
        if rest > 0 and bound > 2 * rest:
            bound, note = rest, " (colour range from positions ≥ 1; position 0 saturates)"
    bound = bound or 1.0
    fig = go.Figure(go.Heatmap(z=z.tolist(), x=list(range(n)), y=list(range(n_layers)), **_scale(method, z, bound),
                               colorbar=dict(title=dict(text="score", side="right"))))
    labels = [html.escape(fmt_token(t)) for t in tokens]
    per_layer = [""] * n_layers
    if layer_gap_rel is not None:
        per_layer = [f"<br>layer completeness gap {pct(float(g))} ({int(s)} steps)"
                     for g, s in zip(layer_gap_rel, layer_steps if layer_steps is not None else [0] * n_layers)]
    click_layer(fig, z, "%{text}<br>score %{customdata:.4f}<br>click: the logit lens at this position"
                        "<extra></extra>")
    fig.data[1].text = np.array([[f"layer {layer} resid_pre · pos {p} {labels[p]}{per_layer[layer]}"
                                  for p in range(n)] for layer in range(n_layers)]).ravel()
    fig.update_xaxes(**token_ticks(tokens), tickangle=-45 if n > 12 else 0, range=[-0.5, n - 0.5])
    fig.update_yaxes(dtick=1 if n_layers <= 16 else 2, range=[-0.5, n_layers - 0.5])
    return _layout(fig, f"Layer view: {METHOD_LABELS.get(method, method)} of {html.escape(explained)} "
                   f"to each layer's residual stream{note}", "input token (position)",
                   "layer (resid_pre: entering the block)", height=max(450, 16 * n_layers + 160))
