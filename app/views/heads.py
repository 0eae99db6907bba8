"""Head scores page: induction and previous-token scores of every head."""

from __future__ import annotations

import numpy as np
import streamlit as st

from backend import HeadScoresSpec, figures

from ..common import main_result, make_spec, navigate
from ..state import View


def render(view: View) -> View:
    st.header("Head scores")
    spec = make_spec(HeadScoresSpec, model=view.model)
    view, out = main_result(view, spec, "head scores")
    if out is None:
        return view
    r = out.result
    st.caption(f"Measured on {r.n_seqs} sequences of {r.seq_len} random tokens repeated once. "
               "Induction: attention from a repeated token to the token after its first occurrence. "
               "Previous token: attention to the token just before.")
    st.caption("Click a head to open its attention pattern on the current prompt.")
    c1, c2 = st.columns(2)
    for col, key, scores, title in ((c1, "induction", r.induction, "Induction score"),
                                    (c2, "prev", r.prev_token, "Previous-token score")):
        event = col.plotly_chart(figures.head_score_heatmap(scores, title), key=key, on_select="rerun",
                                 selection_mode="points")
        points = event.selection.points if event else []
        if points:
            layer, head = int(points[0]["y"]), int(points[0]["x"])
            navigate(view.replace(page="attention", layer=layer, head=head, key=""))
    for col, name, scores in ((c1, "induction", r.induction), (c2, "previous-token", r.prev_token)):
        order = np.argsort(scores, axis=None)[::-1][:5]
        col.markdown(f"**Top {name} heads:** " + ", ".join(
            f"L{i // scores.shape[1]}H{i % scores.shape[1]} ({scores.flat[i]:.2f})" for i in order))
    return view
