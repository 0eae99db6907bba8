"""Figures and HTML of the feature pages (dashboard, map, search). No Streamlit, no torch."""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from . import _layout, fmt_token


def example_html(ex: dict, scale: float, compact: bool = False, around: int = 12) -> str:
    """One corpus example as a line of tokens, each shaded by the feature's activation on it
    (orange, opacity = activation / scale); the example's own token framed; hover: value.
    compact (a narrow side panel): value and place on a line of their own above the context,
    and the context cut to `around` tokens either side of the example's token (… marks a cut)."""
    spans = []
    lo, hi = 0, len(ex["tokens"])
    if compact:
        lo, hi = max(0, ex["focus"] - around), min(hi, ex["focus"] + around + 1)
    for i, (tok, act) in enumerate(zip(ex["tokens"], ex["acts"])):
        if not lo <= i < hi:
            continue
        a = 0.0 if act is None else max(0.0, act) / scale if scale > 0 else 0.0
        title = "not encoded (window position 0)" if act is None else f"activation {act:.2f}"
        style = f"background:rgba(255,120,0,{min(a, 1.0):.2f});padding:0 1px;border-radius:2px;"
        if i == ex["focus"]:
            style += "outline:2px solid #1f4e9c;font-weight:600;"
        shown = tok.replace("\n", "⏎").replace("\t", "⇥") or "∅"
        spans.append(f"<span title='{html.escape(title)}' style='{style}'>{html.escape(shown)}</span>")
    if compact:
        cut = "<span style='color:#999'>…</span>"
        return (f"<div style='font-family:monospace;font-size:0.85em;line-height:1.8;margin-bottom:0.5em'>"
                f"<div style='color:#555'><b>{ex['value']:.2f}</b> "
                f"<span style='color:#999;font-size:0.9em'>doc {ex['doc']} · pos {ex['pos']}</span></div>"
                f"<div style='white-space:pre-wrap;overflow-wrap:anywhere'>{cut if lo > 0 else ''}"
                + "".join(spans) + f"{cut if hi < len(ex['tokens']) else ''}</div></div>")
    # the context wraps inside its own column (value and place stay at the left), so the
    # example's token is never cut off at the right edge of a narrow column
    return (f"<div style='display:flex;align-items:baseline;font-family:monospace;font-size:0.88em;line-height:1.9'>"
            f"<span style='flex:0 0 4.5em;color:#333;font-weight:600'>{ex['value']:.2f}</span>"
            f"<span style='flex:0 0 11.5em;color:#999;font-size:0.8em' "
            f"title='corpus document and token position'>doc {ex['doc']} · pos {ex['pos']}</span>"
            f"<span style='flex:1 1 auto;min-width:0;white-space:pre-wrap;overflow-wrap:anywhere'>"
            + "".join(spans) + "</span></div>")


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


MAP_COLOURS = {"density": "log10 density", "output_score": "output score", "input_score": "input score"}


def feature_map(xy: np.ndarray, density: np.ndarray | None, labels: list[str], title: str,
                selected: int = -1, colour: str = "density", scores: dict | None = None) -> go.Figure:
    """Every feature as a point (UMAP of decoder directions), coloured by log10 density, output
    score or input score (grey where not known); click a point to open that feature. The first
    trace's point index is the feature id. Hover: id, density, scores, label."""
    n = len(xy)
    ids = np.arange(n)
    scores = scores or {}
    out = scores.get("output_score", np.full(n, np.nan))
    inp = scores.get("input_score", np.full(n, np.nan))
    if density is not None:
        dens_text = [f"{d:.3%}" if d > 0 else "never active in the index" for d in np.nan_to_num(density)]
    else:
        dens_text = ["(no corpus index)"] * n
    marker = dict(size=5, color="#4c78a8", opacity=0.7)
    if colour == "density" and density is not None:
        with np.errstate(divide="ignore"):
            logd = np.where(density > 0, np.log10(np.where(density > 0, density, 1.0)), np.nan)
        floor = float(np.nanmin(logd)) - 0.5 if np.isfinite(logd).any() else -6.0
        marker = dict(size=5, color=np.where(np.isnan(logd), floor, logd), colorscale="Viridis",
                      colorbar=dict(title="log10 density"), opacity=0.8)
    elif colour in ("output_score", "input_score"):
        v = out if colour == "output_score" else inp
        marker = dict(size=5, color=np.where(np.isfinite(v), v, -0.05), cmin=-0.05, cmax=1.0,
                      colorscale=[[0.0, "#d0d0d0"], [0.047, "#d0d0d0"], [0.048, "#440154"], [0.5, "#21918c"],
                                  [1.0, "#fde725"]],
                      colorbar=dict(title=MAP_COLOURS[colour] + "<br>(grey: none)"), opacity=0.85)
    fmt = lambda a: "—" if not np.isfinite(a) else f"{a:.3f}"  # noqa: E731
    hover = [f"feature #{f}<br>{html.escape(lbl) or '—'}<br>density {d} · output score {fmt(o)} · input score {fmt(i)}"
             for f, d, lbl, o, i in zip(ids, dens_text, labels, out, inp)]
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


def score_scatter(inp: np.ndarray, out: np.ndarray, labels: list[str], title: str, selected: int = -1) -> go.Figure:
    """Input vs output score of every feature that has both (Arad et al.: they rarely coincide);
    the selected feature starred. Point customdata: the feature id."""
    ok = np.isfinite(inp) & np.isfinite(out)
    ids = np.flatnonzero(ok)
    text = [f"feature #{f}<br>{html.escape(labels[f]) or '—'}<br>input {inp[f]:.3f} · output {out[f]:.3f}" for f in ids]
    jitter = (np.random.default_rng(0).random(len(ids)) - 0.5) * 0.01     # input scores are fractions of ≤ 100
    fig = go.Figure(go.Scatter(x=inp[ids] + jitter, y=out[ids], mode="markers", customdata=ids, text=text,
                               marker=dict(size=5, color="#4c78a8", opacity=0.5), showlegend=False,
                               hovertemplate="%{text}<extra></extra>"))
    if 0 <= selected < len(inp) and ok[selected]:
        fig.add_trace(go.Scatter(x=[inp[selected]], y=[out[selected]], mode="markers", hoverinfo="skip",
                                 marker=dict(symbol="star", size=16, color="red", line=dict(color="black", width=1)),
                                 showlegend=False))
    fig.update_xaxes(range=[-0.03, 1.03])
    fig.update_yaxes(range=[-0.03, 1.03])
    return _layout(fig, f"{title} ({len(ids):,} features with both scores)", "input score (top examples' token among "
                   "the lens tokens)", "output score (adding it makes the model say its lens tokens)", height=480)


def diverging_tokens(rows_up: list[dict], rows_down: list[dict], title: str, x_title: str) -> go.Figure:
    """Tokens with the largest positive (green, top) and negative (red, bottom) values on one
    horizontal bar chart centred at 0."""
    rows = list(rows_up) + sorted(rows_down, key=lambda r: r["value"], reverse=True)
    labels = [fmt_token(r["token"]) for r in rows]
    y = list(range(len(rows)))[::-1]
    fig = go.Figure(go.Bar(x=[r["value"] for r in rows], y=y, orientation="h", showlegend=False,
                           marker_color=["#2ca02c" if r["value"] >= 0 else "#d62728" for r in rows],
                           customdata=[[lbl, r["id"]] for lbl, r in zip(labels, rows)],
                           hovertemplate="%{customdata[0]} (id %{customdata[1]}): %{x:.3f}<extra></extra>"))
    fig.update_yaxes(tickmode="array", tickvals=y, ticktext=labels)
    m = max([abs(r["value"]) for r in rows] or [1.0]) * 1.1
    fig.update_xaxes(range=[-m, m], zeroline=True, zerolinecolor="#555")
    return _layout(fig, title, x_title, "token", height=max(360, 17 * len(rows) + 120))


def token_chips(rows: list[dict], colour: str) -> str:
    """Tokens as small chips (value on hover), for the full VocabProj lists."""
    chips = "".join(f"<span title='{r['value']:.3f} (id {r['id']})' style='display:inline-block;margin:1px 2px;"
                    f"padding:0 4px;border-radius:3px;background:{colour};font-family:monospace;font-size:0.85em'>"
                    f"{html.escape(fmt_token(r['token']))}</span>" for r in rows)
    return f"<div style='line-height:1.8'>{chips}</div>"


def feature_click_overlay(fig: go.Figure, feature_ids: list[int], n_pos: int, tokens: list[str],
                          feature_labels: dict[int, str] | None = None) -> go.Figure:
    """Make each (feature, token) cell of the per-prompt feature heatmap clickable: one almost
    invisible square marker per cell on the heatmap's axes; customdata is the feature id. Hover:
    the feature's label (feature_labels), the token and the activation."""
    rows = len(feature_ids)
    yy, xx = np.mgrid[0:rows, 0:n_pos]
    labels = [html.escape(fmt_token(t)) for t in tokens]
    z = fig.data[0].z
    names = [html.escape((feature_labels or {}).get(int(f), "")) for f in feature_ids]
    fig.add_trace(go.Scatter(
        x=xx.ravel(), y=yy.ravel(), mode="markers", customdata=np.repeat(np.asarray(feature_ids), n_pos),
        text=[f"{names[r] or '(no label yet)'}<br>pos {p} {labels[p]} · activation {float(z[r][p]):.2f}"
              for r, p in zip(yy.ravel(), xx.ravel())],
        hovertemplate="feature #%{customdata} · %{text}<br>click: open its dashboard<extra></extra>",
        marker=dict(symbol="square", size=12, opacity=0.01, color="black"), showlegend=False,
        selected=dict(marker=dict(opacity=0.5, color="red")), unselected=dict(marker=dict(opacity=0.01))),
        row=1, col=1)
    fig.data[0].hoverinfo = "skip"
    fig.update_layout(clickmode="event+select", dragmode=False)
    return fig
