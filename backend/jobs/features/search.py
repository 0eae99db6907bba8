"""Find features: by a token (in their top corpus examples, or among the tokens their decoder
direction promotes) and by a text (run it, rank the features it activates).

A token query is matched against the decoded vocabulary (`token_strings`), as typed and
with a leading space (" Paris" and "Paris" are different tokens; both are searched).
A text query runs the per-prompt SAE analysis (FeaturesSpec: stored, so the link reopens
from the store) and aggregates each feature over the positions >= 1, as the index does.
Every result carries the feature's label, output and input score (backend/jobs/features/
scores.py; None until `feature-scores` has stored them); `sort` ranks by one of SORTS (highest
first, features without it last), `min_output_score` filters, and with no query and a sort
the whole SAE is ranked ("features that steer well": sort by output score).
"""

from __future__ import annotations

from ...errors import EmptySearch, FeatureIndexMissing, InvalidSpec, NotSingleToken
from .index import TOP_TOKEN_EXAMPLES, ensure_vocab, ensure_weight_tables, sae_key


def _tokens_for(store, model: str, q: str) -> list[tuple[int, str]]:
    cur = store.cursor()
    if not cur.execute("SELECT 1 FROM token_strings WHERE model = ? LIMIT 1", [model]).fetchall():
        from ...model import load_model

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
    from ...saes import sae_info
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
    from ...analyses.features import FeaturesSpec
    from ...runner import run
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


SORTS = ("output_score", "input_score", "density")


def _annotate(store, sae_id: str, rows: list[dict], table: dict | None = None) -> dict:
    """Label, output and input score (and density where missing) on each result row."""
    import math

    from .scores import score_table

    t = table or score_table(store, sae_id)
    num = lambda a, f: None if math.isnan(a[f]) else float(a[f])  # noqa: E731
    for r in rows:
        f = r["feature"]
        r["label"] = t["label"][f] or None
        r["output_score"] = num(t["output_score"], f)
        r["input_score"] = num(t["input_score"], f)
        if r.get("density") is None:
            r["density"] = num(t["density"], f)
    return t


def _rank(rows: list[dict], sort: str | None, min_output_score: float | None) -> list[dict]:
    if min_output_score is not None:
        rows = [r for r in rows if r["output_score"] is not None and r["output_score"] >= min_output_score]
    if sort is not None:
        rows = sorted(rows, key=lambda r: (r[sort] is None, -(r[sort] or 0.0), r["feature"]))
    return rows


def rank_features(store, sae_id: str, sort: str, min_output_score: float | None = None, limit: int = 50) -> dict:
    """Every feature of the SAE ranked by a score (no query)."""
    from .scores import score_table

    t = score_table(store, sae_id)
    rows = [{"feature": f} for f in range(len(t["label"]))]
    _annotate(store, sae_id, rows, t)
    rows = _rank(rows, sort, min_output_score)
    return {"mode": "scores", "query": "", "sort": sort, "min_output_score": min_output_score, "results": rows[:limit],
            "n_found": len(rows), "indexed": t["indexed"], "n_scored": t["n_output"], "n_input_scored": t["n_input"]}


def search(store, sae_id: str, mode: str, q: str, model: str = "smollm2-135m", sort: str | None = None,
           min_output_score: float | None = None, **kw) -> dict:
    if sort is not None and sort not in SORTS:
        raise InvalidSpec(f"Sort by one of {', '.join(SORTS)}, not {sort!r}.")
    if mode not in ("token", "text"):
        raise InvalidSpec(f"Unknown search mode {mode!r}: use 'token' or 'text'.")
    if (not isinstance(q, str) or not q.strip()) and (sort is not None or min_output_score is not None):
        return rank_features(store, sae_id, sort or "output_score", min_output_score, kw.get("limit", 50))
    limit = kw.pop("limit", 50)
    if mode == "token":
        out = search_token(store, sae_id, q, limit=10**9, **kw)
    else:
        out = search_text(store, sae_id, q, model, limit=10**9, **kw)
    t = _annotate(store, sae_id, out["results"])
    rows = _rank(out["results"], sort, min_output_score)
    out.update(results=rows[:limit], n_found=len(rows), sort=sort, min_output_score=min_output_score,
               n_scored=t["n_output"])
    return out


__all__ = ["search", "search_token", "search_text", "rank_features", "sae_key", "SORTS"]
