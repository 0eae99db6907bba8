"""Probes: what the hidden states know, four studies of the seed papers.

One page; a study picker; each study's section is its own module (app/views/probes_<study>.py,
`render(view) -> View`), so the four stay short.
"""

from __future__ import annotations

import importlib

import streamlit as st

from ..state import View

STUDIES = {"saplma": "Truth probe (SAPLMA)", "tcav": "Concept vectors (TCAV)",
           "clue": "Verify reasoning traces (CLUE)", "harm-refusal": "Harmfulness vs refusal"}


def render(view: View) -> View:
    st.header("Probes")
    study = view.study if view.study in STUDIES else "saplma"
    choice = st.radio("Study", list(STUDIES), index=list(STUDIES).index(study), format_func=STUDIES.get,
                      horizontal=True, key="w_study")
    if choice != view.study:
        view = view.replace(study=choice, key="")
    module = importlib.import_module(f".probes_{choice.replace('-', '_')}", __package__)
    return module.render(view)


def study_outcome(view: View, form, spec_of, what: str, cost: str, button: str):
    """A study section's main result: its form (navigating on a change), the spec from the view
    (a bad one said in the page), the link's key checked, then the stored outcome, or, on a miss,
    `cost` said and a "Run the study" button that computes it. (view with the run key, outcome) or
    (view, None)."""
    from ..common import check_link_key, fetch, form_spec, show_status

    spec = form_spec(view, form, spec_of)
    if spec is None or not check_link_key(view, spec):
        return view, None
    import backend

    out = backend.lookup(spec)
    if out is None:
        st.info(f"Not computed yet: {cost}")
        if not st.button("Run the study", type="primary", key=button):
            return view, None
        out = fetch(spec, what)
        if out is None:
            return view, None
    else:
        show_status(out, what)
    return view.replace(key=out.run_key), out
