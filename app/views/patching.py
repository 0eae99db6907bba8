"""Activation patching page: a sweep heatmap; click a cell and that one patch runs live."""

from __future__ import annotations

import streamlit as st

from backend.analyses.patching import DIRECTIONS, METRICS, InterventionSpec, PatchSpec
from backend.patch_sites import ATP_SITES, SITE_AXES, SITE_LABELS, SITES, STAR_SITES
from backend.errors import DashboardError
from backend import figures

from ..common import fetch, form_result, navigate, pair_inputs, synced
from ..state import View

TASKS = {"custom": "your own pair", "ioi": "IOI (names)", "induction": "induction (repeated tokens)",
         "facts": "factual recall"}
ATP_MODES = {0: "off", 1: "AtP", 2: "AtP* (QK fix + GradDrop)"}


def _form(view: View) -> View:
    with st.form("patch_form"):
        c1, c2, c3, c4 = st.columns(4)
        task = c1.selectbox("Task", list(TASKS), format_func=TASKS.get, index=list(TASKS).index(view.task)
                            if view.task in TASKS else 0)
        site = c2.selectbox("Site", SITES, format_func=SITE_LABELS.get,
                            index=SITES.index(view.site) if view.site in SITES else 0)
        metric = c3.selectbox("Metric", METRICS, format_func=lambda m: figures.METRIC_LABELS[m].split(" (")[0],
                              index=METRICS.index(view.metric) if view.metric in METRICS else 0)
        direction = c4.selectbox("Direction", DIRECTIONS, index=DIRECTIONS.index(view.direction)
                                 if view.direction in DIRECTIONS else 0,
                                 help="denoising: clean activation into the corrupted run; "
                                      "noising: corrupted activation into the clean run")
        pair = pair_inputs(view)
        corruption = st.radio("Corruption", ["", "gaussian"], horizontal=True, index=int(view.corruption == "gaussian"),
                              format_func={"": "symmetric token replacement (the pair)",
                                           "gaussian": "Gaussian noise on the clean prompt's differing tokens' "
                                                       "embeddings (3× std, 4 seeded samples)"}.get)
        if st.form_submit_button("Run sweep", type="primary"):
            return view.replace(task=task, site=site, metric=metric, direction=direction, **pair, cell="", key="",
                                corruption=corruption)
    return view


def _spec(view: View) -> PatchSpec:
    kw = dict(site=view.site, metric=view.metric, direction=view.direction,
              corruption="gaussian" if view.corruption == "gaussian" else "tokens")
    if view.task == "custom":
        return PatchSpec(model=view.model, clean=view.clean, corrupt=view.corrupt, answer=view.answer,
                         wrong=view.wrong, **kw)
    return PatchSpec.from_pairs(view.model, _pairs(view), **kw)


def _pairs(view: View):
    from backend.store import default_store
    from backend.tasks import stored_pairs

    return stored_pairs(default_store(), view.model, view.task, view.n_pairs)


def render(view: View) -> View:
    st.header("Activation patching")
    st.caption("Patch one activation from one run into the other and measure how much of the clean "
               "behaviour comes back. Click a cell of the heatmap to run that patch live.")
    from .patching_das import render_section as das_section   # DAS and the illusion check
    view = das_section(view)
    view, out = form_result(view, _form, _spec, f"{view.site} patching sweep")
    if out is None:
        return view
    spec = out.spec
    r = out.result
    st.markdown(f"**{r.n_pairs} pair(s)** · clean metric {r.clean_metric:.3f} · corrupted {r.corrupt_metric:.3f}"
                f" · logit difference clean {r.clean_logit_diff:.2f}, corrupted {r.corrupt_logit_diff:.2f}")
    axes = SITE_AXES[view.site]
    values = r.values
    pos = None
    if axes == ("layer", "pos", "head"):
        n = len(r.positions)
        pos = view.pos if -n <= view.pos < n else -1
        pos = st.select_slider("Position", options=list(range(n)), value=pos % n,
                               format_func=lambda i: f"{i}: {figures.fmt_token(r.clean_tokens[i])}")
        view = view.replace(pos=pos)
        values = values[:, pos, :]
    if axes[1] == "pos" and len(axes) == 2:
        cols, col_title, labels = r.positions, "position", [figures.fmt_token(t) for t in r.clean_tokens]
    else:
        cols, col_title, labels = r.heads, ("key/value head" if axes[-1] == "kv_head" else "head"), None
    title = f"{SITE_LABELS[view.site]}: {view.direction}, {view.metric}"
    event = st.plotly_chart(figures.patching_heatmap(values, r.layers, cols, col_title, view.metric, title, labels),
                            key=f"sweep-{out.run_key}", on_select="rerun", selection_mode="points")
    points = event.selection.points if event else []
    if points:
        cell = f"{int(points[0]['y'])},{int(points[0]['x'])}"
        if cell != view.cell:
            view = view.replace(cell=cell)
    if view.cell:
        view = _intervention(view, spec, r, values, axes, pos)
    if view.site in STAR_SITES:
        st.subheader("Attribution patching (AtP) against the exact sweep")
        modes = [0, 1, 2] if view.site in ATP_SITES else [0, 2]
        mode = st.radio("Estimate every cell from gradients", modes, format_func=ATP_MODES.get, horizontal=True,
                        key=synced("w_atp", view.atp if view.atp in modes else 0),
                        help="AtP: one forward and one backward pass. AtP*: exact attention patterns for "
                             "query/key patches, and GradDrop (one batched pass with the gradient "
                             "stopped at each layer in turn) against cancelling paths.")
        view = view.replace(atp=int(mode))
        if mode:
            _atp(view, r, values, labels if col_title == "position" else [str(h) for h in r.heads], col_title)
    return view


def _atp(view: View, exact, values, labels: list[str], col_title: str) -> None:
    """Attribution patching (Kramár et al. 2024) beside the exact sweep: where the estimate fails."""
    from backend.analyses.atp_star import AtPStarSpec
    from backend.analyses.attribution import AtPSpec, correlation

    if view.metric == "kl" and view.direction == "noising":
        st.info("AtP is zero everywhere for KL when noising: the gradient of KL at the clean run is zero.")
        return
    cls = AtPStarSpec if view.atp == 2 else AtPSpec
    kw = dict(site=view.site, metric=view.metric, direction=view.direction)
    try:
        aspec = (cls(model=view.model, clean=view.clean, corrupt=view.corrupt, answer=view.answer,
                     wrong=view.wrong, **kw) if view.task == "custom" else
                 cls.from_pairs(view.model, _pairs(view), **kw))
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return
    aout = fetch(aspec, "AtP* estimate" if view.atp == 2 else "AtP estimate")
    if aout is None:
        return
    if view.atp == 2:
        _atp_star(view, aspec, exact, aout.result, labels, col_title)
        return
    atp = aout.result.values
    r = correlation(values if exact.values.ndim == 2 else exact.values, atp)
    cells = [f"layer {layer} · {col_title} {labels[j]}" for layer in exact.layers for j in range(len(labels))]
    c1, c2 = st.columns(2)
    c1.plotly_chart(figures.patching_heatmap(atp, exact.layers, list(range(len(labels))), col_title, view.metric,
                                             "AtP estimate", labels), key="atp_map")
    c2.plotly_chart(figures.atp_scatter(values, atp, cells, r), key="atp_scatter")


def _atp_star(view: View, aspec, exact, star, labels: list[str], col_title: str) -> None:
    import pandas as pd

    from backend.analyses.atp_star import compare_with_exact
    from backend.analyses.attribution import correlation

    base = exact.corrupt_metric if view.direction == "denoising" else exact.clean_metric
    exact_d = exact.values - base
    cells = [f"layer {layer} · {col_title} {labels[j]}" for layer in exact.layers for j in range(len(labels))]
    c1, c2 = st.columns(2)
    c1.plotly_chart(figures.patching_heatmap(star.values, exact.layers, list(range(len(labels))), col_title,
                                             view.metric, "AtP* estimate (QK fix where it applies)", labels),
                    key="atp_star_map")
    c2.plotly_chart(figures.atp_star_scatter(exact_d, star.atp_deltas, star.deltas, cells,
                                             correlation(star.atp_deltas, exact_d), correlation(star.deltas, exact_d)),
                    key="atp_star_scatter")
    cmp = compare_with_exact(aspec, star)
    if cmp is None:
        return
    names = {"atp": "AtP", "atp_qk_fix": "AtP + QK fix", "graddrop": "GradDrop", "atp_star": "AtP* (max of both)"}
    rows = [{"estimate": names[k], "false negatives": v["false_negatives"],
             "missed cells (exact change)": ", ".join(f"{cells[m['cell']]} ({m['exact']:+.3f})" for m in v["missed"])}
            for k, v in cmp["methods"].items()]
    st.markdown(f"**False negatives against the exact sweep.** {cmp['important']} cells change the metric by "
                f"at least {cmp['threshold']} exactly; each estimate inspects its top {cmp['inspected']} cells "
                "by magnitude, and a cell that matters but is not among them is a false negative.")
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def _intervention(view: View, spec: PatchSpec, r, values, axes, pos) -> View:
    try:
        layer, other = (int(x) for x in view.cell.split(","))
        sweep_value = float(values[layer, other])
    except (ValueError, IndexError):
        st.error(f"The link's cell {view.cell!r} is not a cell of this heatmap.", icon=":material/warning:")
        return view.replace(cell="")
    where = dict(layer=layer)
    if axes == ("layer", "pos"):
        where["pos"] = other
    elif axes in (("layer", "head"), ("layer", "kv_head")):
        where["head"] = other
    else:
        where.update(pos=pos, head=other)
    try:
        ispec = InterventionSpec(**spec.fields(), layer=where["layer"], pos=where.get("pos", -1),
                                 head=where.get("head", -1))
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return view
    out = fetch(ispec, "the patch")
    if out is None:
        return view
    iv = out.result
    label = ", ".join(f"{k} {v}" for k, v in where.items())
    st.subheader(f"Patch at {label}")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("metric before", f"{iv.before:.3f}")
    c2.metric("metric after", f"{iv.after:.3f}", delta=f"{iv.after - iv.before:+.3f}")
    c3.metric("stored sweep value", f"{sweep_value:.3f}",
              help="the value of this cell in the sweep (averaged over pairs when there are several)")
    c4.metric("round trip", f"{iv.seconds * 1000:.0f} ms" if not out.from_store
              else f"{out.read_seconds * 1000:.0f} ms", help="computed live" if not out.from_store
              else f"read from the store (the patch took {iv.seconds * 1000:.0f} ms when clicked)")
    st.plotly_chart(figures.before_after_bars(iv.top_before, iv.top_after, spec.answer, spec.wrong),
                    key="before_after")
    return view
