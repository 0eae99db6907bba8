"""Neurons page: a layer's most active MLP neurons on the prompt, and a neuron's direct logit effect."""

from __future__ import annotations

import streamlit as st

from backend import NeuronLogitSpec, NeuronsSpec, figures

from ..common import fetch, main_result, make_spec, model_dims, navigate, synced
from ..state import View


def render(view: View) -> View:
    st.header("Neurons")
    dims = model_dims(view.model)
    if dims is None:
        return view
    if not 0 <= view.layer < dims["n_layers"]:
        st.error(f"Layer {view.layer} does not exist: {view.model} has layers 0–{dims['n_layers'] - 1}.",
                 icon=":material/warning:")
        return view
    layer = st.select_slider("Layer", options=list(range(dims["n_layers"])), key=synced("w_nlayer", view.layer))
    if layer != view.layer:
        view = view.replace(layer=layer, neuron=-1, key="")
    spec = make_spec(NeuronsSpec, model=view.model, text=view.text, layer=layer)
    view, out = main_result(view, spec, f"neurons of layer {layer}")
    if out is None:
        return view
    r = out.result
    event = st.plotly_chart(figures.neuron_heatmap(r.tokens, r.prompt_top_ids, r.prompt_top_acts, layer),
                            key=f"neurons-{out.run_key}", on_select="rerun", selection_mode="points")
    points = event.selection.points if event else []
    if points:
        view = view.replace(neuron=int(r.prompt_top_ids[int(points[0]["y"])]))
    if view.neuron >= 0:
        if st.button(f"Open L{layer}N{view.neuron} over the corpus (top contexts, histogram) →", key="w_to_corpus"):
            navigate(view.replace(page="neuron", layer=layer, key=""))
        lspec = make_spec(NeuronLogitSpec, model=view.model, layer=layer, neuron=view.neuron)
        lout = fetch(lspec, f"logit effect of L{layer}N{view.neuron}") if lspec else None
        if lout is not None:
            lists = lout.result.as_lists()
            st.plotly_chart(figures.logit_effect_bars(lists["promoted"], lists["suppressed"],
                                                      f"Direct logit effect of L{layer}N{view.neuron}"),
                            key="logit_effect")
            st.caption(f"Computed as {lout.result.convention}. Per unit of activation; a negative activation "
                       "flips promoted and suppressed.")
    else:
        st.caption("Click a neuron's row to see the tokens it promotes and suppresses.")
    return view
