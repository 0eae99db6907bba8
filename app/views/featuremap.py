"""Feature map: every feature of an SAE placed by UMAP of its decoder direction (cosine),
coloured by log density, output score or input score, its label on hover; clicking a point
opens that feature's dashboard."""

from __future__ import annotations

import streamlit as st

from backend.errors import DashboardError, FeatureIndexMissing
from backend.jobs.features.fmap import build_map, map_data
from backend.jobs.features.scores import score_table
from backend.store import default_store
from backend.figures.features import MAP_COLOURS, feature_map

from ..common import first_start_building, navigate
from ..state import View
from .feature_dashboard import build_index_button, choose_sae


def render(view: View) -> View:
    st.header("Feature map")
    sae = choose_sae(view, "w_msae")
    if sae is None:
        return view
    try:
        data = map_data(default_store(), sae)
    except FeatureIndexMissing as e:
        st.info(str(e), icon=":material/map:")
        if st.button("Build the map now (about a minute)", key="w_build_map"):
            with st.status("Building the map…") as status:
                try:
                    r = build_map(default_store(), sae, progress=lambda m: status.update(label=m))
                except DashboardError as err:
                    st.error(str(err), icon=":material/warning:")
                    return view
                status.update(label=f"Map built in {r.get('umap_seconds', 0):.0f} s", state="complete")
            st.rerun()
        return view
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return view
    n = len(data["xy"])
    if view.feature >= n:
        st.error(f"Feature {view.feature} does not exist: {sae} has features 0–{n - 1}.", icon=":material/warning:")
        return view
    if view.colour not in MAP_COLOURS:
        st.error(f"Unknown map colour {view.colour!r}: use one of {', '.join(MAP_COLOURS)}.", icon=":material/warning:")
        return view
    colour = st.radio("Colour by", list(MAP_COLOURS), format_func=lambda c: c.replace("_", " "), horizontal=True,
                      index=list(MAP_COLOURS).index(view.colour), key="w_mcolour")
    if colour != view.colour:
        view = view.replace(colour=colour)
    t = score_table(default_store(), sae)
    labels = [lbl or old for lbl, old in zip(t["label"], data["labels"])]
    st.caption(f"{n:,} features; UMAP of the decoder directions (cosine, 15 neighbours). Hover: its label "
               + ("(tokens at its top corpus examples · top VocabProj tokens)" if t["n_vocab"] else
                  f"({data['label_source']}; no scores stored yet: `python -m backend feature-scores --sae {sae}`)")
               + f", density and scores ({t['n_output']:,} output, {t['n_input']:,} input scores stored). "
               "Click a point to open its dashboard" + (f"; the star is feature #{view.feature}." if view.feature >= 0 else "."))
    if (data["density"] is None and view.colour == "density"
            and not first_start_building("The corpus index (the densities that colour the map)")):
        st.caption("Colour needs the corpus index (densities).")
        build_index_button(view, "map")
    fig = feature_map(data["xy"], data["density"], labels, f"Features of {sae}", view.feature, colour=view.colour,
                      scores={"output_score": t["output_score"], "input_score": t["input_score"]})
    event = st.plotly_chart(fig, key=f"map-{sae}-{view.colour}", on_select="rerun", selection_mode="points")
    points = [p for p in (event.selection.points if event else []) if p.get("curve_number", 0) == 0]
    if points:
        navigate(view.replace(page="feature", feature=int(points[0]["point_index"])))
    return view
