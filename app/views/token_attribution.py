"""Token attribution page: which input tokens made the next token (saliency, input × gradient,
integrated gradients, LRP, DeepLIFT), the completeness of IG and LRP's conservation said plainly, LRP's
positional share, and a layer view whose cells open the logit lens at their position."""

from __future__ import annotations

import numpy as np
import streamlit as st

from backend.analyses.token_attribution import (BASELINES, MAX_STEPS, METHODS, TOLERANCE,
                                                TokenAttributionSpec)
from backend.errors import InvalidSpec, OutOfRange
from backend.figures import fmt_token
from backend.figures.attribution import (LRP, METHOD_LABELS, UNSIGNED, content_and_position, explained_of,
                                         layer_heatmap, pct, token_scores)

from ..common import form_result, metrics_row, navigate, synced
from ..state import View

LABELS = {**METHOD_LABELS, "deeplift": "DeepLIFT (reference differences)"}
METHOD_LINES = {"deeplift": "DeepLIFT: gradient × (input − reference) where every nonlinearity passes its average "
                            "slope between reference and input (SiLU/GELU: (f(x) − f(x_ref)) / (x − x_ref)), so the "
                            "scores add up to f(input) − f(reference); the reference is the baseline below."}
BASELINE_LABELS = {"zero": "zero vectors", "pad": "the pad token's embedding", "mask": "the mean embedding"}
HELD_REASON = ("Held by default: its massive activation switches on abruptly along the path, and the scores "
               "stop adding up.")
HELD_DETAIL = ("On SmolLM2 the first position carries a massive activation; interpolated from the baseline, it "
               "switches on between two adjacent steps and the completeness gap stays in the hundreds of % even "
               "at 1,024 steps (FINDINGS: 'Integrated Gradients on SmolLM2'). Held at its own embedding, the path "
               "is smooth and position 0's score is 0 by construction (with no BOS, as in SmolLM2, that is the first word's).")


def _form(view: View) -> View:
    with st.form("attribution_form"):
        c1, c2, c3, c4 = st.columns([3, 2, 2, 3])
        method = c1.selectbox("Method", METHODS, format_func=lambda m: LABELS.get(m, m),
                              index=METHODS.index(view.amethod) if view.amethod in METHODS else 0)
        base = c2.selectbox("Baseline (IG, DeepLIFT)", BASELINES, format_func=BASELINE_LABELS.get,
                            index=BASELINES.index(view.abase) if view.abase in BASELINES else 0)
        auto = view.asteps.strip().lower() == "auto"
        mode = c3.radio("Steps (IG)", ["auto", "fixed"], index=0 if auto else 1, horizontal=True,
                        help=f"auto: 16, 32, … up to {MAX_STEPS} (one batch each) until the completeness gap "
                             f"is ≤ {TOLERANCE * 100:g} %")
        n = c3.number_input("Fixed steps", 1, MAX_STEPS, 16 if auto or not view.asteps.isdigit()
                            else min(max(int(view.asteps), 1), MAX_STEPS), label_visibility="collapsed")
        first = c4.checkbox("Interpolate position 0 too (IG, DeepLIFT)", value=bool(view.afirst), help=HELD_DETAIL)
        c4.caption(HELD_REASON)
        c1.caption(METHOD_LINES["deeplift"])
        if st.form_submit_button("Attribute", type="primary"):
            return view.replace(amethod=method, abase=base, asteps="auto" if mode == "auto" else str(int(n)),
                                afirst=int(first), key="")
    return view


def spec_of(view: View) -> TokenAttributionSpec:
    raw = view.asteps.strip().lower()
    try:
        steps = None if raw == "auto" else int(raw)
    except ValueError:
        raise OutOfRange(f"The link's steps {view.asteps!r} must be 'auto' or an integer 1–{MAX_STEPS}.") from None
    if view.acontrast and not view.atarget:
        raise InvalidSpec(f"A contrast against {view.acontrast!r} needs the preferred token too (atarget).")
    contrast = (view.atarget, view.acontrast) if view.acontrast else None
    return TokenAttributionSpec(model=view.model, text=view.text, method=view.amethod,
                                target="" if contrast else view.atarget, contrast=contrast, steps=steps,
                                baseline=view.abase, interpolate_first=bool(view.afirst), layers=bool(view.alayers))


def render(view: View) -> View:
    st.header("Token attribution")
    st.caption("Which words of the prompt made the next token: the gradient of the explained logit (or logit "
               "difference) with respect to each input token's embedding. Saliency is its norm (unsigned); "
               "input × gradient and integrated gradients are signed and, for IG, add up to the logit's change "
               "from the baseline to the prompt; LRP propagates the logit itself back by rules, to each token's "
               "content and its position. Blue raises the explained logit, red lowers it.")
    view, out = form_result(view, _form, spec_of, "token attribution")
    if out is None:
        return view
    r = out.result
    view = _target_picker(view, r)
    explained = explained_of(r.target, r.against)
    _numbers(r, explained)
    st.plotly_chart(token_scores(r.tokens, r.scores, r.method, explained, r.held_positions),
                    key=f"scores-{out.run_key}")
    if r.method in LRP and r.position_scores is not None:
        st.plotly_chart(content_and_position(r.tokens, r.scores, r.position_scores, explained),
                        key=f"positions-{out.run_key}")
        st.caption("LRP rules (kernels/lrp.py): norms pass relevance through their denominator, the gate's "
                   "activation passes it unchanged, every product of two activations (gate × up, q · k, "
                   "weights × values, rotary x·cos + rot(x)·sin) splits it in half. The rotary half is the "
                   "position's: AttnLRP propagates through the softmax into queries and keys; CP-LRP holds the "
                   "attention weights constant, so position gets nothing and the scores add up exactly.")
    if r.held_positions:
        st.caption("Position 0 is held at its own embedding. " + HELD_DETAIL)
    elif r.method in ("integrated-gradients", "deeplift"):
        st.caption("Position 0 is interpolated too.")
    return _layer_view(view, r, out.run_key, explained)


def _target_picker(view: View, r) -> View:
    """Explain another of the top next tokens, or a logit difference against one of them."""
    def label(tok: str) -> str:
        p = next((x["prob"] for x in r.top_next if x["token"] == tok), None)
        return fmt_token(tok) + ("" if p is None else f"  (p = {p:.3f})")

    tops = [x["token"] for x in r.top_next]
    target = r.target["token"]
    against = r.against["token"] if r.against else ""
    c1, c2 = st.columns(2)
    chosen = c1.selectbox("Explain the next token", tops + ([target] if target not in tops else []),
                          format_func=label, key=synced("w_atarget", target),
                          help="the model's top next tokens at the last position")
    versus = c2.selectbox("… against (optional: explain the logit difference)",
                          [""] + tops + ([against] if against and against not in tops else []),
                          format_func=lambda x: "nothing: the logit itself" if x == "" else label(x),
                          key=synced("w_acontrast", against))
    if versus == chosen:
        st.info("Pick two different tokens: the logit difference of a token with itself is always 0.")
    elif (chosen, versus) != (target, against):
        plain_top = chosen == tops[0] and not versus and not view.atarget
        navigate(view.replace(atarget="" if plain_top else chosen, acontrast=versus, key=""))
    return view


def _numbers(r, explained: str) -> None:
    ig = r.method == "integrated-gradients"
    total = float(np.sum(r.scores))
    if r.method in LRP:
        pos = float(np.sum(r.position_scores)) if r.position_scores is not None else 0.0
        metrics_row([(explained, f"{r.target_logit:.3f}"), ("content relevance", f"{total:+.3f}"),
                     ("positional relevance", f"{pos:+.3f}"), ("conservation gap", f"{r.completeness_gap:+.4g}"),
                     ("gap, relative", pct(r.completeness_gap_rel))])
        st.caption(f"Conservation: content + position − {explained} = {total:+.4f} + {pos:+.4f} − "
                   f"{r.target_logit:.4f}.")
        if r.completeness_gap_rel > TOLERANCE:
            st.warning(f"The relevances do not add up: {pct(r.completeness_gap_rel)} of {explained} is not "
                       "accounted for. AttnLRP's softmax rule is not conservative (the softmax ignores a shift "
                       "of its inputs, and the rule gives relevance in proportion to their level); CP-LRP "
                       "conserves exactly, at the price of giving queries, keys and positions nothing.",
                       icon=":material/warning:")
        return
    if r.method == "deeplift":
        _deeplift_numbers(r, explained, total)
        return
    if not ig:
        items = [(explained, f"{r.target_logit:.3f}")]
        if r.method not in UNSIGNED:
            items.append(("sum of scores", f"{total:+.3f}"))
        metrics_row(items)
        st.caption("No completeness to check: " + ("saliency is a gradient norm, with nothing to add up to."
                                                   if r.method in UNSIGNED else
                                                   "input × gradient is a first-order estimate with no baseline."))
        return
    delta = r.target_logit - r.baseline_logit
    metrics_row([(explained, f"{r.target_logit:.3f}"), ("at the baseline", f"{r.baseline_logit:.3f}"),
                 ("sum of scores", f"{total:+.3f}"),
                 ("completeness gap", f"{r.completeness_gap:+.4g}"), ("gap, relative", pct(r.completeness_gap_rel)),
                 ("steps used", f"{r.steps_used}" + (" (auto)" if r.steps_requested == "auto" else ""))])
    rounds = " → ".join(f"{x['steps']} steps: {pct(x['gap_rel'])}" for x in r.rounds)
    st.caption(f"Baseline: {BASELINE_LABELS.get(r.baseline, r.baseline)}. Gap = sum of scores − (f(input) − "
               f"f(baseline)) = {total:+.4f} − ({delta:+.4f}); relative to |f(input) − f(baseline)|. Rounds: {rounds}.")
    if r.completeness_gap_rel > TOLERANCE:
        why = (f"auto reached its cap of {r.steps_cap} steps without getting under {TOLERANCE * 100:g} %"
               if r.steps_requested == "auto" else f"{r.steps_used} fixed steps do not integrate the path "
               "closely enough: try auto")
        first = ("" if r.held_positions else " Position 0 is interpolated: its massive activation makes the "
                 "path jump; holding it usually closes most of the gap.")
        st.warning(f"Completeness gap {pct(r.completeness_gap_rel)}, above {TOLERANCE * 100:g} %: the scores add up "
                   f"to {total:+.3f}, but {explained} moved by {delta:+.3f} from the baseline to the prompt. "
                   f"These attributions do not add up: {why}.{first}", icon=":material/warning:")


def _deeplift_numbers(r, explained: str, total: float) -> None:
    delta = r.target_logit - r.baseline_logit
    metrics_row([(explained, f"{r.target_logit:.3f}"), ("at the reference", f"{r.baseline_logit:.3f}"),
                 ("sum of scores", f"{total:+.3f}"), ("completeness gap", f"{r.completeness_gap:+.4g}"),
                 ("gap, relative", pct(r.completeness_gap_rel))])
    st.caption(f"DeepLIFT, reference: {BASELINE_LABELS.get(r.baseline, r.baseline)}. Gap = sum of scores − "
               f"(f(input) − f(reference)) = {total:+.4f} − ({delta:+.4f}). The rescale rule on SiLU/GELU, the "
               "symmetric split on products of two activations (gate × up, q · k, weights × values, x · 1/rms), "
               "the softmax's slope averaged between reference and input (kernels/deeplift.py): each adds up, so "
               "the gap is float rounding.")
    if r.completeness_gap_rel > TOLERANCE:
        st.warning(f"Completeness gap {pct(r.completeness_gap_rel)}, above {TOLERANCE * 100:g} %: the scores add up "
                   f"to {total:+.3f}, but {explained} moved by {delta:+.3f} from the reference to the prompt. "
                   "These attributions do not add up.", icon=":material/warning:")


def _layer_view(view: View, r, run_key: str, explained: str) -> View:
    st.subheader("Layer view")
    cost = (f"one integrated-gradients run per layer ({len(r.tokens)} tokens; with auto steps this can take "
            "minutes on a CPU)" if r.method == "integrated-gradients" else "nothing more (the same backward)"
            if r.method in LRP or r.method == "deeplift" else "one more backward pass")
    on = st.checkbox("Attribute to every layer's residual stream (resid_pre) too", key=synced("w_alayers",
                     bool(view.alayers)), help=f"the same method applied at each layer's input; costs {cost}")
    if on != bool(view.alayers):
        navigate(view.replace(alayers=int(on), key=""))
    if r.layer_scores is None:
        st.caption(f"Off: it costs {cost}.")
        return view
    fig = layer_heatmap(r.tokens, r.layer_scores, r.method, explained, r.layer_gap_rel, r.layer_steps)
    event = st.plotly_chart(fig, key=f"layers-{run_key}", on_select="rerun", selection_mode="points")
    st.caption("Click a cell: the logit lens at that position, following "
               f"{fmt_token(r.target['token'])} through the layers (Prompt page).")
    if r.layer_gap_rel is not None:
        bad = np.flatnonzero(r.layer_gap_rel > TOLERANCE)
        if len(bad):
            worst = int(bad[np.argmax(r.layer_gap_rel[bad])])
            st.warning(f"{len(bad)} of {len(r.layer_gap_rel)} layers have a completeness gap above "
                       f"{TOLERANCE * 100:g} % (largest {pct(float(r.layer_gap_rel[worst]))} at layer {worst}): "
                       "their rows do not add up.", icon=":material/warning:")
    points = event.selection.points if event else []
    if points:
        pos = int(points[0]["x"])
        navigate(view.replace(page="prompt", lens="token", token=r.target["token"], lpos=str(pos), key=""))
    return view
