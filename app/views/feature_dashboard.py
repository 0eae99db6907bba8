"""Feature dashboard: one SAE feature over the corpus (top and quantile examples, histogram,
density) beside its output-centric descriptions (VocabProj, TokenChange), its label, input and
output score badges, a link to steer with it, and the features with the most similar decoder
directions."""

from __future__ import annotations

import json

import streamlit as st

from backend.errors import DashboardError
from backend.jobs.features import DEFAULT_WINDOWS
from backend.jobs.features.query import check_feature, feature_dashboard
from backend.jobs.features.scores import feature_scores, score_table
from backend.jobs.graph_corpus import graphs_with_feature
from backend.saes import feature_sources, sae_info
from backend.store import default_store
from backend import figures
from backend.figures.features import activation_histogram, diverging_tokens, example_html, score_scatter, token_chips

from ..common import first_start_building, first_start_running, metrics_row, navigate, run_job_button, synced
from ..state import View

LABEL_NOTE = ("Label: the tokens at its top corpus examples (fires on) and its top VocabProj tokens (promotes), "
              "listed from stored evidence, not an explanation written by a model.")


def steer_link(sae: str, feature: int) -> str:
    """The steering page with this feature's decoder direction (that page reads sae + feature)."""
    from urllib.parse import urlencode

    return "?" + urlencode({"page": "steering", "sae": sae, "feature": feature})


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def _badges(sc: dict) -> None:
    o, i = sc["output_score"], sc["input_score"]
    od, idt = sc["output_score_detail"], sc["input_score_detail"]
    b = st.columns([1, 1, 2])
    with b[0]:
        st.badge(f"output score {_fmt(o)}", icon=":material/campaign:",
                 color="green" if (o or 0) >= 0.1 else "gray" if o is None else "orange")
        if od:
            st.caption(f"adding 10·a_max (a_max {od['a_max']:.2f}) at the last token of “{od['prompt']}”: "
                       f"best lens token {od['best_token']!r}, p {od['max_prob']:.3f}, rank {od['best_rank']}")
    with b[1]:
        st.badge(f"input score {_fmt(i)}", icon=":material/input:",
                 color="blue" if (i or 0) >= 0.5 else "gray" if i is None else "violet")
        if idt:
            st.caption(f"{idt['hits']} of its top {idt['examples']} examples sit on a lens token"
                       + ("" if idt["examples"] >= idt["min_examples"] else f" (fewer than {idt['min_examples']}: no score)"))
    with b[2]:
        st.link_button("Steer with this feature", steer_link(sc["sae_id"], sc["feature"]), icon=":material/tune:")
        sae, feature = sc["sae_id"], sc["feature"]

        def neuronpedia_json() -> bytes:
            from backend import export

            return json.dumps(export.feature_record(sae, feature), ensure_ascii=False).encode()

        st.download_button("Export (Neuronpedia-like JSON)", neuronpedia_json, file_name=f"{sae}-{feature}.json",
                           mime="application/json", on_click="ignore", icon=":material/download:",
                           key=f"dl-feature-{sae}-{feature}")


def _c_source_text(src: str) -> str:
    """What the stored c_source means, in words ("shipped: " marks rows shipped beside the SAE)."""
    shipped = src.startswith("shipped: ")
    src = src.removeprefix("shipped: ")
    why = "no corpus index" if "no index" in src else "the feature never fired in the index"
    text = ("10 × its median active value in the corpus index" if src == "index median" else
            f"fallback, {why}: 10 × a typical active feature's size / ‖d‖")
    return text + ("; computed with these SAE weights and shipped beside them" if shipped else "")


def _output_views(view: View, sc: dict, d: dict) -> None:
    """VocabProj and TokenChange (the output-centric descriptions)."""
    vp = sc["vocab_proj"]
    if vp is not None:
        st.plotly_chart(diverging_tokens(vp["top"][:15], vp["bottom"][:15],
                                         f"Logit effects (VocabProj) of #{view.feature}", "W_U · final_norm(d)"),
                        key="vocab_proj")
        with st.expander(f"VocabProj: all top and bottom {len(vp['top'])} tokens"):
            st.markdown(token_chips(vp["top"], "#d8f0d8"), unsafe_allow_html=True)
            st.markdown(token_chips(vp["bottom"], "#f6d6d6"), unsafe_allow_html=True)
    else:
        st.plotly_chart(figures.logit_effect_bars(d["logits"]["promoted"], d["logits"]["suppressed"],
                                                  f"Logit effects of feature #{view.feature}"), key="logits")
        st.caption("Direct effect on each token's logit: (decoder direction ⊙ final norm weight) @ W_U.")
    tc = sc["token_change"]
    if tc is None:
        st.caption("TokenChange not computed yet.")
        return
    st.caption(f"TokenChange: ±c·d added at every position ≥ 1 of {tc['windows']} held-out windows of "
               f"{tc['window_len']} tokens, c = {tc['c']:.2f} ({_c_source_text(tc['c_source'])}); "
               "mean change of the next-token logits.")
    c1, c2 = st.columns(2)
    with c1:
        st.plotly_chart(diverging_tokens(tc["plus_increased"], tc["plus_decreased"], "TokenChange at +c", "Δ logit"),
                        key="tc_plus")
    with c2:
        st.plotly_chart(diverging_tokens(tc["minus_increased"], tc["minus_decreased"], "TokenChange at −c", "Δ logit"),
                        key="tc_minus")


TRANSCODER_WINDOWS = 32     # a transcoder set is 30 SAEs' worth of rows per token: fewer windows


def choose_sae(view: View, key: str) -> str | None:
    """SAE selector shared by the feature pages; None (after st.error) for an unknown SAE."""
    ids = feature_sources(view.model)
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
    tc_set = (sae_info(view.sae).get("transcoder_set") if view.sae else None)
    which, n, what = (tc_set, TRANSCODER_WINDOWS, f"every layer of {tc_set}") if tc_set else ("all", DEFAULT_WINDOWS, "all SAEs")
    cmd = f"python -m backend feature-index --model {view.model} --sae {which} --windows {n}"
    st.caption(f"From a shell: `{cmd}` (resumable; a few minutes on two quiet cores).")
    from backend.jobs.features import build_index

    run_job_button(f"Build the corpus index now ({n} windows, {what})",
                   lambda progress: build_index(view.model, which, n, store=default_store(),
                                                progress=progress),
                   f"w_build_{where}",
                   done=lambda s: f"Indexed {s.get('rows', 0):,} rows in {s.get('seconds', 0):.0f} s.")


def _graphs_with_feature(view: View, info: dict) -> None:
    """The stored graphs (graph-corpus jobs) in which this transcoder feature is a node."""
    found = graphs_with_feature(default_store(), info["transcoder_set"], info["layer"], view.feature)
    st.markdown("**Graphs this feature appears in** (pruned attribution graphs of stored corpus prompts; "
                "click to open the graph)")
    if not found:
        st.caption(f"None stored. `python -m backend graph-corpus --model {view.model} --windows 16` traces 16 "
                   "corpus prompts (resumable; about half a minute per prompt on two cores).")
        return
    for i, g in enumerate(found):
        label = f"{g['prompt'][:70]!r} · pos {g['pos']} · influence {g['influence']:.3f} · act {g['activation']:.2f}"
        if st.button(label, key=f"w_graph_{i}"):
            navigate(View(page="graph", model=view.model, text=g["prompt"], gnode=f"{info['layer']}_{view.feature}_{g['pos']}"))


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
    info = sae_info(sae)
    if info.get("transcoder_set"):
        st.caption(f"A transcoder feature: layer {info['layer']} of the set {info['transcoder_set']}. It reads the "
                   f"MLP's input (`{info['hook_name']}`) and writes into the MLP's output (`{info['hook_out']}`); "
                   "its decoder row is what one unit of it adds to the residual stream. Its attribution-graph "
                   "nodes are this feature at a position.")
    try:
        sc = feature_scores(default_store(), sae, view.feature, compute=False)
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return view
    sc.update(sae_id=sae, feature=view.feature)
    if sc["label"]:
        st.markdown(f"**{sc['label']}**")
        st.caption(LABEL_NOTE)
    _badges(sc)
    if sc["missing"]:
        how = ("The first-start build is computing them for every feature (progress bar at the top); this one "
               "can also be computed now." if first_start_running() else
               f"`python -m backend feature-scores --sae {sae}` computes them for every feature"
               + (" (the input score and TokenChange need the corpus index)." if sc.get("no_index") else "."))
        st.caption(f"Not stored yet: {', '.join(sc['missing'])}. {how}")
        if st.button("Compute this feature's scores now (loads the model, about a minute)", key="w_score_one"):
            with st.spinner("Computing VocabProj, output score, TokenChange…"):
                try:
                    feature_scores(default_store(), sae, view.feature, compute=True)
                except DashboardError as e:
                    st.error(str(e), icon=":material/warning:")
                    return view
            st.rerun()
    index = d["index"]
    if index is None:
        if not first_start_building("The corpus index (top examples, histogram, density)"):
            st.warning(d["missing"], icon=":material/database:")
            build_index_button(view, "feature")
        _output_views(view, sc, d)
    else:
        s = d["stats"]
        metrics_row([("density", f"{s['density']:.3%}"), ("active on", f"{s['n']:,} tokens"),
                     ("max activation", f"{s['max']:.2f}"), ("mean when active", f"{s['mean']:.2f}"),
                     ("median when active", f"{s['quantiles'][0.5]:.2f}")])
        st.caption(f"Index: {index.describe()}. Dashboard read in {d['seconds'] * 1000:.0f} ms.")
        left, right = st.columns([3, 2])
        with left:
            if s["n"] == 0:
                st.info("This feature never fires on the indexed windows (a dead or very rare latent).")
            else:
                st.markdown("**Top activating examples** (token shaded by activation, the example's token framed; "
                            "hover a token for its value)")
                st.markdown("".join(example_html(ex, s["max"]) for ex in d["top"]), unsafe_allow_html=True)
        with right:
            st.markdown("**What it makes the model say**")
            _output_views(view, sc, d)
        if s["n"]:
            st.plotly_chart(activation_histogram(d["histogram"]["edges"], d["histogram"]["counts"], view.feature,
                                                 s["density"], index.n_tokens), key="hist")
            with st.expander("Examples by activation quantile band", expanded=True):
                for band in d["bands"]:
                    if band["examples"]:
                        st.markdown(f"*{band['label']} of active values ({band['lo']:.2f}–{band['hi']:.2f})*")
                        st.markdown("".join(example_html(ex, s["max"]) for ex in band["examples"]),
                                    unsafe_allow_html=True)
    with st.expander("Input vs output score of every feature of this SAE", expanded=True):
        t = score_table(default_store(), sae)
        if t["n_output"] and t["n_input"]:
            st.plotly_chart(score_scatter(t["input_score"], t["output_score"], t["label"],
                                          f"Input vs output score, {sae}", view.feature), key="scatter")
        else:
            st.caption(f"Needs both scores: {t['n_output']:,} output and {t['n_input']:,} input scores stored.")
    if info.get("transcoder_set"):
        _graphs_with_feature(view, info)
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
