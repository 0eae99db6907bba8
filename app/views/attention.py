"""Attention page: one head's query × key pattern, any layer and head."""

from __future__ import annotations

import streamlit as st

from backend import AttentionSpec, figures

from ..common import main_result, make_spec, model_dims, navigate, synced
from ..state import View


def render(view: View) -> View:
    st.header("Attention patterns")
    dims = model_dims(view.model)
    if dims is None:
        return view
    n_layers, n_heads = dims["n_layers"], dims["n_heads"]
    bad = [f"Layer {view.layer} does not exist: {view.model} has layers 0–{n_layers - 1}."
           for _ in [0] if not 0 <= view.layer < n_layers]
    bad += [f"Head {view.head} does not exist: {view.model} has heads 0–{n_heads - 1} per layer."
            for _ in [0] if not 0 <= view.head < n_heads]
    if bad:
        for msg in bad:
            st.error(msg, icon=":material/warning:")
        if st.button("Show layer 0, head 0 instead"):
            navigate(view.replace(layer=0, head=0, key=""))
        return view
    c1, c2 = st.columns(2)
    layer = c1.selectbox("Layer", range(n_layers), key=synced("w_layer", view.layer))
    head = c2.selectbox("Head", range(n_heads), key=synced("w_head", view.head))
    if (layer, head) != (view.layer, view.head):
        view = view.replace(layer=layer, head=head, key="")
    spec = make_spec(AttentionSpec, model=view.model, text=view.text, layer=layer)
    view, out = main_result(view, spec, f"attention of layer {layer}")
    if out is None:
        return view
    r = out.result
    st.plotly_chart(figures.attention_pattern(r.tokens, r.pattern[head], layer, head), key="pattern")
    return view
