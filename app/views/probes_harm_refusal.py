"""Harmfulness vs refusal on the Probes page: two diff-means directions read at two positions of
the chat template, their cosine per layer, the instructions projected on both, and steering
with each side by side. The link carries the fields and run key; a stored study reopens from the
store (its directions and steering runs are looked up by their own keys)."""

from __future__ import annotations

import streamlit as st

import backend
from backend.analyses.probes import harm_refusal as H
from backend.errors import DashboardError
from backend.figures.probe_studies import harm_cosine, harm_scatter, harm_steering

from ..common import check_link_key, form_spec, metrics_row, navigate, show_status, synced
from ..state import View


def spec_of(view: View) -> H.HarmRefusalSpec:
    return H.spec_of(view.model, view.hr_layer, view.hr_strength)


def _form(view: View) -> View:
    with st.form("harm_form"):
        c1, c2 = st.columns(2)
        layer = c1.number_input("Layer of the two directions (-1: the middle layer)", -1, 200, int(view.hr_layer))
        strength = c2.number_input("Steering strength (× the raw diff-means vector)", -50.0, 50.0,
                                   float(view.hr_strength), step=1.0)
        if st.form_submit_button("Set up the study", type="primary"):
            return view.replace(hr_layer=int(layer), hr_strength=float(strength), key="")
    return view


def _stored(spec) -> H.Study | None:
    """The whole study from the store, or None when its main run is not there (no model load:
    the derived directions and steering runs are store hits once the study has run)."""
    main = backend.lookup(spec)
    if main is None:
        return None
    return H.run_study(spec)


def render(view: View) -> View:
    st.subheader("Harmfulness vs refusal")
    st.caption("Mild harmful-style and harmless instructions (shipped; every 4th held out) in the chat template. "
               "The harmfulness direction is the difference of means at the instruction's last token (t_inst), "
               "the refusal direction at the last template token before the answer (t_post-inst), at every "
               "layer's block output. If the model keeps the two apart, their cosine stays well below 1 and "
               "adding one does not do what adding the other does.")
    spec = form_spec(view, _form, spec_of)
    if spec is None or not check_link_key(view, spec):
        return view
    try:
        study = _stored(spec)
        if study is None:
            n = len(spec.heldout_harmful) + len(spec.heldout_harmless)
            st.info(f"Not computed yet: one pass over {len(spec.harmful) + len(spec.harmless) + n} instructions, "
                    f"then greedy completions of the {n} held-out ones with each direction (about a minute).")
            if not st.button("Run the study", type="primary", key="hr_run"):
                return view
            with st.status("Running the harmfulness / refusal study…") as status:
                study = H.run_study(spec, progress=lambda m: status.update(label=m))
                status.update(label="Done", state="complete")
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return view
    out, r = study.main, study.main.result
    show_status(out, "harmfulness / refusal study")
    view = view.replace(key=out.run_key)
    li = r.layer
    metrics_row([(f"cosine at layer {li}", f"{r.cosine[li]:.3f}"),
                 ("lowest cosine", f"{r.cosine.min():.3f} (layer {int(r.cosine.argmin())})"),
                 ("harmfulness accuracy", f"{r.harm_accuracy[li]:.0%}"),
                 ("refusal accuracy", f"{r.refusal_accuracy[li]:.0%}")])
    st.plotly_chart(harm_cosine(r.layers, r.cosine, r.harm_accuracy, r.refusal_accuracy, li),
                    key=f"hr-cos-{out.run_key}")
    shown = view.hr_show if 0 <= view.hr_show < len(r.layers) else li
    layer = st.slider("Layer of the scatter", 0, len(r.layers) - 1, key=synced("w_hr_show", shown))
    if layer != shown:
        view = view.replace(hr_show=int(layer))
    st.plotly_chart(harm_scatter(r.proj_harm[layer], r.proj_refusal[layer], r.label, r.heldout, r.texts, layer),
                    key=f"hr-scatter-{out.run_key}")
    c1, c2 = st.columns(2)
    for col, name, d in ((c1, "harmfulness", study.harm), (c2, "refusal", study.refusal)):
        col.markdown(f"**{name.capitalize()} direction** (layer {li}, norm {d.result.norm:.2f}): `{d.run_key}`  \n"
                     f"[open on the Directions & steering page](?page=steering&model={spec.model}&dkey={d.run_key})")
    if study.steering:
        h, f = (H.steering_summary(study.steering[k]) for k in ("harm", "refusal"))
        st.plotly_chart(harm_steering(h, f, spec.strength), key=f"hr-steer-{out.run_key}")
        with st.expander("Held-out harmless completions, side by side"):
            rows = [{"instruction": t, "unsteered": b, "+ harmfulness": x, "+ refusal": y}
                    for t, b, x, y in zip(spec.heldout_harmless, h["harmless_completions"]["baseline"],
                                          h["harmless_completions"]["added"], f["harmless_completions"]["added"])]
            st.dataframe(rows, hide_index=True)
    return view
