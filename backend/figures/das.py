"""Figures of the DAS section (patching page): plain arrays in, Plotly figures out (no torch).

IIA is an accuracy in [0, 1] (a sequential scale from 0); logit-difference effects are signed
(blue moves the base run toward the expected answer, red away, as on the patching heatmaps).
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import _layout, click_layer, fmt_token

EFFECT_LABELS = {"full_activation": "whole activation", "v": "v", "v_row": "v_row (rowspace part)",
                 "v_null": "v_null (nullspace part)"}


def iia_heatmap(iia: np.ndarray, layers: list[int], positions: list[int], tokens: list[str],
                title: str = "DAS sweep: held-out IIA at K = 1") -> go.Figure:
    """[layers positions] IIA; a click on a cell selects its marker (click_layer)."""
    z = np.asarray(iia, dtype=float)
    cols = [f"{p}: {fmt_token(tokens[p])}" if 0 <= p < len(tokens) else str(p) for p in positions]
    text = [[f"layer {layer} · position {cols[b]}<br>IIA {z[a, b]:.2f}" for b in range(len(positions))]
            for a, layer in enumerate(layers)]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(len(positions))), y=list(range(len(layers))), zmin=0, zmax=1,
                               colorscale="Viridis", colorbar=dict(title="IIA", len=1, lenmode="fraction",
                                                                   thickness=14), text=text,
                               hovertemplate="%{text}<extra></extra>"))
    click_layer(fig, z, "layer %{y} · column %{x}<br>IIA %{customdata:.2f}<extra>click: open this run</extra>")
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(positions))), ticktext=cols)
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(layers))), ticktext=[str(x) for x in layers])
    # a floor on the height: one or two rows of cells would squash the colour bar to a sliver
    return _layout(fig, title, "position (base prompt token)", "layer", height=max(280, 120 + 34 * len(layers)))


def training_curve(curve: np.ndarray, title: str = "DAS training") -> go.Figure:
    """Loss (cross-entropy on the expected token) and the batch's IIA per step."""
    c = np.asarray(curve, dtype=float).reshape(-1, 3)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=c[:, 0], y=c[:, 1], name="loss", line=dict(color="#4c78a8"),
                             hovertemplate="step %{x}<br>loss %{y:.3f}<extra></extra>"), secondary_y=False)
    fig.add_trace(go.Scatter(x=c[:, 0], y=c[:, 2], name="batch IIA", line=dict(color="#f58518"),
                             hovertemplate="step %{x}<br>batch IIA %{y:.2f}<extra></extra>"), secondary_y=True)
    fig.update_yaxes(title_text="cross-entropy (nats)", secondary_y=False)
    fig.update_yaxes(title_text="batch IIA", range=[0, 1.05], secondary_y=True)
    return _layout(fig, title, "step", "cross-entropy (nats)", height=320)


def illusion_figure(v_row_norm: float, v_null_norm: float, effects: dict, title: str) -> go.Figure:
    """Left: v split into its rowspace and nullspace parts (squared norms add up to 1). Right:
    the change of the logit difference (expected − base answer) that each patch makes, with
    its IIA in the hover and on the bar."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.3, 0.7],
                        subplot_titles=("v = v_row + v_null (‖·‖²)", "effect of each patch (Δ logit difference)"))
    for name, val, colour in (("rowspace ‖v_row‖²", v_row_norm ** 2, "#4c78a8"),
                              ("nullspace ‖v_null‖²", v_null_norm ** 2, "#b279a2")):
        # the value in the legend too: a part of (near) zero has no visible bar to carry a label
        fig.add_trace(go.Bar(x=["v"], y=[val], name=f"{name} = {val:.3f}", marker_color=colour, text=[f"{val:.2f}"],
                             hovertemplate=f"{name}: %{{y:.3f}}<extra></extra>"), row=1, col=1)
    keys = [k for k in EFFECT_LABELS if k in effects]
    eff = np.array([effects[k]["effect"] for k in keys], dtype=float)
    lim = max(float(np.abs(eff).max()), 1e-9)
    fig.add_trace(go.Bar(x=[EFFECT_LABELS[k] for k in keys], y=eff, showlegend=False,
                         marker=dict(color=eff, colorscale="RdBu", cmin=-lim, cmax=lim),
                         text=[f"{e:+.2f} · IIA {effects[k]['iia']:.2f}" for k, e in zip(keys, eff)],
                         textposition="outside",
                         cliponaxis=False,
                         customdata=[[effects[k]["logit_diff"], effects[k]["iia"]] for k in keys],
                         hovertemplate="%{x}<br>Δ logit diff %{y:+.3f}<br>logit diff %{customdata[0]:.3f}"
                                       "<br>IIA %{customdata[1]:.2f}<extra></extra>"), row=1, col=2)
    fig = _layout(fig, title, "", "", height=380)
    fig.update_layout(barmode="stack", legend=dict(orientation="h", y=-0.25))
    # after _layout, whose empty axis titles would otherwise blank the first one
    fig.update_yaxes(title_text="share of ‖v‖²", range=[0, 1.05], row=1, col=1)
    fig.update_yaxes(title_text="Δ logit difference", range=[min(0.0, eff.min()) - 0.25 * lim,
                                                            max(0.0, eff.max()) + 0.25 * lim], row=1, col=2)
    return fig
