"""Figures of the directions & steering page: plain arrays in, Plotly figures out."""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from . import DIVERGING, _layout, fmt_token, token_ticks


def layer_curve(accuracy: np.ndarray, separation: np.ndarray, chosen: int, method: str) -> go.Figure:
    """Held-out accuracy (left axis) and separation d′ (right axis) per layer; the markers
    are selectable: a click picks that layer's direction."""
    layers = list(range(len(accuracy)))
    acc_name = "probe accuracy (held out)" if method == "probe" else "midpoint-rule accuracy (held out)"
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=layers, y=accuracy, mode="lines+markers", name=acc_name, marker=dict(size=11, color="#4c78a8"),
        hovertemplate="layer %{x}<br>accuracy %{y:.3f}<br>click: use this layer<extra></extra>",
        selected=dict(marker=dict(color="red", size=14)), unselected=dict(marker=dict(opacity=0.9))))
    fig.add_trace(go.Scatter(
        x=layers, y=separation, mode="lines", name="separation d′ (held out)", yaxis="y2",
        line=dict(color="#f58518", dash="dot"), hovertemplate="layer %{x}<br>d′ %{y:.2f}<extra></extra>"))
    fig.add_vline(x=chosen, line=dict(color="red", width=1), annotation_text=f"layer {chosen}")
    fig.update_layout(yaxis=dict(range=[-0.02, 1.05]), clickmode="event+select", dragmode=False,
                      yaxis2=dict(title="d′", overlaying="y", side="right", showgrid=False),
                      legend=dict(orientation="h", y=1.12, x=0.3))
    return _layout(fig, "Which layer separates the sets (click a layer to use its direction)", "layer",
                   "accuracy", height=380)


def projection_heatmap(tokens: list[str], projection: np.ndarray, norms: np.ndarray, layers: list[int],
                       own_row: int, site: str) -> go.Figure:
    """Layer × token projection on the unit direction, diverging scale centred at 0. The colour
    range comes from positions ≥ 1 (position 0 carries the massive activations); hover shows
    every value."""
    rows, n = projection.shape
    body = projection[:, 1:] if n > 1 else projection
    bound = float(np.percentile(np.abs(body), 99)) or 1.0
    custom = np.stack([np.broadcast_to(np.array([html.escape(fmt_token(t)) for t in tokens]), projection.shape),
                       np.char.mod("%.1f", norms)], -1)
    fig = go.Figure(go.Heatmap(
        z=projection, x=list(range(n)), y=list(range(rows)), zmid=0, zmin=-bound, zmax=bound,
        colorscale=DIVERGING, reversescale=True, colorbar=dict(title="x · r̂"), customdata=custom,
        hovertemplate="layer %{y} · pos %{x} %{customdata[0]}<br>projection %{z:.3f}<br>‖x‖ %{customdata[1]}"
                      "<extra></extra>"))
    fig.update_xaxes(**token_ticks(tokens), tickangle=-45)
    fig.update_yaxes(tickmode="array", tickvals=list(range(rows)), ticktext=[str(layer) for layer in layers])
    if rows > 1:
        fig.add_hline(y=own_row, line=dict(color="black", width=1, dash="dot"))
    return _layout(fig, f"Projection on the direction at {site} of every layer (dotted: the direction's layer)",
                   "token (position)", "layer", height=max(380, 16 * rows + 160))


def probe_scores(tokens: list[str], scores: np.ndarray) -> go.Figure:
    fig = go.Figure(go.Bar(x=list(range(len(tokens))), y=scores, marker_color="#54a24b",
                           customdata=[html.escape(fmt_token(t)) for t in tokens],
                           hovertemplate="pos %{x} %{customdata}<br>p(label 1) %{y:.3f}<extra></extra>"))
    fig.update_xaxes(**token_ticks(tokens), tickangle=-45)
    fig.update_yaxes(range=[0, 1])
    return _layout(fig, "Probe score per token: sigmoid(x·w + b) at the probe's layer", "token (position)",
                   "p(label 1)", height=320)


def behaviour_curve(multipliers: np.ndarray, behaviour: np.ndarray, letter_mass: np.ndarray) -> go.Figure:
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=multipliers, y=behaviour, mode="lines+markers", name="p(match) / (p(A) + p(B))",
                             hovertemplate="multiplier %{x:g}<br>behaviour %{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=multipliers, y=letter_mass, mode="lines", name="p(A) + p(B)",
                             line=dict(dash="dot"), hovertemplate="multiplier %{x:g}<br>p(A)+p(B) %{y:.3f}<extra></extra>"))
    fig.add_hline(y=0.5, line=dict(color="grey", width=1, dash="dash"))
    fig.update_yaxes(range=[0, 1.02])
    return _layout(fig, "CAA behaviour on held-out A/B questions against the multiplier", "multiplier of the vector",
                   "probability", height=340)


def refusal_bars(conditions: list[str], harmful: np.ndarray, harmless: np.ndarray) -> go.Figure:
    fig = go.Figure([go.Bar(name="harmful-style", x=conditions, y=harmful, marker_color="#e45756",
                            hovertemplate="%{x}: %{y:.0%} refused<extra>harmful-style</extra>"),
                     go.Bar(name="harmless-style", x=conditions, y=harmless, marker_color="#4c78a8",
                            hovertemplate="%{x}: %{y:.0%} refused<extra>harmless-style</extra>")])
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    return _layout(fig, "Refusal rate (substring match) on held-out instructions", "condition", "refused",
                   height=320)
