"""The feature index build against the model's own forward over the same windows, one run.

    .venv/bin/python benchmarks/bench_feature_index.py [--windows 64] [--threads 2]

Builds the index of every shipped SAE of the default model over --windows corpus windows of
128 tokens into a scratch store (the real job: one forward for all SAEs that stops after the
deepest hook, the fused TopK encode, sparse rows, DuckDB inserts, the clustered copies), and
times the bare forward to the deepest hook over the same windows (LoadedModel.capture). The
ratio says how model-bound the index is (1.0: the encode, the rows and the store cost nothing).
The weight-only tables (computed once per SAE weights, not per index) are timed apart.
Needs the corpus (python -m backend corpus build).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    from backend import corpus
    from backend.jobs.features import index as fidx
    from backend.model import DEFAULT_MODEL, load_model
    from backend.saes import list_saes, load_sae
    from backend.store import Store

    torch.set_num_threads(a.threads)
    model = load_model(DEFAULT_MODEL)
    saes = [s["sae_id"] for s in list_saes(DEFAULT_MODEL)]
    hooks = sorted({load_sae(s).cfg.metadata.hook_name for s in saes})
    wins = fidx.select_windows(DEFAULT_MODEL, a.windows)
    n_tok = sum(len(w[2]) for w in wins)

    t = time.perf_counter()
    for idx in fidx._batches(wins):
        ids, _ = corpus.pad_right([wins[i][2] for i in idx])
        fidx.hook_batch(model, hooks, model.tensor(ids))
    fwd = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d) / "bench.duckdb")
        t = time.perf_counter()
        for s in saes:    # weight-only tables (logit effects, similar features): once per SAE weights
            fidx.ensure_weight_tables(store, s, model)
        weights = time.perf_counter() - t
        t = time.perf_counter()
        out = fidx.build_index(DEFAULT_MODEL, "all", a.windows, store=store)
        build = time.perf_counter() - t
        store.close()
    print(f"{len(saes)} SAEs ({', '.join(saes)}), {a.windows} windows, {n_tok} tokens, {a.threads} threads")
    print(f"forward to the deepest hook : {fwd:7.1f} s  {n_tok / fwd:7.0f} tok/s")
    print(f"feature index build         : {build:7.1f} s  {n_tok / build:7.0f} tok/s  "
          f"({out.get('rows', out.get('n_rows', '?'))} rows)")
    print(f"weight-only tables, once    : {weights:7.1f} s  (logit effects, similar features; not in the build below)")
    enc, fin = out.get("encode_seconds"), out.get("finish_seconds")
    if enc is not None and fin is not None:
        print(f"  of which chunks (forward, encode, inserts) {enc:7.1f} s, finish (clustered copy, stats) {fin:7.1f} s")
    print(f"index / forward time        : {build / fwd:5.2f}x  (1.0 = model-bound)")


if __name__ == "__main__":
    main()
