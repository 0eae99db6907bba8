"""Feature search: by a token (features whose top corpus examples sit on it, or whose logit
effects promote it) or by a text (the features it activates most). Results open dashboards."""

from __future__ import annotations

from urllib.parse import urlencode

import pandas as pd
import streamlit as st

from backend.errors import DashboardError
from backend.features_corpus.search import search
from backend.store import default_store

from ..common import navigate, synced
from ..figures import fmt_token
from ..state import View, view_params
from .feature import choose_sae

MODES = {"token": "by token", "text": "by text"}


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
    with st.form("search_form"):
        mode = st.radio("Search", list(MODES), format_func=MODES.get, horizontal=True, key=synced("w_smode", view.mode))
        q = st.text_input("Token (e.g. ' Paris': with or without the leading space)" if view.mode == "token"
                          else "Text", key=synced("w_sq", view.q))
        submitted = st.form_submit_button("Search", type="primary")
    if submitted and (mode, q) != (view.mode, view.q):
        view = view.replace(mode=mode, q=q, key="")
    if not view.q and not submitted:
        st.info("Type a token or a text and press Search.")
        return view
    try:
        with st.spinner("Searching…"):
            r = search(default_store(), sae, view.mode, view.q, view.model)
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return view
    if view.mode == "token":
        st.caption(f"Tokens searched: {', '.join(repr(t) for t in r['tokens'])}. "
                   + ("'in top examples': how many of the feature's top "
                      f"{r['top_examples_per_feature']} corpus examples sit on it; " if r["indexed"] else
                      "No corpus index yet: only logit effects are searched; ")
                   + "'logit rank': its rank among the tokens the feature promotes (1–10).")
        cols = ["feature", "in_top_examples", "logit_rank", "logit_value", "density"]
    else:
        st.caption(f"{len(r['tokens'])} tokens; features ranked by their {r['by']} activation over positions ≥ 1 "
                   "(position 0 carries the massive activations and is left out, as in the index). "
                   + ("Read from the store." if r["from_store"] else "Computed and stored."))
        cols = ["feature", "max", "sum", "count", "at_token", "density"]
    if not r["results"]:
        st.warning("No feature found.")
        return view
    df = pd.DataFrame(r["results"])[cols]
    if "at_token" in df:
        df["at_token"] = df["at_token"].map(fmt_token)
    df.insert(1, "dashboard", [_link(view, f) for f in df["feature"]])
    st.caption(f"{r['n_found']} features found" + (f", the first {len(df)} shown" if r["n_found"] > len(df) else "")
               + "; select a row (or follow its link) to open the dashboard.")
    event = st.dataframe(df, hide_index=True, on_select="rerun", selection_mode="single-row", key=f"w_res_{view.q}",
                         column_config={"dashboard": st.column_config.LinkColumn("dashboard", display_text="open"),
                                        "density": st.column_config.NumberColumn(format="percent")})
    rows = event.selection.rows if event else []
    if rows:
        navigate(view.replace(page="feature", feature=int(df["feature"].iloc[rows[0]]), key=""))
    return view
