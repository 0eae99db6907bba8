"""Circuits page: EAP / EAP-IG edge scores or ACDC's pruning, the circuit run exactly
(faithfulness); click a node or an edge to remove it and rerun; the faithfulness of any circuit
under every ablation x metric x direction; the three methods' faithfulness against edges; save
circuits with links."""

from __future__ import annotations

from urllib.parse import urlencode

import streamlit as st

from backend.analyses.circuits import (CIRCUIT_METHODS, CIRCUIT_METRICS, CircuitAblationsSpec, CircuitSpec,
                                       save_circuit, saved_circuits)
from backend.errors import DashboardError
from backend import figures
from backend.figures.circuits import ablation_heatmap, circuit_graph, clicked_item, method_curves_figure

from ..common import fetch, form_result, model_dims, navigate, pair_inputs, synced
from ..state import View, view_params
from .patching import TASKS

METHOD_LABELS = {"eap": "EAP (1 forward + backward)", "eap-ig": "EAP-IG (integrated gradients, 5 steps)",
                 "acdc": "ACDC (prune edge by edge, runs)"}
DEFAULT_TAU = 0.05
VIEWS = {"": "Circuit graph", "ablations": "Ablation table (faithfulness every way)"}


def tau_of(view: View) -> float:
    try:
        return float(view.tau) if view.tau else DEFAULT_TAU
    except ValueError:
        return DEFAULT_TAU


def _form(view: View) -> View:
    with st.form("circuit_form"):
        c1, c2, c3, c4, c5 = st.columns(5)
        task = c1.selectbox("Task", list(TASKS), format_func=TASKS.get,
                            index=list(TASKS).index(view.task) if view.task in TASKS else 0)
        method = c2.selectbox("Method", CIRCUIT_METHODS, format_func=METHOD_LABELS.get,
                              index=CIRCUIT_METHODS.index(view.method) if view.method in CIRCUIT_METHODS else 0)
        metric = c3.selectbox("Metric", CIRCUIT_METRICS, format_func=lambda m: figures.METRIC_LABELS[m].split(" (")[0],
                              index=CIRCUIT_METRICS.index(view.metric) if view.metric in CIRCUIT_METRICS else 0)
        top_n = c4.number_input("Edges kept (top-n by |score|)", 1, CircuitSpec.MAX_TOP_N,
                                min(max(view.top_n, 1), CircuitSpec.MAX_TOP_N), help="EAP / EAP-IG")
        tau = c5.number_input("ACDC τ", min_value=1e-6, max_value=100.0, value=tau_of(view), format="%.4g",
                              help="ACDC removes an edge when the metric changes by less than τ (KL is "
                                   "the paper's metric; a task metric counts its drop)")
        pair = pair_inputs(view)
        if st.form_submit_button("Find circuit", type="primary"):
            return view.replace(task=task, method=method, metric=metric, top_n=int(top_n), **pair,
                                tau="" if method != "acdc" else f"{tau:g}", removed="", circuit="", key="")
    return view


def removed_list(view: View) -> tuple[str, ...]:
    return tuple(r for r in view.removed.split(";") if r.strip())


def spec_of(view: View, removed: tuple[str, ...] | None = None) -> CircuitSpec:
    kw = dict(metric=view.metric, method=view.method, top_n=view.top_n,
              removed=removed_list(view) if removed is None else removed)
    if view.method == "acdc":
        kw.update(threshold=tau_of(view), top_n=0)
    if view.task == "custom":
        return CircuitSpec(model=view.model, clean=view.clean, corrupt=view.corrupt, answer=view.answer,
                           wrong=view.wrong, **kw)
    from backend.store import default_store
    from backend.tasks import stored_pairs

    return CircuitSpec.from_pairs(view.model, stored_pairs(default_store(), view.model, view.task, view.n_pairs), **kw)


def render(view: View) -> View:
    st.header("Circuits")
    st.caption("Edge attribution patching scores every edge of the graph (embeddings → heads / MLPs → "
               "logits); the top edges form a circuit, which is then RUN: every edge outside it carries "
               "the corrupted activation. Faithfulness = (M(circuit) − M(corrupt)) / (M(clean) − M(corrupt)). "
               "Click a node or an edge (its midpoint) to remove it and rerun.")
    view, out = form_result(view, _form, spec_of, "circuit")
    if out is None:
        return view
    spec = out.spec
    r = out.result
    removed = removed_list(view)
    prev = None
    if removed:
        prev_out = fetch(spec.replace(removed=removed[:-1]), "circuit before the last removal")
        prev = prev_out.result.faithfulness if prev_out else None
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("faithfulness", f"{r.faithfulness:.3f}",
              delta=None if prev is None else f"{r.faithfulness - prev:+.3f}",
              help="fraction of the clean-vs-corrupt metric gap the circuit recovers, by running it")
    c2.metric("before the last removal", "–" if prev is None else f"{prev:.3f}")
    c3.metric("edges / nodes", f"{len(r.edge_score)} / {len(r.nodes)}",
              help=f"{r.n_selected} edges selected of {r.n_edges_total}; dangling ones pruned")
    c4.metric("metric: clean / corrupt / circuit",
              f"{r.clean_metric:.2f} / {r.corrupt_metric:.2f} / {r.circuit_metric:.2f}")
    st.caption(f"{r.n_pairs} pair(s) · logit difference clean {r.clean_logit_diff:.2f}, corrupted "
               f"{r.corrupt_logit_diff:.2f} · method {r.method} · metric {r.metric}")
    info = model_dims(view.model)
    if info is None:
        return view
    cview = st.radio("Show", list(VIEWS), format_func=VIEWS.get, horizontal=True,
                     index=list(VIEWS).index(view.cview) if view.cview in VIEWS else 0)
    if cview != view.cview:
        navigate(view.replace(cview=cview, key=""))
    if r.method == "acdc":
        _acdc(spec, r)
    if view.cview == "ablations":
        _ablations(spec)
        return _saved(view, spec, r)
    title = ((f"Circuit: ACDC τ = {r.threshold:g} (width ∝ |metric change when kept|)" if r.method == "acdc" else
              f"Circuit: top {r.top_n} edges by |{r.method.upper()} score| (width ∝ |score|; blue +, red −)")
             + (f", {len(removed)} removed" if removed else ""))
    fig, items = circuit_graph(r.nodes, r.edge_from, r.edge_to, r.edge_score, info["n_layers"], info["n_heads"], title)
    event = st.plotly_chart(fig, key=f"circuit-{out.run_key}", on_select="rerun", selection_mode="points")
    points = event.selection.points if event else []
    item = clicked_item(points, fig, items) if points else None
    if item:
        target = item.split(":", 1)[1]
        if target not in removed:
            navigate(view.replace(removed=";".join(removed + (target,)), circuit="", key=""))
    if removed:
        st.markdown("**Removed** (in click order): " + ", ".join(f"`{x}`" for x in removed))
        if st.button("Restore all removed nodes and edges"):
            navigate(view.replace(removed="", circuit="", key=""))
    with st.expander(f"Edges of the circuit ({len(r.edge_score)})"):
        st.dataframe([{"from": str(u), "to": str(d), "score": float(s)}
                      for u, d, s in zip(r.edge_from, r.edge_to, r.edge_score)], hide_index=True)
    return _saved(view, spec, r)


def _saved(view: View, spec: CircuitSpec, r) -> View:
    st.subheader("Saved circuits")
    with st.form("save_circuit"):
        name = st.text_input("Name this circuit", key=synced("w_circuit_name", ""))
        if st.form_submit_button("Save circuit"):
            try:
                cid = save_circuit(name, spec, r.faithfulness, link=view_params(view.replace(circuit="")))
                view = view.replace(circuit=cid)
                st.success(f"Saved as {name!r} ({cid}).")
            except DashboardError as e:
                st.error(str(e), icon=":material/warning:")
    rows = saved_circuits(model=view.model)
    if not rows:
        st.caption("No saved circuits yet.")
    for c in rows:
        mark = " ← this view" if c["id"] == view.circuit else ""
        s = c["spec"]
        size = f"τ {s.threshold:g}" if s.method == "acdc" else f"top {s.top_n}"
        st.markdown(f"- [{c['name']}](?{urlencode(c['link'])}) · {s.method}, {size}"
                    f"{', ' + str(len(s.removed)) + ' removed' if s.removed else ''} · faithfulness "
                    f"{c['faithfulness']:.3f} · `{c['id']}`{mark}")
    return view


def _acdc(spec: CircuitSpec, r) -> None:
    """ACDC's search: forward passes, the overlap with EAP / EAP-IG of the same size, the log of
    removals, and the three methods' faithfulness against edges."""
    from backend.analyses.acdc import method_curves, removed_log

    c1, c2 = st.columns(2)
    c1.metric("ACDC forward passes", f"{r.forward_passes:,}", help="one per edge measured, plus the first run")
    c2.metric("edges kept by ACDC (before pruning)", f"{r.n_selected}")
    if r.overlaps:
        st.markdown("**Overlap with the gradient methods** (same task, as many edges)")
        st.dataframe([{"method": o["method"].upper(), "edges": o["edges"], "edge Jaccard": round(o["jaccard"], 3),
                       "faithfulness": round(o["faithfulness"], 3), "metric": o["metric"]} for o in r.overlaps],
                     hide_index=True)
    log = [x for x in removed_log(r) if x["measured"]]
    with st.expander(f"Removed edges, in the order visited ({len(log)} measured; the others' receivers "
                     "reached nothing: change 0)"):
        st.dataframe(log, hide_index=True)
    if st.checkbox("Faithfulness vs edges: EAP, EAP-IG and ACDC (logit difference)", key="acdc_curves"):
        with st.spinner("EAP / EAP-IG curves…"):
            curves = method_curves(spec, [5, 10, 20, 50, 100, 200, 500], [spec.replace(removed=())])
        st.plotly_chart(method_curves_figure(curves, "Faithfulness vs circuit size: three methods, one task"),
                        key=f"curves-{spec.key()}")


def _ablations(spec: CircuitSpec) -> None:
    out = fetch(spec.as_task(CircuitAblationsSpec), "ablation table")
    if out is None:
        return
    r = out.result
    prompts = f"{r.n_reference} corrupted prompt{'s' if r.n_reference != 1 else ''}"
    st.plotly_chart(ablation_heatmap(r.rows, f"Faithfulness of this circuit ({r.n_edges} edges) every way: "
                                              f"ablation × metric × direction (mean ablation over {prompts})"),
                    key=f"ablations-{out.run_key}")
    vals = [x["faithfulness"] for x in r.rows if x["faithfulness"] is not None]
    if vals:
        st.caption(f"Spread: {min(vals):.3f} to {max(vals):.3f}. Denoising: only the circuit's edges carry the "
                   "clean run; noising: only they are ablated (1 − the share of the effect left). Resample · "
                   "denoising · logit difference is the faithfulness above."
                   + (" With one pair the mean over the corrupted prompts is that prompt: mean ablation equals "
                      "resample; a built-in task with more pairs separates them." if r.n_reference == 1 else ""))
    st.dataframe(r.rows, hide_index=True)
