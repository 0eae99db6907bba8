"""Attribution graph page: the features behind the prompt's next token. Click a node for its
edges, pin nodes, group pinned nodes into named supernodes, switch features off and see the
prediction change. Everything (clicked node, pins, supernodes, intervention) is in the link."""

from __future__ import annotations

import re

import streamlit as st

from backend.analyses.graph import GraphSpec
from backend.analyses.graph_intervention import GraphInterventionSpec
from backend.errors import DashboardError
from backend.figures.features import example_html
from backend.figures.graph import clicked_node, graph_figure, intervention_figure
from backend.jobs.features.query import feature_dashboard
from backend.store import default_store

from ..common import fetch, main_result, make_spec, model_dims, navigate
from ..state import View


def _ids(s: str) -> list[str]:
    return [x for x in s.split(";") if x.strip()]


def parse_supers(s: str) -> dict[str, list[str]]:
    """"name:id,id|name:id,id" -> {name: [ids]} (malformed parts are skipped)."""
    out: dict[str, list[str]] = {}
    for part in s.split("|"):
        if ":" in part:
            name, members = part.split(":", 1)
            ids = [m for m in members.split(",") if m]
            if name.strip() and ids:
                out[name.strip()] = ids
    return out


def format_supers(d: dict[str, list[str]]) -> str:
    return "|".join(f"{k}:{','.join(v)}" for k, v in d.items())


def _clean_name(name: str) -> str:
    return re.sub(r"[:|;,=]", " ", name).strip()[:40]


def render(view: View) -> View:
    st.header("Attribution graph")
    st.caption("Which transcoder features carry the prompt's next token: nodes are features (one per active "
               "transcoder latent and position), MLP error terms, input tokens and the top output tokens; an "
               "edge is a direct effect in the local replacement model (attention patterns and norm scales "
               "frozen on this prompt). Pruned by influence on the output, as circuit-tracer prunes.")
    with st.form("graph_form"):
        c1, c2, c3 = st.columns(3)
        tcs = c1.text_input("Transcoder set (empty: the model's shipped set)", value=view.tcs)
        node_thr = c2.number_input("Node threshold (share of influence kept)", 0.05, 1.0, float(view.node_thr), 0.05)
        edge_thr = c3.number_input("Edge threshold", 0.05, 1.0, float(view.edge_thr), 0.01)
        if st.form_submit_button("Trace this prediction", type="primary"):
            new = view.replace(tcs=tcs.strip(), node_thr=float(node_thr), edge_thr=float(edge_thr), key="")
            if new != view:
                navigate(new.replace(gnode="", pinned="", supers="", iv=""))
    spec = make_spec(GraphSpec, model=view.model, text=view.text, transcoders=view.tcs,
                     node_threshold=view.node_thr, edge_threshold=view.edge_thr)
    if spec is None:
        return view
    view, out = main_result(view, spec, "attribution graph")
    if out is None:
        return view
    # the link names the set with its fingerprint ("<set>@<hash>"): reopened after the set was
    # retrained, it still shows this graph from the store, and a recompute says the set changed
    view = view.replace(tcs=spec.transcoders)
    r = out.result
    s = r.scores
    c = st.columns(5)
    c[0].metric("replacement score", f"{s['replacement_score']:.3f}",
                help="share of the tokens' and errors' influence on the logits that starts at tokens (pruned graph; "
                     f"unpruned {s['replacement_score_unpruned']:.3f})")
    c[1].metric("completeness score", f"{s['completeness_score']:.3f}",
                help=f"influence-weighted share of node inputs that are not errors (unpruned {s['completeness_score_unpruned']:.3f})")
    c[2].metric("nodes / edges", f"{_short(len(r.nodes))}/{_short(len(r.edge_weight))}",
                help=f"{len(r.nodes):,} nodes and {len(r.edge_weight):,} edges kept, of {r.n_nodes_unpruned:,} nodes unpruned")
    c[3].metric("active features", f"{r.n_active_features}")
    c[4].metric("top prediction", f"{r.logits[0]['token']!r}", f"p = {r.logits[0]['prob']:.3f}", delta_color="off")
    info = model_dims(view.model)
    if info is None:
        return view
    pinned = _ids(view.pinned)
    supers = parse_supers(view.supers)
    groups = {m: name for name, ms in supers.items() for m in ms}
    ids = [n["id"] for n in r.nodes]
    by_id = {n["id"]: n for n in r.nodes}
    left, right = st.columns([3, 1.3])
    with left:
        fig = graph_figure(r.nodes, r.edge_source, r.edge_target, r.edge_weight, r.tokens, info["n_layers"],
                           f"Attribution graph of {r.logits[0]['token']!r} · transcoders {r.transcoders}",
                           set(pinned), view.gnode, groups)
        event = st.plotly_chart(fig, key=f"graph-{out.run_key}", on_select="rerun", selection_mode="points")
        i = clicked_node(event.selection.points if event else [], fig)
        if i is not None and ids[i] != view.gnode:
            navigate(view.replace(gnode=ids[i]))
        st.caption(f"Node size: influence on the output; blue edges excite, red inhibit (the {min(len(r.edge_weight), 400)} "
                   "largest |weights| drawn). Click a node for its edges.")
    with right:
        view = _side_panel(view, r, by_id, pinned)
    view = _supernodes(view, r, by_id, pinned, supers)
    return _interventions(view, r, by_id, pinned, supers)


def _short(n: int) -> str:
    """A count that fits a fifth of the page's width: 1648, 37.7k, 377k, 1.2M."""
    return (f"{n}" if n < 10_000 else f"{n / 1000:.1f}k" if n < 100_000 else f"{n / 1000:.0f}k" if n < 1_000_000
            else f"{n / 1e6:.1f}M")


def _corpus_examples(view: View, r, n: dict) -> None:
    """The feature's top corpus examples (the transcoder layer's index) and a link to its dashboard."""
    set_id = r.transcoders.split("@")[0]
    sid = f"{set_id}.L{n['layer']}"
    try:
        d = feature_dashboard(default_store(), sid, int(n["feature"]), 3)
    except DashboardError:
        d = None
    if d and d["index"] is not None and d["top"]:
        st.markdown("**Top corpus examples**")
        st.markdown("".join(example_html(ex, d["stats"]["max"], compact=True) for ex in d["top"][:3]), unsafe_allow_html=True)
    else:
        st.caption(f"No corpus index of {sid} yet (the first start builds it; or "
                   f"`python -m backend feature-index --sae {set_id} --windows 32`).")
    if st.button("Open its feature dashboard", key="to_dashboard"):
        navigate(View(page="feature", model=view.model, sae=sid, feature=int(n["feature"])))


def _side_panel(view: View, r, by_id: dict, pinned: list[str]) -> View:
    n = by_id.get(view.gnode)
    if n is None:
        st.info("Click a node of the graph to see its inputs and outputs here.", icon=":material/touch_app:")
        if view.gnode:
            st.caption(f"Node {view.gnode!r} of the link is not in this pruned graph.")
        return view
    st.subheader(n["label"] if n["kind"] != "feature" else f"Feature {n['feature']} · layer {n['layer']}")
    st.markdown(f"`{n['id']}` · {n['kind']} · position {n['pos']} ({r.tokens[n['pos']]!r})")
    if n["kind"] == "feature":
        st.markdown(f"activation **{n['activation']:.3f}** · influence {n['influence']:.4f}  \n"
                    f"decoder promotes: {n['label']}")
        _corpus_examples(view, r, n)
    idx = {k["id"]: j for j, k in enumerate(r.nodes)}
    me = idx[n["id"]]
    ins = sorted([(float(w), r.nodes[s]["id"]) for s, t, w in zip(r.edge_source, r.edge_target, r.edge_weight) if t == me],
                 key=lambda e: -abs(e[0]))[:8]
    outs = sorted([(float(w), r.nodes[t]["id"]) for s, t, w in zip(r.edge_source, r.edge_target, r.edge_weight) if s == me],
                  key=lambda e: -abs(e[0]))[:8]
    if ins:
        st.markdown("**Top inputs**")
        st.dataframe([{"from": k, "label": by_id[k]["label"], "weight": round(w, 4)} for w, k in ins], hide_index=True)
    if outs:
        st.markdown("**Top outputs**")
        st.dataframe([{"to": k, "label": by_id[k]["label"], "weight": round(w, 4)} for w, k in outs], hide_index=True)
    if n["id"] in pinned:
        if st.button("Unpin", key="unpin"):
            navigate(view.replace(pinned=";".join(p for p in pinned if p != n["id"])))
    elif st.button("Pin this node", key="pin", type="primary"):
        navigate(view.replace(pinned=";".join(pinned + [n["id"]])))
    return view


def _supernodes(view: View, r, by_id: dict, pinned: list[str], supers: dict[str, list[str]]) -> View:
    st.subheader("Pinned nodes and supernodes")
    if not pinned:
        st.caption("Pin nodes (click a node, then 'Pin this node') to collect a subgraph and group it into supernodes.")
        return view
    st.markdown("Pinned: " + ", ".join(f"`{p}` ({by_id[p]['label'] if p in by_id else '?'})" for p in pinned))
    with st.form("supernode_form"):
        c1, c2 = st.columns([1, 2])
        name = c1.text_input("Supernode name")
        members = c2.multiselect("Members (pinned nodes)", pinned, default=[p for p in pinned if p not in
                                                                            {m for ms in supers.values() for m in ms}])
        if st.form_submit_button("Group into a supernode"):
            clean = _clean_name(name)
            if not clean or not members:
                st.error("Give the supernode a name and at least one member.", icon=":material/warning:")
            else:
                navigate(view.replace(supers=format_supers({**supers, clean: members})))
    for sname, ms in supers.items():
        feats = [m for m in ms if by_id.get(m, {}).get("kind") == "feature"]
        c1, c2 = st.columns([3, 1])
        c1.markdown(f"**{sname}**: " + ", ".join(f"`{m}`" for m in ms))
        if feats and c2.button(f"Switch off {sname}", key=f"off-{sname}"):
            navigate(view.replace(iv=";".join(f"{m}=0" for m in feats)))
    return view


def _interventions(view: View, r, by_id: dict, pinned: list[str], supers: dict) -> View:
    st.subheader("Intervene on features")
    feats = [n["id"] for n in r.nodes if n["kind"] == "feature"]
    with st.form("intervene_form"):
        c1, c2, c3 = st.columns([3, 1, 1])
        chosen = c1.multiselect("Features", feats, default=[p for p in pinned if p in feats][:8],
                                format_func=lambda k: f"{k} {by_id[k]['label']}")
        how = c2.selectbox("Change", ["switch off", "multiply by", "set to"])
        value = c3.number_input("Value (×k or constant)", value=0.0 if how == "switch off" else 2.0)
        if st.form_submit_button("Run intervention"):
            if chosen:
                val = "0" if how == "switch off" else (f"x{value:g}" if how == "multiply by" else f"{value:g}")
                navigate(view.replace(iv=";".join(f"{k}={val}" for k in chosen)))
            else:
                st.error("Choose at least one feature.", icon=":material/warning:")
    edits = tuple(_ids(view.iv))
    if not edits:
        return view
    spec = make_spec(GraphInterventionSpec, model=view.model, text=view.text, transcoders=view.tcs, edits=edits)
    out = fetch(spec, "intervention") if spec is not None else None
    if out is None:
        return view
    ir = out.result
    t = ir.target
    st.markdown(f"Edits: " + ", ".join(f"`{e['node']}` {e['before']:.3f} → {e['after']:.3f}" for e in ir.edits))
    c = st.columns(3)
    c[0].metric(f"logit of {t['token']!r}", f"{t['logit_after']:.3f}", f"{t['logit_after'] - t['logit_before']:+.3f}")
    c[1].metric(f"p({t['token']!r})", f"{t['prob_after']:.3f}", f"{t['prob_after'] - t['prob_before']:+.3f}")
    c[2].metric("top token after", f"{ir.top_after[0]['token']!r}", f"p = {ir.top_after[0]['prob']:.3f}", delta_color="off")
    st.plotly_chart(intervention_figure(ir.top_before, ir.top_after, "Next-token probabilities before and after the intervention"),
                    key=f"iv-{out.run_key}")
    if st.button("Clear the intervention"):
        navigate(view.replace(iv=""))
    return view
