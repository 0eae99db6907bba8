"""The DAS section of the activation patching page: is this variable in this subspace?

A form (task, site, layer, position, K, boundless, steps), the run's numbers and training curve,
the layer x position IIA sweep at K = 1 (click a cell to open its run, read from the store), and
the illusion check of the open run (the rowspace / nullspace split of its direction).
"""

from __future__ import annotations

import streamlit as st

from backend.analyses.das import SITES, DASSpec, DASSweepSpec
from backend.analyses.illusion import IllusionSpec
from backend.errors import DashboardError
from backend.figures.das import iia_heatmap, illusion_figure, training_curve

from ..common import fetch, link_of, metrics_row, navigate
from ..state import View

TASKS = {"ioi": "IOI: the indirect object's name", "country-capital": "country → capital"}
SITE_LABELS = {"resid_pre": "residual stream (resid_pre)", "mlp_post": "MLP hidden units (mlp_post)",
               "attn_z": "attention z, all heads flattened (attn_z)"}


def _ints(text: str) -> tuple:
    return tuple(int(x) for x in text.replace(" ", "").split(",") if x)


def run_spec(view: View) -> DASSpec:
    """The run the view shows: a sweep's cell (K = 1, not boundless, a layer and position of the sweep)
    is the sweep's own stored run (its lr and batch), so a click opens it without training again."""
    if view.das_sweep and view.das_dim == 1 and not view.das_bl:
        try:
            sweep = sweep_spec(view)
        except DashboardError:
            sweep = None
        if sweep and view.das_layer in sweep.layers and view.das_pos in sweep.positions:
            return sweep.cell(view.das_layer, view.das_pos)
    return DASSpec(model=view.model, task=view.das_task, n=view.das_n, site=view.das_site, layer=view.das_layer,
                   pos=view.das_pos, dim=view.das_dim, boundless=bool(view.das_bl), steps=view.das_steps)


def sweep_spec(view: View) -> DASSweepSpec:
    try:
        layers, positions = _ints(view.das_sl), _ints(view.das_sp)
    except ValueError:
        from backend.errors import InvalidSpec

        raise InvalidSpec(f"Sweep layers and positions are comma-separated numbers, not {view.das_sl!r} / "
                          f"{view.das_sp!r}.") from None
    return DASSweepSpec(model=view.model, task=view.das_task, n=view.das_n, site=view.das_site, layers=layers,
                        positions=positions, steps=view.das_steps)


def _form(view: View) -> View:
    with st.form("das_form"):
        c1, c2, c3, c4, c5 = st.columns([3, 3, 1, 1, 1])
        task = c1.selectbox("Task", list(TASKS), format_func=TASKS.get,
                            index=list(TASKS).index(view.das_task) if view.das_task in TASKS else 0)
        site = c2.selectbox("Site", SITES, format_func=SITE_LABELS.get,
                            index=SITES.index(view.das_site) if view.das_site in SITES else 0)
        layer = c3.number_input("Layer", 0, 200, view.das_layer)
        pos = c4.number_input("Position", -64, 512, view.das_pos, help="a token index; -1 = the last token")
        dim = c5.number_input("K", 1, 4096, view.das_dim, help="the subspace's dimension")
        d1, d2, d3, d4, d5 = st.columns([2, 2, 2, 3, 3])
        bl = d1.checkbox("Boundless", value=bool(view.das_bl), help="learn a soft mask over a full rotation "
                         "(Wu et al.); the dimension is learned")
        steps = d2.number_input("Steps", 1, 5000, view.das_steps)
        n = d3.number_input("Examples", 4, 1024, view.das_n)
        sl = d4.text_input("Sweep layers", view.das_sl, help="comma-separated; empty = every layer")
        sp = d5.text_input("Sweep positions", view.das_sp, help="comma-separated token indices; empty = all")
        b1, b2 = st.columns(2)
        go_run = b1.form_submit_button("Train DAS", type="primary")
        go_sweep = b2.form_submit_button("Sweep layers × positions (K = 1)")
        if go_run or go_sweep:
            return view.replace(das_task=task, das_site=site, das_layer=int(layer), das_pos=int(pos), das_dim=int(dim),
                                das_bl=int(bl), das_steps=int(steps), das_n=int(n), das_sl=sl, das_sp=sp,
                                das_sweep=int(go_sweep or view.das_sweep), das_ill=0)
    return view


def render_section(view: View) -> View:
    """The DAS section (a toggle; open when the link says so)."""
    on = st.toggle("Subspaces: distributed alignment search (DAS) and the illusion check", value=bool(view.das_on),
                   key="w_das_on", help="Is a causal variable encoded in a low-dimensional subspace at a site?")
    if bool(on) != bool(view.das_on):
        navigate(view.replace(das_on=int(on)))
    if not on:
        return view
    st.caption("DAS learns a K-dimensional subspace at one site and position such that swapping just that "
               "subspace from a source prompt into a base prompt makes the model answer what the causal "
               "variable's source value says (interchange-intervention accuracy, IIA, on held-out examples). "
               "The illusion check asks whether a 1-D subspace works through the next weights' row space or "
               "through a dormant pathway (Makelov, Lange & Nanda).")
    new = _form(view)
    if new != view:
        navigate(new)
    if view.das_sweep:
        view = _sweep(view)
    try:
        spec = run_spec(view)
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return view
    out = fetch(spec, "DAS run")
    if out is None:
        return view
    _run(out)
    if st.button("Illusion check of this run's direction", key="das_ill_btn") and not view.das_ill:
        navigate(view.replace(das_ill=1))
    if view.das_ill:
        _illusion(view, out)
    st.markdown(f"[Link to this DAS view]({link_of(view)})")
    return view


def _run(out) -> None:
    r = out.result
    st.subheader(f"DAS at {r.site}, layer {r.layer}, position {r.position}: K = {r.dim}")
    metrics_row([("IIA (held out)", f"{r.iia:.2f}"), ("IIA (train)", f"{r.iia_train:.2f}"),
                 ("whole-vector IIA", f"{r.iia_full:.2f}"), ("no-intervention IIA", f"{r.iia_baseline:.2f}"),
                 ("logit diff recovered", f"{r.logit_diff_recovered:.2f}")])
    st.caption(f"{r.n_train} training and {r.n_test} held-out examples ({r.n_dropped} the model got wrong were "
               f"dropped first); {r.steps_per_second:.1f} training steps/s ({r.engine}). Logit difference = "
               "logit(expected) − logit(the base run's own answer): base "
               f"{r.logit_diff_base:.2f}, intervened {r.logit_diff:.2f}, the source run {r.logit_diff_source:.2f}.")
    st.plotly_chart(training_curve(r.curve, f"DAS training at layer {r.layer}, {r.site}"), key=f"das-curve-{out.run_key}")
    if r.examples:
        import pandas as pd

        with st.expander("Held-out examples"):
            st.dataframe(pd.DataFrame(r.examples), hide_index=True, width="stretch")


def _sweep(view: View) -> View:
    try:
        spec = sweep_spec(view)
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return view
    out = fetch(spec, "DAS sweep")
    if out is None:
        return view
    r = out.result
    event = st.plotly_chart(iia_heatmap(r.iia, r.layers, r.positions, r.tokens), key=f"das-sweep-{out.run_key}",
                            on_select="rerun", selection_mode="points")
    st.caption("Best cells: " + "; ".join(f"layer {b['layer']}, position {b['pos']}: IIA {b['iia']:.2f}"
                                          for b in r.best[:3]) + ". Click a cell to open its run.")
    points = event.selection.points if event else []
    if points:
        a, b = int(points[0]["y"]), int(points[0]["x"])
        if 0 <= a < len(r.layers) and 0 <= b < len(r.positions):
            layer, pos = r.layers[a], r.positions[b]
            if (layer, pos, 1, 0) != (view.das_layer, view.das_pos, view.das_dim, view.das_bl):
                navigate(view.replace(das_layer=layer, das_pos=pos, das_dim=1, das_bl=0, das_ill=0))
    return view


def _illusion(view: View, out) -> None:
    from backend.analyses.das import direction_keys

    try:
        key = direction_keys(out)[0]
        spec = IllusionSpec(model=view.model, direction=key)
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return
    ill = fetch(spec, "illusion check")
    if ill is None:
        return
    r = ill.result
    st.subheader("Illusion check of the run's first direction")
    if out.result.dim > 1:
        st.caption(f"The run has K = {out.result.dim}; the check is of its first basis vector.")
    word = {"illusion": ":red[likely an illusion]", "rowspace": ":green[runs through the rowspace]",
            "no effect": "no effect to explain", "no nullspace": ":green[no nullspace at this site]"}[r.verdict]
    st.markdown(f"**Verdict: {word}.** {r.verdict_text}")
    st.caption(f"Next weights: {r.next_weight} {r.next_weight_shape}, rank {r.rank}. ‖v_row‖ = {r.v_row_norm:.3f}, "
               f"‖v_null‖ = {r.v_null_norm:.3f} (cosine of v with the row space {r.cos_rowspace:.3f}); "
               f"{r.n_examples} held-out examples; direction `{key}`.")
    st.plotly_chart(illusion_figure(r.v_row_norm, r.v_null_norm, r.effects,
                                    f"Illusion check at {r.site}, layer {r.layer}"), key=f"das-ill-{ill.run_key}")
