"""Massive activations (Sun et al. 2024): where the huge residual-stream scalars sit, and sinks."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from backend import MassiveSpec

from .. import figures
from ..common import check_link_key, fetch, make_spec, navigate, synced
from ..state import View


def render(view: View) -> View:
    st.header("Massive activations")
    st.caption("A few residual-stream scalars are orders of magnitude larger than the rest, sit in fixed "
               "dimensions, and appear at the first token and at delimiters (Sun et al. 2024).")
    with st.form("massive_form"):
        c1, c2, c3 = st.columns([1, 1, 1])
        abs_thr = c1.number_input("criterion: |value| ≥", value=float(view.abs_thr), step=10.0)
        ratio_thr = c2.number_input("and ≥ × layer median", value=float(view.ratio_thr), step=100.0)
        if c3.form_submit_button("Apply criterion"):
            if (abs_thr, ratio_thr) != (view.abs_thr, view.ratio_thr):
                navigate(view.replace(abs_thr=abs_thr, ratio_thr=ratio_thr, key=""))
    spec = make_spec(MassiveSpec, model=view.model, text=view.text, abs_threshold=view.abs_thr,
                     ratio_threshold=view.ratio_thr)
    if spec is None or not check_link_key(view, spec):
        return view
    out = fetch(spec, "massive-activation scan")
    if out is None:
        return view
    view = view.replace(key=out.run_key)
    r = out.result
    ratios = r.top_ratios()[:, 0]
    if r.massive:
        st.success(f"{len(r.massive)} massive activation(s) from layer {r.first_layer} on, in dimension(s) "
                   f"{', '.join(map(str, r.massive_dims[:6]))}, at token(s) "
                   f"{', '.join(f'{p}:{figures.fmt_token(r.tokens[p])}' for p in r.sink_positions[:8])}.")
    else:
        st.info(f"No activation meets the criterion (|value| ≥ {r.abs_threshold:g} and ≥ {r.ratio_threshold:g}× "
                f"the layer median). The largest ratio is {ratios.max():.0f}× at layer {int(ratios.argmax())}.")
    c1, c2 = st.columns([3, 2])
    c1.plotly_chart(figures.massive_heatmap(r.tokens, r.pos_max, r.median), key="massive_map")
    c2.plotly_chart(figures.massive_top3(r.top_values, r.median, r.top_dims, r.top_positions, r.tokens), key="top3")
    n_layers = len(r.median)
    layer = view.layer if 0 <= view.layer < n_layers else (r.first_layer or 0)
    layer = st.select_slider("Layer for the token × dimension view", options=list(range(n_layers)),
                             key=synced("w_mlayer", layer))
    view = view.replace(layer=layer)
    st.plotly_chart(figures.massive_dims(r.tokens, r.dims[layer], r.dim_values[layer], r.rest_max[layer], layer),
                    key="dims")
    c1, c2 = st.columns([2, 3])
    with c1:
        st.markdown("**Massive activations** (layer, position, token, dimension, value, ratio to the median)")
        if r.massive:
            table = pd.DataFrame(r.massive)
            table["token"] = table["token"].map(figures.fmt_token)
            st.dataframe(table, hide_index=True, height=360,
                         column_config={"value": st.column_config.NumberColumn(format="%.1f"),
                                        "ratio": st.column_config.NumberColumn(format="%.0f")})
            if r.massive_truncated:
                st.caption("Only the largest rows are kept.")
        else:
            st.caption("none under this criterion")
    if r.sink_positions:
        sink_tokens = ", ".join(f"{p}:{figures.fmt_token(r.tokens[p])}" for p in r.sink_positions[:5])
        c2.plotly_chart(figures.sink_heatmap(r.sink_share, sink_tokens), key="sink")
    return view
