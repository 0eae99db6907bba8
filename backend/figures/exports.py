"""The figures of a stored result, by kind, for `python -m backend export figure` and the pages'
download buttons. Plotly only (no Streamlit, no torch): the same builders the pages draw with.

`figures_for(kind, result, spec)` → {name: Figure}; the first is the result's main figure.
"""

from __future__ import annotations

from .. import figures


def _prompt(r, spec) -> dict:
    return {"logit_lens": figures.logit_lens_top(r.tokens, r.layer_labels, r.lens_probs, r.lens_tokens),
            "top_k": figures.top_k_bar(r.top_tokens, r.top_probs)}


def _attention(r, spec) -> dict:
    layer = spec.get("layer", 0)
    return {f"head{h}": figures.attention_pattern(r.tokens, r.pattern[h], layer, h) for h in range(len(r.pattern))}


def _head_scores(r, spec) -> dict:
    return {"induction": figures.head_score_heatmap(r.induction, "Induction score"),
            "previous_token": figures.head_score_heatmap(r.prev_token, "Previous-token score")}


def _massive(r, spec) -> dict:
    return {"max_per_layer_token": figures.massive_heatmap(r.tokens, r.pos_max, r.median),
            "top3": figures.massive_top3(r.top_values, r.median, r.top_dims, r.top_positions, r.tokens)}


def _patch(r, spec) -> dict:
    values = r.values
    if values.ndim != 2:   # by position and head: one figure per position
        return {f"pos{p}": figures.patching_heatmap(values[:, p, :], r.layers, r.heads, "head", spec.get("metric", ""),
                                                    f"{spec.get('site')} at position {p}")
                for p in range(values.shape[1])}
    by_pos = values.shape[1] == len(r.positions) and spec.get("site") in ("resid_pre", "attn_out", "mlp_out")
    cols = r.positions if by_pos else r.heads
    labels = [figures.fmt_token(t) for t in r.clean_tokens] if by_pos else None
    title = f"{spec.get('site')}: {spec.get('direction', '')}, {spec.get('metric', '')}"
    return {"sweep": figures.patching_heatmap(values, r.layers, cols, "position" if by_pos else "head",
                                              spec.get("metric", ""), title, labels)}


def _token_attribution(r, spec) -> dict:
    from .attribution import explained_of, layer_heatmap, token_scores

    explained = explained_of(r.target, r.against)
    figs = {"scores": token_scores(r.tokens, r.scores, r.method, explained, r.held_positions)}
    if r.layer_scores is not None:
        figs["layers"] = layer_heatmap(r.tokens, r.layer_scores, r.method, explained, r.layer_gap_rel, r.layer_steps)
    return figs


BUILDERS = {"prompt": _prompt, "attention": _attention, "head_scores": _head_scores, "massive": _massive,
            "patch": _patch, "token_attribution": _token_attribution}


def figures_for(kind: str, result, spec: dict) -> dict:
    build = BUILDERS.get(kind)
    return build(result, spec) if build else {}
