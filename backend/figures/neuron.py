"""Figures of the neuron corpus page and of massive activations across the corpus."""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import fmt_token


def layer_summary(rows: list[dict]) -> go.Figure:
    """Per layer: dead neurons, token detectors, positional neurons (counts) and mean frequency."""
    layers = [r["layer"] for r in rows]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("neurons per layer (of 1536)", "mean activation frequency"))
    for key, name, colour in (("dead", "dead", "#555"), ("token_detectors", "token detectors", "#d62728"),
                              ("n_positional", "positional", "#1f77b4")):
        fig.add_trace(go.Scatter(x=layers, y=[r[key] for r in rows], mode="lines+markers", name=name,
                                 line=dict(color=colour),
                                 hovertemplate=f"layer %{{x}}: %{{y}} {name}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=layers, y=[r["mean_freq"] for r in rows], mode="lines+markers", name="mean freq",
                             line=dict(color="#2ca02c"), hovertemplate="layer %{x}: %{y:.3f}<extra></extra>"),
                  row=1, col=2)
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="neurons", row=1, col=1)
    fig.update_yaxes(title_text="share of tokens active", row=1, col=2)
    fig.update_layout(title=dict(text="Neuron statistics over the corpus, per layer", x=0.01), height=380,
                      margin=dict(l=60, r=20, t=70, b=50), legend=dict(orientation="h", y=-0.25))
    return fig


def neuron_histogram(counts: list[int], edges: np.ndarray, threshold: float, title: str) -> go.Figure:
    """A neuron's activation histogram (asinh-spaced bins drawn at their true width; log y)."""
    c = np.asarray(counts, dtype=float)
    nz = np.nonzero(c)[0]
    lo, hi = (nz.min(), nz.max() + 1) if len(nz) else (0, len(c))
    left, right = edges[lo:hi], edges[lo + 1:hi + 1]
    fig = go.Figure(go.Bar(x=(left + right) / 2, y=c[lo:hi], width=right - left, marker_color="#4c78a8",
                           customdata=np.stack([left, right], 1),
                           hovertemplate="[%{customdata[0]:.3g}, %{customdata[1]:.3g}): %{y} tokens<extra></extra>"))
    fig.add_vline(x=threshold, line=dict(color="#d62728", dash="dash"),
                  annotation_text=f"active > {threshold:.3g}", annotation_position="top right")
    fig.update_yaxes(type="log")
    fig.update_layout(title=dict(text=title, x=0.01), xaxis_title="activation (bins spaced evenly in asinh)",
                      yaxis_title="tokens (log)", height=360, margin=dict(l=60, r=20, t=60, b=50), bargap=0)
    return fig


def context_html(tokens: list[str], acts: list[float], bound: float, mark: int) -> str:
    """Tokens coloured by activation: red positive, blue negative, white at 0 (shared scale)."""
    out = []
    for i, (t, a) in enumerate(zip(tokens, acts)):
        f = max(-1.0, min(1.0, a / bound)) if bound > 0 else 0.0
        r, g, b = (255, int(255 * (1 - f)), int(255 * (1 - f))) if f >= 0 else (int(255 * (1 + f)), int(255 * (1 + f)), 255)
        border = "border-bottom:2px solid #000;" if i == mark else ""
        out.append(f"<span title='activation {a:.3f}' style='background:rgb({r},{g},{b});{border}"
                   f"font-family:monospace;white-space:pre'>{html.escape(fmt_token(t))}</span>")
    return "".join(out)


def massive_corpus_layers(rows: list[dict]) -> go.Figure:
    """Per layer over the corpus: mean top |value| and mean median (log), share of sequences."""
    layers = [r["layer"] for r in rows]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("top |value| vs median |value| (mean over sequences)",
                                        "share of sequences with a massive activation"))
    fig.add_trace(go.Scatter(x=layers, y=[r["mean_top"] for r in rows], name="mean top |value|", mode="lines+markers",
                             hovertemplate="layer %{x}: %{y:.1f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=layers, y=[r["max_top"] for r in rows], name="max top |value|", mode="lines",
                             line=dict(dash="dot"), hovertemplate="layer %{x}: %{y:.1f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=layers, y=[r["mean_median"] for r in rows], name="mean median |value|",
                             mode="lines+markers", hovertemplate="layer %{x}: %{y:.3f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=layers, y=[r["share_with_massive"] for r in rows], name="share with massive",
                         marker_color="#d62728", hovertemplate="layer %{x}: %{y:.2f}<extra></extra>"), row=1, col=2)
    fig.update_yaxes(type="log", title_text="|value| (log)", row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], title_text="share of sequences", row=1, col=2)
    fig.update_xaxes(title_text="layer (resid_post)")
    fig.update_layout(title=dict(text="Massive activations across the corpus", x=0.01), height=400,
                      margin=dict(l=60, r=20, t=70, b=50), legend=dict(orientation="h", y=-0.25))
    return fig


def massive_corpus_dims(rows: list[dict]) -> go.Figure:
    """(layer, dim) cells with massive entries: mean value (colour), share of sequences (size)."""
    fig = go.Figure(go.Scatter(
        x=[r["layer"] for r in rows], y=[str(r["dim"]) for r in rows], mode="markers",
        marker=dict(size=[6 + 18 * r["share_sequences"] for r in rows], color=[r["mean"] for r in rows],
                    colorscale="RdBu_r", cmid=0, colorbar=dict(title="mean value")),
        customdata=[[r["mean"], r["std"], r["share_sequences"], r["n"]] for r in rows],
        hovertemplate="layer %{x}, dim %{y}<br>mean %{customdata[0]:.1f} ± %{customdata[1]:.1f}"
                      "<br>in %{customdata[2]:.0%} of sequences (%{customdata[3]} entries)<extra></extra>"))
    fig.update_yaxes(type="category", title_text="dimension")
    fig.update_layout(title=dict(text="Which dimensions carry them, where (size: share of sequences)", x=0.01),
                      xaxis_title="layer", height=320, margin=dict(l=60, r=20, t=60, b=50))
    return fig


def ablation_bars(orig: float, zero: float, mean: float, layer: int) -> go.Figure:
    labels = ["original", "set to zero", "set to corpus mean"]
    vals = [orig, zero, mean]
    fig = go.Figure(go.Bar(x=labels, y=vals, marker_color=["#4c78a8", "#d62728", "#2ca02c"],
                           text=[f"{v:.3f}" for v in vals], textposition="outside",
                           hovertemplate="%{x}: loss %{y:.4f} nats<extra></extra>"))
    fig.update_layout(title=dict(text=f"Held-out LM loss with the massive activations of layer {layer} changed", x=0.01),
                      yaxis_title="mean next-token loss (nats)", height=360, margin=dict(l=60, r=20, t=60, b=40))
    return fig
