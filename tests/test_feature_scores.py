"""Feature scores (backend/jobs/features/scores.py): VocabProj, output score, TokenChange,
input score, labels, the job and the CLI; real model, real SAEs, real DuckDB, a small corpus.

Every fast path is checked against a plain computation: VocabProj against the unembedding and
final-norm weights by hand, the batched output score against one full forward per feature
with a plain hook (model.run_with_hooks), TokenChange against full forwards per window, the
input score against the index's rows in Python. Feature ids are chosen at run time (the
shipped SAEs get retrained). The index lives in the session store for an SAE no other test
module indexes there.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backend import corpus
from backend.jobs.features import index as fidx
from backend.jobs.features import query
from backend.jobs.features import scores as S

pytestmark = pytest.mark.model

SAE = "smollm2-135m-L15-resid_pre"
ZSAE = "smollm2-135m-L23-z"
N_OUT = 24          # features with output scores / TokenChange computed by the job here
N_TC = 2


@pytest.fixture(scope="module")
def built(model, tmp_path_factory):
    from backend.saes import load_sae
    from backend.store import default_store

    root = tmp_path_factory.mktemp("scorpus")
    corpus.build(["stdlib"], root=root, max_words=24_000)
    corpus.tokenize(model.info.model_id, root=root)
    store = default_store()
    fidx.build_index(model.info.model_id, SAE, 32, store=store, root=root)
    S.build_scores(model.info.model_id, [SAE, ZSAE], store=store, root=root, parts=("vocab",))
    summary = S.build_scores(model.info.model_id, [SAE, ZSAE], store=store, root=root, features=N_OUT,
                             parts=("output", "input"))
    tc = S.build_scores(model.info.model_id, SAE, store=store, root=root, features=N_TC, parts=("token_change",))
    return {"store": store, "root": root, "summary": summary, "tc": tc, "saes": {s: load_sae(s) for s in (SAE, ZSAE)},
            "index": query.index_for(store, SAE)}


def _stored_vp(store, sae_id):
    key = fidx.sae_key(sae_id)
    rows = store.cursor().execute("SELECT feature, top_ids, top_values, bottom_ids FROM feature_vocab_proj WHERE "
                                  "sae_key = ? ORDER BY feature", [key]).fetchall()
    return {f: (np.array(t), np.array(v), np.array(b)) for f, t, v, b in rows}


def _plain_direction(model, sae, f: int) -> torch.Tensor:
    """The residual-stream direction of feature f by hand from the weights."""
    w = sae.W_dec[f].detach().float()
    w = w / w.norm()                                                    # the shipped SAEs rescale by the decoder norm
    hook = sae.cfg.metadata.hook_name
    if hook.endswith("attn.hook_z"):
        layer = int(hook.split(".")[1])
        W_O = model.W_O()[layer].float()                                # [head d_head d_model]
        return torch.einsum("hd,hdm->m", w.reshape(W_O.shape[:2]), W_O)
    return w


def _plain_vocab(model, d: torch.Tensor) -> torch.Tensor:
    gamma = model.final_norm_weight().float()
    W_U, _ = model.unembed_weights()
    normed = d / torch.sqrt((d ** 2).mean() + 1e-5) * gamma            # RMSNorm (SmolLM2: eps 1e-5)
    return W_U.float() @ normed                                         # [d_vocab]


@pytest.mark.parametrize("sae_id", [SAE, ZSAE])
def test_vocab_proj_equals_plain_computation(built, model, sae_id):
    vp = _stored_vp(built["store"], sae_id)
    sae = built["saes"][sae_id]
    assert len(vp) == sae.cfg.d_sae
    rng = np.random.default_rng(1)
    for f in rng.choice(sae.cfg.d_sae, 4, replace=False).tolist():
        with torch.inference_mode():
            logits = _plain_vocab(model, _plain_direction(model, sae, f))
        top = logits.topk(S.VOCAB_K)
        bottom = logits.topk(S.VOCAB_K, largest=False)
        ids, vals, bids = vp[f]
        assert ids.tolist() == top.indices.tolist()
        assert bids.tolist() == bottom.indices.tolist()
        np.testing.assert_allclose(vals, top.values.numpy(), rtol=1e-4, atol=1e-4)


def _reference_output_score(model, sae, f: int, lens: list[int]) -> float:
    """Arad et al.'s output score, one full forward with a plain hook, formula by hand."""
    ids = model.tokenize(S.PROMPT)
    hook = sae.cfg.metadata.hook_name
    with torch.inference_mode():
        _, cache = model.run_with_cache(ids, [hook])
        x = cache[hook][0, -1].reshape(-1).float()
        a_max = float(sae.encode(x[None]).max())
        delta = S.OUT_SCALE * a_max * (sae.W_dec[f].float() / sae.W_dec[f].float().norm())

        def add(act, hook):
            act = act.clone()
            act[:, -1] += delta.reshape(act.shape[2:])
            return act
        logits = model.run_with_hooks(ids, fwd_hooks=[(hook, add)])[0, -1]
    p = torch.softmax(logits.double(), -1).numpy()
    order = np.argsort(-p, kind="stable")
    rank_of = np.empty(len(p), np.int64)
    rank_of[order] = np.arange(len(p))
    r = min(rank_of[t] for t in lens)
    return (1 - r / len(p)) * max(p[t] for t in lens)


@pytest.mark.parametrize("sae_id", [SAE, ZSAE])
def test_output_score_equals_plain_hook_reference(built, model, sae_id):
    store = built["store"]
    key = fidx.sae_key(sae_id)
    rows = store.cursor().execute("SELECT feature, score FROM feature_output_scores WHERE sae_key = ? ORDER BY score DESC",
                                  [key]).fetchall()
    assert len(rows) == N_OUT
    vp = _stored_vp(store, sae_id)
    for f, score in (rows[0], rows[len(rows) // 2], rows[-1]):
        ref = _reference_output_score(model, built["saes"][sae_id], f, vp[f][0][:S.LENS_K].tolist())
        assert score == pytest.approx(ref, rel=1e-3, abs=1e-7), (f, score, ref)


def test_token_change_zero_strength_changes_nothing_and_matches_reference(built, model):
    sae = built["saes"][SAE]
    wins = S.heldout_windows(model.info.model_id, root=built["root"])
    assert len(wins) == S.TC_WINDOWS and all(len(w) == S.TC_LEN for w in wins)
    st = S.windows_state(model, sae, wins)
    rows = S.decoder_rows(sae)
    feats = np.array([3, 11])
    zero = S.token_change(model, sae, feats, rows, np.zeros(2), st)
    assert np.abs(zero["values"]).max() < 1e-4             # float rounding of the batched rows only

    # reference: each window alone, a full forward with a plain hook adding ±c·d at positions >= 1
    f, c = 5, 40.0
    fast = S.token_change(model, sae, np.array([f]), rows, np.array([c]), st)
    hook = sae.cfg.metadata.hook_name
    d = rows[f]
    with torch.inference_mode():
        batch = model.tensor(wins)                                               # [32 16], one forward each
        clean = model.logits(batch)[:, 1:].mean((0, 1))
        for j, sign in enumerate((1.0, -1.0)):
            def add(act, hook, s=sign):
                act = act.clone()
                act[:, 1:] += s * c * d
                return act
            dl = model.run_with_hooks(batch, fwd_hooks=[(hook, add)])[:, 1:].mean((0, 1)) - clean
            up, down = dl.topk(S.TC_K), dl.topk(S.TC_K, largest=False)
            assert fast["ids"][0, 2 * j].tolist() == up.indices.tolist()
            assert fast["ids"][0, 2 * j + 1].tolist() == down.indices.tolist()
            np.testing.assert_allclose(fast["values"][0, 2 * j], up.values.numpy(), rtol=2e-3, atol=2e-3)

    # the job's rows: c = C_MULT x the feature's median active value in the index
    key, ix = fidx.sae_key(SAE), built["index"].ix
    stored = built["store"].cursor().execute(
        "SELECT t.feature, t.c, t.c_source, s.quantiles[2] FROM feature_token_change t LEFT JOIN feature_stats s "
        "ON s.ix = t.ix AND s.feature = t.feature WHERE t.sae_key = ? AND t.ix = ? ORDER BY t.feature", [key, ix]).fetchall()
    assert [r[0] for r in stored] == list(range(N_TC))
    for _, cc, src, med in stored:
        if med is None:                                     # never fires in the index
            assert src.startswith("fallback")
        else:
            assert src == "index median" and cc == pytest.approx(S.C_MULT * med, rel=1e-5)


def test_input_score_equals_python_over_index_rows(built):
    store, index = built["store"], built["index"]
    key = fidx.sae_key(SAE)
    vp = _stored_vp(store, SAE)
    got = {f: (s, n, h) for f, s, n, h in store.cursor().execute(
        "SELECT feature, score, n, hits FROM feature_input_scores WHERE sae_key = ? AND ix = ?", [key, index.ix]).fetchall()}
    assert got and any(s is not None for s, _, _ in got.values())
    rows = store.cursor().execute("SELECT feature, doc, pos, value, token FROM feature_acts_by_feature WHERE ix = ?",
                                  [index.ix]).fetchall()
    best: dict[tuple[int, int, int], tuple[float, int]] = {}
    for f, doc, pos, v, t in rows:
        k = (f, doc, pos // fidx.CONTEXT)
        if k not in best or v > best[k][0]:
            best[k] = (v, t)
    per: dict[int, list[tuple[float, int, int, int]]] = {}
    for (f, doc, w), (v, t) in best.items():
        per.setdefault(f, []).append((-v, doc, w, t))
    checked = 0
    for f in sorted(per, key=lambda f: -len(per[f]))[:30]:
        ex = sorted(per[f])[:S.IN_MAX]
        hits = sum(t in set(vp[f][0][:S.LENS_K].tolist()) for *_, t in ex)
        s, n, h = got[f]
        assert (n, h) == (len(ex), hits)
        assert s == (None if n < S.IN_MIN else pytest.approx(hits / n))
        checked += s is not None
    assert checked > 0


def test_job_is_resumable_idempotent_and_reports_pending_parts(built, model, tmp_path):
    from backend.store import Store

    store = Store(tmp_path / "fresh.duckdb")                # a fresh store: no index, no corpus needed
    seen = []
    r = S.build_scores(model.info.model_id, ZSAE, store=store, features=40, parts=("output", "input", "token_change"),
                       stop_after=0, root=built["root"])
    assert r["saes"][ZSAE]["output_score"]["status"] == "partial"
    r = S.build_scores(model.info.model_id, ZSAE, store=store, features=40, root=built["root"],
                       progress=lambda desc: (lambda d, n, m: seen.append((desc, d, n))))
    res = r["saes"][ZSAE]
    assert res["vocab_proj"]["status"] == res["output_score"]["status"] == "done"
    assert res["input_score"]["status"] == "pending" and "feature-index" in res["input_score"]["reason"]
    assert res["token_change"]["status"] == "pending"
    assert any("output score" in d for d, *_ in seen)
    n = store.cursor().execute("SELECT count(*), count(DISTINCT feature) FROM feature_output_scores").fetchall()[0]
    assert n == (40, 40)
    again = S.build_scores(model.info.model_id, ZSAE, store=store, features=40, root=built["root"])
    assert again["saes"][ZSAE]["output_score"].get("already_done")
    assert store.cursor().execute("SELECT count(*) FROM feature_output_scores").fetchall()[0][0] == 40
    store.close()


def test_planted_paris_feature(model, tmp_path, built):
    """A toy SAE whose feature 0 writes the unembedding direction of ' Paris' at layer 25: its
    row of W_U less the mean row (every row shares a large common part, which alone would rank
    large-norm tokens first)."""
    from sae_lens import SAE as LensSAE

    from backend.saes import load_sae
    from backend.store import Store

    base = load_sae("smollm2-135m-L25-resid_pre")
    toy = LensSAE.from_dict({**base.cfg.to_dict()})
    toy.load_state_dict(base.state_dict())
    paris = model.tokenize(" Paris", prepend_bos=False)
    assert len(paris) == 1
    W_U, _ = model.unembed_weights()
    with torch.no_grad():
        u = W_U[paris[0]].float() - W_U.float().mean(0)
        toy.W_dec[0] = u / u.norm()
    folder = tmp_path / "toy-sae"
    toy.save_model(str(folder))
    store = Store(tmp_path / "toy.duckdb")
    out = S.feature_scores(store, str(folder), 0, root=built["root"])
    assert out["vocab_proj"]["top"][0]["token"] == " Paris"
    assert out["output_score"] > 0.5, out["output_score_detail"]
    assert out["output_score_detail"]["best_token"] == " Paris"
    assert out["label"].startswith("promotes: Paris")       # no index for this SAE: only the output half
    store.close()


def test_labels_and_score_table(built):
    t = S.score_table(built["store"], SAE)
    assert t["indexed"] and t["n_vocab"] == 4608 and t["n_output"] == N_OUT
    assert all(lbl.startswith("fires on: ") and " · promotes: " in lbl for lbl in t["label"][:50])
    assert np.isfinite(t["output_score"][:N_OUT]).all() and np.isnan(t["output_score"][N_OUT:]).all()
    assert S.make_label([" Karel", " Patrick", "Patrick", " Darren"], ["'s", " only", " himself"]) == \
        "fires on: Karel, Patrick, Darren · promotes: 's, only, himself"


def test_feature_cli_fields_and_search_sort(built, capsys):
    from backend.cli import main

    f = int(built["store"].cursor().execute(
        "SELECT feature FROM feature_output_scores WHERE sae_key = ? ORDER BY score DESC LIMIT 1",
        [fidx.sae_key(SAE)]).fetchall()[0][0])
    assert main(["feature", "--sae", SAE, "--feature", str(f), "--format", "json", "--no-compute"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["label"].startswith("fires on: ") and isinstance(d["output_score"], float)
    assert len(d["vocab_proj"]["top"]) == len(d["vocab_proj"]["bottom"]) == S.VOCAB_K
    assert set(d["vocab_proj"]["top"][0]) == {"token", "id", "value"}
    assert "input_score" in d and "token_change" in d
    assert main(["feature-search", "--sae", SAE, "--sort", "output_score", "--min-output-score", "0", "--limit", "5",
                 "--format", "json"]) == 0
    s = json.loads(capsys.readouterr().out)
    scores = [r["output_score"] for r in s["results"]]
    assert s["results"][0]["feature"] == f and scores == sorted(scores, reverse=True) and s["n_found"] == N_OUT
    assert main(["feature-search", "--sae", SAE, "--q", " the", "--sort", "density", "--format", "json"]) == 0
    s = json.loads(capsys.readouterr().out)
    dens = [r["density"] for r in s["results"] if r["density"] is not None]
    assert dens == sorted(dens, reverse=True) and all("label" in r for r in s["results"])
    assert main(["feature-scores", "--sae", SAE, "--parts", "vocab,sideways", "--format", "json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["type"] == "InvalidSpec"


def test_shipped_token_change_is_imported_once_and_counts_as_computed(built, model, tmp_path):
    """feature-scores --ship writes the stored TokenChange beside the SAE; a fresh store imports
    it (once, marked as shipped) and the job then treats those features as done; a file of other
    weights, or measured on other windows (another corpus), is ignored."""
    import pyarrow.parquet as pq

    from backend.store import Store

    empty = Store(tmp_path / "empty.duckdb")                     # nothing stored: the file is left alone
    (tmp_path / S.SHIPPED_FILE).write_bytes(b"kept")
    info = S.ship_token_change(empty, SAE, folder=tmp_path, root=built["root"])
    assert info["written"] is False and info["features"] == 0 and (tmp_path / S.SHIPPED_FILE).read_bytes() == b"kept"
    empty.close()
    info = S.ship_token_change(built["store"], SAE, folder=tmp_path, root=built["root"])
    assert info["written"] and info["features"] == N_TC and (tmp_path / S.SHIPPED_FILE).exists()
    wins = S.heldout_windows(model.info.model_id, root=built["root"])
    fresh = Store(tmp_path / "fresh.duckdb")
    assert S.import_shipped(fresh, SAE, [w[::-1] for w in wins], folder=tmp_path) == 0   # other windows
    assert S.import_shipped(fresh, SAE, wins, folder=tmp_path) == N_TC
    assert S.import_shipped(fresh, SAE, wins, folder=tmp_path) == 0             # once
    key = fidx.sae_key(SAE)
    rows = fresh.cursor().execute("SELECT feature, ix, c_source FROM feature_token_change WHERE sae_key = ? "
                                  "ORDER BY feature", [key]).fetchall()
    assert [r[0] for r in rows] == list(range(N_TC)) and all(r[1] == S.SHIPPED_IX for r in rows)
    assert all(r[2].startswith("shipped: ") for r in rows)
    assert S._present(fresh, "feature_token_change", key, np.arange(N_TC), ix=7) == set(range(N_TC))
    orig = built["store"].cursor().execute("SELECT pos_up_ids, pos_up FROM feature_token_change WHERE sae_key = ? "
                                           "AND feature = 1 AND ix = ?", [key, built["index"].ix]).fetchall()[0]
    got = fresh.cursor().execute("SELECT pos_up_ids, pos_up FROM feature_token_change WHERE sae_key = ? AND feature = 1",
                                 [key]).fetchall()[0]
    assert got == orig
    t = pq.read_table(tmp_path / S.SHIPPED_FILE)                               # other weights: ignored
    meta = json.loads(t.schema.metadata[b"dashboard"])
    pq.write_table(t.replace_schema_metadata({"dashboard": json.dumps({**meta, "sae_key": "other@0"})}),
                   tmp_path / S.SHIPPED_FILE)
    other = Store(tmp_path / "other.duckdb")
    assert S.import_shipped(other, SAE, wins, folder=tmp_path) == 0
    fresh.close()
    other.close()
