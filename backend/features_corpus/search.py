"""Find features: by a token (in their top corpus examples, or among the tokens their decoder
direction promotes) and by a text (run it, rank the features it activates).

A token query is matched against the decoded vocabulary (`token_strings`), as typed and
with a leading space (" Paris" and "Paris" are different tokens; both are searched).
A text query runs the per-prompt SAE analysis (FeaturesSpec: stored, so the link reopens
from the store) and aggregates each feature over the positions >= 1, as the index does.
"""

from __future__ import annotations

from ..errors import EmptySearch, FeatureIndexMissing, InvalidSpec, NotSingleToken
from .index import TOP_TOKEN_EXAMPLES, ensure_vocab, ensure_weight_tables, sae_key


def _tokens_for(store, model: str, q: str) -> list[tuple[int, str]]:
    cur = store.cursor()
    if not cur.execute("SELECT 1 FROM token_strings WHERE model = ? LIMIT 1", [model]).fetchall():
        from ..model import load_model

        ensure_vocab(store, load_model(model))
    variants = sorted({q, " " + q.lstrip(" ")})
    rows = cur.execute("SELECT token, text FROM token_strings WHERE model = ? AND list_contains(?, text) "
                       "ORDER BY token", [model, variants]).fetchall()
    if not rows:
        raise NotSingleToken(f"{q!r} is not a single token of {model} (with or without a leading space): "
                             "search one token, e.g. 'Paris' or ' the', or use text mode.")
    return [(int(t), s) for t, s in rows]


def search_token(store, sae_id: str, q: str, limit: int = 50) -> dict:
    """Features whose top corpus examples sit on the token, or whose logit effects promote it."""
    from ..saes import sae_info
    from .query import index_for

    if not isinstance(q, str) or not q.strip():
        raise EmptySearch("Type a token to search for.")
    model = sae_info(sae_id)["model"]
    toks = _tokens_for(store, model, q)
    ids = [t for t, _ in toks]
    key = ensure_weight_tables(store, sae_id)
    cur = store.cursor()
    found: dict[int, dict] = {}
    try:
        index = index_for(store, sae_id)
    except FeatureIndexMissing:
        index = None
    if index is not None:
        for f, n, d in cur.execute(
                "SELECT t.feature, sum(t.n), s.density FROM feature_top_tokens t JOIN feature_stats s "
                "ON s.ix = t.ix AND s.feature = t.feature WHERE t.ix = ? AND list_contains(?, t.token) "
                "GROUP BY t.feature, s.density", [index.ix, ids]).fetchall():
            found[f] = {"feature": int(f), "in_top_examples": int(n), "density": float(d)}
    for f, rank, v in cur.execute("SELECT feature, min(rank), max(value) FROM sae_logit_effects WHERE sae_key = ? "
                                  "AND rank > 0 AND list_contains(?, token) GROUP BY feature", [key, ids]).fetchall():
        found.setdefault(f, {"feature": int(f), "in_top_examples": 0, "density": None})
        found[f].update(logit_rank=int(rank), logit_value=float(v))
    if index is not None:
        missing = [f for f, r in found.items() if r["density"] is None]
        for f, d in cur.execute("SELECT feature, density FROM feature_stats WHERE ix = ? AND list_contains(?, feature)",
                                [index.ix, missing]).fetchall():
            found[f]["density"] = float(d)
    rows = sorted(found.values(), key=lambda r: (-r["in_top_examples"], r.get("logit_rank", 99), r["feature"]))
    for r in rows:
        r.setdefault("logit_rank", None)
        r.setdefault("logit_value", None)
    return {"mode": "token", "query": q, "tokens": [s for _, s in toks], "token_ids": ids,
            "indexed": index is not None, "top_examples_per_feature": TOP_TOKEN_EXAMPLES,
            "results": rows[:limit], "n_found": len(rows), "sae_key": key}


def search_text(store, sae_id: str, text: str, model: str, by: str = "max", limit: int = 30) -> dict:
    """Features most active on a text (max or sum over positions >= 1), from the stored
    per-prompt analysis."""
    from ..analyses.features import FeaturesSpec
    from ..runner import run
    from .query import index_for

    if not isinstance(text, str) or not text.strip():
        raise EmptySearch("Type a text to search with.")
    if by not in ("max", "sum"):
        raise InvalidSpec(f"Rank by 'max' or 'sum', not {by!r}.")
    out = run(FeaturesSpec(model=model, sae=sae_id, text=text, k=64), store=store)
    r = out.result
    skip = 1 if len(r.tokens) > 1 else 0
    agg: dict[int, dict] = {}
    for p in range(skip, len(r.tokens)):
        for f, v in zip(r.feature_ids[p].tolist(), r.feature_values[p].tolist()):
            if v <= 0:
                continue
            a = agg.setdefault(f, {"feature": int(f), "max": 0.0, "sum": 0.0, "count": 0, "at_pos": p})
            a["sum"] += v
            a["count"] += 1
            if v > a["max"]:
                a["max"], a["at_pos"] = v, p
    for a in agg.values():
        a["at_token"] = r.tokens[a["at_pos"]]
    try:
        index = index_for(store, sae_id)
        for f, d in store.cursor().execute("SELECT feature, density FROM feature_stats WHERE ix = ? AND "
                                           "list_contains(?, feature)", [index.ix, list(agg)]).fetchall():
            agg[f]["density"] = float(d)
    except FeatureIndexMissing:
        pass
    rows = sorted(agg.values(), key=lambda a: (-a[by], a["feature"]))
    for a in rows:
        a.setdefault("density", None)
    return {"mode": "text", "query": text, "by": by, "tokens": r.tokens, "run_key": out.run_key,
            "from_store": out.from_store, "results": rows[:limit], "n_found": len(rows),
            "skipped_position_0": bool(skip)}


def search(store, sae_id: str, mode: str, q: str, model: str = "smollm2-135m", **kw) -> dict:
    if mode == "token":
        return search_token(store, sae_id, q, **kw)
    if mode == "text":
        return search_text(store, sae_id, q, model, **kw)
    raise InvalidSpec(f"Unknown search mode {mode!r}: use 'token' or 'text'.")


__all__ = ["search", "search_token", "search_text", "sae_key"]
