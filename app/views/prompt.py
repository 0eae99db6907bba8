"""Prompt page: tokens, the top next tokens, and the logit lens (two modes)."""

from __future__ import annotations

import streamlit as st

from backend import PromptSpec, TokenLensSpec, figures

from ..common import navigate, fetch, main_result, make_spec, synced, token_chips
from ..state import LENS_MODES, View


def render(view: View) -> View:
    st.header("Prompt & logit lens")
    spec = make_spec(PromptSpec, model=view.model, text=view.text)
    view, out = main_result(view, spec, "prompt analysis")
    if out is None:
        return view
    r = out.result
    st.subheader(f"{len(r.tokens)} tokens")
    token_chips(r.tokens)
    left, right = st.columns([1, 3])
    with left:
        st.plotly_chart(figures.top_k_bar(r.top_tokens, r.top_probs), key="topk")
        if st.button("Trace this prediction", help="the attribution graph of the next token: which transcoder "
                     "features carry it (Attribution graph page)"):
            navigate(view.replace(page="graph", key=""))
        if st.button("Which input tokens made it?", help="gradient attributions of the next token to each "
                     "input token (Token attribution page)"):
            navigate(view.replace(page="attribution_tokens", key=""))
    with right:
        mark = _marked_position(view, r.tokens)
        if mark is None:
            view = view.replace(lpos="")
        mode = st.segmented_control("Logit lens shows", list(LENS_MODES), format_func=LENS_MODES.get,
                                    key=synced("w_lens", view.lens)) or "top"
        view = view.replace(lens=mode)
        if mode == "top":
            st.plotly_chart(figures.logit_lens_top(r.tokens, r.layer_labels, r.lens_probs, r.lens_tokens, mark),
                            key="lens_top")
        else:
            token = st.text_input("Token to follow (mind the leading space)",
                                  key=synced("w_token", view.token or r.top_tokens[0]))
            view = view.replace(token=token)
            tspec = make_spec(TokenLensSpec, model=view.model, text=view.text, token=token)
            tout = fetch(tspec, "token lens") if tspec else None
            if tout is not None:
                t = tout.result
                st.plotly_chart(figures.logit_lens_token(t.tokens, t.layer_labels, t.probs, t.ranks, token, mark),
                                key="lens_token")
    return view


def _marked_position(view: View, tokens: list[str]) -> int | None:
    """The position a link marks in the logit lens (lpos, e.g. from a click on the token
    attribution page's layer view), or None; one outside this prompt is said and dropped."""
    if not view.lpos:
        return None
    if view.lpos.strip().lstrip("-").isdigit() and -len(tokens) <= int(view.lpos) < len(tokens):
        pos = int(view.lpos) % len(tokens)
        st.caption(f"Marked: position {pos} {figures.fmt_token(tokens[pos])!s} (dotted lines in the logit lens).")
        return pos
    st.warning(f"The link marks position {view.lpos!r}, which is not a position of this prompt "
               f"(0–{len(tokens) - 1}); nothing is marked.", icon=":material/link:")
    return None
