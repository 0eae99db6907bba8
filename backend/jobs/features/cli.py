"""CLI of the feature index, map and search (registered in backend/cli.py).

    python -m backend feature-index --model smollm2-135m --sae all --windows 1024
    python -m backend feature-map --sae smollm2-135m-L15-resid_pre
    python -m backend feature-search --sae smollm2-135m-L15-resid_pre --mode token --q " Paris"
    python -m backend feature --sae smollm2-135m-L15-resid_pre --feature 12     # a dashboard as JSON
    python -m backend feature-scores --sae all        # VocabProj, scores, TokenChange of every feature
"""

from __future__ import annotations

from ...model import DEFAULT_MODEL
from .index import DEFAULT_WINDOWS


def add_index_args(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--sae", default="all", help="an SAE id, a transcoder set id (all its layers, '<set>.L<layer>' each), "
                        "or 'all' (every shipped SAE of the model)")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS,
                   help=f"corpus windows of 128 tokens to encode (default {DEFAULT_WINDOWS})")
    p.add_argument("--corpus", default="default")
    from .. import add_engine_args

    add_engine_args(p)


def run_index(a) -> dict:
    from .. import tqdm_progress
    from .index import build_index

    return build_index(a.model, a.sae, a.windows, progress=tqdm_progress("feature index"), corpus_name=a.corpus,
                       engine=a.engine)


def add_map_args(p) -> None:
    p.add_argument("--sae", required=True, help="an SAE id, or 'all'")
    p.add_argument("--model", default=DEFAULT_MODEL, help="with --sae all: the model whose SAEs to map")
    p.add_argument("--no-file", action="store_true", help="store only, do not write feature_map.npz beside the SAE")


def run_map(a) -> dict:
    import sys

    from ...store import default_store
    from .fmap import build_map
    from .index import resolve_saes

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    return {"maps": [build_map(default_store(), s, write_file=not a.no_file, progress=log)
                     for s in resolve_saes(a.model, a.sae)]}


def add_search_args(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--sae", required=True)
    p.add_argument("--mode", choices=["token", "text"], default="token")
    p.add_argument("--q", default="", help="a token (token mode) or a text (text mode); without it and with "
                                           "--sort: every feature of the SAE, ranked")
    p.add_argument("--by", choices=["max", "sum"], default="max", help="text mode: rank by max or sum over tokens")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--sort", choices=["output_score", "input_score", "density"], default=None,
                   help="rank the results by this score (highest first; features without it last)")
    p.add_argument("--min-output-score", type=float, default=None, help="keep features whose output score is at least this")


def run_search(a) -> dict:
    from ...store import default_store
    from .search import search

    kw = {"limit": a.limit, **({"by": a.by} if a.mode == "text" else {})}
    return search(default_store(), a.sae, a.mode, a.q, a.model, sort=a.sort, min_output_score=a.min_output_score, **kw)


def add_feature_args(p) -> None:
    p.add_argument("--sae", required=True)
    p.add_argument("--feature", type=int, required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--no-compute", action="store_true",
                   help="do not compute missing scores (they are null and listed in scores_missing)")


def run_feature(a) -> dict:
    from ...store import default_store
    from .query import feature_dashboard
    from .scores import feature_scores

    sc = feature_scores(default_store(), a.sae, a.feature, compute=not a.no_compute)
    d = feature_dashboard(default_store(), a.sae, a.feature, a.k)
    for k in ("label", "vocab_proj", "token_change", "input_score", "output_score", "input_score_detail",
              "output_score_detail"):
        d[k] = sc[k]
    d["scores_missing"] = sc["missing"]
    ix = d.pop("index")
    d["index"] = None if ix is None else {"ix": ix.ix, "weights_hash": ix.weights_hash, "n_windows": ix.n_windows,
                                          "n_tokens": ix.n_tokens, "n_rows": ix.n_rows}
    d["query_ms"] = round(d.pop("seconds") * 1000, 2)
    return d


def add_scores_args(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--sae", default="all", help="an SAE id, a transcoder set id (all its layers, '<set>.L<layer>' each), "
                        "or 'all' (every shipped SAE of the model)")
    p.add_argument("--corpus", default="default", help="corpus of the TokenChange held-out windows")
    p.add_argument("--parts", default="vocab,output,input,token_change",
                   help="comma-separated subset of vocab,output,input,token_change")
    p.add_argument("--features", type=int, default=None, help="only the first N features of each SAE (trials)")
    p.add_argument("--ship", action="store_true",
                   help="afterwards write each SAE's stored TokenChange beside it (<SAE folder>/token_change.parquet), "
                        "imported by every later run so a fresh start has it")
    from .. import add_engine_args

    add_engine_args(p)


def run_scores(a) -> dict:
    from ...errors import InvalidSpec
    from .. import tqdm_progress
    from .scores import build_scores

    parts = tuple(x.strip() for x in a.parts.split(",") if x.strip())
    bad = [x for x in parts if x not in ("vocab", "output", "input", "token_change")]
    if bad or not parts:
        raise InvalidSpec(f"Unknown parts {bad}: use a subset of vocab,output,input,token_change.")
    if a.features is not None and a.features < 1:
        raise InvalidSpec("--features must be at least 1.")
    out = build_scores(a.model, a.sae, progress=tqdm_progress, corpus_name=a.corpus, parts=parts, features=a.features,
                       engine=a.engine)
    if a.ship:
        from ...store import default_store
        from .scores import ship_token_change

        out["shipped"] = [ship_token_change(default_store(), s, corpus_name=a.corpus) for s in out["saes"]]
    return out
