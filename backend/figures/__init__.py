"""Plotly figure builders: plain arrays in, figures out. No Streamlit, no torch.

Below both the app (the pages draw with them) and the backend (`backend.export` and the pages'
download buttons build a stored result's figures through `exports.figures_for`). This module holds
the shared builders and helpers; one submodule per page family (`attribution`, `circuits`, `das`,
`features`, `graph`, `neuron`, `probe_studies`, `probes`, `steering`) and `exports` (kind ->
figures). Importing it never imports torch or streamlit (tests/test_boundaries.py checks).
"""

from __future__ import annotations

import html

import numpy as np
import plotly.colors
import plotly.graph_objects as go

SEQUENTIAL = "Viridis"
DIVERGING = "RdBu"
# Streamlit's Plotly theme writes colours #000000-#0000ff into its template as placeholders and
# swaps them for theme colours in the browser, so a figure's own colour in that range is swapped
# too: Plotly's Inferno starts at #000004, and the smallest values came out pink. Plotly's scale
# with that stop nudged off the placeholders (tests/test_figures.py checks the heatmaps using it).
INFERNO = [[i / (len(plotly.colors.sequential.Inferno) - 1), "#010105" if c == "#000004" else c]
           for i, c in enumerate(plotly.colors.sequential.Inferno)]


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


def mark_position(fig: go.Figure, pos: int | None) -> go.Figure:
    """Dotted lines around one token's column (a position a link points at)."""
    if pos is not None:
        fig.add_vrect(x0=pos - 0.5, x1=pos + 0.5, line=dict(color="red", width=2, dash="dot"))
    return fig


def logit_lens_top(tokens: list[str], layer_labels: list[str], probs: np.ndarray,
                   top_tokens: np.ndarray, mark: int | None = None) -> go.Figure:
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
    mark_position(fig, mark)
    return _layout(fig, "Logit lens: top token at each layer's residual stream", "input token (position)",
                   "layer (output of block; embed = input)", height=max(420, 18 * n_rows + 140))


def logit_lens_token(tokens: list[str], layer_labels: list[str], probs: np.ndarray, ranks: np.ndarray,
                     token: str, mark: int | None = None) -> go.Figure:
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
    mark_position(fig, mark)
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


METRIC_LABELS = {"logit_diff_norm": "normalised logit difference (0 = corrupted, 1 = clean)",
                 "logit_diff": "logit difference (answer − wrong)", "prob": "probability of the answer",
                 "kl": "KL(clean ‖ patched), nats"}


def patching_heatmap(values: np.ndarray, rows: list[int], cols: list, col_title: str, metric: str,
                     title: str, col_labels: list[str] | None = None) -> go.Figure:
    """Layer × (position | head) patching result; click a cell to run that patch live.

    Signed metrics get a diverging scale centred at 0; KL and probability a sequential one.
    """
    signed = metric in ("logit_diff_norm", "logit_diff")
    bound = float(np.nanmax(np.abs(values))) if values.size else 1.0
    fig = go.Figure(go.Heatmap(
        z=values, x=list(range(len(cols))), y=list(range(len(rows))),
        colorscale=DIVERGING if signed else SEQUENTIAL, zmid=0 if signed else None,
        zmin=-bound if signed else 0, zmax=bound if signed else None,
        colorbar=dict(title=dict(text=METRIC_LABELS.get(metric, metric), side="right"))))
    labels = col_labels or [str(c) for c in cols]
    hover = np.array([[f"layer {r} · {col_title} {html.escape(labels[j])}" for j in range(len(cols))] for r in rows])
    click_layer(fig, values, "%{text}<br>value %{customdata:.3f}<br>click: run this patch<extra></extra>")
    fig.data[1].text = hover.ravel()
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(cols))), ticktext=labels, tickangle=-45)
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(rows))), ticktext=[str(r) for r in rows])
    return _layout(fig, title, col_title, "layer", height=max(450, 16 * len(rows) + 160))


def before_after_bars(top_before: list[dict], top_after: list[dict], answer: str, wrong: str) -> go.Figure:
    """Top next tokens of the unpatched and the patched run, side by side."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("before the patch", "after the patch"),
                        horizontal_spacing=0.18)
    for c, top in enumerate((top_before, top_after), start=1):
        toks = [fmt_token(t["token"]) for t in top][::-1]
        probs = [t["prob"] for t in top][::-1]
        colours = ["#2ca02c" if t["token"] == answer else "#d62728" if t["token"] == wrong else "#4c78a8"
                   for t in top][::-1]
        fig.add_trace(go.Bar(x=probs, y=toks, orientation="h", marker_color=colours, showlegend=False,
                             hovertemplate="%{y}: p = %{x:.4f}<extra></extra>"), row=1, col=c)
        fig.update_xaxes(title_text="probability", range=[0, 1], row=1, col=c)
    return _layout(fig, "Top next tokens (green: answer, red: wrong answer)", "", "", height=360)


def massive_heatmap(tokens: list[str], pos_max: np.ndarray, median: np.ndarray) -> go.Figure:
    """Layer × token of the largest |activation| in the residual stream, log colour scale."""
    n_layers, n_pos = pos_max.shape
    logz = np.log10(np.maximum(pos_max, 1e-6))
    ratio = pos_max / np.maximum(median[:, None], 1e-30)
    labels = np.array([html.escape(fmt_token(t)) for t in tokens])
    custom = np.stack([np.broadcast_to(labels, pos_max.shape), pos_max.round(1).astype(str),
                       ratio.round(0).astype(int).astype(str)], axis=-1)
    ticks = [v for v in range(-1, 6) if logz.min() - 1 <= v <= logz.max() + 1]
    fig = go.Figure(go.Heatmap(
        z=logz, x=list(range(n_pos)), y=list(range(n_layers)), colorscale=INFERNO, customdata=custom,
        colorbar=dict(title="max |value|", tickvals=ticks, ticktext=[f"{10.0 ** v:g}" for v in ticks]),
        hovertemplate="layer %{y} · pos %{x} %{customdata[0]}<br>max |value| %{customdata[1]}"
                      "<br>× layer median: %{customdata[2]}<extra></extra>"))
    fig.update_xaxes(**token_ticks(tokens), tickangle=-45)
    return _layout(fig, "Largest |activation| in the residual stream (after each block), log scale",
                   "token (position)", "layer", height=max(450, 16 * n_layers + 160))


def massive_top3(top_values: np.ndarray, median: np.ndarray, top_dims: np.ndarray, top_pos: np.ndarray,
                 tokens: list[str]) -> go.Figure:
    """The paper's plot: top-3 |values| per layer against the layer median (log y)."""
    layers = list(range(len(median)))
    fig = go.Figure()
    for i, colour in zip(range(top_values.shape[1]), ["#d62728", "#ff7f0e", "#bcbd22"]):
        text = [f"dim {top_dims[l, i]} at pos {top_pos[l, i]} {html.escape(fmt_token(tokens[top_pos[l, i]]))}"
                f"<br>value {top_values[l, i]:.1f} · {abs(top_values[l, i]) / max(median[l], 1e-30):.0f}× median"
                for l in layers]
        fig.add_trace(go.Scatter(x=layers, y=np.abs(top_values[:, i]), mode="lines+markers", name=f"top {i + 1}",
                                 line=dict(color=colour), text=text,
                                 hovertemplate="layer %{x}<br>%{text}<extra></extra>"))
    fig.add_trace(go.Scatter(x=layers, y=median, mode="lines+markers", name="median", line=dict(color="#1f77b4"),
                             hovertemplate="layer %{x}<br>median |value| %{y:.2f}<extra></extra>"))
    fig.update_yaxes(type="log", dtick=1)   # powers of ten only (the 2 and 5 between them crowd the axis)
    return _layout(fig, "Top-3 |activations| per layer vs the layer median", "layer", "|value| (log)", height=420)


def massive_dims(tokens: list[str], dims: np.ndarray, dim_values: np.ndarray, rest_max: np.ndarray,
                 layer: int) -> go.Figure:
    """Token × dimension magnitudes at one layer: the few largest dims, then the max of the rest."""
    z = np.vstack([np.abs(dim_values), rest_max[None, :]])
    rows = [f"dim {d}" for d in dims] + ["other dims (max)"]
    logz = np.log10(np.maximum(z, 1e-6))
    custom = np.array([[f"{rows[r]} · pos {p} {html.escape(fmt_token(tokens[p]))}<br>value "
                        f"{(dim_values[r, p] if r < len(dims) else rest_max[p]):.2f}"
                        for p in range(len(tokens))] for r in range(len(rows))])
    ticks = [v for v in range(-1, 6) if logz.min() - 1 <= v <= logz.max() + 1]
    fig = go.Figure(go.Heatmap(z=logz, x=list(range(len(tokens))), y=list(range(len(rows))), colorscale=INFERNO,
                               customdata=custom, hovertemplate="%{customdata}<extra></extra>",
                               colorbar=dict(title="|value|", tickvals=ticks,
                                             ticktext=[f"{10.0 ** v:g}" for v in ticks])))
    fig.update_xaxes(**token_ticks(tokens), tickangle=-45)
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(rows))), ticktext=rows, autorange="reversed")
    return _layout(fig, f"Layer {layer}: |value| of the largest dimensions at each token", "token (position)",
                   "dimension", height=max(330, 26 * len(rows) + 160))


def sink_heatmap(share: np.ndarray, sink_tokens: str) -> go.Figure:
    n_layers, n_heads = share.shape
    fig = go.Figure(go.Heatmap(z=share, x=list(range(n_heads)), y=list(range(n_layers)), zmin=0, zmax=1,
                               colorscale=SEQUENTIAL, colorbar=dict(title="share"),
                               hovertemplate="layer %{y} head %{x}<br>attention to massive tokens %{z:.3f}"
                                             "<extra></extra>"))
    fig.update_xaxes(dtick=1)
    return _layout(fig, f"Attention sink: share of attention to {sink_tokens}", "head", "layer",
                   height=max(420, 16 * n_layers + 140))


def feature_heatmap(tokens: list[str], feature_ids: np.ndarray, feature_values: np.ndarray,
                    recon_error: np.ndarray, n_features: int = 24) -> go.Figure:
    """Token × feature activations for the features most active on the prompt, plus reconstruction error."""
    from plotly.subplots import make_subplots

    # rank and scale by positions after the first: position 0 carries the massive activations,
    # whose latents would otherwise swamp the figure (they saturate the scale instead)
    skip = 1 if len(tokens) > 1 else 0
    totals: dict[int, float] = {}
    for fs, vs in zip(feature_ids[skip:].tolist(), feature_values[skip:].tolist()):
        for f, v in zip(fs, vs):
            if v > 0:
                totals[f] = max(totals.get(f, 0.0), v)
    feats = sorted(totals, key=totals.get, reverse=True)[:n_features]
    z = np.zeros((len(feats), len(tokens)), np.float32)
    index = {f: i for i, f in enumerate(feats)}
    for p, (fs, vs) in enumerate(zip(feature_ids.tolist(), feature_values.tolist())):
        for f, v in zip(fs, vs):
            if f in index:
                z[index[f], p] = v
    fig = make_subplots(rows=2, cols=1, row_heights=[0.8, 0.2], shared_xaxes=True, vertical_spacing=0.04)
    labels = np.array([html.escape(fmt_token(t)) for t in tokens])
    zmax = float(z[:, skip:].max()) if z[:, skip:].size and z[:, skip:].max() > 0 else None
    fig.add_trace(go.Heatmap(z=z, x=list(range(len(tokens))), y=list(range(len(feats))), colorscale="Blues",
                             zmin=0, zmax=zmax,
                             customdata=np.broadcast_to(labels, z.shape),
                             colorbar=dict(title="activation", len=0.75, y=0.62),
                             hovertemplate="feature %{text}<br>pos %{x} %{customdata}<br>activation %{z:.2f}"
                                           "<extra></extra>",
                             text=np.repeat(np.array([str(f) for f in feats])[:, None], len(tokens), 1)),
                  row=1, col=1)
    fig.add_trace(go.Bar(x=list(range(len(tokens))), y=recon_error, marker_color="#d62728", customdata=labels,
                         showlegend=False, hovertemplate="pos %{x} %{customdata}<br>error %{y:.3f}<extra></extra>"),
                  row=2, col=1)
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(feats))), ticktext=[f"#{f}" for f in feats],
                     autorange="reversed", title_text="feature", row=1, col=1)
    fig.update_yaxes(title_text="‖x−x̂‖²/‖x‖²", row=2, col=1)
    fig.update_xaxes(**token_ticks(tokens), tickangle=-45, title_text="token (position)", row=2, col=1)
    fig.update_layout(title=dict(text="SAE features active on the prompt (ranked after position 0) and reconstruction error",
                                 x=0.01), margin=dict(l=70, r=20, t=60, b=70),
                      height=max(520, 20 * len(feats) + 300))
    return fig


def neuron_heatmap(tokens: list[str], neuron_ids: np.ndarray, acts: np.ndarray, layer: int) -> go.Figure:
    """Neuron × token activations of the prompt's most active neurons; click a row to inspect one."""
    z = acts.T  # [neuron pos]
    bound = float(np.abs(z).max()) or 1.0
    fig = go.Figure(go.Heatmap(z=z, x=list(range(len(tokens))), y=list(range(len(neuron_ids))),
                               colorscale=DIVERGING, zmid=0, zmin=-bound, zmax=bound,
                               colorbar=dict(title="activation")))
    labels = np.array([html.escape(fmt_token(t)) for t in tokens])
    click_layer(fig, z, "%{text}<br>activation %{customdata:.3f}<br>click: this neuron's logit effect<extra></extra>")
    fig.data[1].text = np.array([[f"L{layer}N{n} · pos {p} {labels[p]}" for p in range(len(tokens))]
                                 for n in neuron_ids]).ravel()
    fig.update_xaxes(**token_ticks(tokens), tickangle=-45)
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(neuron_ids))),
                     ticktext=[f"N{n}" for n in neuron_ids], autorange="reversed")
    return _layout(fig, f"Layer {layer}: the prompt's most active MLP neurons (SiLU-gated: signed)",
                   "token (position)", "neuron", height=max(450, 18 * len(neuron_ids) + 160))


def logit_effect_bars(promoted: list[dict], suppressed: list[dict], title: str) -> go.Figure:
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("promoted", "suppressed"), horizontal_spacing=0.2)
    for c, rows, colour in ((1, promoted, "#2ca02c"), (2, suppressed, "#d62728")):
        fig.add_trace(go.Bar(x=[r["value"] for r in rows][::-1], y=[fmt_token(r["token"]) for r in rows][::-1],
                             orientation="h", marker_color=colour, showlegend=False,
                             hovertemplate="%{y}: %{x:.3f}<extra></extra>"), row=1, col=c)
        fig.update_xaxes(title_text="direct logit effect", row=1, col=c)
    return _layout(fig, title, "", "", height=max(380, 18 * len(promoted) + 120))


def atp_scatter(exact: np.ndarray, atp: np.ndarray, labels: list[str], r: float) -> go.Figure:
    """Exact patching vs its attribution-patching estimate, one point per cell, with y = x."""
    x, y = exact.ravel(), atp.ravel()
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    fig = go.Figure([go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="#999", dash="dash"),
                                name="y = x", hoverinfo="skip"),
                     go.Scatter(x=x, y=y, mode="markers", text=labels, name="cells",
                                marker=dict(size=6, color=np.abs(y - x), colorscale="Reds",
                                            colorbar=dict(title="|AtP − exact|")),
                                hovertemplate="%{text}<br>exact %{x:.3f}<br>AtP %{y:.3f}<extra></extra>")])
    fig.update_layout(showlegend=False)
    return _layout(fig, f"Attribution patching vs exact patching (Pearson r = {r:.3f}; dashed: y = x)", "exact patching",
                   "AtP estimate", height=460)


def atp_star_scatter(exact: np.ndarray, plain: np.ndarray, fixed: np.ndarray, labels: list[str],
                     r_plain: float, r_fixed: float) -> go.Figure:
    """Exact patching vs plain AtP and vs AtP with the QK fix, one point per cell and method."""
    x = exact.ravel()
    lo = float(min(x.min(), plain.min(), fixed.min()))
    hi = float(max(x.max(), plain.max(), fixed.max()))
    fig = go.Figure([go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="#999", dash="dash"),
                                name="y = x", hoverinfo="skip")])
    for y, name, color, sym in ((plain.ravel(), f"AtP (r = {r_plain:.3f})", "#d62728", "circle-open"),
                                (fixed.ravel(), f"AtP* QK fix (r = {r_fixed:.3f})", "#1f77b4", "circle")):
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers", text=labels, name=name,
                                 marker=dict(size=7, color=color, symbol=sym),
                                 hovertemplate="%{text}<br>exact %{x:.3f}<br>" + name.split(" (")[0]
                                 + " %{y:.3f}<extra></extra>"))
    fig.update_layout(legend=dict(orientation="h", y=-0.2))
    return _layout(fig, "AtP and AtP* against exact patching (dashed: y = x)", "exact patching (change)",
                   "estimated change", height=480)
