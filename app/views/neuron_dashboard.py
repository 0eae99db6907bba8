"""Neuron (corpus) page: per-layer neuron statistics over the corpus, or one neuron's top
contexts, histogram and direct logit effect. Reads the neuron-statistics job from the store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from backend import NeuronLogitSpec, figures
from backend.jobs import neuron_stats as ns
from backend.errors import DashboardError
from backend.store import default_store
from backend.figures import neuron as figures_neuron

from ..common import fetch, first_start_building, make_spec, metrics_row, model_dims, navigate, run_job_button, synced
from ..state import View


def _run_job_button(view: View) -> None:
    st.info("The neuron statistics of this model have not been computed yet. They come from a resumable job "
            "over corpus windows (CLI: `python -m backend neuron-stats --model "
            f"{view.model} --windows {ns.DEFAULT_WINDOWS}`).", icon=":material/info:")
    n = st.number_input("corpus windows (128 tokens each)", min_value=4, max_value=20000,
                        value=ns.DEFAULT_WINDOWS, step=16, key="w_ns_windows")
    run_job_button("Compute neuron statistics",
                   lambda progress: ns.run(ns.NeuronStatsJob(model=view.model, n_windows=int(n)), progress=progress),
                   "w_ns_run", primary=True)


def render(view: View) -> View:
    st.header("Neuron (corpus)")
    dims = model_dims(view.model)
    if dims is None:
        return view
    n_layers, d_mlp = dims["n_layers"], dims["d_mlp"]
    try:
        ns.check_site(n_layers, d_mlp, view.layer, view.neuron if view.neuron >= 0 else None)
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return view
    store = default_store()
    job = ns.finished_job(store, view.model)
    if job is None:
        if not first_start_building("The neuron statistics of this model"):
            _run_job_button(view)
        return view
    summ = ns.summary(store, job)
    thr = summ["thresholds"]
    st.caption(f"{summ.get('tokens', '?')} tokens in {job.n_windows} windows of {job.length} ({job.split} split) · "
               f"job `{job.key()}` · {ns.DEFINITION}. Token detector: ≥ {ns.DETECTOR_TOP1:.0%} of the activation "
               f"mass on one token id or ≥ {ns.DETECTOR_TOP5:.0%} on five; positional: ≥ {ns.POSITIONAL_SHARE:.0%} "
               "of the variance explained by position (adjusted η²) and more than by token.")
    if view.neuron < 0:
        return _layer_view(view, store, job, n_layers)
    return _neuron_view(view, store, job, thr[view.layer])


def _layer_view(view: View, store, job, n_layers: int) -> View:
    rows = ns.layer_summaries(store, job.key()).to_pylist()
    st.plotly_chart(figures_neuron.layer_summary(rows), key="ns_layers")
    layer = st.select_slider("Layer", options=list(range(n_layers)), key=synced("w_nslayer", view.layer))
    view = view.replace(layer=layer)
    t = ns.layer_neurons(store, job.key(), layer).to_pandas()
    r = rows[layer]
    st.markdown(f"**Layer {layer}**: {r['dead']} dead, {r['token_detectors']} token detectors, "
                f"{r['n_positional']} positional; mean frequency {r['mean_freq']:.3f}.")
    kind = st.radio("Notable neurons", ["token detectors", "positional", "largest max", "most frequent", "dead"],
                    horizontal=True, key="w_nskind")
    sel = {"token detectors": t[t.token_detector].sort_values("top1_share", ascending=False),
           "positional": t[t.is_positional].sort_values("pos_share", ascending=False),
           "largest max": t.sort_values("max", ascending=False),
           "most frequent": t.sort_values("freq", ascending=False),
           "dead": t[t.dead]}[kind].head(50)
    sel = sel.assign(top_tokens=[" | ".join(figures.fmt_token(s) for s in _token_strings(view.model, [i for i in x[:5] if i >= 0]))
                                 for x in sel.top_tokens])
    st.caption("Click a row to open the neuron.")
    event = st.dataframe(sel[["neuron", "freq", "max", "mean", "std", "top1_share", "top5_share", "pos_share",
                              "tok_share", "top_tokens"]], hide_index=True, on_select="rerun",
                         selection_mode="single-row", key=f"ns_table_{layer}_{kind}",
                         column_config={c: st.column_config.NumberColumn(format="%.3f")
                                        for c in ("freq", "max", "mean", "std", "top1_share", "top5_share",
                                                  "pos_share", "tok_share")})
    picked = event.selection.rows if event else []
    if picked:
        navigate(view.replace(neuron=int(sel.iloc[picked[0]]["neuron"])))
    return view


def _neuron_view(view: View, store, job, threshold: float) -> View:
    layer, neuron = view.layer, view.neuron
    row = ns.neuron_stats(store, job.key(), layer, neuron)
    if row is None:
        st.error(f"No statistics for L{layer}N{neuron} in job {job.key()}.", icon=":material/warning:")
        return view
    if st.button("← all neurons of this layer"):
        navigate(view.replace(neuron=-1))
    st.markdown(f"### Layer {layer}, neuron {neuron} (L{layer}N{neuron})")
    tags = [x for x, on in (("dead", row["dead"]), ("token detector", row["token_detector"]),
                            ("positional", row["is_positional"])) if on]
    metrics_row([("frequency", f"{row['freq']:.4f}"), ("max", f"{row['max']:.3f}"), ("mean", f"{row['mean']:.3f}"),
                 ("std", f"{row['std']:.3f}"),
                 ("top-1 / top-5 token share", f"{row['top1_share']:.2f} / {row['top5_share']:.2f}"),
                 ("var. share: pos / token", f"{row['pos_share']:.2f} / {row['tok_share']:.2f}")])
    st.markdown(f"**Kind:** {', '.join(tags) or 'none of dead / token detector / positional'} · active when "
                f"value > {threshold:.3g} (this layer's threshold)")
    cspec = make_spec(ns.NeuronContextsSpec, model=view.model, job_key=job.key(), layer=layer, neuron=neuron)
    out = fetch(cspec, f"top contexts of L{layer}N{neuron}") if cspec else None
    left, right = st.columns([3, 2])
    with left:
        st.markdown("**Top-20 corpus contexts** (red: positive, blue: negative, white: 0; the max is underlined)")
        if out is not None:
            ctxs = out.result.contexts
            bound = max([abs(a) for c in ctxs for a in c["acts"]] + [1e-9])
            lines = []
            for c in ctxs:
                mark = c["pos"] - c["first"]
                lines.append(f"<div style='margin:2px 0'><code>{c['value']:.2f}</code> "
                             f"<span style='color:#888'>doc {c['doc']} · pos {c['pos']}</span> "
                             f"{figures_neuron.context_html(c['tokens'], c['acts'], bound, mark)}</div>")
            st.markdown("".join(lines), unsafe_allow_html=True)
    with right:
        st.plotly_chart(figures_neuron.neuron_histogram(row["hist"], ns.HIST_EDGES, threshold,
                                                        f"Activations of L{layer}N{neuron} over the corpus"),
                        key="ns_hist")
        if row["top_tokens"] and row["top_tokens"][0] >= 0:
            toks = _token_strings(view.model, [t for t in row["top_tokens"] if t >= 0])
            mass = row["mass"] or 1.0
            st.dataframe(pd.DataFrame({"token": [figures.fmt_token(t) for t in toks],
                                       "share of activation mass": np.array(row["top_token_mass"][:len(toks)]) / mass,
                                       "active count": row["top_token_count"][:len(toks)]}),
                         hide_index=True, column_config={"share of activation mass":
                                                         st.column_config.NumberColumn(format="%.3f")})
    lspec = make_spec(NeuronLogitSpec, model=view.model, layer=layer, neuron=neuron)
    lout = fetch(lspec, f"logit effect of L{layer}N{neuron}") if lspec else None
    if lout is not None:
        lists = lout.result.as_lists()
        st.plotly_chart(figures.logit_effect_bars(lists["promoted"], lists["suppressed"],
                                                  f"Direct logit effect of L{layer}N{neuron}"), key="ns_logit")
        st.caption(f"Computed as {lout.result.convention}. Per unit of activation.")
    return view


@st.cache_resource
def _tokenizer(model_id: str):
    """The model's tokenizer.json through `tokenizers` (no torch, no model load)."""
    from tokenizers import Tokenizer

    from backend.model import OFFLINE_MODELS, converted_dir
    return Tokenizer.from_file(str(converted_dir(OFFLINE_MODELS[model_id]) / "tokenizer.json"))


def _token_strings(model_id: str, ids: list[int]) -> list[str]:
    try:
        tok = _tokenizer(model_id)
        return [tok.decode([i]) for i in ids]
    except Exception:  # a hub model or no converted checkpoint: show ids
        return [f"#{i}" for i in ids]
