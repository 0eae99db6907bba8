"""Feature-store queries: clustered vs unclustered, and a whole dashboard, medians in ms.

    .venv/bin/python benchmarks/bench_feature_store.py [--store data/store.duckdb]
                     [--sae smollm2-135m-L15-resid_pre] [--repeat 30]

Needs a built index (python -m backend feature-index ...). The index's rows are copied into
a scratch DuckDB file three times: sorted by (feature, value desc), sorted by (doc, pos), and
in random order (the unclustered baseline); the same queries run against each. Then the
real dashboard functions run against the store (feature_dashboard = stats, top-10 examples
with contexts, 6 quantile bands, histogram, logit effects, similar features).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def median_ms(fn, repeat: int) -> float:
    fn()   # warm
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 2)


def main() -> None:
    import duckdb
    import numpy as np

    from backend import settings
    from backend.jobs.features.query import feature_dashboard, features_at, index_for, top_examples
    from backend.store import Store

    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=str(settings.store_path()))
    ap.add_argument("--sae", default="smollm2-135m-L15-resid_pre")
    ap.add_argument("--repeat", type=int, default=30)
    a = ap.parse_args()
    store = Store(a.store)
    idx = index_for(store, a.sae)
    cur = store.cursor()
    feats = [f for (f,) in cur.execute("SELECT feature FROM feature_stats WHERE ix = ? ORDER BY n DESC",
                                       [idx.ix]).fetchall()]
    rng = np.random.default_rng(0)
    sample_f = [feats[i] for i in rng.integers(0, len(feats), 20)]
    places = cur.execute("SELECT doc, pos FROM feature_acts_by_doc WHERE ix = ? USING SAMPLE 20 ROWS",
                         [idx.ix]).fetchall()
    scratch = Path(tempfile.mkdtemp()) / "bench.duckdb"
    con = duckdb.connect(str(scratch))
    t = store.cursor().sql("SELECT ix, feature, doc, pos, value FROM feature_acts_by_feature WHERE ix = ?",
                           params=[idx.ix]).to_arrow_table()
    con.register("src", t)
    con.execute("CREATE TABLE by_feature AS SELECT * FROM src ORDER BY feature, value DESC")
    con.execute("CREATE TABLE by_doc AS SELECT * FROM src ORDER BY doc, pos")
    con.execute("CREATE TABLE unclustered AS SELECT * FROM src ORDER BY hash(doc, pos, feature)")
    con.unregister("src")
    con.execute("CHECKPOINT")
    n_rows = con.execute("SELECT count(*) FROM by_feature").fetchall()[0][0]

    def top(table):
        def run():
            for f in sample_f:
                con.execute(f"SELECT doc, pos, value FROM {table} WHERE feature = ? ORDER BY value DESC LIMIT 20",
                            [f]).fetchall()
        return run

    def at(table):
        def run():
            for d, p in places:
                con.execute(f"SELECT feature, value FROM {table} WHERE doc = ? AND pos = ?", [d, p]).fetchall()
        return run

    out = {"sae": a.sae, "rows": n_rows, "index_rows_all_saes": store.cursor().execute(
        "SELECT sum(n_rows) FROM feature_indexes WHERE built IS NOT NULL").fetchall()[0][0],
        "top20_ms": {"clustered_by_feature": median_ms(top("by_feature"), a.repeat) / 20,
                     "unclustered": median_ms(top("unclustered"), a.repeat) / 20},
        "features_at_doc_pos_ms": {"clustered_by_doc": median_ms(at("by_doc"), a.repeat) / 20,
                                   "unclustered": median_ms(at("unclustered"), a.repeat) / 20}}
    con.close()
    f0 = sample_f[0]
    out["store_top_examples_with_context_ms"] = median_ms(lambda: top_examples(store, idx, f0, 10), a.repeat)
    out["store_features_at_ms"] = median_ms(lambda: features_at(store, idx, *places[0]), a.repeat)
    dash = []
    for f in sample_f[:10]:
        dash.append(median_ms(lambda f=f: feature_dashboard(store, a.sae, f), max(3, a.repeat // 5)))
    out["feature_dashboard_ms"] = {"median": round(statistics.median(dash), 2), "max": max(dash)}
    for k in ("top20_ms", "features_at_doc_pos_ms"):
        v = list(out[k].values())
        out[k]["ratio"] = round(v[1] / v[0], 1)
    import json

    print(json.dumps(out, indent=1))
    store.close()


if __name__ == "__main__":
    main()
