"""Figure builders (fast tier): what Streamlit's browser side does to a figure's colours."""

from __future__ import annotations

import json
import re

import numpy as np
import plotly.graph_objects as go

from app import figures

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
