"""Feature dashboard: one SAE feature over the corpus (top and quantile examples, histogram,
density), its logit effects and the features with the most similar decoder directions."""

from __future__ import annotations

import streamlit as st

from backend.errors import DashboardError
from backend.features_corpus import DEFAULT_WINDOWS
from backend.features_corpus.query import check_feature, feature_dashboard
from backend.saes import list_saes, sae_info
from backend.store import default_store

from .. import figures
from ..common import navigate, synced
from ..figures_features import activation_histogram, example_html
from ..state import View


def choose_sae(view: View, key: str) -> str | None:
    """SAE selector shared by the feature pages; None (after st.error) for an unknown SAE."""
    ids = [s["sae_id"] for s in list_saes(view.model)]
    try:
        sae_info(view.sae)
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return None
    options = ids + ([view.sae] if view.sae not in ids else [])
    choice = st.selectbox("SAE", options, key=synced(key, view.sae))
    if choice != view.sae:
        navigate(view.replace(sae=choice, key=""))
    return view.sae


def build_index_button(view: View, where: str) -> None:
    """Offer to build the corpus index (every SAE of the model, one pass) from the page."""
    cmd = f"python -m backend feature-index --model {view.model} --sae all --windows {DEFAULT_WINDOWS}"
    st.caption(f"From a shell: `{cmd}` (resumable; a few minutes on two quiet cores).")
    if st.button(f"Build the corpus index now ({DEFAULT_WINDOWS} windows, all SAEs)", key=f"w_build_{where}"):
        from backend.features_corpus import build_index

        bar = st.progress(0.0, text="loading the model…")
        try:
            summary = build_index(view.model, "all", DEFAULT_WINDOWS, store=default_store(),
                                  progress=lambda d, n, m: bar.progress(d / max(n, 1), text=m))
        except DashboardError as e:
            st.error(str(e), icon=":material/warning:")
            return
        st.success(f"Indexed {summary.get('rows', 0):,} rows in {summary.get('seconds', 0):.0f} s.")
        st.rerun()


def render(view: View) -> View:
    st.header("Feature dashboard")
    sae = choose_sae(view, "w_fsae")
    if sae is None:
        return view
    feature = st.number_input("Feature (−1: none)", min_value=-1, step=1, key=synced("w_feature", max(view.feature, -1)))
    if feature != view.feature and not (feature == -1 and view.feature < -1):
        navigate(view.replace(feature=int(feature)))
    if view.feature < 0:
        st.info("Pick a feature by its id, or find one on the feature map or with feature search.")
        return view
    try:
        check_feature(sae, view.feature)
        d = feature_dashboard(default_store(), sae, view.feature)
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return view
    st.subheader(f"Feature #{view.feature} of {sae}")
    index = d["index"]
    if index is None:
        st.warning(d["missing"], icon=":material/database:")
        build_index_button(view, "feature")
    else:
        s = d["stats"]
        c = st.columns(5)
        c[0].metric("density", f"{s['density']:.3%}")
        c[1].metric("active on", f"{s['n']:,} tokens")
        c[2].metric("max activation", f"{s['max']:.2f}")
        c[3].metric("mean when active", f"{s['mean']:.2f}")
        c[4].metric("median when active", f"{s['quantiles'][0.5]:.2f}")
        st.caption(f"Index: {index.describe()}. Dashboard read in {d['seconds'] * 1000:.0f} ms.")
        if s["n"] == 0:
            st.info("This feature never fires on the indexed windows (a dead or very rare latent).")
        else:
            st.markdown("**Top activating examples** (token shaded by activation, the example's token framed; "
                        "hover a token for its value)")
            st.markdown("".join(example_html(ex, s["max"]) for ex in d["top"]), unsafe_allow_html=True)
            st.plotly_chart(activation_histogram(d["histogram"]["edges"], d["histogram"]["counts"], view.feature,
                                                 s["density"], index.n_tokens), key="hist")
            with st.expander("Examples by activation quantile band", expanded=True):
                for band in d["bands"]:
                    if band["examples"]:
                        st.markdown(f"*{band['label']} of active values ({band['lo']:.2f}–{band['hi']:.2f})*")
                        st.markdown("".join(example_html(ex, s["max"]) for ex in band["examples"]),
                                    unsafe_allow_html=True)
    st.plotly_chart(figures.logit_effect_bars(d["logits"]["promoted"], d["logits"]["suppressed"],
                                              f"Logit effects of feature #{view.feature}: (decoder direction ⊙ final "
                                              "norm weight) @ W_U"), key="logits")
    st.markdown("**Most similar decoder directions** (cosine); click to open")
    cols = st.columns(5)
    for i, sim in enumerate(d["similar"]):
        dens = "" if sim["density"] is None else f", {sim['density']:.2%}"
        if cols[i % 5].button(f"#{sim['feature']} · cos {sim['cosine']:.2f}{dens}", key=f"w_sim_{sim['feature']}"):
            navigate(view.replace(feature=sim["feature"]))
    c1, c2 = st.columns(2)
    if c1.button("Show on the feature map", key="w_to_map"):
        navigate(view.replace(page="featuremap"))
    if c2.button("Search features by a text", key="w_to_search"):
        navigate(view.replace(page="search", mode="text"))
    return view
