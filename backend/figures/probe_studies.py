"""Figures of two probe studies, CLUE and harmfulness vs refusal: plain arrays in, Plotly out."""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from . import _layout

BASELINE_LABELS = {"mean_logprob": "mean token log-prob", "answer_prob": "final-answer probability"}
RERANK_LABELS = {"centroid": "nearest success centroid", "majority": "majority vote",
                 "confidence": "most confident (mean log-prob)", "random": "a random candidate (expected)",
                 "oracle": "oracle (some candidate right)"}


def clue_layers(layers: list[int], accuracy: np.ndarray, auroc: np.ndarray, baselines: dict,
                rerank_layer: int) -> go.Figure:
    """Held-out AUROC and accuracy of the nearest-centroid verifier per layer, with the two
    baselines' AUROC as horizontal lines and chance at 0.5."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=layers, y=auroc, mode="lines+markers", name="AUROC (centroid score)",
                             marker=dict(color="#4c78a8"),
                             hovertemplate="layer %{x}<br>AUROC %{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=layers, y=accuracy, mode="lines+markers", name="accuracy (nearest centroid)",
                             line=dict(dash="dot", color="#f58518"),
                             hovertemplate="layer %{x}<br>accuracy %{y:.3f}<extra></extra>"))
    colours = {"mean_logprob": "#54a24b", "answer_prob": "#b279a2"}
    for name, b in baselines.items():
        v = b.get("auroc")
        if v is None or not np.isfinite(v):
            continue
        fig.add_trace(go.Scatter(x=[layers[0], layers[-1]], y=[v, v], mode="lines",
                                 name=f"baseline AUROC: {BASELINE_LABELS.get(name, name)}",
                                 line=dict(dash="dash", color=colours.get(name, "grey")),
                                 hovertemplate=f"{BASELINE_LABELS.get(name, name)}<br>AUROC {v:.3f}"
                                               f"<br>accuracy {b.get('accuracy', float('nan')):.3f}<extra></extra>"))
    fig.add_hline(y=0.5, line=dict(color="grey", width=1), annotation_text="chance")
    fig.add_vline(x=rerank_layer, line=dict(color="red", width=1, dash="dot"),
                  annotation_text=f"rerank layer {rerank_layer}")
    fig.update_yaxes(range=[0, 1.02])
    fig.update_layout(legend=dict(orientation="h", y=-0.25))
    return _layout(fig, "Verifying held-out traces from the hidden-state change δ (per layer)", "layer",
                   "AUROC / accuracy", height=440)


def clue_rerank(rerank: dict) -> go.Figure:
    """Top-1 accuracy of each way of picking one of a problem's sampled answers."""
    names = [k for k in RERANK_LABELS if rerank.get(k) is not None]
    vals = [float(rerank[k]) for k in names]
    colours = ["#4c78a8" if k == "centroid" else "#bab0ac" if k in ("random", "oracle") else "#f58518"
               for k in names]
    labels = [RERANK_LABELS[k] + (f" (layer {rerank.get('layer')})" if k == "centroid" else "") for k in names]
    fig = go.Figure(go.Bar(x=labels, y=vals, marker_color=colours, text=[f"{v:.0%}" for v in vals],
                           textposition="outside", cliponaxis=False,
                           hovertemplate="%{x}<br>top-1 accuracy %{y:.3f}<extra></extra>"))
    fig.update_yaxes(range=[0, 1.1], tickformat=".0%")
    return _layout(fig, f"Reranking {rerank.get('n_candidates')} sampled answers on {rerank.get('n_problems')} "
                        "held-out problems", "how the answer is picked", "top-1 accuracy", height=380)


def clue_scores(scores: np.ndarray, correct: np.ndarray, layer: int) -> go.Figure:
    """Held-out traces' centroid score at one layer, correct against wrong (overlaid histograms)."""
    fig = go.Figure()
    for ok, name, colour in ((1, "correct traces", "#4c78a8"), (0, "wrong traces", "#e45756")):
        fig.add_trace(go.Histogram(x=scores[correct == ok], name=name, opacity=0.6, marker_color=colour,
                                   nbinsx=30, hovertemplate="score %{x}<br>%{y} traces<extra>" + name + "</extra>"))
    fig.add_vline(x=0, line=dict(color="black", width=1, dash="dot"), annotation_text="decision")
    fig.update_layout(barmode="overlay")
    return _layout(fig, f"Layer {layer}: ‖δ − μ⁻‖ − ‖δ − μ⁺‖ of held-out traces (> 0: judged correct)",
                   "centroid score", "traces", height=340)


def harm_cosine(layers: list[int], cosine: np.ndarray, harm_acc: np.ndarray, refusal_acc: np.ndarray,
                chosen: int) -> go.Figure:
    """Cosine of the harmfulness and refusal directions per layer, with each direction's held-out
    midpoint accuracy (right axis)."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=layers, y=cosine, mode="lines+markers", name="cos(harmfulness, refusal)",
                             marker=dict(color="#4c78a8"),
                             hovertemplate="layer %{x}<br>cosine %{y:.3f}<extra></extra>"))
    for acc, name, colour in ((harm_acc, "harmfulness (t_inst) held-out accuracy", "#e45756"),
                              (refusal_acc, "refusal (t_post-inst) held-out accuracy", "#54a24b")):
        fig.add_trace(go.Scatter(x=layers, y=acc, mode="lines", name=name, yaxis="y2",
                                 line=dict(dash="dot", color=colour),
                                 hovertemplate="layer %{x}<br>accuracy %{y:.2f}<extra></extra>"))
    fig.add_hline(y=0, line=dict(color="grey", width=1))
    fig.add_vline(x=chosen, line=dict(color="red", width=1, dash="dot"), annotation_text=f"layer {chosen}")
    fig.update_layout(yaxis=dict(range=[-1.02, 1.02]), legend=dict(orientation="h", y=-0.25),
                      yaxis2=dict(title="accuracy", overlaying="y", side="right", range=[0, 1.02], showgrid=False))
    return _layout(fig, "How alike are the harmfulness and refusal directions (cosine per layer)", "layer",
                   "cosine", height=440)


def harm_scatter(proj_harm: np.ndarray, proj_refusal: np.ndarray, label: np.ndarray, heldout: np.ndarray,
                 texts: list[str], layer: int) -> go.Figure:
    """Each instruction at one layer: its t_inst state on the harmfulness direction (x) and its
    t_post-inst state on the refusal direction (y); held-out ones filled, training ones hollow."""
    fig = go.Figure()
    for lab, name, colour in ((1, "harmful-style", "#e45756"), (0, "harmless", "#4c78a8")):
        for held, how in ((0, "training"), (1, "held out")):
            m = (label == lab) & (heldout == held)
            if not m.any():
                continue
            fig.add_trace(go.Scatter(
                x=proj_harm[m], y=proj_refusal[m], mode="markers", name=f"{name}, {how}",
                marker=dict(color=colour, size=11 if held else 8, symbol="circle" if held else "circle-open",
                            line=dict(width=1.5, color=colour)),
                customdata=[html.escape(t) for t, k in zip(texts, m) if k],
                hovertemplate="%{customdata}<br>harmfulness %{x:.2f}<br>refusal %{y:.2f}<extra>" + name
                              + f", {how}</extra>"))
    return _layout(fig, f"Layer {layer}: projection on the harmfulness direction (t_inst) and on the refusal "
                        "direction (t_post-inst)", "t_inst · harmfulness unit vector",
                   "t_post-inst · refusal unit vector", height=460)


def harm_steering(harm: dict, refusal: dict, strength: float) -> go.Figure:
    """Refusal rate on held-out instructions: harmless ones with each direction added, and
    harmful-style ones with each direction ablated, beside the unsteered baseline."""
    def rate(d, which, cond):
        return d[f"{which}_refusal_rate"][cond]
    groups = [("harmless + added", "harmless", "added"), ("harmful-style, ablated", "harmful", "ablated")]
    x = ["baseline (harmless)"] + [g[0] for g in groups[:1]] + ["baseline (harmful-style)"] + [g[0] for g in groups[1:]]
    fig = go.Figure()
    for d, name, colour in ((harm, "harmfulness direction", "#e45756"), (refusal, "refusal direction", "#54a24b")):
        ys = [rate(d, "harmless", "baseline"), rate(d, "harmless", "added"), rate(d, "harmful", "baseline"),
              rate(d, "harmful", "ablated")]
        fig.add_trace(go.Bar(name=name, x=x, y=ys, marker_color=colour, text=[f"{v:.0%}" for v in ys],
                             textposition="outside", cliponaxis=False,
                             hovertemplate="%{x}<br>%{y:.0%} refused<extra>" + name + "</extra>"))
    fig.update_yaxes(range=[0, 1.1], tickformat=".0%")
    return _layout(fig, f"Steering with each direction (added × {strength:g} on harmless instructions, ablated on "
                        "harmful-style ones)", "condition", "refused (phrase match)", height=400)
