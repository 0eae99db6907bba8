"""The circuit graph figure: nodes laid out by layer, edges by score. No Streamlit, no torch."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

POS_COLOR, NEG_COLOR = "#2166ac", "#b2182b"   # RdBu ends: positive blue, negative red


def node_xy(name: str, n_layers: int, n_heads: int) -> tuple[float, float]:
    """input at the left (x = -1), logits at the right (x = n_layers); head A{l}.{h} at
    (l, h); MLP M{l} at (l + 0.4, n_heads) above the heads of its layer."""
    if name == "input":
        return -1.0, (n_heads - 1) / 2
    if name == "logits":
        return float(n_layers), (n_heads - 1) / 2
    if name.startswith("A"):
        layer, head = name[1:].split(".")
        return float(layer), float(head)
    return float(name[1:]) + 0.4, float(n_heads)


def _label(name: str) -> str:
    if name.startswith("A"):
        layer, head = name[1:].split(".")
        return f"head L{layer}H{head}"
    if name.startswith("M"):
        return f"MLP L{name[1:]}"
    return {"input": "embeddings", "logits": "logits"}.get(name, name)


def circuit_graph(nodes: list[str], edge_from, edge_to, edge_score, n_layers: int, n_heads: int,
                  title: str) -> tuple[go.Figure, list[str]]:
    """The figure and the list of clickable items in point order of the clickable traces:
    trace "nodes" (curve 0 of the returned `items` map) and trace "edges" (midpoints).

    Returns (fig, items) where items[i] is "node:<name>" or "edge:<from>-><to>" for the i-th
    point across the two selectable traces (nodes first, then edge midpoints)."""
    fig = go.Figure()
    scores = np.asarray(edge_score, dtype=float)
    top = float(np.abs(scores).max()) if scores.size else 1.0
    # edges: one line trace per (sign, width bin) so widths vary without one trace per edge
    bins = np.minimum((np.abs(scores) / (top or 1.0) * 5).astype(int), 4) if scores.size else np.array([], int)
    for sign, color in ((1, POS_COLOR), (-1, NEG_COLOR)):
        for b in range(5):
            xs, ys = [], []
            for u, d, s, k in zip(edge_from, edge_to, scores, bins):
                if k != b or (s >= 0) != (sign > 0):
                    continue
                (x0, y0), (x1, y1) = node_xy(str(u), n_layers, n_heads), node_xy(str(d), n_layers, n_heads)
                xs += [x0, x1, None]
                ys += [y0, y1, None]
            if xs:
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                         line=dict(color=color, width=0.8 + 1.6 * b), opacity=0.55))
    # clickable nodes
    nx, ny = zip(*(node_xy(n, n_layers, n_heads) for n in nodes)) if nodes else ((), ())
    kind_sym = ["square" if n.startswith("M") else "diamond" if n in ("input", "logits") else "circle" for n in nodes]
    fig.add_trace(go.Scatter(
        x=list(nx), y=list(ny), mode="markers+text", name="nodes", showlegend=False,
        text=[n for n in nodes], textposition="top center", textfont=dict(size=9),
        marker=dict(size=13, color="#444", symbol=kind_sym, line=dict(color="white", width=1)),
        customdata=[_label(n) for n in nodes],
        hovertemplate="%{customdata}<br>click: remove this node and rerun<extra></extra>",
        selected=dict(marker=dict(color="orange")), unselected=dict(marker=dict(opacity=1))))
    # clickable edge midpoints
    mx, my, hover = [], [], []
    for u, d, s in zip(edge_from, edge_to, scores):
        (x0, y0), (x1, y1) = node_xy(str(u), n_layers, n_heads), node_xy(str(d), n_layers, n_heads)
        mx.append((x0 + x1) / 2)
        my.append((y0 + y1) / 2)
        hover.append(f"{_label(str(u))} → {_label(str(d))}<br>score {s:+.4f}")
    fig.add_trace(go.Scatter(
        x=mx, y=my, mode="markers", name="edges", showlegend=False, customdata=hover,
        marker=dict(size=7, symbol="circle-open", color=[POS_COLOR if s >= 0 else NEG_COLOR for s in scores]),
        hovertemplate="%{customdata}<br>click: remove this edge and rerun<extra></extra>",
        selected=dict(marker=dict(color="orange")), unselected=dict(marker=dict(opacity=0.7))))
    fig.update_xaxes(title="layer (embeddings at the left, logits at the right)", range=[-1.6, n_layers + 0.8],
                     tickmode="array", tickvals=[-1] + list(range(0, n_layers, 2)) + [n_layers],
                     ticktext=["emb"] + [str(i) for i in range(0, n_layers, 2)] + ["logits"], zeroline=False)
    fig.update_yaxes(title="head (MLP on top)", tickmode="array", tickvals=list(range(n_heads)) + [n_heads],
                     ticktext=[f"H{h}" for h in range(n_heads)] + ["MLP"], range=[-0.8, n_heads + 0.9],
                     zeroline=False)
    fig.update_layout(title=dict(text=title, x=0.01), height=520, margin=dict(l=70, r=20, t=60, b=60),
                      clickmode="event+select", dragmode=False, hoverlabel=dict(font_family="monospace"),
                      plot_bgcolor="white")
    items = [f"node:{n}" for n in nodes] + [f"edge:{u}->{d}" for u, d in zip(edge_from, edge_to)]
    return fig, items


def clicked_item(points: list[dict], fig: go.Figure, items: list[str]) -> str | None:
    """The item ("node:..." / "edge:...") of the first selected point, from its trace and index."""
    names = [t.name for t in fig.data]
    n_nodes = len(fig.data[names.index("nodes")].x)
    for p in points:
        curve = p.get("curve_number", p.get("curveNumber"))
        idx = p.get("point_index", p.get("pointIndex", p.get("point_number")))
        if curve is None or idx is None or curve >= len(names):
            continue
        if names[curve] == "nodes":
            return items[idx]
        if names[curve] == "edges":
            return items[n_nodes + idx]
    return None


ABLATION_METRIC_LABELS = {"logit_diff": "logit difference", "prob": "probability", "kl": "KL"}


def ablation_heatmap(rows: list[dict], title: str) -> go.Figure:
    """The 18 faithfulness values of a circuit: rows ablation x direction, columns metric."""
    metrics = list(ABLATION_METRIC_LABELS)
    keys = [(a, d) for a in ("resample", "mean", "zero") for d in ("denoising", "noising")]
    val = {(r["ablation"], r["direction"], r["metric"]): r["faithfulness"] for r in rows}
    z = [[val.get((a, d, m)) for m in metrics] for a, d in keys]
    text = [["undefined" if v is None else f"{0.0 if abs(v) < 5e-4 else v:.3f}" for v in row] for row in z]
    # signed: centred at 0 (red: the circuit pushes against the effect), symmetric, 1 = the full effect
    top = max([1.0] + [abs(v) for row in z for v in row if v is not None])
    fig = go.Figure(go.Heatmap(
        z=[[float("nan") if v is None else v for v in row] for row in z],
        x=[ABLATION_METRIC_LABELS[m] for m in metrics], y=[f"{a} · {d}" for a, d in keys],
        text=text, texttemplate="%{text}", colorscale="RdBu", zmid=0.0, zmin=-top, zmax=top,
        colorbar={"title": "faithfulness<br>(1 = full effect)"},
        hovertemplate="ablation · direction: %{y}<br>metric: %{x}<br>faithfulness: %{text}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="metric", yaxis_title="ablation of the edges outside · direction",
                      yaxis={"autorange": "reversed"}, height=420, margin={"l": 200})
    return fig


def method_curves_figure(curves: dict, title: str) -> go.Figure:
    """Faithfulness (logit difference) against circuit edges for EAP, EAP-IG (top-n curves) and ACDC (points)."""
    fig = go.Figure()
    for method, c in curves.items():
        fig.add_trace(go.Scatter(
            x=c["edges"], y=c["faithfulness"], name=method.upper(), mode="markers" if method == "acdc" else "lines+markers",
            marker={"size": 12 if method == "acdc" else 6, "symbol": "star" if method == "acdc" else "circle"},
            text=c.get("labels"),
            hovertemplate=method.upper() + "<br>edges: %{x}<br>faithfulness: %{y:.3f}<br>%{text}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="edges in the circuit (after pruning)", yaxis_title="faithfulness (logit difference)",
                      xaxis_type="log", height=420)
    return fig
