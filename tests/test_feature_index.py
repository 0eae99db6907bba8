"""The corpus feature index: real model, real SAEs, real DuckDB, a small stdlib corpus.

The index is built once per module for two SAEs (a residual SAE and the hook_z SAE, so one
forward serves both), interrupted after its first chunk and resumed. The reference is a
plain per-window `run_with_cache` + SAELens's dense `sae.encode` of the same windows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend import corpus
from backend.errors import EmptySearch, FeatureIndexMissing, NotSingleToken, OutOfRange, UnknownSAE
from backend.jobs.features import index as fidx
from backend.jobs.features import query
from backend.jobs.features.search import search_text, search_token

pytestmark = pytest.mark.model   # loads the real model

SAES = ["smollm2-135m-L5-resid_pre", "smollm2-135m-L23-z"]
N_WINDOWS, CHUNK = 18, 6


class _Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def built(tmp_path_factory, model):
    from backend.saes import load_sae
    from backend.store import Store

    root = tmp_path_factory.mktemp("fcorpus")
    corpus.build(["stdlib"], root=root, max_words=12_000)
    corpus.tokenize(model.info.model_id, root=root)
    store = Store(tmp_path_factory.mktemp("fstore") / "store.duckdb")

    def interrupt(done, total, message):          # as a Ctrl-C after the first chunk is written
        if done == 1:
            raise _Interrupted
    with pytest.raises(_Interrupted):
        fidx.build_index(model.info.model_id, SAES, N_WINDOWS, store=store, root=root, chunk_windows=CHUNK,
                         progress=interrupt)
    cur = store.cursor()
    partial = {"chunks": cur.execute("SELECT count(*) FROM job_chunks").fetchall()[0][0],
               "raw": cur.execute("SELECT count(*) FROM feature_acts").fetchall()[0][0],
               "clustered": cur.execute("SELECT count(*) FROM feature_acts_by_feature").fetchall()[0][0],
               "built": cur.execute("SELECT count(*) FROM feature_indexes WHERE built IS NOT NULL").fetchall()[0][0]}
    summary = fidx.build_index(model.info.model_id, SAES, N_WINDOWS, store=store, root=root, chunk_windows=CHUNK)

    # reference: each window alone, run_with_cache at both hooks, SAELens's dense encode
    wins = fidx.select_windows(model.info.model_id, N_WINDOWS, root=root)
    saes = {s: load_sae(s) for s in SAES}
    ref = {s: {} for s in SAES}                     # sae -> {(doc, pos, feature): value}
    hooks = [saes[s].cfg.metadata.hook_name for s in SAES]
    with torch.inference_mode():
        for doc, start, ids in wins:
            _, cache = model.run_with_cache(ids, hooks, stop_at_layer=24)
            for s in SAES:
                x = cache[saes[s].cfg.metadata.hook_name][0]                  # [pos d] or [pos head d_head]
                dense = saes[s].encode(x)              # [pos d_sae]; SAELens flattens hook_z heads itself
                for p, f in (dense[1:] > 0).nonzero().tolist():
                    ref[s][(doc, start + p + 1, f)] = float(dense[p + 1, f])
    yield {"store": store, "root": root, "summary": summary, "partial": partial, "wins": wins, "saes": saes,
           "ref": ref, "model": model}
    store.close()


def _index(b, sae):
    return query.index_for(b["store"], sae)


def _features(b, sae):
    """A dense, a middling and a rare feature of the reference."""
    counts: dict[int, int] = {}
    for (_, _, f) in b["ref"][sae]:
        counts[f] = counts.get(f, 0) + 1
    order = sorted(counts, key=lambda f: (-counts[f], f))
    return [order[0], order[len(order) // 4], order[len(order) // 2]]


@pytest.mark.parametrize("sae", SAES)
def test_top_examples_equal_dense_saelens_encode(built, sae):
    b = built
    idx = _index(b, sae)
    for f in _features(b, sae):
        ref = sorted(((v, d, p) for (d, p, ff), v in b["ref"][sae].items() if ff == f), key=lambda t: -t[0])[:8]
        got = query.top_examples(b["store"], idx, f, k=8)
        assert [g["value"] for g in got] == pytest.approx([r[0] for r in ref], rel=1e-4, abs=1e-4)
        for g in got:   # each example's own value and context agree with the reference
            assert b["ref"][sae][(g["doc"], g["pos"], f)] == pytest.approx(g["value"], rel=1e-4, abs=1e-4)
            assert g["acts"][g["focus"]] == pytest.approx(g["value"])
            win = next(w for w in b["wins"] if w[0] == g["doc"] and w[1] <= g["pos"] < w[1] + len(w[2]))
            lo = g["pos"] - g["focus"]
            assert g["token_ids"] == win[2][lo - win[1]:lo - win[1] + len(g["token_ids"])]
            for j, a in enumerate(g["acts"]):
                if a is not None:
                    assert a == pytest.approx(b["ref"][sae].get((g["doc"], lo + j, f), 0.0), rel=1e-4, abs=1e-4)
        st = query.stats(b["store"], idx, f)
        vals = np.array([v for (_, _, ff), v in b["ref"][sae].items() if ff == f])
        assert st["n"] == len(vals) and st["max"] == pytest.approx(vals.max(), rel=1e-4)
        assert st["density"] == pytest.approx(len(vals) / idx.n_tokens)
        assert sum(query.histogram(b["store"], idx, f)["counts"]) == len(vals)


def test_rows_match_reference_and_clustered_tables_hold_the_same_rows(built):
    b, cur = built, built["store"].cursor()
    n_tokens = sum(len(w[2]) - 1 for w in b["wins"])
    for sae in SAES:
        idx = _index(b, sae)
        assert idx.n_tokens == n_tokens
        rows = cur.execute("SELECT doc, pos, feature, value FROM feature_acts_by_feature WHERE ix = ?", [idx.ix]).fetchall()
        keys = {(d, p, f) for d, p, f, _ in rows}
        assert len(keys) == len(rows) == idx.n_rows                      # no duplicates
        ref = b["ref"][sae]
        assert len(rows) == len(ref)                                     # no losses
        assert len(keys & set(ref)) >= 0.999 * len(ref)                  # top-k near-ties aside
        for t in ("feature_acts_by_feature", "feature_acts_by_doc"):
            other = "feature_acts_by_doc" if t == "feature_acts_by_feature" else "feature_acts_by_feature"
            diff = cur.execute(f"SELECT count(*) FROM (SELECT * FROM {t} WHERE ix = ? EXCEPT ALL "
                               f"SELECT * FROM {other} WHERE ix = ?)", [idx.ix, idx.ix]).fetchall()[0][0]
            assert diff == 0
        # physically clustered: read in storage order, the rows come sorted
        f_order = cur.execute("SELECT feature, value FROM feature_acts_by_feature WHERE ix = ?", [idx.ix]).fetchall()
        assert f_order == sorted(f_order, key=lambda r: (r[0], -r[1]))
        d_order = cur.execute("SELECT doc, pos FROM feature_acts_by_doc WHERE ix = ?", [idx.ix]).fetchall()
        assert d_order == sorted(d_order)
        d, p = rows[0][0], rows[0][1]
        assert {f for f, _ in query.features_at(b["store"], idx, d, p)} == {f for (dd, pp, f) in ref if (dd, pp) == (d, p)}
    assert cur.execute("SELECT count(*) FROM feature_acts").fetchall()[0][0] == 0   # raw rows dropped at finish


def test_interrupted_job_resumes_without_duplicates_or_losses(built):
    b = built
    assert b["partial"]["chunks"] == 1 and b["partial"]["raw"] > 0
    assert b["partial"]["clustered"] == 0 and b["partial"]["built"] == 0     # nothing finished half-way
    s = b["summary"]
    assert s["finished"] and s["chunks_done"] == s["n_chunks"] == N_WINDOWS // CHUNK
    assert s["new_tokens"] < s["n_tokens"]                                    # the resumed run did only the rest
    chunks = b["store"].cursor().execute("SELECT chunk FROM job_chunks ORDER BY chunk").fetchall()
    assert [c for (c,) in chunks] == list(range(N_WINDOWS // CHUNK))
    again = fidx.build_index(b["model"].info.model_id, SAES, N_WINDOWS, store=b["store"], root=b["root"],
                             chunk_windows=CHUNK)
    assert again["already_built"]


@pytest.mark.parametrize("sae", SAES)
def test_logit_effects_and_similar_features_equal_direct_computation(built, sae):
    b, model = built, built["model"]
    s = b["saes"][sae]
    hf = model.hf_model()
    layer = int(s.cfg.metadata.hook_name.split(".")[1])       # test-side only: which block's W_O
    for f in _features(b, sae)[:2]:
        with torch.inference_mode():
            one = torch.zeros(1, s.cfg.d_sae)
            one[0, f] = 1.0
            reshaping = getattr(s, "hook_z_reshaping_mode", False)
            if reshaping:
                s.turn_off_forward_pass_hook_z_reshaping()
            d = (s.decode(one) - s.decode(torch.zeros_like(one)))[0]           # [d_in], SAELens's own decode
            if reshaping:
                s.turn_on_forward_pass_hook_z_reshaping()
            if "hook_z" in s.cfg.metadata.hook_name:
                d = hf.model.layers[layer].self_attn.o_proj.weight @ d             # z (heads concatenated) -> resid
            ref = hf.lm_head.weight @ (d * hf.model.norm.weight)                  # [d_vocab]
        got = query.logit_effects(b["store"], sae, f)
        top, bot = ref.topk(10), ref.topk(10, largest=False)
        assert [g["token_id"] for g in got["promoted"]] == top.indices.tolist()
        assert [g["value"] for g in got["promoted"]] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-5)
        assert [g["token_id"] for g in got["suppressed"]] == bot.indices.tolist()
        assert got["promoted"][0]["token"] == model.tokenizer.decode([top.indices[0].item()])
        W = torch.nn.functional.normalize(s.W_dec.float(), dim=-1)
        cos = W @ W[f]
        cos[f] = -2
        sim = query.similar_features(b["store"], sae, f)
        assert [x["feature"] for x in sim] == cos.topk(10).indices.tolist()
        assert [x["cosine"] for x in sim] == pytest.approx(cos.topk(10).values.tolist(), abs=1e-5)


def test_search_by_text_agrees_with_per_prompt_features(built):
    from backend.analyses.features import FeaturesSpec
    from backend.runner import run

    b, sae = built, SAES[0]
    text = "The quick brown fox jumps over the lazy dog. def main(): return 0"
    r = search_text(b["store"], sae, text, b["model"].info.model_id)
    per = run(FeaturesSpec(model=b["model"].info.model_id, sae=sae, text=text, k=10), store=b["store"]).result
    best: dict[int, float] = {}
    for p in range(1, len(per.tokens)):
        for f, v in zip(per.feature_ids[p].tolist(), per.feature_values[p].tolist()):
            best[f] = max(best.get(f, 0.0), v)
    got = {x["feature"]: x["max"] for x in r["results"]}
    top = max(best, key=best.get)
    assert r["results"][0]["feature"] == top and r["results"][0]["max"] == pytest.approx(best[top], rel=1e-5)
    for f in list(got)[:10]:
        if f in best:
            assert got[f] == pytest.approx(best[f], rel=1e-5)
    # and against SAELens's dense encode of a plain run_with_cache
    s = b["saes"][sae]
    with torch.inference_mode():
        _, cache = b["model"].run_with_cache(b["model"].encode(text), [s.cfg.metadata.hook_name])
        dense = s.encode(cache[s.cfg.metadata.hook_name][0])[1:]
    sums = dense.sum(0)
    by_sum = search_text(b["store"], sae, text, b["model"].info.model_id, by="sum")
    assert by_sum["results"][0]["feature"] == int(sums.argmax())
    assert by_sum["results"][0]["sum"] == pytest.approx(float(sums.max()), rel=1e-4)


def test_search_by_token_finds_the_features_whose_top_examples_sit_on_it(built):
    b, sae = built, SAES[0]
    strings = query.vocab(b["store"], b["model"].info.model_id)
    ref_tokens: dict[int, dict[int, int]] = {}           # feature -> token -> count in its top 20
    win_tok = {(d, s + j): t for d, s, ids in b["wins"] for j, t in enumerate(ids)}
    per_feature: dict[int, list] = {}
    for (d, p, f), v in b["ref"][sae].items():
        per_feature.setdefault(f, []).append((v, d, p))
    for f, hits in per_feature.items():
        for v, d, p in sorted(hits, key=lambda h: (-h[0], h[1], h[2]))[:fidx.TOP_TOKEN_EXAMPLES]:
            ref_tokens.setdefault(f, {}).setdefault(win_tok[(d, p)], 0)
            ref_tokens[f][win_tok[(d, p)]] += 1
    tok = b["model"].encode(" the")[0]
    r = search_token(b["store"], sae, strings[tok])
    ids = set(r["token_ids"])
    assert tok in ids
    want = {f: sum(c.get(t, 0) for t in ids) for f, c in ref_tokens.items()}
    want = {f: n for f, n in want.items() if n}
    got = {x["feature"]: x["in_top_examples"] for x in r["results"] if x["in_top_examples"]}
    if r["n_found"] <= len(r["results"]):
        assert got == want
    for x in r["results"]:
        if x["logit_rank"] is not None:
            assert tok in {t["token_id"] for t in query.logit_effects(b["store"], sae, x["feature"])["promoted"]} | ids


def test_bad_input_gives_typed_errors(built, tmp_path):
    from backend.store import Store

    b = built
    with pytest.raises(UnknownSAE):
        query.feature_dashboard(b["store"], "no-such-sae", 1)
    with pytest.raises(OutOfRange):
        query.feature_dashboard(b["store"], SAES[0], 4608)
    with pytest.raises(OutOfRange):
        query.feature_dashboard(b["store"], SAES[0], -1)
    with pytest.raises(EmptySearch):
        search_token(b["store"], SAES[0], "   ")
    with pytest.raises(EmptySearch):
        search_text(b["store"], SAES[0], "", b["model"].info.model_id)
    with pytest.raises(NotSingleToken):
        search_token(b["store"], SAES[0], "certainly not one token")
    with pytest.raises(UnknownSAE):
        fidx.build_index(b["model"].info.model_id, "no-such-sae", 4, store=b["store"])
    fresh = Store(tmp_path / "empty.duckdb")
    with pytest.raises(FeatureIndexMissing, match="feature-index"):
        query.index_for(fresh, SAES[0])
    fresh.close()


def test_index_of_other_weights_is_reported_stale(built):
    b, cur = built, built["store"].cursor()
    ix = _index(b, SAES[1]).ix
    real = fidx.weights_hash(SAES[1])
    cur.execute("UPDATE feature_indexes SET weights_hash = 'retrained000000' WHERE ix = ?", [ix])
    try:
        with pytest.raises(FeatureIndexMissing, match="retrained"):
            query.index_for(b["store"], SAES[1])
        d = query.feature_dashboard(b["store"], SAES[1], 3)
        assert d["index"] is None and "retrained" in d["missing"] and d["logits"]["promoted"]
    finally:
        cur.execute("UPDATE feature_indexes SET weights_hash = ? WHERE ix = ?", [real, ix])
