"""Massive activations (Sun et al. 2024): where the huge residual-stream scalars sit, and sinks."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from backend import MassiveSpec, figures

from ..common import fetch, main_result, make_spec, navigate, run_job_button, synced
from ..state import View


def render(view: View) -> View:
    st.header("Massive activations")
    st.caption("A few residual-stream scalars are orders of magnitude larger than the rest, sit in fixed "
               "dimensions, and appear at the first token and at delimiters (Sun et al. 2024).")
    with st.form("massive_form"):
        c1, c2, c3 = st.columns([1, 1, 1])
        abs_thr = c1.number_input("criterion: |value| ≥", value=float(view.abs_thr), step=10.0)
        ratio_thr = c2.number_input("and ≥ × layer median", value=float(view.ratio_thr), step=100.0)
        if c3.form_submit_button("Apply criterion"):
            if (abs_thr, ratio_thr) != (view.abs_thr, view.ratio_thr):
                navigate(view.replace(abs_thr=abs_thr, ratio_thr=ratio_thr, key=""))
    spec = make_spec(MassiveSpec, model=view.model, text=view.text, abs_threshold=view.abs_thr,
                     ratio_threshold=view.ratio_thr)
    view, out = main_result(view, spec, "massive-activation scan")
    if out is None:
        return view
    r = out.result
    ratios = r.top_ratios()[:, 0]
    if r.massive:
        st.success(f"{len(r.massive)} massive activation(s) from layer {r.first_layer} on, in dimension(s) "
                   f"{', '.join(map(str, r.massive_dims[:6]))}, at token(s) "
                   f"{', '.join(f'{p}:{figures.fmt_token(r.tokens[p])}' for p in r.sink_positions[:8])}.")
    else:
        st.info(f"No activation meets the criterion (|value| ≥ {r.abs_threshold:g} and ≥ {r.ratio_threshold:g}× "
                f"the layer median). The largest ratio is {ratios.max():.0f}× at layer {int(ratios.argmax())}.")
    c1, c2 = st.columns([3, 2])
    c1.plotly_chart(figures.massive_heatmap(r.tokens, r.pos_max, r.median), key="massive_map")
    c2.plotly_chart(figures.massive_top3(r.top_values, r.median, r.top_dims, r.top_positions, r.tokens), key="top3")
    n_layers = len(r.median)
    layer = view.layer if 0 <= view.layer < n_layers else (r.first_layer or 0)
    layer = st.select_slider("Layer for the token × dimension view", options=list(range(n_layers)),
                             key=synced("w_mlayer", layer))
    view = view.replace(layer=layer)
    st.plotly_chart(figures.massive_dims(r.tokens, r.dims[layer], r.dim_values[layer], r.rest_max[layer], layer),
                    key="dims")
    c1, c2 = st.columns([2, 3])
    with c1:
        st.markdown("**Massive activations** (layer, position, token, dimension, value, ratio to the median)")
        if r.massive:
            table = pd.DataFrame(r.massive)
            table["token"] = table["token"].map(figures.fmt_token)
            st.dataframe(table, hide_index=True, height=360,
                         column_config={"value": st.column_config.NumberColumn(format="%.1f"),
                                        "ratio": st.column_config.NumberColumn(format="%.0f")})
            if r.massive_truncated:
                st.caption("Only the largest rows are kept.")
        else:
            st.caption("none under this criterion")
    if r.sink_positions:
        sink_tokens = ", ".join(f"{p}:{figures.fmt_token(r.tokens[p])}" for p in r.sink_positions[:5])
        c2.plotly_chart(figures.sink_heatmap(r.sink_share, sink_tokens), key="sink")
    _across_corpus(view)
    return view


def _across_corpus(view: View) -> None:
    """Across the corpus: the massive-corpus job's aggregates and the zero/mean ablation."""
    from backend.jobs import massive_corpus as mc
    from backend.store import default_store

    from backend.figures import neuron as figures_neuron

    st.subheader("Across the corpus")
    store = default_store()
    job = mc.finished_job(store, view.model)
    if job is None:
        st.info("Not computed yet: a resumable job scans corpus windows with the on-the-fly kernel "
                f"(CLI: `python -m backend massive-corpus --model {view.model}`).", icon=":material/info:")
        run_job_button("Scan 256 corpus windows",
                       lambda progress: mc.run(mc.MassiveCorpusJob(model=view.model), progress=progress), "w_mc_run")
        return
    summ = mc.summary(store, job)
    st.caption(f"{job.n_windows} train windows of {job.length} tokens · criterion |value| ≥ {job.abs_threshold:g} "
               f"and ≥ {job.ratio_threshold:g} × the sequence's layer median · job `{job.key()}`")
    if summ["appears"] is None:
        st.info("In no layer do at least half the sequences have a massive activation under this criterion.")
    else:
        dims = ", ".join(f"{d['dim']} (layers {d['appears']}–{d['last']}, mean {d['mean_value']:.0f}, "
                         f"std {d['mean_std']:.0f})" for d in summ["dims"])
        st.success(f"Massive activations appear at layer {summ['appears']} and stay through layer "
                   f"{summ['vanishes_after']} (in ≥ half the sequences), in dimension(s) {dims}.")
    st.plotly_chart(figures_neuron.massive_corpus_layers(summ["layers"]), key="mc_layers")
    c1, c2 = st.columns([3, 2])
    c1.plotly_chart(figures_neuron.massive_corpus_dims(mc.dims(store, job.key())), key="mc_dims")
    with c2:
        st.markdown("**Token kinds** carrying them (entries over all layers)")
        st.dataframe(pd.DataFrame(summ["kinds"]), hide_index=True,
                     column_config={"share": st.column_config.NumberColumn(format="%.3f")})
    spec = make_spec(mc.MassiveCorpusAblationSpec, model=view.model, job_key=job.key())
    if spec is None:
        return
    import backend

    if backend.lookup(spec) is None and not st.session_state.get("w_mc_ablate"):
        st.info("The zero-vs-mean ablation on held-out corpus windows has not run yet (three forwards of "
                f"{spec.n_heldout} windows of {job.length} tokens: well under a minute on a quiet machine).", icon=":material/info:")
        if not st.button("Run the ablation", key="w_mc_ablate"):
            return
    out = fetch(spec, "ablation on held-out corpus windows")
    if out is not None:
        r = out.result
        c1, c2 = st.columns([2, 3])
        c1.plotly_chart(figures_neuron.ablation_bars(r.loss_original, r.loss_zero, r.loss_mean, r.layer),
                        key="mc_ablation")
        c2.markdown(f"**The paper's intervention** at layer {r.layer} ({r.layer_chosen}) on {r.n_windows} held-out "
                    f"windows ({r.n_tokens} predicted tokens, {r.n_entries} massive entries changed):\n\n"
                    f"| | loss (nats) | perplexity |\n|---|---|---|\n"
                    f"| original | {r.loss_original:.4f} | {r.ppl_original:.2f} |\n"
                    f"| set to zero | {r.loss_zero:.4f} | {r.ppl_zero:.2f} |\n"
                    f"| set to the corpus mean | {r.loss_mean:.4f} | {r.ppl_mean:.2f} |\n\n"
                    "Corpus means used: " + ", ".join(f"dim {d['dim']}: {d['mean']:.1f}" for d in r.dims))
