"""A 2-D map of every feature of an SAE: UMAP of the decoder directions, cosine metric.

Computed once per SAE weights (~1 min on two cores, most of it numba's first compile) and
stored in `sae_maps` under the SAE's key; for a shipped SAE also written beside its weights
(data/saes/<id>/feature_map.npz, 37 KB, with the weights hash), so it ships with the SAE and
a fresh store reads it from there. A map whose hash differs from the weights is ignored.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from ...errors import FeatureIndexMissing
from .index import sae_key, weights_hash

MAP_FILE = "feature_map.npz"
N_NEIGHBORS, MIN_DIST, SEED = 15, 0.1, 0


def _map_file(sae_id: str) -> Path | None:
    from ...saes import SAE_DIR, resolve

    kind, ref = resolve(sae_id)
    return Path(ref) / MAP_FILE if kind == "folder" and Path(ref).parent == SAE_DIR else None


def build_map(store, sae_id: str, write_file: bool = True, progress=None) -> dict:
    """UMAP of the SAE's decoder rows; stored, and written beside a shipped SAE's weights
    (unless write_file is False). Returns timings."""
    key = sae_key(sae_id)
    xy, seconds = get_map(store, sae_id), None
    if xy is None:
        from ...saes import load_sae

        W = load_sae(sae_id).W_dec.detach().cpu().float().numpy()                # [d_sae d_in]
        if progress:
            progress(f"UMAP of {W.shape[0]} decoder directions (about a minute)…")
        import umap

        t = time.perf_counter()
        xy = umap.UMAP(n_components=2, metric="cosine", n_neighbors=N_NEIGHBORS, min_dist=MIN_DIST,
                       random_state=SEED).fit_transform(W).astype(np.float32)   # [d_sae 2]
        seconds = round(time.perf_counter() - t, 2)
        _store_map(store, key, xy)
    path = _map_file(sae_id) if write_file else None
    if path is not None and _file_map(sae_id) is None:
        np.savez(path.with_suffix(".tmp.npz"), xy=xy, weights_hash=np.array(weights_hash(sae_id)))
        path.with_suffix(".tmp.npz").replace(path)
    return {"sae_key": key, "features": int(len(xy)), "umap_seconds": seconds, "already_built": seconds is None,
            "file": str(path) if path else None}


def _file_map(sae_id: str) -> np.ndarray | None:
    """The shipped map beside the SAE's weights, if it was made from these weights."""
    path = _map_file(sae_id)
    if path is None or not path.exists():
        return None
    with np.load(path) as z:
        return z["xy"] if str(z["weights_hash"]) == weights_hash(sae_id) else None


def _store_map(store, key: str, xy: np.ndarray) -> None:
    t = pa.table({"sae_key": pa.array([key] * len(xy)), "feature": np.arange(len(xy), dtype=np.int32),
                  "x": xy[:, 0], "y": xy[:, 1]})
    cur = store.cursor()
    with store.locked():
        if cur.execute("SELECT 1 FROM sae_maps WHERE sae_key = ? LIMIT 1", [key]).fetchall():
            return
        cur.register("_map", t)
        cur.execute("INSERT INTO sae_maps SELECT sae_key, feature, x, y FROM _map")
        cur.unregister("_map")


def get_map(store, sae_id: str) -> np.ndarray | None:
    """[d_sae 2] coordinates of the SAE's current weights, from the store or the shipped file."""
    key = sae_key(sae_id)
    t = store.cursor().sql("SELECT x, y FROM sae_maps WHERE sae_key = ? ORDER BY feature",
                           params=[key]).to_arrow_table()
    if t.num_rows:
        return np.stack([t["x"].to_numpy(), t["y"].to_numpy()], 1)
    xy = _file_map(sae_id)
    if xy is not None:
        _store_map(store, key, xy)
    return xy


def map_data(store, sae_id: str) -> dict:
    """What the map page draws: coordinates, log10 density (None without a corpus index) and a
    hover label per feature (top corpus tokens when indexed, else the promoted tokens)."""
    from .query import index_for, vocab

    xy = get_map(store, sae_id)
    if xy is None:
        raise FeatureIndexMissing(f"No feature map for {sae_id} yet: build it with `python -m backend feature-map "
                                  f"--sae {sae_id}` (about a minute).")
    n = len(xy)
    cur = store.cursor()
    try:
        index = index_for(store, sae_id)
    except FeatureIndexMissing:
        index = None
    labels = [""] * n
    density = None
    if index is not None:
        strings = vocab(store, index.model)
        density = np.full(n, np.nan)
        for f, d in cur.execute("SELECT feature, density FROM feature_stats WHERE ix = ?", [index.ix]).fetchall():
            density[f] = d
        rows = cur.execute("SELECT feature, token FROM feature_top_tokens WHERE ix = ? "
                           "QUALIFY row_number() OVER (PARTITION BY feature ORDER BY n DESC, token) <= 4 "
                           "ORDER BY feature, n DESC, token", [index.ix]).fetchall()
        for f, tok in rows:
            labels[f] += ("" if not labels[f] else " · ") + repr(strings[tok])[1:-1]
        source = "top corpus tokens"
    else:
        from .index import ensure_weight_tables
        from ...saes import sae_info

        key = ensure_weight_tables(store, sae_id)
        strings = vocab(store, sae_info(sae_id)["model"])
        for f, tok in cur.execute("SELECT feature, token FROM sae_logit_effects WHERE sae_key = ? AND rank BETWEEN 1 "
                                  "AND 4 ORDER BY feature, rank", [key]).fetchall():
            labels[f] += ("" if not labels[f] else " · ") + repr(strings[tok])[1:-1]
        source = "promoted tokens (no corpus index yet)"
    return {"xy": xy, "density": density, "labels": labels, "label_source": source, "index": index}
