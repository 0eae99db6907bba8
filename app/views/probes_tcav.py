"""TCAV on the Probes page: is a class's output sensitive to a concept? Concept activation
vectors against random ones, per layer, with a t-test and a Bonferroni verdict. The link carries
the study's fields and run key; a stored study reopens without running the model."""

from __future__ import annotations

import numpy as np
import streamlit as st

from backend.analyses.probes import tcav as T
from backend.errors import InvalidSpec
from backend.figures import fmt_token
from backend.figures.probes import tcav_bars

from ..common import metrics_row
from ..state import View
from .probes import study_outcome

CONCEPTS = ["water", "cooking"]


def spec_of(view: View) -> T.TcavSpec:
    try:
        layers = tuple(int(x) for x in view.tc_layers.split(",") if x.strip())
    except ValueError:
        raise InvalidSpec(f"Layers {view.tc_layers!r}: a comma list of blocks.") from None
    return T.TcavSpec(model=view.model, concept=view.tc_concept, random=view.tc_random, classes=view.tc_class,
                      target=view.tc_target, versus=view.tc_versus, layers=layers, n_random=int(view.tc_n))


def _form(view: View) -> View:
    with st.form("tcav_form"):
        c1, c2, c3 = st.columns(3)
        concept = c1.text_input("Concept set (shipped: water, cooking; or a file path)", view.tc_concept)
        random = c2.text_input("Random pool (shipped: random)", view.tc_random)
        classes = c3.text_input("Class prompts (shipped: sea)", view.tc_class)
        c4, c5, c6, c7 = st.columns(4)
        target = c4.text_input("Target token (mind the leading space)", view.tc_target)
        versus = c5.text_input("… minus this token's logit (optional)", view.tc_versus)
        layers = c6.text_input("Layers (comma list)", view.tc_layers)
        n = c7.number_input("Random CAVs", 2, 100, int(view.tc_n), help="≥ 20 recommended (the paper's practice)")
        if st.form_submit_button("Set up the study", type="primary"):
            return view.replace(tc_concept=concept.strip(), tc_random=random.strip(), tc_class=classes.strip(),
                                tc_target=target, tc_versus=versus, tc_layers=layers.strip(), tc_n=int(n), key="")
    return view


def render(view: View) -> View:
    st.subheader("Concept activation vectors (TCAV)")
    st.caption("A concept activation vector (CAV) is the normal of a linear classifier that tells the concept's "
               "sentences from random ones at a layer. A class prompt counts when the target logit rises along "
               "the CAV (positive directional derivative at the last token). The TCAV score is that fraction; "
               "random-vs-random CAVs give what it would be by chance.")
    view, out = study_outcome(view, _form, spec_of, "TCAV study",
                              f"{view.tc_n} concept and {view.tc_n} random CAVs per layer and one backward pass "
                              "over the class prompts (about a minute on a CPU).", "tcav_run")
    if out is None:
        return view
    r = out.result
    p = r.payload()
    explained = f"logit({fmt_token(r.target)})" + (f" − logit({fmt_token(r.versus)})" if r.versus else "")
    metrics_row([(f"TCAV score, layer {p['layer']}", f"{p['tcav_score']:.3f}"),
                 ("random CAVs (mean ± sd)", f"{np.mean(p['random_scores']):.3f} ± {np.std(p['random_scores']):.3f}"),
                 ("p-value (t-test)", f"{p['p_value']:.2g}"),
                 ("verdict", "significant" if p["significant"] else "not significant")])
    st.plotly_chart(tcav_bars(r.layers, r.tcav_scores, r.random_scores, r.p_values, p["alpha"], view.tc_concept),
                    key=f"tcav-{out.run_key}")
    note = (f" Bonferroni: {p['bonferroni']} layers tested, so each is judged at α = 0.05 / {p['bonferroni']} = "
            f"{p['alpha']:.3g}." if p["bonferroni"] > 1 else "")
    st.caption(f"Explained: {explained} at the last position of {r.n_class} class prompts; {r.m} items per concept "
               f"and random set; two-sided two-sample t-test of the concept CAVs' scores against the random ones'.{note}")
    st.dataframe([{"layer": row["layer"], "TCAV score": round(row["tcav_score"], 3),
                   "random mean": round(row["random_mean"], 3), "random sd": round(row["random_std"], 3),
                   "p-value": f"{row['p_value']:.2g}", "significant": row["significant"]} for row in p["per_layer"]],
                 hide_index=True)
    return view
