"""Feature search: by a token (features whose top corpus examples sit on it, or whose logit
effects promote it) or by a text (the features it activates most), or with no query every
feature ranked by a score ("features that steer well": by output score). Results carry labels
and scores, sort and filter by them, and open dashboards."""

from __future__ import annotations

from urllib.parse import urlencode

import pandas as pd
import streamlit as st

from backend.errors import DashboardError
from backend.jobs.features.search import SORTS, search
from backend.store import default_store
from backend.figures import fmt_token

from ..common import navigate, synced
from ..state import View, view_params
from .feature_dashboard import choose_sae

MODES = {"token": "by token", "text": "by text"}
SORT_NAMES = {"": "the search's own order", "output_score": "output score", "input_score": "input score",
              "density": "density"}


def _link(view: View, feature: int) -> str:
    return "?" + urlencode(view_params(view.replace(page="feature", feature=feature, key="")))


def render(view: View) -> View:
    st.header("Feature search")
    sae = choose_sae(view, "w_ssae")
    if sae is None:
        return view
    if view.mode not in MODES:
        st.error(f"Unknown search mode {view.mode!r}: use 'token' or 'text'.", icon=":material/warning:")
        return view
    if view.sort and view.sort not in SORTS:
        st.error(f"Unknown sort {view.sort!r}: use one of {', '.join(SORTS)}.", icon=":material/warning:")
        return view
    try:
        min_out = float(view.min_out) if view.min_out else None
    except ValueError:
        st.error(f"The minimum output score {view.min_out!r} is not a number.", icon=":material/warning:")
        return view
    with st.form("search_form"):
        mode = st.radio("Search", list(MODES), format_func=MODES.get, horizontal=True, key=synced("w_smode", view.mode))
        q = st.text_input("Token (e.g. ' Paris': with or without the leading space)" if view.mode == "token"
                          else "Text", key=synced("w_sq", view.q),
                          help="Leave empty and pick a sort to rank every feature of the SAE.")
        c1, c2 = st.columns(2)
        sort = c1.selectbox("Sort by", list(SORT_NAMES), format_func=SORT_NAMES.get, key=synced("w_ssort", view.sort))
        m = c2.number_input("Minimum output score (−1: no filter)", min_value=-1.0, max_value=1.0, step=0.05,
                            key=synced("w_smin", -1.0 if min_out is None else min_out))
        submitted = st.form_submit_button("Search", type="primary")
    new_min = "" if m < 0 else f"{m:g}"
    if submitted and (mode, q, sort, new_min) != (view.mode, view.q, view.sort, view.min_out):
        view = view.replace(mode=mode, q=q, sort=sort, min_out=new_min, key="")
        min_out = None if m < 0 else float(m)
    if not view.q and not view.sort and min_out is None:
        st.info("Type a token or a text and press Search, or pick a sort (e.g. output score: features that steer "
                "well) with no query to rank every feature.")
        return view
    try:
        with st.spinner("Searching…"):
            r = search(default_store(), sae, view.mode, view.q, view.model, sort=view.sort or None,
                       min_output_score=min_out)
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return view
    scores = ["output_score", "input_score"]
    if r["mode"] == "scores":
        st.caption(f"Every feature of {sae} ranked by {SORT_NAMES[r['sort']]}"
                   + (f", output score ≥ {min_out:g}" if min_out is not None else "")
                   + f". {r['n_scored']:,} features have an output score, {r['n_input_scored']:,} an input score"
                   + ("" if r["indexed"] else " (no corpus index: no input score or density)") + ".")
        cols = ["feature", "label", "output_score", "input_score", "density"]
    elif view.mode == "token":
        st.caption(f"Tokens searched: {', '.join(repr(t) for t in r['tokens'])}. "
                   + ("'in top examples': how many of the feature's top "
                      f"{r['top_examples_per_feature']} corpus examples sit on it; " if r["indexed"] else
                      "No corpus index yet: only logit effects are searched; ")
                   + "'logit rank': its rank among the tokens the feature promotes (1–10).")
        cols = ["feature", "label", "in_top_examples", "logit_rank", "logit_value", "output_score", "input_score",
                "density"]
    else:
        st.caption(f"{len(r['tokens'])} tokens; features ranked by their {r['by']} activation over positions ≥ 1 "
                   "(position 0 carries the massive activations and is left out, as in the index). "
                   + ("Read from the store." if r["from_store"] else "Computed and stored."))
        cols = ["feature", "label", "max", "sum", "count", "at_token", "output_score", "input_score", "density"]
    if r.get("n_scored") == 0:
        st.caption(f"No scores stored for {sae} yet: `python -m backend feature-scores --sae {sae}`.")
    if not r["results"]:
        if view.mode == "token":
            toks = " or ".join(repr(t) for t in r["tokens"])
            st.warning(f"No feature of {sae} has {toks} among the 10 tokens it promotes most"
                       + (f" or among the tokens of its top {r['top_examples_per_feature']} corpus examples."
                          if r["indexed"] else " (with no corpus index, top examples are not searched).")
                       + " Try text mode with a sentence that uses it.")
        else:
            st.warning("No feature found.")
        return view
    df = pd.DataFrame(r["results"])[cols]
    if "at_token" in df:
        df["at_token"] = df["at_token"].map(fmt_token)
    df.insert(1, "dashboard", [_link(view, f) for f in df["feature"]])
    st.caption(f"{r['n_found']} features found" + (f", the first {len(df)} shown" if r["n_found"] > len(df) else "")
               + "; select a row (or follow its link) to open the dashboard. Labels list stored evidence (tokens at "
                 "the top examples · top VocabProj tokens), not a model-written explanation.")
    event = st.dataframe(df, hide_index=True, on_select="rerun", selection_mode="single-row",
                         key=f"w_res_{view.q}_{view.sort}_{view.min_out}",
                         column_config={"dashboard": st.column_config.LinkColumn("dashboard", display_text="open"),
                                        "label": st.column_config.TextColumn("label", width="large"),
                                        "output_score": st.column_config.NumberColumn("output score", format="%.3f"),
                                        "input_score": st.column_config.NumberColumn("input score", format="%.3f"),
                                        "density": st.column_config.NumberColumn(format="percent")})
    rows = event.selection.rows if event else []
    if rows:
        navigate(view.replace(page="feature", feature=int(df["feature"].iloc[rows[0]]), key=""))
    return view
