"""Directions & steering: make a direction (diff-means, CAA, ActAdd, probe; or take an SAE
feature from `?sae=…&feature=N`), see which layer separates the sets, read its projection
on a prompt, steer (default and steered generations side by side), ablate, evaluate.

Everything shown is a stored result: the link carries the direction's key and the steer's
fields, so it reopens from the store without running the model.
"""

from __future__ import annotations

import math

import streamlit as st

import backend
from backend.analyses import directions as D
from backend.analyses import steering as S
from backend.analyses import steering_eval as E
from backend.errors import DashboardError
from backend.store import default_store
from backend.figures.steering import behaviour_curve, layer_curve, probe_scores, projection_heatmap, refusal_bars

from ..common import fetch, main_result, make_spec, navigate, show_status, synced
from ..state import View

METHOD_LABELS = {"diff-means": "difference of means", "caa": "CAA (A/B contrast pairs)",
                 "actadd": "ActAdd (one prompt pair)", "probe": "linear probe (labelled prompts)",
                 "grains": "GrAInS (IG picks the tokens)"}
POSITION_LABELS = {"all": "every position", "from-instruction": "from the end of the instruction on",
                   "prefix": "prompt prefix (ActAdd: its first k positions)"}


def _lines(text: str) -> tuple[str, ...]:
    return tuple(ln.strip() for ln in (text or "").splitlines() if ln.strip())


def _uploaded(f) -> str:
    return f.getvalue().decode("utf-8", errors="replace") if f is not None else ""


def _set_fields(method: str, source: str) -> dict | None:
    """The set fields of a DirectionSpec from the form's widgets (inside the form)."""
    if method == "actadd":
        c1, c2 = st.columns(2)
        return {"positive": (c1.text_input("Positive prompt", " Love", key="w_act_pos"),),
                "negative": (c2.text_input("Negative prompt", " Hate", key="w_act_neg"),), "source": "typed"}
    if source == "shipped":
        names = [n for n, s in D.SHIPPED.items() if s["method"] == method]
        name = st.selectbox("Shipped set", names, format_func=lambda n: D.SHIPPED[n]["label"], key="w_shipped")
        return {"shipped": name}
    if source == "type":
        if method in ("caa", "grains"):
            what = ("{\"question\", \"positive\", \"negative\"}" if method == "caa" else
                    "{\"question\": prompt, \"positive\": preferred next token, \"negative\": dispreferred one}")
            text = st.text_area(f"Pairs, JSON Lines {what}", key=f"w_pairs_text_{method}")
            return {"pairs": tuple(D.parse_pairs(text, "typed pairs")), "source": "typed"}
        c1, c2 = st.columns(2)
        a = c1.text_area("Positive set (label 1), one prompt per line" if method == "probe"
                         else "Positive set, one prompt per line", key="w_pos_text", height=150)
        b = c2.text_area("Negative set (label 0), one prompt per line", key="w_neg_text", height=150)
        if method == "probe":
            pa, pb = _lines(a), _lines(b)
            return {"texts": pa + pb, "labels": (1,) * len(pa) + (0,) * len(pb), "source": "typed"}
        return {"positive": _lines(a), "negative": _lines(b), "source": "typed"}
    if method in ("caa", "grains"):
        f = st.file_uploader("Pairs file (JSON Lines)", type=["jsonl", "json"], key="w_up_pairs")
        return {"pairs": tuple(D.parse_pairs(_uploaded(f), "uploaded pairs")), "source": f"upload:{f.name if f else ''}"}
    if method == "probe":
        f = st.file_uploader("Labelled prompts (CSV or JSON Lines, text + label)", type=["csv", "jsonl"], key="w_up_data")
        texts, labels = D.parse_labelled(_uploaded(f), "uploaded data") if f is not None else ([], [])
        return {"texts": tuple(texts), "labels": tuple(labels), "source": f"upload:{f.name if f else ''}"}
    c1, c2 = st.columns(2)
    fp = c1.file_uploader("Positive prompts (text or JSON Lines)", type=["txt", "jsonl"], key="w_up_pos")
    fn = c2.file_uploader("Negative prompts", type=["txt", "jsonl"], key="w_up_neg")
    return {"positive": tuple(D.parse_prompts(_uploaded(fp), "positive")),
            "negative": tuple(D.parse_prompts(_uploaded(fn), "negative")),
            "source": f"upload:{fp.name if fp else ''},{fn.name if fn else ''}"}


def _make_direction(view: View) -> None:
    with st.expander("Make a direction", expanded=not view.dkey and view.feature < 0):
        c1, c2 = st.columns([3, 2])
        method = c1.radio("Method", list(METHOD_LABELS), format_func=METHOD_LABELS.get, horizontal=True,
                          key="w_dmethod")
        source = "type" if method == "actadd" else c2.radio("Sets", ["shipped", "type", "upload"], horizontal=True,
                                                              key="w_dsource")
        with st.form("w_direction_form"):
            try:
                fields = _set_fields(method, source)
            except DashboardError as e:
                st.error(str(e), icon=":material/warning:")
                fields = None
            c1, c2, c3, c4 = st.columns(4)
            site = c1.selectbox("Site", D.RESID_SITES, index=D.RESID_SITES.index(D.DEFAULT_SITE.get(method, "resid_pre")),
                                key=f"w_dsite_{method}")
            layer = c2.number_input("Layer", 0, 200, 10, key="w_dlayer")
            position = c3.selectbox("Read at", D.POSITIONS, key="w_dposition",
                                    help="last token, or the chat template's post-instruction tokens (averaged)")
            chat = c4.checkbox("Chat template", value=bool(fields and fields.get("shipped") == "refusal"), key="w_dchat")
            top_k = (st.number_input("Tokens per prompt on each side (GrAInS: the top-k positively and negatively "
                                     "attributed by integrated gradients)", 1, 16, 3, key="w_dtopk")
                     if method == "grains" else None)
            if st.form_submit_button("Make direction", type="primary") and fields is not None:
                kw = dict(site=site, layer=int(layer), position=position,
                          chat=bool(chat or position == "post-instruction"))
                if top_k is not None:
                    kw["top_k"] = int(top_k)
                try:
                    if "shipped" in fields:
                        spec = D.shipped_spec(view.model, fields["shipped"], **kw)
                    else:
                        spec = D.DirectionSpec(model=view.model, method=method, **kw, **fields)
                except DashboardError as e:
                    st.error(str(e), icon=":material/warning:")
                    return
                out = fetch(spec, "direction")
                if out is not None:
                    navigate(view.replace(dkey=out.run_key, feature=-1, steer=0, key=""))
        stored = [r for r in default_store().list_runs(kind=D.DirectionSpec.KIND, limit=50) if r["model"] == view.model]
        if stored:
            labels = {r["run_key"]: f"{r['spec']['method']} · {r['spec'].get('site')} L{r['spec'].get('layer')} · "
                                    f"{r['spec'].get('source') or r['spec'].get('sae', '')} · {r['run_key']}"
                      for r in stored if r["spec"]["method"] != "sae"}
            if labels:
                pick = st.selectbox("…or open a stored direction", [""] + list(labels),
                                    format_func=lambda k: labels.get(k, "—"), key="w_open_dir")
                if pick and pick != view.dkey:
                    navigate(view.replace(dkey=pick, feature=-1, steer=0, key=""))


def _target(view: View) -> dict | None:
    """What the page steers with: a stored direction (no model needed) or an SAE feature."""
    if view.dkey:
        try:
            spec, r = D.load_direction(view.dkey)
        except DashboardError as e:
            st.error(str(e), icon=":material/warning:")
            return None
        if spec.model != view.model:
            st.error(f"Direction {view.dkey} was made on {spec.model}, not {view.model}.", icon=":material/warning:")
            return None
        st.subheader(f"Direction: {METHOD_LABELS.get(r.method, r.method)} at {r.hook_name}")
        c = st.columns(4)
        c[0].metric("site · layer", f"{r.site} · {r.layer}")
        c[1].metric("‖vector‖", f"{r.norm:.3g}")
        src = spec.source or "—"    # a run key or file name can be long: the metric shows its start, hover all
        c[2].metric("made from", src if len(src) <= 16 else src[:15] + "…", help=src if len(src) > 16 else None)
        c[3].metric("examples", str(r.made.get("n_positive", len(spec.texts) or len(spec.pairs) or 1))
                    + (f" + {r.made['n_negative']}" if "n_negative" in r.made else ""))
        st.caption(f"Key `{view.dkey}` · how it was made: {r.made}")
        return {"kind": "direction", "spec": spec, "result": r}
    if view.feature >= 0:
        from backend.saes import sae_info

        try:
            info = sae_info(view.sae)
        except DashboardError as e:
            st.error(str(e), icon=":material/warning:")
            return None
        if view.feature >= (info.get("d_sae") or 0):
            st.error(f"Feature {view.feature} does not exist: {view.sae} has features 0–{info['d_sae'] - 1}.",
                     icon=":material/warning:")
            return None
        what = "Transcoder feature" if info.get("transcoder_set") else "SAE feature"
        st.subheader(f"{what} #{view.feature} of {view.sae}")
        hook = info.get("hook_out") or info["hook_name"]      # a transcoder writes at the MLP's output
        st.caption(f"Its decoder row is the direction, added at {hook}"
                   + (" (the row reshaped to heads × d_head)." if hook.endswith("hook_z") else "."))
        return {"kind": "sae", "hook": hook}
    st.info("Make a direction above, open a stored one, or come from a feature dashboard "
            "(“steer with this feature”).")
    return None


def _layer_curve(view: View, t: dict) -> None:
    r = t["result"]
    if not len(r.layer_accuracy):
        return
    fig = layer_curve(r.layer_accuracy, r.layer_separation, r.layer, r.method)
    event = st.plotly_chart(fig, key=f"curve-{view.dkey}", on_select="rerun", selection_mode="points")
    points = [p for p in (event.selection.points if event else []) if p.get("curve_number", 0) == 0]
    if points:
        layer = int(points[0]["x"])
        if layer != r.layer:
            try:
                out = D.at_layer(t["spec"], r, layer)
            except DashboardError as e:
                st.error(str(e), icon=":material/warning:")
                return
            navigate(view.replace(dkey=out.run_key, steer=0, key=""))


def _steer_form(view: View, t: dict) -> None:
    with st.form("w_steer_form"):
        prompt = st.text_input("Prompt", key=synced("w_sprompt", view.prompt))
        c = st.columns(6)
        mode = c[0].selectbox("Mode", S.MODES, index=S.MODES.index(view.smode) if view.smode in S.MODES else 0,
                              key=synced("w_smode", view.smode if view.smode in S.MODES else "add"))
        finite = math.isfinite(view.strength) and abs(view.strength) <= 1e6
        strength = c[1].number_input("Strength (× vector)", value=float(view.strength) if finite else 0.0, step=1.0,
                                     key="w_strength", help="ignored when ablating")
        spos = c[2].selectbox("Positions", S.POSITION_MODES, format_func=POSITION_LABELS.get,
                              index=S.POSITION_MODES.index(view.spos) if view.spos in S.POSITION_MODES else 0,
                              key="w_spos")
        max_new = c[3].number_input("New tokens", 1, S.MAX_NEW_TOKENS, min(max(view.max_new, 1), S.MAX_NEW_TOKENS),
                                    key="w_max_new")
        temp = c[4].number_input("Temperature (0: greedy)", 0.0, 5.0,
                                 float(min(max(view.temp, 0.0), 5.0)) if math.isfinite(view.temp) else 0.0,
                                 step=0.1, key="w_temp")
        seed = c[5].number_input("Seed", 0, 2**31 - 1, max(view.seed, 0), key="w_seed")
        cc = st.columns(2)
        chat = cc[0].checkbox("Put the prompt in the chat template", value=bool(view.chat), key="w_schat")
        snorm = cc[1].checkbox("Keep each activation's norm (GrAInS)", value=bool(view.snorm), key="w_snorm",
                               help="add mode: after adding, rescale each steered activation back to its norm "
                                    "before the steer, x ← (x + s·v)·‖x‖/‖x + s·v‖, as GrAInS does: the steer "
                                    "turns the activation without growing it")
        if st.form_submit_button("Steer", type="primary"):
            navigate(view.replace(prompt=prompt, smode=mode, strength=float(strength), spos=spos,
                                  max_new=int(max_new), temp=float(temp), seed=int(seed), chat=int(chat),
                                  snorm=int(snorm), steer=1, key=""))


def _target_fields(view: View, t: dict) -> dict:
    return {"direction": view.dkey} if t["kind"] == "direction" else {"sae": view.sae, "feature": view.feature}


def _steered(view: View, t: dict) -> View:
    if not view.steer:
        return view
    spec = make_spec(S.SteerSpec, model=view.model, prompt=view.prompt, strength=view.strength, mode=view.smode,
                     positions=view.spos, chat=bool(view.chat), max_new_tokens=view.max_new, temperature=view.temp,
                     seed=view.seed, preserve_norm=bool(view.snorm), **_target_fields(view, t))
    view, out = main_result(view, spec, "steered generation")
    if out is None:
        return view
    r = out.result
    c = st.columns(3)
    c[0].metric("strength", f"{r.strength:g}" if r.mode == "add" else "ablated")
    c[1].metric("relative to ‖resid‖", f"{r.relative_strength:.3f}" if r.mode == "add" else "–",
                help="strength × ‖vector‖ / mean ‖activation‖ at the hook over the prompt (position 0 left out)")
    c[2].metric("mean ‖activation‖ at the hook", f"{r.mean_resid_norm:.1f}")
    what = ("direction projected out of every resid_pre, attn_out and mlp_out" if r.mode == "ablate"
            else f"+{r.strength:g} × direction at {r.hook_name}, {POSITION_LABELS[view.spos]}"
            + (", each activation rescaled to its own norm" if r.preserve_norm else ""))
    left, right = st.columns(2)
    with left:
        st.markdown("**Default**")
        st.markdown(_generation_html(view.prompt, r.default), unsafe_allow_html=True)
    with right:
        st.markdown(f"**Steered** ({what})")
        st.markdown(_generation_html(view.prompt, r.steered), unsafe_allow_html=True)
    st.caption(f"Same seed ({view.seed}), {'greedy' if view.temp == 0 else f'temperature {view.temp:g}'}, "
               f"{len(r.default_tokens)} / {len(r.steered_tokens)} new tokens, KV cache.")
    return view


def _generation_html(prompt: str, text: str) -> str:
    from html import escape

    return (f"<div class='generation' style='border:1px solid #ccc;border-radius:6px;padding:8px;"
            f"white-space:pre-wrap;font-family:serif'><span style='color:#888'>{escape(prompt)}</span>"
            f"<b>{escape(text)}</b></div>")


def _projection(view: View, t: dict) -> None:
    if t["kind"] != "direction":
        return
    spec = make_spec(S.ProjectionSpec, model=view.model, direction=view.dkey, prompt=view.prompt, chat=bool(view.chat))
    out = fetch(spec, "projection") if spec is not None else None
    if out is None:
        return
    p = out.result
    st.plotly_chart(projection_heatmap(p.tokens, p.projection, p.norms, p.layers, p.own_row, t["result"].site),
                    key=f"proj-{out.run_key}")
    if len(p.probe_score):
        st.plotly_chart(probe_scores(p.tokens, p.probe_score), key=f"probe-{out.run_key}")


def _evaluation(spec, what: str, button: str, draw) -> None:
    if spec is None:
        return
    try:
        out = backend.lookup(spec)
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return
    if out is None and st.button(button, key=f"w_eval_{spec.KIND}"):
        out = fetch(spec, what)
    elif out is not None:
        show_status(out, what)
    if out is not None:
        draw(out.result)


def _evaluations(view: View, t: dict) -> None:
    st.subheader("Evaluate")
    source = E.default_text_source(view.model)
    se = make_spec(E.SideEffectsSpec, model=view.model, strength=view.strength, mode=view.smode, text_source=source,
                   **_target_fields(view, t))

    def draw_side(r):
        c = st.columns(3)
        c[0].metric("KL(default ‖ steered), neutral text", f"{r.kl_mean:.4f} nats/token")
        c[1].metric(f"cross-entropy, {r.text_source} text", f"{r.ce_steered:.3f}", delta=f"{r.ce_steered - r.ce_default:+.3f}",
                    delta_color="inverse")
        c[2].metric("unsteered cross-entropy", f"{r.ce_default:.3f}")
    st.markdown(f"**Side effects** of this steer ({'ablation' if view.smode == 'ablate' else f'strength {view.strength:g}'}, "
                "every position)")
    _evaluation(se, "side effects", "Measure side effects (KL, cross-entropy)", draw_side)
    if t["kind"] != "direction":
        return
    spec, r = t["spec"], t["result"]
    if r.method == "caa":
        pairs = (D.shipped("optimism", "heldout")["pairs"] if spec.source == "shipped:optimism" else list(spec.pairs))
        st.markdown("**Behaviour** (held-out A/B questions)" if spec.source == "shipped:optimism"
                    else "**Behaviour** (on the direction's own pairs: not held out)")
        _evaluation(make_spec(E.BehaviourSpec, model=view.model, direction=view.dkey,
                              pairs=tuple(tuple(p) for p in pairs), source=spec.source or "pairs"),
                    "behaviour curve", "Evaluate behaviour against multipliers −2…2",
                    lambda b: st.plotly_chart(behaviour_curve(b.multipliers, b.behaviour, b.letter_mass),
                                              key="behaviour"))
    if r.method in ("diff-means", "probe", "actadd") and r.site in D.RESID_SITES:
        held = D.shipped("refusal", "heldout")
        st.markdown(f"**Refusal** on held-out shipped instructions: baseline, ablated, added "
                    f"(strength {view.strength:g})")

        def draw_refusal(res):
            st.plotly_chart(refusal_bars(res.conditions, res.harmful_rate, res.harmless_rate), key="refusal")
            with st.expander("Completions"):
                rows = [{"set": name, "instruction": ins, **dict(zip(res.conditions, texts))}
                        for name, items, arr in (("harmful", held["positive"], res.harmful_text),
                                                 ("harmless", held["negative"], res.harmless_text))
                        for ins, texts in zip(items, arr.tolist())]
                st.dataframe(rows, hide_index=True)
        _evaluation(make_spec(E.RefusalSpec, model=view.model, direction=view.dkey, harmful=tuple(held["positive"]),
                              harmless=tuple(held["negative"]), strength=view.strength, source="shipped:refusal"),
                    "refusal rates", "Evaluate refusal (generates 3 × 8 completions)", draw_refusal)


def render(view: View) -> View:
    st.header("Directions & steering")
    st.caption("A direction is a vector at a site: made from two sets (difference of means), contrast pairs "
               "(CAA), a prompt pair (ActAdd), a probe, the tokens integrated gradients picks (GrAInS), or an SAE feature. Read it (projection per layer and "
               "token), add it (steered generation beside the default one, same seed) or ablate it.")
    _make_direction(view)
    t = _target(view)
    if t is None:
        return view
    if t["kind"] == "direction":
        _layer_curve(view, t)
    st.subheader("Steer")
    _steer_form(view, t)
    view = _steered(view, t)
    _projection(view, t)
    _evaluations(view, t)
    return view
