"""CLUE on the Probes page: the model's own sampled arithmetic traces, verified from the change of
their hidden state (nearest success / failure centroid), against log-probability baselines, and
used to rerank the sampled answers. The link carries the study's fields and run key; a stored
study reopens without running the model."""

from __future__ import annotations

import numpy as np
import streamlit as st

from backend.analyses.probes import clue as C
from backend.figures.probe_studies import BASELINE_LABELS, clue_layers, clue_rerank, clue_scores

from ..common import metrics_row, synced
from ..state import View
from .probes import study_outcome


def spec_of(view: View) -> C.ClueSpec:
    return C.spec_of(view.model, view.cl_n, view.cl_samples, view.cl_temp, seed=view.cl_seed)


def _form(view: View) -> View:
    with st.form("clue_form"):
        c1, c2, c3, c4 = st.columns(4)
        n = c1.number_input("Problems (first N of the shipped task)", C.MIN_PROBLEMS, 240, int(view.cl_n))
        s = c2.number_input("Samples per problem", 2, 32, int(view.cl_samples))
        t = c3.number_input("Temperature", 0.05, 2.0, float(view.cl_temp), step=0.1)
        seed = c4.number_input("Seed", 0, 10_000, int(view.cl_seed))
        if st.form_submit_button("Set up the study", type="primary"):
            return view.replace(cl_n=int(n), cl_samples=int(s), cl_temp=float(t), cl_seed=int(seed), key="")
    return view


def render(view: View) -> View:
    st.subheader("Verify reasoning traces (CLUE)")
    st.caption("The model answers small sums and differences (one-digit, and two-digit + one-digit) and "
               "one-step word problems after four worked examples, several times per problem (sampled). Each "
               "answer is summarised by how its hidden state moved from the end of the question to the end of "
               "the answer (δ, at every layer). Traces of the "
               "training problems give a centroid of correct and of wrong answers; held-out traces are judged by "
               "the nearer centroid, and the candidate nearest the 'correct' centroid is picked among a "
               "problem's samples.")
    n = view.cl_n * view.cl_samples
    view, out = study_outcome(view, _form, spec_of, "CLUE study",
                              f"{view.cl_n} problems × {view.cl_samples} samples ({n} traces); the default takes a "
                              "few minutes on a CPU.", "clue_run")
    if out is None:
        return view
    spec = out.spec
    r = out.result
    best = int(np.nanargmax(r.auroc)) if np.isfinite(r.auroc).any() else 0
    metrics_row([("correct traces", f"{r.class_balance:.0%}"),
                 (f"AUROC, layer {r.rerank['layer']} (chosen on training)", f"{r.auroc[r.rerank['layer']]:.3f}"),
                 (f"best AUROC (layer {best})", f"{r.auroc[best]:.3f}"),
                 ("rerank: centroid", f"{r.rerank['centroid']:.0%}"), ("majority vote", f"{r.rerank['majority']:.0%}")])
    b = r.balance
    st.caption(f"{b['n_traces']} traces ({b['n_train_traces']} training, {b['n_test_traces']} held out); correct: "
               f"training {b['train']:.0%}, held out {b['test']:.0%}; by kind: "
               + ", ".join(f"{k} {v:.0%}" for k, v in b["by_kind"].items())
               + f". Sampling (hidden states read on the way): {r.made['sample_seconds']} s.")
    st.plotly_chart(clue_layers(r.layers, r.accuracy, r.auroc, r.baselines, r.rerank["layer"]),
                    key=f"clue-layers-{out.run_key}")
    st.caption("Baselines (dashed): " + "; ".join(
        f"{BASELINE_LABELS[k]} AUROC {v['auroc']:.3f}, accuracy {v['accuracy']:.3f} (threshold fitted on training)"
        for k, v in r.baselines.items()) + ".")
    st.plotly_chart(clue_rerank(r.rerank), key=f"clue-rerank-{out.run_key}")
    st.caption(f"The rerank layer ({r.rerank['layer']}) is the best two-fold AUROC inside the training problems; "
               "picking the best held-out layer would flatter the centroid. Majority vote ties go to the answer "
               "sampled first.")
    layer = st.slider("Layer of the score histogram", 0, len(r.layers) - 1,
                      int(view.cl_layer) if 0 <= view.cl_layer < len(r.layers) else r.rerank["layer"],
                      key=synced("w_cl_layer", int(view.cl_layer) if 0 <= view.cl_layer < len(r.layers)
                                 else r.rerank["layer"]))
    if layer != view.cl_layer and not (view.cl_layer < 0 and layer == r.rerank["layer"]):
        view = view.replace(cl_layer=int(layer))
    test = r.split[r.problem] == 1
    st.plotly_chart(clue_scores(r.scores[layer, test], r.correct[test], layer), key=f"clue-hist-{out.run_key}")
    with st.expander("Held-out traces"):
        rows = [{"problem": spec.problems[int(p)][1], "answer": spec.problems[int(p)][2], "trace": t,
                 "parsed": a, "correct": bool(c), "mean log-prob": round(float(lp), 3),
                 f"score (layer {layer})": round(float(s), 3)}
                for p, t, a, c, lp, s, h in zip(r.problem, r.traces, r.parsed, r.correct, r.mean_logprob,
                                               r.scores[layer], test) if h]
        st.dataframe(rows, hide_index=True)
    return view
