"""The attribution-graph figure: nodes by layer (rows) and token (columns). No Streamlit, no torch."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

POS_COLOR, NEG_COLOR = "#2166ac", "#b2182b"          # RdBu ends: excitatory blue, inhibitory red
KIND_COLOR = {"feature": "#4c78a8", "error": "#9d9d9d", "embedding": "#54a24b", "logit": "#f58518"}
KIND_SYMBOL = {"feature": "circle", "error": "square", "embedding": "diamond", "logit": "star"}
MAX_EDGES_DRAWN = 400


def node_positions(nodes: list[dict], n_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """x = token position (nodes of one cell spread across ±0.4), y = layer (embeddings -1,
    logits n_layers)."""
    cells: dict[tuple[int, int], list[int]] = {}
    for i, n in enumerate(nodes):
        y = -1 if n["kind"] == "embedding" else (n_layers if n["kind"] == "logit" else n["layer"])
        cells.setdefault((y, n["pos"]), []).append(i)
    x, y = np.zeros(len(nodes)), np.zeros(len(nodes))
    for (row, pos), members in cells.items():
        members.sort(key=lambda i: -nodes[i]["influence"])
        k = len(members)
        for j, i in enumerate(members):
            x[i] = pos + (0 if k == 1 else (j / (k - 1) - 0.5) * min(0.8, 0.12 * k))
            y[i] = row
    return x, y


def _hover(n: dict) -> str:
    act = "" if n["activation"] is None else (f"<br>probability {n['activation']:.3f}" if n["kind"] == "logit"
                                                 else f"<br>activation {n['activation']:.3f}")
    where = "" if n["kind"] in ("embedding", "logit") else f"<br>layer {n['layer']}, position {n['pos']}"
    return (f"<b>{n['id']}</b> ({n['kind']})<br>{n['label']}{where}{act}"
            f"<br>influence {n['influence']:.4f}")


def graph_figure(nodes: list[dict], src, dst, weight, tokens: list[str], n_layers: int, title: str,
                 pinned: set[str] = frozenset(), selected: str = "", groups: dict[str, str] | None = None) -> go.Figure:
    """The pruned graph. Edges: the MAX_EDGES_DRAWN largest |weight| (blue +, red −, width by
    |weight|); nodes sized by influence, coloured by kind (or by supernode), pinned ones ringed.
    The node trace is named "nodes": its point index is the node's index."""
    groups = groups or {}
    x, y = node_positions(nodes, n_layers)
    w = np.asarray(weight, dtype=float)
    order = np.argsort(-np.abs(w))[:MAX_EDGES_DRAWN]
    top = float(np.abs(w[order]).max()) if len(order) else 1.0
    fig = go.Figure()
    for sign, color in ((1, POS_COLOR), (-1, NEG_COLOR)):
        for b in range(4):
            xs, ys = [], []
            for e in order:
                s = w[e]
                k = min(int(abs(s) / (top or 1.0) * 4), 3)
                if k != b or (s >= 0) != (sign > 0):
                    continue
                xs += [float(x[src[e]]), float(x[dst[e]]), None]
                ys += [float(y[src[e]]), float(y[dst[e]]), None]
            if xs:
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                         line=dict(color=color, width=0.5 + 1.5 * b), opacity=0.25 + 0.15 * b))
    inf = np.array([n["influence"] for n in nodes], dtype=float)
    size = (7 + 22 * np.sqrt(inf / (inf.max() or 1.0))).tolist()
    palette = ["#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#ff9da6", "#9d755d"]
    gnames = sorted(set(groups.values()))
    color = [palette[gnames.index(groups[n["id"]]) % len(palette)] if n["id"] in groups else KIND_COLOR[n["kind"]]
             for n in nodes]
    line_w = [3 if n["id"] == selected else (2 if n["id"] in pinned else 0.5) for n in nodes]
    line_c = ["black" if n["id"] == selected else ("#d62728" if n["id"] in pinned else "white") for n in nodes]
    fig.add_trace(go.Scatter(
        x=x.tolist(), y=y.tolist(), mode="markers", name="nodes", showlegend=False,
        marker=dict(size=size, color=color, symbol=[KIND_SYMBOL[n["kind"]] for n in nodes],
                    line=dict(width=line_w, color=line_c)),
        customdata=[_hover(n) + (f"<br>supernode {groups[n['id']]}" if n["id"] in groups else "") for n in nodes],
        hovertemplate="%{customdata}<br><i>click: details, pin, intervene</i><extra></extra>",
        selected=dict(marker=dict(opacity=1)), unselected=dict(marker=dict(opacity=1))))
    for kind, c in KIND_COLOR.items():        # legend entries only
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=kind, hoverinfo="skip",
                                 marker=dict(color=c, symbol=KIND_SYMBOL[kind], size=10)))
    T = len(tokens)
    fig.update_xaxes(title="token (position)", tickmode="array", tickvals=list(range(T)),
                     ticktext=[f"{t!r}"[1:-1] or "·" for t in tokens], range=[-0.6, T - 0.4], zeroline=False,
                     showgrid=True, gridcolor="#eee")
    ticks = [-1] + list(range(0, n_layers, 3)) + [n_layers]
    fig.update_yaxes(title="layer (embeddings at the bottom, logits on top)", tickmode="array", tickvals=ticks,
                     ticktext=["emb"] + [str(t) for t in ticks[1:-1]] + ["logits"], range=[-1.8, n_layers + 0.9],
                     zeroline=False, showgrid=True, gridcolor="#f3f3f3")
    fig.update_layout(title=dict(text=title, x=0.01), height=640, margin=dict(l=70, r=20, t=60, b=70),
                      clickmode="event+select", dragmode=False, plot_bgcolor="white",
                      legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"),
                      hoverlabel=dict(font_family="monospace"))
    return fig


def clicked_node(points: list[dict], fig: go.Figure) -> int | None:
    """The node index of the first selected point on the "nodes" trace."""
    names = [t.name for t in fig.data]
    for p in points:
        curve = p.get("curve_number", p.get("curveNumber"))
        idx = p.get("point_index", p.get("pointIndex", p.get("point_number")))
        if curve is not None and idx is not None and curve < len(names) and names[curve] == "nodes":
            return int(idx)
    return None


def intervention_figure(before: list[dict], after: list[dict], title: str) -> go.Figure:
    """Top next tokens before and after an intervention, side by side (probabilities)."""
    toks = list(dict.fromkeys([d["token"] for d in before] + [d["token"] for d in after]))[:15]
    pb = {d["token"]: d["prob"] for d in before}
    pa = {d["token"]: d["prob"] for d in after}
    labels = [f"{t!r}" for t in toks]
    fig = go.Figure([go.Bar(name="before", x=labels, y=[pb.get(t, 0) for t in toks], marker_color="#9d9d9d",
                            hovertemplate="%{x}: p = %{y:.4f} before<extra></extra>"),
                     go.Bar(name="after", x=labels, y=[pa.get(t, 0) for t in toks], marker_color="#f58518",
                            hovertemplate="%{x}: p = %{y:.4f} after<extra></extra>")])
    fig.update_layout(barmode="group", title=dict(text=title, x=0.01), height=340, yaxis_title="probability",
                      xaxis_title="next token (top 10 before and after; 0 where it left the top 10)",
                      margin=dict(l=60, r=20, t=50, b=60), plot_bgcolor="white")
    return fig
