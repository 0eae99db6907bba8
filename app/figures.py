"""Plotly figure builders: plain arrays in, figures out. No Streamlit, no torch."""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

SEQUENTIAL = "Viridis"
DIVERGING = "RdBu"


def fmt_token(t: str) -> str:
    """A token made visible: leading spaces as ␣, newlines as ⏎, tabs as ⇥."""
    if t == "":
        return "∅"
    return t.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")


def token_ticks(tokens: list[str]) -> dict:
    return dict(tickmode="array", tickvals=list(range(len(tokens))),
                ticktext=[f"{fmt_token(t)}" for t in tokens])


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int | None = None) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.01), xaxis_title=x, yaxis_title=y,
                      margin=dict(l=70, r=20, t=60, b=70), height=height,
                      hoverlabel=dict(font_family="monospace"))
    return fig


def top_k_bar(tokens: list[str], probs: np.ndarray) -> go.Figure:
    labels = [fmt_token(t) for t in tokens][::-1]
    fig = go.Figure(go.Bar(x=probs[::-1], y=list(range(len(tokens))), orientation="h",
                           text=[f"{p:.3f}" for p in probs[::-1]], textposition="auto", cliponaxis=False,
                           customdata=labels, marker_color="#4c78a8",
                           hovertemplate="token %{customdata}<br>p = %{x:.4f}<extra></extra>"))
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(tokens))), ticktext=labels)
    fig.update_xaxes(range=[0, min(1.0, float(probs.max()) * 1.2 + 0.02)])
    return _layout(fig, "Top next tokens", "probability", "token", height=60 + 28 * len(tokens))


def logit_lens_top(tokens: list[str], layer_labels: list[str], probs: np.ndarray,
                   top_tokens: np.ndarray) -> go.Figure:
    """Layer × position heatmap of the top token's probability, the token written in the cell.

    probs, top_tokens: [layers+1, pos, k]; hover lists the k best tokens.
    """
    n_rows, n_pos, k = probs.shape
    hover = [[f"layer {layer_labels[r]} · pos {p} {html.escape(fmt_token(tokens[p]))}<br>" + "<br>".join(
        f"{html.escape(fmt_token(str(top_tokens[r, p, j])))}: {probs[r, p, j]:.3f}" for j in range(k))
        for p in range(n_pos)] for r in range(n_rows)]
    cell_text = [[fmt_token(str(top_tokens[r, p, 0]))[:8] for p in range(n_pos)] for r in range(n_rows)]
    fig = go.Figure(go.Heatmap(
        z=probs[:, :, 0], x=list(range(n_pos)), y=list(range(n_rows)), zmin=0, zmax=1,
        colorscale=SEQUENTIAL, colorbar=dict(title="p(top)"), customdata=hover,
        text=cell_text, texttemplate="%{text}" if n_pos <= 24 else None,
        textfont=dict(size=9), hovertemplate="%{customdata}<extra></extra>"))
    fig.update_xaxes(**token_ticks(tokens), tickangle=-45)
    fig.update_yaxes(tickmode="array", tickvals=list(range(n_rows)), ticktext=layer_labels)
    return _layout(fig, "Logit lens: top token at each layer's residual stream", "input token (position)",
                   "layer (output of block; embed = input)", height=max(420, 18 * n_rows + 140))


def logit_lens_token(tokens: list[str], layer_labels: list[str], probs: np.ndarray, ranks: np.ndarray,
                     token: str) -> go.Figure:
    n_rows, n_pos = probs.shape
    custom = np.stack([np.broadcast_to(np.array([html.escape(fmt_token(t)) for t in tokens]), probs.shape),
                       ranks.astype(str)], axis=-1)
    fig = go.Figure(go.Heatmap(
        z=probs, x=list(range(n_pos)), y=list(range(n_rows)), zmin=0, zmax=max(float(probs.max()), 1e-6),
        colorscale=SEQUENTIAL, colorbar=dict(title=f"p({fmt_token(token)})"), customdata=custom,
        hovertemplate="layer %{y} · pos %{x} %{customdata[0]}<br>"
                      f"p({html.escape(fmt_token(token))}) = " + "%{z:.4f}<br>rank %{customdata[1]}<extra></extra>"))
    fig.update_xaxes(**token_ticks(tokens), tickangle=-45)
    fig.update_yaxes(tickmode="array", tickvals=list(range(n_rows)), ticktext=layer_labels)
    return _layout(fig, f"Logit lens: probability of {fmt_token(token)!s} at each layer", "input token (position)",
                   "layer (output of block; embed = input)", height=max(420, 18 * n_rows + 140))


def attention_pattern(tokens: list[str], pattern: np.ndarray, layer: int, head: int) -> go.Figure:
    """Query × key heatmap of one head (pattern [q k])."""
    n = len(tokens)
    labels = np.array([html.escape(fmt_token(t)) for t in tokens])
    custom = np.stack([np.repeat(labels[:, None], n, 1), np.repeat(labels[None, :], n, 0)], axis=-1)
    z = np.where(np.tril(np.ones((n, n), bool)), pattern, np.nan)  # causal mask shown blank
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n)), y=list(range(n)), zmin=0, zmax=1, colorscale="Blues",
        colorbar=dict(title="attention"), customdata=custom,
        hovertemplate="query %{y} %{customdata[0]}<br>key %{x} %{customdata[1]}<br>"
                      "attention %{z:.3f}<extra></extra>"))
    fig.update_xaxes(**token_ticks(tokens), tickangle=-45)
    fig.update_yaxes(**token_ticks(tokens), autorange="reversed")
    return _layout(fig, f"Attention pattern, layer {layer} head {head}", "key token (attended to)",
                   "query token (attending)", height=max(450, 22 * n + 160))


def click_layer(fig: go.Figure, z: np.ndarray, hovertemplate: str) -> go.Figure:
    """Overlay one nearly invisible square marker per heatmap cell, so a click selects the cell.

    Plotly heatmaps report no single-cell clicks in select mode (plotly.js issue 7685); scatter
    points do. The markers carry the hover text; the heatmap below draws the colours.
    """
    rows, cols = z.shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    fig.add_trace(go.Scatter(
        x=xx.ravel(), y=yy.ravel(), mode="markers", customdata=z.ravel(), hovertemplate=hovertemplate,
        marker=dict(symbol="square", size=14, opacity=0.01, color="black"), showlegend=False,
        selected=dict(marker=dict(opacity=0.6, color="red")), unselected=dict(marker=dict(opacity=0.01))))
    fig.data[0].hoverinfo = "skip"
    fig.update_layout(clickmode="event+select", dragmode=False)
    return fig


def head_score_heatmap(scores: np.ndarray, title: str) -> go.Figure:
    n_layers, n_heads = scores.shape
    fig = go.Figure(go.Heatmap(
        z=scores, x=list(range(n_heads)), y=list(range(n_layers)), zmin=0, zmax=1, colorscale=SEQUENTIAL,
        colorbar=dict(title="score")))
    click_layer(fig, scores, "layer %{y} head %{x}<br>score %{customdata:.3f}<br>click: open its pattern<extra></extra>")
    fig.update_xaxes(dtick=1)
    return _layout(fig, title, "head", "layer", height=max(420, 16 * n_layers + 140))
