"""Figures of the truth probe (SAPLMA) and TCAV: plain arrays in, Plotly out."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from . import _layout


def saplma_curve(layers: list[int], mlp: np.ndarray, logreg: np.ndarray, few_shot: float) -> go.Figure:
    """Held-out-topic accuracy per layer (mean over topics) of the MLP and the logistic probe,
    with the model's own few-shot answer and chance as horizontal lines."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=layers, y=np.asarray(mlp).tolist(), mode="lines+markers", name="MLP probe (256-128-64)",
                             marker=dict(color="#4c78a8"),
                             hovertemplate="layer %{x}<br>MLP held-out accuracy %{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=layers, y=np.asarray(logreg).tolist(), mode="lines+markers", name="logistic probe",
                             line=dict(dash="dot", color="#f58518"),
                             hovertemplate="layer %{x}<br>logistic held-out accuracy %{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[layers[0], layers[-1]], y=[few_shot, few_shot], mode="lines",
                             name="few-shot: the model's own answer", line=dict(dash="dash", color="#54a24b"),
                             hovertemplate=f"few-shot accuracy {few_shot:.3f}<extra></extra>"))
    fig.add_hline(y=0.5, line=dict(color="grey", width=1), annotation_text="chance")
    fig.update_yaxes(range=[0.3, 1.02])
    fig.update_layout(legend=dict(orientation="h", y=-0.25))
    return _layout(fig, "Truth probe: accuracy on the held-out topic (mean over the leave-one-topic-out folds)",
                   "layer (resid_post, last token)", "accuracy", height=440)


def topic_heatmap(layers: list[int], topics: list[str], acc: np.ndarray, few_shot: np.ndarray,
                  probe: str) -> go.Figure:
    """Topic x layer held-out accuracy [n_layers n_topics], centred at chance (0.5), with the
    few-shot accuracy of each topic as the last column."""
    z = np.concatenate([acc.T, np.asarray(few_shot)[:, None]], axis=1)           # [topic layer+1]
    x = [str(layer) for layer in layers] + ["few-shot"]
    fig = go.Figure(go.Heatmap(z=z.tolist(), x=x, y=topics, zmin=0.0, zmax=1.0, zmid=0.5, colorscale="RdBu",
                               text=np.round(z, 2), texttemplate="%{text:.2f}" if len(x) <= 16 else None,
                               colorbar=dict(title="accuracy"),
                               hovertemplate="held-out topic %{y}<br>layer %{x}<br>accuracy %{z:.3f}<extra></extra>"))
    fig.update_xaxes(type="category")
    return _layout(fig, f"{probe} probe: accuracy per held-out topic (blue above chance, red below)",
                   "layer", "held-out topic", height=120 + 40 * len(topics))


def tcav_bars(layers: list[int], scores: np.ndarray, random_scores: np.ndarray, p_values: np.ndarray,
              alpha: float, concept: str) -> go.Figure:
    """Per layer: the concept's mean TCAV score and the random CAVs' (mean ± one standard
    deviation, every random CAV as a dot), significance (Bonferroni) in the hover and a star."""
    x = [str(layer) for layer in layers]
    mean, rmean, rstd = scores.mean(1), random_scores.mean(1), random_scores.std(1)
    sig = np.asarray(p_values) < alpha
    fig = go.Figure()
    fig.add_trace(go.Bar(x=x, y=mean.tolist(), name=f"concept '{concept}' CAVs (mean)", marker_color="#4c78a8",
                         error_y=dict(type="data", array=scores.std(1).tolist(), visible=True, color="#1f3b5a"),
                         text=["*" if s else "" for s in sig], textposition="outside", cliponaxis=False,
                         customdata=np.stack([p_values, sig.astype(float)], 1).tolist(),
                         hovertemplate="layer %{x}<br>TCAV score %{y:.3f}<br>p = %{customdata[0]:.2g}"
                                       f" (α = {alpha:.3g})<extra></extra>"))
    fig.add_trace(go.Bar(x=x, y=rmean.tolist(), name="random CAVs (null: mean ± sd)", marker_color="#bab0ac",
                         error_y=dict(type="data", array=rstd.tolist(), visible=True, color="#6b6b6b"),
                         hovertemplate="layer %{x}<br>random CAVs' mean %{y:.3f}<extra></extra>"))
    for i, layer in enumerate(x):
        fig.add_trace(go.Scatter(x=[layer] * random_scores.shape[1], y=random_scores[i].tolist(), mode="markers",
                                 marker=dict(color="#6b6b6b", size=5, opacity=0.6), showlegend=i == 0,
                                 name="one random CAV", offsetgroup="1",
                                 hovertemplate="layer %{x}<br>random CAV score %{y:.3f}<extra></extra>"))
    fig.add_hline(y=0.5, line=dict(color="grey", width=1, dash="dot"))
    fig.update_yaxes(range=[0, 1.1])
    fig.update_xaxes(type="category")
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.25))
    return _layout(fig, "TCAV: fraction of class prompts whose target logit rises along the CAV "
                        "(* significant after Bonferroni)", "layer (resid_post)", "TCAV score", height=420)
