"""Reads behind a feature dashboard: plain functions over the clustered tables, no torch.

Every function takes the index (from `index_for(store, sae_id)`: the built index of the
SAE's current weights) and a feature. Top examples read `feature_acts_by_feature`, whose rows
are sorted by (ix, feature, value desc), so DuckDB's zone maps skip everything but the
feature's own rows; `features_at` reads `feature_acts_by_doc`, sorted by (ix, doc, pos).
Tokens come from `feature_windows` (one row per encoded window) and are decoded with the
stored vocabulary (`token_strings`), so no tokenizer or model is loaded to show a dashboard.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from ...errors import FeatureIndexMissing, OutOfRange
from .index import HIST_BINS, QUANTILES, current_index, sae_key

BEFORE, AFTER = 14, 4            # context tokens shown around an example's token


@dataclass(frozen=True)
class IndexInfo:
    ix: int
    sae_id: str
    weights_hash: str
    model: str
    hook_name: str
    d_sae: int
    n_windows: int
    n_tokens: int
    n_rows: int
    built: str
    corpus: str

    def describe(self) -> str:
        return (f"{self.n_windows:,} windows of corpus '{self.corpus}' ({self.n_tokens:,} tokens, position 0 of "
                f"each window left out), {self.n_rows:,} active (feature, token) pairs; weights {self.weights_hash}")


def index_for(store, sae_id: str) -> IndexInfo:
    """The built index of the SAE's current weights; FeatureIndexMissing otherwise (UnknownSAE
    when the SAE does not exist)."""
    info = current_index(store, sae_id)
    if info is None:
        raise FeatureIndexMissing(f"No corpus index for {sae_id} yet: build it with `python -m backend "
                                  f"feature-index --sae {sae_id}` (or the button on this page).")
    if info["stale"]:
        raise FeatureIndexMissing(f"The corpus index of {sae_id} was built for other weights ({info['weights_hash']}):"
                                  f" the SAE was retrained. Rebuild it with `python -m backend feature-index "
                                  f"--sae {sae_id}`.")
    return IndexInfo(info["ix"], sae_id, info["weights_hash"], info["model"], info["hook_name"], info["d_sae"],
                     info["n_windows"], info["n_tokens"], info["n_rows"], info["built"], info["corpus"])


def check_feature(sae_id: str, feature: int) -> int:
    """The SAE's width, after checking the feature exists (OutOfRange otherwise)."""
    from ...saes import sae_info

    d_sae = int(sae_info(sae_id)["d_sae"])
    if not isinstance(feature, (int, np.integer)) or not 0 <= int(feature) < d_sae:
        raise OutOfRange(f"Feature {feature} does not exist: {sae_id} has features 0–{d_sae - 1}.")
    return d_sae


_vocab_cache: dict[tuple[str, str], np.ndarray] = {}
_vocab_lock = threading.Lock()


def vocab(store, model: str) -> np.ndarray:
    """Decoded token strings of a model, indexed by token id (read once per process)."""
    k = (str(store.path), model)
    with _vocab_lock:
        if k not in _vocab_cache:
            t = store.cursor().sql("SELECT token, text FROM token_strings WHERE model = ? ORDER BY token",
                                   params=[model]).to_arrow_table()
            arr = np.empty(len(t), dtype=object)
            arr[t["token"].to_numpy()] = t["text"].to_pylist()
            if len(arr):
                _vocab_cache[k] = arr
            return arr
        return _vocab_cache[k]


def stats(store, index: IndexInfo, feature: int) -> dict:
    rows = store.cursor().execute("SELECT n, density, max, mean, quantiles FROM feature_stats WHERE ix = ? AND "
                                  "feature = ?", [index.ix, feature]).fetchall()
    if not rows:   # never active on the indexed windows
        return {"n": 0, "density": 0.0, "max": 0.0, "mean": 0.0, "quantiles": {q: 0.0 for q in QUANTILES}}
    n, d, mx, mean, qs = rows[0]
    return {"n": int(n), "density": float(d), "max": float(mx), "mean": float(mean),
            "quantiles": dict(zip(QUANTILES, (float(q) for q in qs)))}


def _contexts(store, index: IndexInfo, feature: int, hits: list[tuple[int, int, float]],
              before: int = BEFORE, after: int = AFTER) -> list[dict]:
    """Each hit (doc, pos, value) with its context window: tokens, and this feature's activation
    at every token of it (0 where inactive; None at a window's position 0, never encoded)."""
    if not hits:
        return []
    cur = store.cursor()
    docs = sorted({h[0] for h in hits})
    wins: dict[int, list[tuple[int, list[int]]]] = {}
    for d, s, ids in cur.execute("SELECT doc, start, ids FROM feature_windows WHERE ix = ? AND list_contains(?, doc)",
                                 [index.ix, docs]).fetchall():
        wins.setdefault(d, []).append((s, ids))
    acts: dict[tuple[int, int], float] = {
        (d, p): v for d, p, v in cur.execute(
            "SELECT doc, pos, value FROM feature_acts_by_feature WHERE ix = ? AND feature = ? AND list_contains(?, doc)",
            [index.ix, feature, docs]).fetchall()}
    strings = vocab(store, index.model)
    out = []
    for doc, pos, value in hits:
        start, ids = next((s, w) for s, w in wins.get(doc, []) if s <= pos < s + len(w))
        lo, hi = max(start, pos - before), min(start + len(ids), pos + after + 1)
        toks = ids[lo - start:hi - start]
        out.append({"doc": int(doc), "pos": int(pos), "value": float(value), "focus": pos - lo,
                    "token_ids": toks, "tokens": [strings[t] if t < len(strings) else f"<{t}>" for t in toks],
                    "acts": [None if p == start else acts.get((doc, p), 0.0) for p in range(lo, hi)]})
    return out


def top_examples(store, index: IndexInfo, feature: int, k: int = 10, before: int = BEFORE,
                 after: int = AFTER) -> list[dict]:
    """The k highest activations of the feature in the corpus, each with its context."""
    hits = store.cursor().execute(
        "SELECT doc, pos, value FROM feature_acts_by_feature WHERE ix = ? AND feature = ? "
        "ORDER BY value DESC, doc, pos LIMIT ?", [index.ix, feature, k]).fetchall()
    return _contexts(store, index, feature, hits, before, after)


def quantile_bands(st: dict) -> list[tuple[float, float, str]]:
    """(lo, hi] activation bands between the stored quantiles of the feature's active values."""
    qs = st["quantiles"]
    edges = [0.0] + [qs[q] for q in QUANTILES] + [st["max"]]
    names = ["0–25 %"] + [f"{int(a * 100)}–{int(b * 100)} %" for a, b in zip(QUANTILES, QUANTILES[1:])] + \
            [f"top {100 - int(QUANTILES[-1] * 100)} %"]
    return [(edges[i], edges[i + 1], names[i]) for i in range(len(names))][::-1]


def quantile_examples(store, index: IndexInfo, feature: int, per_band: int = 3, st: dict | None = None) -> list[dict]:
    """A few examples from each activation quantile band (highest band first), sampled by a
    fixed hash of (doc, pos), so the same link shows the same examples."""
    st = st or stats(store, index, feature)
    if st["n"] == 0:
        return []
    bands = quantile_bands(st)
    case = " ".join(f"WHEN value > {lo!r} AND value <= {hi!r} THEN {b}" for b, (lo, hi, _) in enumerate(bands))
    rows = store.cursor().execute(
        f"SELECT band, doc, pos, value FROM (SELECT CASE {case} END AS band, doc, pos, value FROM "
        "feature_acts_by_feature WHERE ix = ? AND feature = ?) WHERE band IS NOT NULL "
        "QUALIFY row_number() OVER (PARTITION BY band ORDER BY hash(doc, pos)) <= ? ORDER BY band, value DESC",
        [index.ix, feature, per_band]).fetchall()
    ctx = _contexts(store, index, feature, [(d, p, v) for _, d, p, v in rows])
    out = [{"label": name, "lo": lo, "hi": hi, "examples": []} for lo, hi, name in bands]
    for (band, *_), c in zip(rows, ctx):
        out[band]["examples"].append(c)
    return out


def histogram(store, index: IndexInfo, feature: int, st: dict | None = None) -> dict:
    """Counts of the active values in HIST_BINS equal bins on [0, max]."""
    st = st or stats(store, index, feature)
    counts = np.zeros(HIST_BINS, np.int64)
    for b, n in store.cursor().execute("SELECT bin, n FROM feature_hist WHERE ix = ? AND feature = ?",
                                       [index.ix, feature]).fetchall():
        counts[b] = n
    return {"edges": np.linspace(0.0, st["max"], HIST_BINS + 1).tolist(), "counts": counts.tolist(),
            "n_tokens": index.n_tokens}


def logit_effects(store, sae_id: str, feature: int, model: str | None = None) -> dict:
    """Promoted (rank 1..N) and suppressed tokens of the feature's decoder direction. Computed
    once per SAE weights (loads the model) when not yet stored."""
    key = sae_key(sae_id)
    cur = store.cursor()
    q = "SELECT rank, token, value FROM sae_logit_effects WHERE sae_key = ? AND feature = ? ORDER BY rank"
    rows = cur.execute(q, [key, feature]).fetchall()
    if not rows:
        from .index import ensure_weight_tables

        ensure_weight_tables(store, sae_id)
        rows = cur.execute(q, [key, feature]).fetchall()
    from ...saes import sae_info

    strings = vocab(store, model or sae_info(sae_id)["model"])
    item = lambda r: {"token": strings[r[1]], "token_id": int(r[1]), "value": float(r[2])}  # noqa: E731
    return {"promoted": [item(r) for r in rows if r[0] > 0],
            "suppressed": [item(r) for r in sorted(rows, key=lambda r: -r[0]) if r[0] < 0]}


def similar_features(store, sae_id: str, feature: int, index: IndexInfo | None = None) -> list[dict]:
    """Features with the most similar decoder directions (cosine), with their density if indexed."""
    rows = store.cursor().execute(
        "SELECT s.other, s.cosine, st.density FROM sae_similar s LEFT JOIN feature_stats st "
        "ON st.ix = ? AND st.feature = s.other WHERE s.sae_key = ? AND s.feature = ? ORDER BY s.rank",
        [index.ix if index else -1, sae_key(sae_id), feature]).fetchall()
    if not rows:
        from .index import ensure_weight_tables

        ensure_weight_tables(store, sae_id)
        return similar_features(store, sae_id, feature, index)
    return [{"feature": int(o), "cosine": float(c), "density": None if d is None else float(d)} for o, c, d in rows]


def features_at(store, index: IndexInfo, doc: int, pos: int) -> list[tuple[int, float]]:
    """All active features at one corpus position, highest first (the (doc, pos) clustering)."""
    return store.cursor().execute(
        "SELECT feature, value FROM feature_acts_by_doc WHERE ix = ? AND doc = ? AND pos = ? ORDER BY value DESC",
        [index.ix, doc, pos]).fetchall()


def top_tokens(store, index: IndexInfo, feature: int, n: int = 5) -> list[tuple[str, int]]:
    """The tokens at the feature's best corpus examples, most frequent first."""
    rows = store.cursor().execute("SELECT token, n FROM feature_top_tokens WHERE ix = ? AND feature = ? "
                                  "ORDER BY n DESC, token LIMIT ?", [index.ix, feature, n]).fetchall()
    strings = vocab(store, index.model)
    return [(strings[t], int(c)) for t, c in rows]


def feature_dashboard(store, sae_id: str, feature: int, k: int = 10, per_band: int = 3) -> dict:
    """Everything a feature's dashboard shows; `index` None (with `missing`) when the corpus
    index is not built, in which case only the weight-derived parts are filled."""
    check_feature(sae_id, feature)
    t = time.perf_counter()
    out: dict = {"sae_id": sae_id, "feature": int(feature)}
    try:
        index = index_for(store, sae_id)
    except FeatureIndexMissing as e:
        index, out["missing"] = None, str(e)
    out["index"] = index
    if index is not None:
        st = stats(store, index, feature)
        out.update(stats=st, top=top_examples(store, index, feature, k), bands=quantile_examples(store, index, feature,
                   per_band, st), histogram=histogram(store, index, feature, st))
    out["logits"] = logit_effects(store, sae_id, feature, index.model if index else None)
    out["similar"] = similar_features(store, sae_id, feature, index)
    out["seconds"] = time.perf_counter() - t
    return out
