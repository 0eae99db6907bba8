"""Figure builders (fast tier): what Streamlit's browser side does to a figure's colours."""

from __future__ import annotations

import json
import re

import numpy as np
import plotly.graph_objects as go

from backend import figures

# Streamlit's Plotly theme uses these as placeholders that the browser replaces with theme colours
PLACEHOLDER = re.compile(r"#0000[0-9a-fA-F]{2}\b")


def _placeholders(fig) -> list[str]:
    """Placeholder colours in the figure's own traces and layout (the template, which is
    Streamlit's own once streamlit is imported, is where they belong)."""
    d = fig.to_plotly_json()
    d["layout"].pop("template", None)
    return PLACEHOLDER.findall(json.dumps(d, default=str))


def test_massive_figures_use_no_streamlit_placeholder_colour():
    rng = np.random.default_rng(0)
    tokens = ["<s>", "When", " Mary", " and"]
    pos_max = 10 ** rng.uniform(0.5, 4, (6, 4))
    heat = figures.massive_heatmap(tokens, pos_max, np.median(pos_max, axis=1))
    dims = figures.massive_dims(tokens, np.array([507, 12]), rng.normal(0, 100, (2, 4)), np.abs(rng.normal(0, 5, 4)), 3)
    for fig in (heat, dims):
        assert _placeholders(fig) == [], "a colour Streamlit swaps for a theme colour (the low end turned pink)"
    # the check can fail: Plotly's own Inferno starts on a placeholder
    assert _placeholders(go.Figure(go.Heatmap(z=[[0, 1]], colorscale="Inferno")))
    assert heat.data[0].colorscale[0][1] != "#000004" and len(heat.data[0].colorscale) == 10


def test_token_attribution_figures_centre_signed_scores_at_zero_and_never_round_a_gap_to_1_percent():
    from backend.figures.attribution import layer_heatmap, pct, token_scores

    tokens = ["The", " capital", " of", " France", " is"]
    scores = np.array([0.0, 0.85, 4.92, 3.79, -3.15])
    strip = token_scores(tokens, scores, "integrated-gradients", "logit(␣Paris)", [0])
    h = strip.data[0]
    assert h.zmid == 0 and h.zmin == -h.zmax == -4.92 and h.z[0] == list(scores)
    assert token_scores(tokens, np.abs(scores), "saliency", "logit(␣Paris)").data[0].zmin == 0
    layers = np.vstack([scores, scores * 2, np.r_[40.0, scores[1:]]])     # position 0 massive in one row
    fig = layer_heatmap(tokens, layers, "input-x-gradient", "logit(␣Paris)")
    assert fig.data[0].zmid == 0 and fig.data[0].zmax == 9.84 and "position 0 saturates" in fig.layout.title.text
    assert len(fig.data[1].x) == layers.size and fig.layout.clickmode == "event+select"
    assert list(fig.layout.xaxis.ticktext) == ["The", "␣capital", "␣of", "␣France", "␣is"]
    assert fig.layout.yaxis.title.text and fig.layout.xaxis.title.text
    for f in (strip, fig):
        assert _placeholders(f) == []
    assert pct(0.01004) == "1.004 %" and pct(0.0100001) == "1.00001 %" and pct(0.397) == "39.7 %"
    assert pct(0.01) == "1.0 %" and pct(0.0049) == "0.49 %" and pct(1e-6) == "0.0001 %"
