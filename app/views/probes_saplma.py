"""Truth probe (SAPLMA) on the Probes page: per layer, an MLP and a logistic probe on the
statement's last-token residual, scored on a topic they never saw, against the model's own
few-shot answer; any layer's probe becomes a direction. The link carries the study's fields and
run key; a stored study reopens without running the model."""

from __future__ import annotations

import numpy as np
import streamlit as st

import backend
from backend.analyses.probes import saplma as S
from backend.errors import DashboardError
from backend.figures.probes import saplma_curve, topic_heatmap

from ..common import link_of, metrics_row
from ..state import View
from .probes import study_outcome


def spec_of(view: View) -> S.SaplmaSpec:
    return S.SaplmaSpec(model=view.model, layers=S.parse_layers(view.sp_layers), max_per_topic=int(view.sp_max),
                        epochs=int(view.sp_epochs))


def _form(view: View) -> View:
    with st.form("saplma_form"):
        c1, c2, c3 = st.columns([3, 2, 2])
        layers = c1.text_input("Layers (comma list; empty = all)", view.sp_layers)
        n = c2.number_input("True and false statements per topic (0 = all)", 0, 1000, int(view.sp_max),
                            help=f"0 or ≥ {S.MIN_PER_CLASS}; the shipped set has 156–206 of each per topic")
        epochs = c3.number_input("MLP epochs", 1, 500, int(view.sp_epochs))
        if st.form_submit_button("Set up the study", type="primary"):
            return view.replace(sp_layers=layers.strip(), sp_max=int(n), sp_epochs=int(epochs), key="")
    return view


def render(view: View) -> View:
    st.subheader("Truth probe (SAPLMA)")
    st.caption("Six topics of true statements and their false twins (the object swapped). At every layer a small MLP "
               "(256-128-64) and a logistic probe read the last token's residual stream; each is trained on five "
               "topics and scored on the sixth. The green line is the model itself, asked 'True or False?' after "
               "four worked examples.")
    view, out = study_outcome(view, _form, spec_of, "truth-probe study",
                              "activations of every statement in batched passes, then six train/test folds per "
                              "layer and the few-shot baseline (50 per class and topic, all layers: a few minutes "
                              "on a CPU).", "saplma_run")
    if out is None:
        return view
    r = out.result
    mlp, lr = r.mlp_acc.mean(1), r.logreg_acc.mean(1)
    peak = int(np.argmax(mlp))
    metrics_row([("peak layer (MLP)", str(r.layers[peak])), ("MLP held-out accuracy", f"{mlp[peak]:.3f}"),
                 ("logistic at best layer", f"{lr.max():.3f} (L{r.layers[int(np.argmax(lr))]})"),
                 ("few-shot (the model)", f"{r.few_shot_acc:.3f}"),
                 ("statements", str(sum(c["true"] + c["false"] for c in r.counts.values())))])
    st.plotly_chart(saplma_curve(r.layers, mlp, lr, r.few_shot_acc), key=f"sp-curve-{out.run_key}")
    probe = st.radio("Topic × layer table of", ["MLP", "logistic"], horizontal=True, key="w_sp_table")
    acc = r.mlp_acc if probe == "MLP" else r.logreg_acc
    st.plotly_chart(topic_heatmap(r.layers, r.topics, acc, r.few_shot, probe), key=f"sp-heat-{out.run_key}-{probe}")
    _direction(view, r, out.run_key)
    return view


def _direction(view: View, r, run_key: str) -> None:
    """Make one layer's logistic probe (refitted on all topics) a direction for the steering page."""
    st.markdown("**Use a layer's probe as a direction** (read, add, ablate on the steering page)")
    c1, c2 = st.columns([2, 3])
    layer = c1.selectbox("Layer", r.layers, index=int(np.argmax(r.logreg_acc.mean(1))), key="w_sp_dir_layer")
    if c2.button("Make this layer's probe a direction", key="sp_make_dir"):
        try:
            out = backend.run(S.derived_spec_of(view.model, run_key, int(layer)))
        except DashboardError as e:
            st.error(str(e), icon=":material/warning:")
            return
        st.session_state["sp_dir"] = (run_key, int(layer), out.run_key)
    made = st.session_state.get("sp_dir")
    if made and made[0] == run_key:
        key = made[2]
        steer = View(page="steering", model=view.model, dkey=key)
        st.success(f"Layer {made[1]}'s truth probe is direction `{key}` (resid_post, false → true).")
        st.markdown(f"[Open it on the steering page]({link_of(steer)})")
