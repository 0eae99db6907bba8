"""SAE features page: which latents of a sparse autoencoder fire on each token of the prompt,
each with its label (stored by `feature-scores`) on hover and in the table."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from backend.analyses.features import FeaturesSpec
from backend.errors import DashboardError
from backend.jobs.features.scores import labels as feature_labels
from backend.saes import list_saes
from backend.store import default_store
from backend import figures
from backend.figures.features import feature_click_overlay

from ..common import main_result, make_spec, navigate
from ..state import View


def _quality_table(saes: list[dict]) -> pd.DataFrame:
    rows = []
    for s in saes:
        q = (s.get("quality") or {}).get("heldout", {})
        u = (s.get("quality") or {}).get("unlike_training", {})
        rows.append({"SAE": s["sae_id"], "hook": s["hook_name"], "width": s["d_sae"], "L0": q.get("l0"),
                     "var. explained (held-out)": q.get("variance_explained"),
                     "var. explained (unlike training)": u.get("variance_explained"),
                     "CE recovered (vs zero)": q.get("ce_recovered"),
                     "CE recovered (vs mean)": q.get("ce_recovered_vs_mean"),
                     "Δ loss (nats)": q.get("delta_loss"), "dead": q.get("dead_fraction")})
    return pd.DataFrame(rows)


def render(view: View) -> View:
    st.header("SAE features")
    saes = list_saes(view.model)
    if not saes:
        st.info(f"No SAE is available for {view.model}. Shipped SAEs are for smollm2-135m; any SAELens-format "
                "folder or pretrained release can be named in the link's `sae` field.")
        if view.sae == View().sae:          # the default SAE belongs to another model: nothing to run
            return view
    ids = [s["sae_id"] for s in saes]
    if ids:
        choice = st.selectbox("SAE", ids + ([view.sae] if view.sae not in ids else []),
                              index=ids.index(view.sae) if view.sae in ids else len(ids))
        if choice != view.sae:
            navigate(view.replace(sae=choice, key=""))
        with st.expander("Quality of the shipped SAEs"):
            st.dataframe(_quality_table(saes), hide_index=True,
                         column_config={c: st.column_config.NumberColumn(format="%.3f")
                                        for c in _quality_table(saes).columns[3:]})
    spec = make_spec(FeaturesSpec, model=view.model, sae=view.sae, text=view.text)
    view, out = main_result(view, spec, "SAE decomposition")
    if out is None:
        return view
    r = out.result
    st.caption(f"{r.sae_id} at `{r.hook_name}`, {r.d_sae} latents. Mean L0 {r.l0.mean():.1f}; "
               f"median reconstruction error {float(pd.Series(r.recon_error).median()):.3f} of the squared norm. "
               "Position 0 carries the massive activations and reconstructs poorly.")
    fig = figures.feature_heatmap(r.tokens, r.feature_ids, r.feature_values, r.recon_error)
    rows = [int(t.lstrip("#")) for t in (fig.layout.yaxis.ticktext or ())]   # the heatmap's features, top down
    try:
        names = feature_labels(default_store(), r.sae_id)
    except DashboardError:
        names = {}
    feature_click_overlay(fig, rows, len(r.tokens), r.tokens, names)
    st.caption("Click a cell to open that feature's dashboard (corpus examples, logit effects, similar features).")
    event = st.plotly_chart(fig, key=f"feat-{out.run_key}", on_select="rerun", selection_mode="points")
    points = [p for p in (event.selection.points if event else []) if p.get("curve_number") == 2]
    if points:
        navigate(view.replace(page="feature", feature=rows[int(points[0]["y"])], key=""))
    short = lambda f: names.get(f, "").split(" · promotes: ")[0].removeprefix("fires on: ")  # noqa: E731
    rows = [{"pos": p, "token": figures.fmt_token(t),
             "top features": " | ".join(f"#{f['feature']} ({f['value']:.1f})" + (f" {short(f['feature'])}"
                                        if names.get(f["feature"]) else "") for f in feats[:5])}
            for p, (t, feats) in enumerate(zip(r.tokens, r.top_features()))]
    if names:
        st.caption("Beside each feature: the tokens it fires on at its top corpus examples (hover the heatmap for the "
                   "full label with the tokens it promotes).")
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    return view
