"""Figures and HTML of the feature pages (dashboard, map, search). No Streamlit, no torch."""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from .figures import _layout, fmt_token


def example_html(ex: dict, scale: float) -> str:
    """One corpus example as a line of tokens, each shaded by the feature's activation on it
    (orange, opacity = activation / scale); the example's own token framed; hover: value."""
    spans = []
    for i, (tok, act) in enumerate(zip(ex["tokens"], ex["acts"])):
        a = 0.0 if act is None else max(0.0, act) / scale if scale > 0 else 0.0
        title = "not encoded (window position 0)" if act is None else f"activation {act:.2f}"
        style = f"background:rgba(255,120,0,{min(a, 1.0):.2f});padding:0 1px;border-radius:2px;"
        if i == ex["focus"]:
            style += "outline:2px solid #1f4e9c;font-weight:600;"
        shown = tok.replace("\n", "⏎").replace("\t", "⇥") or "∅"
        spans.append(f"<span title='{html.escape(title)}' style='{style}'>{html.escape(shown)}</span>")
    return (f"<div style='font-family:monospace;font-size:0.88em;line-height:1.9;white-space:pre;overflow-x:auto'>"
            f"<span style='display:inline-block;width:4.5em;color:#333;font-weight:600'>{ex['value']:.2f}</span>"
            f"<span style='color:#999;font-size:0.8em;display:inline-block;width:11.5em' "
            f"title='corpus document and token position'>doc {ex['doc']} · pos {ex['pos']}</span>"
            + "".join(spans) + "</div>")


def activation_histogram(edges: list[float], counts: list[int], feature: int, density: float,
                         n_tokens: int) -> go.Figure:
    e = np.asarray(edges)
    mids, widths = (e[:-1] + e[1:]) / 2, np.diff(e)
    fig = go.Figure(go.Bar(x=mids, y=counts, width=widths, marker_color="#ff7800",
                           customdata=np.stack([e[:-1], e[1:]], 1),
                           hovertemplate="activation %{customdata[0]:.2f}–%{customdata[1]:.2f}<br>%{y} tokens"
                                         "<extra></extra>"))
    fig.update_yaxes(type="log")
    return _layout(fig, f"Activations of feature #{feature} where active (density {density:.3%} of "
                        f"{n_tokens:,} tokens)", "activation value", "tokens (log scale)", height=330)


def feature_map(xy: np.ndarray, density: np.ndarray | None, labels: list[str], title: str,
                selected: int = -1) -> go.Figure:
    """Every feature as a point (UMAP of decoder directions), coloured by log10 density; click
    a point to open that feature. The first trace's point index is the feature id."""
    n = len(xy)
    ids = np.arange(n)
    if density is not None:
        with np.errstate(divide="ignore"):
            logd = np.where(density > 0, np.log10(np.where(density > 0, density, 1.0)), np.nan)
        floor = float(np.nanmin(logd)) - 0.5 if np.isfinite(logd).any() else -6.0
        colour = np.where(np.isnan(logd), floor, logd)
        dens_text = [f"{d:.3%}" if d > 0 else "never active in the index" for d in np.nan_to_num(density)]
        marker = dict(size=5, color=colour, colorscale="Viridis", colorbar=dict(title="log10 density"),
                      opacity=0.8)
    else:
        dens_text = ["(no corpus index)"] * n
        marker = dict(size=5, color="#4c78a8", opacity=0.7)
    hover = [f"feature #{f}<br>density {d}<br>{html.escape(lbl) or '—'}" for f, d, lbl in zip(ids, dens_text, labels)]
    fig = go.Figure(go.Scatter(x=xy[:, 0], y=xy[:, 1], mode="markers", marker=marker, customdata=ids,
                                 text=hover, hovertemplate="%{text}<br>click: open its dashboard<extra></extra>",
                                 showlegend=False, selected=dict(marker=dict(color="red", size=9)),
                                 unselected=dict(marker=dict(opacity=0.8))))
    if 0 <= selected < n:
        fig.add_trace(go.Scatter(x=[xy[selected, 0]], y=[xy[selected, 1]], mode="markers", hoverinfo="skip",
                                 marker=dict(symbol="star", size=18, color="red", line=dict(color="black", width=1)),
                                 name=f"#{selected}", showlegend=False))
    fig.update_layout(clickmode="event+select", dragmode="zoom")
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return _layout(fig, title, "UMAP 1", "UMAP 2", height=720)


def feature_click_overlay(fig: go.Figure, feature_ids: list[int], n_pos: int, tokens: list[str]) -> go.Figure:
    """Make each (feature, token) cell of the per-prompt feature heatmap clickable: one almost
    invisible square marker per cell on the heatmap's axes; customdata is the feature id."""
    rows = len(feature_ids)
    yy, xx = np.mgrid[0:rows, 0:n_pos]
    labels = [html.escape(fmt_token(t)) for t in tokens]
    fig.add_trace(go.Scatter(
        x=xx.ravel(), y=yy.ravel(), mode="markers", customdata=np.repeat(np.asarray(feature_ids), n_pos),
        text=[f"pos {p} {labels[p]}" for p in xx.ravel()],
        hovertemplate="feature #%{customdata} · %{text}<br>click: open its dashboard<extra></extra>",
        marker=dict(symbol="square", size=12, opacity=0.01, color="black"), showlegend=False,
        selected=dict(marker=dict(opacity=0.5, color="red")), unselected=dict(marker=dict(opacity=0.01))),
        row=1, col=1)
    fig.data[0].hoverinfo = "skip"
    fig.update_layout(clickmode="event+select", dragmode=False)
    return fig
