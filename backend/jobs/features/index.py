"""The corpus index of SAE features: one encoding job for all SAEs of a model.

    build_index("smollm2-135m", ["smollm2-135m-L15-resid_pre", ...], n_windows=1024)

1. Windows. `corpus.windows(model, split, 128)` in a seeded permutation; the first
   n_windows of it (so a larger n is a superset of a smaller one), processed in (doc, start)
   order, CHUNK_WINDOWS windows per chunk of the resumable job (backend/jobs/__init__.py).
2. One forward per batch of windows, hooks at every SAE's hook; the forward stops as soon as
   the deepest hook has fired. Each SAE encodes its activations with the fused TopK kernel
   (kernels/sae_encode.py): only the k active latents, never the dense [n d_sae] matrix.
   Position 0 of every window is not encoded (massive activations; the SAEs were trained
   without it); the window's tokens, position 0 included, are kept for context.
3. Rows (ix, feature, doc, pos, value, token) with doc/pos in document coordinates go to
   `feature_acts`; each chunk's rows and its done-mark in one transaction.
4. Finish (one transaction): two clustered copies, by (ix, feature, value desc) and by
   (ix, doc, pos); per-feature count, density, max, mean, quantiles, a HIST_BINS-bin histogram
   of the active values on [0, max]; the tokens at each feature's TOP_TOKEN_EXAMPLES best
   examples; the unclustered rows are deleted, and older built indexes of the same SAE id
   (other weights, or superseded) are dropped.

Weight-only tables (no corpus needed; keyed by `sae_key` = "<sae id>@<weights hash>"):
  logit effects  e_f = (d_f ⊙ γ_final) @ W_U, d_f the feature's effective decoder direction in
                 the residual stream per unit of its activation (SAELens decode(e_f) − decode(0);
                 for an attention-output (hook_z) SAE mapped through that layer's W_O). No 1/RMS
                 factor, no bias: the output-centric description of the feature.
  similar        the N_SIMILAR features with the highest cosine between decoder rows.
"""

from __future__ import annotations

import hashlib
import json
from typing import ClassVar
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa

from ... import corpus, jobs
from ..driver import CorpusJob, Finished, drive

# The feature index's tables (store migration 4), read by query.py, search.py and fmap.py beside it.
SCHEMA = [
    """CREATE TABLE feature_indexes(ix SMALLINT PRIMARY KEY, sae_id VARCHAR NOT NULL,
               weights_hash VARCHAR NOT NULL, model VARCHAR NOT NULL, hook_name VARCHAR, d_sae INTEGER,
               corpus VARCHAR, split VARCHAR, context INTEGER, n_windows INTEGER, job_key VARCHAR NOT NULL,
               n_tokens BIGINT, n_rows BIGINT, built TIMESTAMP)""",
    """CREATE TABLE feature_acts(ix SMALLINT NOT NULL, feature INTEGER NOT NULL, doc INTEGER NOT NULL,
               pos INTEGER NOT NULL, value FLOAT NOT NULL, token INTEGER NOT NULL)""",
    """CREATE TABLE feature_acts_by_feature(ix SMALLINT NOT NULL, feature INTEGER NOT NULL,
               doc INTEGER NOT NULL, pos INTEGER NOT NULL, value FLOAT NOT NULL, token INTEGER NOT NULL)""",
    """CREATE TABLE feature_acts_by_doc(ix SMALLINT NOT NULL, feature INTEGER NOT NULL,
               doc INTEGER NOT NULL, pos INTEGER NOT NULL, value FLOAT NOT NULL, token INTEGER NOT NULL)""",
    """CREATE TABLE feature_windows(ix SMALLINT NOT NULL, doc INTEGER NOT NULL, start INTEGER NOT NULL,
               ids INTEGER[] NOT NULL)""",
    """CREATE TABLE feature_stats(ix SMALLINT NOT NULL, feature INTEGER NOT NULL, n BIGINT, density DOUBLE,
               max FLOAT, mean FLOAT, quantiles FLOAT[])""",
    """CREATE TABLE feature_hist(ix SMALLINT NOT NULL, feature INTEGER NOT NULL, bin SMALLINT NOT NULL,
               n BIGINT)""",
    """CREATE TABLE feature_top_tokens(ix SMALLINT NOT NULL, feature INTEGER NOT NULL, token INTEGER NOT NULL,
               n INTEGER)""",
    """CREATE TABLE sae_logit_effects(sae_key VARCHAR NOT NULL, feature INTEGER NOT NULL,
               rank SMALLINT NOT NULL, token INTEGER NOT NULL, value FLOAT NOT NULL)""",
    """CREATE TABLE sae_similar(sae_key VARCHAR NOT NULL, feature INTEGER NOT NULL, rank SMALLINT NOT NULL,
               other INTEGER NOT NULL, cosine FLOAT NOT NULL)""",
    """CREATE TABLE sae_maps(sae_key VARCHAR NOT NULL, feature INTEGER NOT NULL, x FLOAT, y FLOAT)""",
    """CREATE TABLE token_strings(model VARCHAR NOT NULL, token INTEGER NOT NULL, text VARCHAR NOT NULL)""",
]
from ...errors import InvalidSpec, SAEMismatch, UnknownSAE
from ...model.local import same_weights

CONTEXT = 128
CHUNK_WINDOWS = 16
BATCH_TOKENS = 2048
SPLIT = "train"
SEED = 0
# 1024 windows ≈ 117 k encoded tokens, ≈ 15 M rows for the four shipped SAEs; at the
# ~500 tok/s of a quiet 2-core machine about 4 min (benchmarks/bench_feature_store.py).
DEFAULT_WINDOWS = 1024
QUANTILES = (0.25, 0.5, 0.75, 0.9, 0.99)
HIST_BINS = 40
TOP_TOKEN_EXAMPLES = 20
N_LOGIT = 10
N_SIMILAR = 10
IX_TABLES = ("feature_acts", "feature_acts_by_feature", "feature_acts_by_doc", "feature_windows",
             "feature_stats", "feature_hist", "feature_top_tokens")


# -- keys ---------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def weights_hash(sae_id: str) -> str:
    """A hash of the SAE's weights file (of its tensors, for a downloaded release)."""
    from ...saes import resolve

    kind, ref = resolve(sae_id)
    if kind == "transcoder":
        folder, layer = ref.rsplit("#", 1)
        f = Path(folder) / f"layer_{layer}.safetensors"
        st = f.stat()
        return _file_hash(str(f), st.st_size, st.st_mtime_ns)
    if kind == "folder":
        files = sorted(Path(ref).glob("*.safetensors"))
        if not files:
            raise UnknownSAE(f"SAE folder {ref} has no .safetensors weights.")
        st = files[0].stat()
        return _file_hash(str(files[0]), st.st_size, st.st_mtime_ns)
    from ...saes import load_sae

    sae = load_sae(sae_id)
    h = hashlib.sha256()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        h.update(getattr(sae, name).detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def sae_key(sae_id: str) -> str:
    return f"{sae_id}@{weights_hash(sae_id)}"


def index_job_key(model: str, saes: list[tuple[str, str]], n_windows: int, corpus_name: str,
                  split: str = SPLIT, context: int = CONTEXT, chunk_windows: int = CHUNK_WINDOWS) -> str:
    payload = json.dumps({"model": model, "saes": sorted(saes), "n": n_windows, "corpus": corpus_name,
                          "split": split, "context": context, "seed": SEED, "chunk": chunk_windows,
                          "v": 1}, sort_keys=True)
    return "feature_index-" + hashlib.sha256(payload.encode()).hexdigest()[:20]


# -- windows ------------------------------------------------------------------------------
def select_windows(model: str, n_windows: int, corpus_name: str = corpus.DEFAULT_NAME, root=None,
                   split: str = SPLIT, context: int = CONTEXT) -> list[tuple[int, int, list[int]]]:
    """The first n_windows of a seeded permutation of the corpus windows, in (doc, start) order."""
    return corpus.pick_windows(model, split, context, n_windows, order="seeded", seed=SEED, name=corpus_name,
                               root=root, strict=False)


def _batches(wins, max_tokens: int = BATCH_TOKENS):
    """Indices of windows grouped by length into batches of at most max_tokens (padded)."""
    return corpus.length_batches(wins, max_tokens)


def hook_batch(model, hooks: list[str], ids) -> dict:
    """Activations {hook: [batch pos d]} (hook_z flattened over heads) from one forward that
    stops right after the last of the hooks."""
    from ...errors import InvalidSite

    try:
        return model.capture(ids, sorted(set(hooks)), flatten_heads=True)
    except (InvalidSite, RuntimeError) as e:
        raise SAEMismatch(f"Hooks {sorted(set(hooks))} do not all exist in {model.info.model_id} ({e}).") from None


def encode_windows(model, saes: list[tuple[int, object]], wins) -> dict[str, pa.Table]:
    """Sparse rows of every SAE for these windows (positions >= 1), and the windows' tokens."""
    from kernels.sae_encode import fused_encode

    hooks = sorted({s.cfg.metadata.hook_name for _, s in saes})
    parts: list[dict] = []
    for idx in _batches(wins):
        ids, mask = corpus.pad_right([wins[i][2] for i in idx])
        mask[:, 0] = False                                  # position 0 left out
        acts = hook_batch(model, hooks, model.tensor(ids))
        b_doc = np.array([wins[i][0] for i in idx], np.int32)
        b_start = np.array([wins[i][1] for i in idx], np.int32)
        rr, pp = mask.nonzero(as_tuple=True)                 # [n] batch row and window position
        doc = b_doc[rr.numpy()]
        pos = b_start[rr.numpy()] + pp.numpy().astype(np.int32)
        tok = ids[rr, pp].numpy().astype(np.int32)
        for ix, sae in saes:
            x = acts[sae.cfg.metadata.hook_name][mask].float()      # [n d_in]
            if x.shape[-1] != sae.cfg.d_in:
                raise SAEMismatch(f"SAE expects width {sae.cfg.d_in}, the hook gives {x.shape[-1]}.")
            v, f = fused_encode(sae, x)                                # [n k], sorted desc
            v, f = v.numpy(), f.numpy()
            keep = v > 0
            per = keep.sum(1)
            parts.append({"ix": np.full(int(per.sum()), ix, np.int16), "feature": f[keep].astype(np.int32),
                          "doc": np.repeat(doc, per), "pos": np.repeat(pos, per), "value": v[keep],
                          "token": np.repeat(tok, per)})
    cols = ("ix", "feature", "doc", "pos", "value", "token")
    merged = {c: np.concatenate([p[c] for p in parts]) if parts else np.zeros(0) for c in cols}
    order = np.lexsort((merged["feature"], merged["pos"], merged["doc"], merged["ix"]))
    acts_t = pa.table({c: merged[c][order] for c in cols})
    win_rows = [(ix, d, s, w) for ix, _ in saes for d, s, w in wins]
    win_t = pa.table({"ix": pa.array([r[0] for r in win_rows], pa.int16()),
                      "doc": pa.array([r[1] for r in win_rows], pa.int32()),
                      "start": pa.array([r[2] for r in win_rows], pa.int32()),
                      "ids": pa.array([r[3] for r in win_rows], pa.list_(pa.int32()))})
    return {"feature_acts": acts_t, "feature_windows": win_t}


# -- index rows ---------------------------------------------------------------------------
def _ensure_index_rows(store, job_key: str, model: str, infos: list[dict], n_windows: int,
                       corpus_name: str) -> dict[str, int]:
    cur = store.cursor()
    out = {}
    with store.locked():
        for info in infos:
            rows = cur.execute("SELECT ix FROM feature_indexes WHERE job_key = ? AND sae_id = ?",
                               [job_key, info["sae_id"]]).fetchall()
            if rows:
                out[info["sae_id"]] = rows[0][0]
                continue
            ix = cur.execute("SELECT coalesce(max(ix), 0) + 1 FROM feature_indexes").fetchall()[0][0]
            cur.execute("INSERT INTO feature_indexes(ix, sae_id, weights_hash, model, hook_name, d_sae, corpus, "
                        "split, context, n_windows, job_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [ix, info["sae_id"], info["hash"], model, info["hook_name"], info["d_sae"], corpus_name,
                         SPLIT, CONTEXT, n_windows, job_key])
            out[info["sae_id"]] = ix
    return out


def ensure_vocab(store, model) -> None:
    """The decoded string of every token id of the model (for pages that never load it)."""
    cur = store.cursor()
    if cur.execute("SELECT count(*) FROM token_strings WHERE model = ?", [model.info.model_id]).fetchall()[0][0]:
        return
    n = model.info.d_vocab
    texts = [model.tokenizer.decode([i]) for i in range(n)]
    t = pa.table({"model": pa.array([model.info.model_id] * n), "token": pa.array(range(n), pa.int32()),
                  "text": pa.array(texts)})
    from ...store import insert_arrow

    with store.transaction() as cur:       # checked again under the lock: another thread may have won
        if not cur.execute("SELECT count(*) FROM token_strings WHERE model = ?", [model.info.model_id]).fetchall()[0][0]:
            insert_arrow(cur, "token_strings", t)


def _finish_sql(ix: int, n_tokens: int) -> tuple[list[str], list[list]]:
    q = "[" + ", ".join(str(x) for x in QUANTILES) + "]"
    sql = [
        "INSERT INTO feature_acts_by_feature SELECT ix, feature, doc, pos, value, token FROM feature_acts "
        "WHERE ix = ? ORDER BY feature, value DESC, doc, pos",
        "INSERT INTO feature_acts_by_doc SELECT ix, feature, doc, pos, value, token FROM feature_acts "
        "WHERE ix = ? ORDER BY doc, pos, value DESC",
        f"INSERT INTO feature_stats SELECT ix, feature, count(*), count(*) / ?::DOUBLE, max(value), avg(value), "
        f"quantile_cont(value, {q})::FLOAT[] FROM feature_acts WHERE ix = ? GROUP BY ix, feature ORDER BY feature",
        f"INSERT INTO feature_hist SELECT a.ix, a.feature, least(floor(a.value / s.max * {HIST_BINS}), "
        f"{HIST_BINS - 1})::SMALLINT AS bin, count(*) FROM feature_acts a JOIN feature_stats s "
        "ON s.ix = a.ix AND s.feature = a.feature WHERE a.ix = ? GROUP BY ALL ORDER BY a.feature, bin",
        "INSERT INTO feature_top_tokens SELECT ix, feature, token, count(*)::INTEGER FROM ("
        "SELECT ix, feature, token, row_number() OVER (PARTITION BY feature ORDER BY value DESC, doc, pos) AS rn "
        f"FROM feature_acts WHERE ix = ?) WHERE rn <= {TOP_TOKEN_EXAMPLES} GROUP BY ALL ORDER BY feature",
        "UPDATE feature_indexes SET n_tokens = ?, n_rows = (SELECT count(*) FROM feature_acts WHERE ix = ?), "
        "built = current_timestamp WHERE ix = ?",
        "DELETE FROM feature_acts WHERE ix = ?",
    ]
    params = [[ix], [ix], [n_tokens, ix], [ix], [ix], [n_tokens, ix, ix], [ix]]
    return sql, params


def _drop_sql(ix: int) -> tuple[list[str], list[list]]:
    sql = [f"DELETE FROM {t} WHERE ix = ?" for t in IX_TABLES] + ["DELETE FROM feature_indexes WHERE ix = ?"]
    return sql, [[ix]] * len(sql)


def drop_index(store, ix: int) -> None:
    """Delete an index and its rows (and its job's marks once no index of that job is left)."""
    cur = store.cursor()
    job = cur.execute("SELECT job_key FROM feature_indexes WHERE ix = ?", [ix]).fetchall()
    sql, params = _drop_sql(ix)
    with store.locked():
        cur.begin()
        try:
            for q, p in zip(sql, params):
                cur.execute(q, p)
            if job and not cur.execute("SELECT 1 FROM feature_indexes WHERE job_key = ?", [job[0][0]]).fetchall():
                cur.execute("DELETE FROM job_chunks WHERE job_key = ?", [job[0][0]])
                cur.execute("DELETE FROM jobs WHERE job_key = ?", [job[0][0]])
            cur.commit()
        except Exception:
            cur.rollback()
            raise


# -- the job ------------------------------------------------------------------------------
def resolve_saes(model_id: str, sae: str | list[str]) -> list[str]:
    """'all' → every shipped SAE of the model; a transcoder set's id → every layer of it
    ("<set>.L<layer>"); an id or a list of ids otherwise."""
    from ...saes import list_saes, sae_info, transcoder_features

    if sae == "all":
        ids = [s["sae_id"] for s in list_saes(model_id)]
        if not ids:
            raise UnknownSAE(f"No shipped SAE for {model_id}.")
        return ids
    ids = []
    for one in ([sae] if isinstance(sae, str) else list(sae)):
        ids += transcoder_features(one) if _is_transcoder_set(one) else [one]
    for s in ids:
        info = sae_info(s)
        if info["model"] and not same_weights(info["model"], model_id):
            raise SAEMismatch(f"SAE {s!r} was trained on {info['model']!r}, not {model_id!r}.")
    return ids


def _is_transcoder_set(name: str) -> bool:
    from ... import transcoders

    try:
        transcoders.resolve(name)
        return True
    except transcoders.UnknownTranscoders:
        return False


@dataclass(frozen=True)
class FeatureIndexJob(CorpusJob):
    """Encode the corpus windows with every given SAE (one forward for all); a chunk's rows are
    the SAEs' sparse activations of chunk_windows windows."""

    KIND: ClassVar[str] = "feature_index"
    model: str
    saes: tuple[tuple[str, str], ...]        # (sae id, weights hash)
    n_windows: int
    corpus_name: str = corpus.DEFAULT_NAME
    root: str | None = None                  # the corpus root (tests); None: the default one
    chunk_windows: int = CHUNK_WINDOWS

    def key(self) -> str:
        return index_job_key(self.model, [tuple(x) for x in self.saes], self.n_windows, self.corpus_name,
                             chunk_windows=self.chunk_windows)

    def pick_windows(self):
        return select_windows(self.model, self.n_windows, self.corpus_name, self.root)

    @cached_property
    def n_chunks(self) -> int:
        return (len(self.windows()) + self.chunk_windows - 1) // self.chunk_windows

    def _chunk(self, wins, c: int):
        return wins[c * self.chunk_windows:(c + 1) * self.chunk_windows]

    def _ixs(self, store) -> dict[str, int]:
        from ...saes import sae_info

        infos = [{**sae_info(s), "sae_id": s, "hash": h} for s, h in self.saes]
        return _ensure_index_rows(store, self.key(), self.model, infos, len(self.windows()), self.corpus_name)

    def prepare(self, store, model, progress) -> dict:
        return {"saes": [s for s, _ in self.saes], "n_windows": self.n_windows, "corpus": self.corpus_name}

    def inputs(self, store, spec, model) -> dict:
        ixs = self._ixs(store)
        ensure_vocab(store, model())
        return {"ixs": [[s, ixs[s]] for s, _ in self.saes]}

    def work(self, spec, inputs, model, store=None):
        from ...saes import load_sae

        wins, m = self.windows(), model()
        saes = [(ix, load_sae(s)) for s, ix in inputs["ixs"]]
        return lambda c: encode_windows(m, saes, self._chunk(wins, c))

    def _progress(self, done: int, run) -> dict:
        wins = self.windows()
        new_tokens = sum(len(w[2]) - 1 for c in run.new_chunks for w in self._chunk(wins, c))
        return {"job_key": self.key(), "model": self.model, "n_windows": len(wins), "chunks_done": done,
                "n_chunks": self.n_chunks, "encode_seconds": round(run.seconds, 2), "new_tokens": new_tokens,
                "tok_per_s": round(new_tokens / run.seconds, 1) if new_tokens else None, "finished": False}

    def partial(self, store, done, run) -> dict:
        return self._progress(done, run)

    def finish(self, store, spec, run) -> Finished:
        ixs = self._ixs(store)
        model = run.model()
        ensure_vocab(store, model)
        for s, _ in self.saes:
            ensure_weight_tables(store, s, model)
        n_tokens = sum(len(w[2]) - 1 for w in self.windows())
        cur = store.cursor()
        per_sae, sql, params = {}, [], []
        for s, h in self.saes:
            ix = ixs[s]
            rows = cur.execute("SELECT count(*), count(DISTINCT feature) FROM feature_acts WHERE ix = ?",
                               [ix]).fetchall()[0]
            per_sae[s] = {"ix": ix, "rows": rows[0], "alive_features": rows[1], "weights_hash": h}
            q, p = _finish_sql(ix, n_tokens)
            sql += q
            params += p
            for (old,) in cur.execute("SELECT ix FROM feature_indexes WHERE sae_id = ? AND ix <> ? "
                                      "AND built IS NOT NULL", [s, ix]).fetchall():
                q, p = _drop_sql(old)
                sql += q
                params += p
        summary = {**self._progress(self.n_chunks, run), "finished": True, "n_tokens": n_tokens,
                   "rows": sum(v["rows"] for v in per_sae.values()), "per_sae": per_sae}
        return Finished(summary, sql, params)

    def result(self, store, run) -> dict:
        summary = jobs.state(store, self.key()).summary
        if run is None:
            return {**summary, "already_built": True}
        return {**summary, "finish_seconds": round(run.finish_seconds, 2), "seconds": round(run.seconds, 2)}


def build_index(model_id: str, sae: str | list[str], n_windows: int = DEFAULT_WINDOWS, store=None,
                progress: jobs.Progress | None = None, corpus_name: str = corpus.DEFAULT_NAME, root=None,
                stop_after: int | None = None, chunk_windows: int = CHUNK_WINDOWS, engine: str = "local") -> dict:
    """Encode n_windows corpus windows with every given SAE (one forward for all); resumable.
    Returns a summary: job key, rows, seconds, tokens per second, per-SAE counts."""
    if not isinstance(n_windows, int) or not 1 <= n_windows <= 1_000_000:
        raise InvalidSpec("The number of windows must be in 1–1,000,000.")
    ids = resolve_saes(model_id, sae)
    job = FeatureIndexJob(model_id, tuple((s, weights_hash(s)) for s in ids), n_windows, corpus_name,
                          None if root is None else str(root), chunk_windows)
    return drive(job, store, engine, progress, stop_after)


# -- weight-only tables -------------------------------------------------------------------
def feature_directions(model, sae):
    """[d_sae d_model]: what one unit of each feature's activation adds to the residual stream."""
    import torch

    from ...sites import Component, Site, hook_name

    hook = sae.cfg.metadata.hook_name
    with torch.inference_mode():
        W = sae.W_dec.float()
        if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
            W = W / W.norm(dim=-1, keepdim=True)
        z_hooks = {hook_name(Site(Component.Z, layer)): layer for layer in range(model.info.n_layers)}
        if hook in z_hooks:
            W_O = model.W_O()[z_hooks[hook]].float()                       # [head d_head d_model]
            return torch.einsum("fhd,hdm->fm", W.reshape(W.shape[0], *W_O.shape[:2]), W_O)
        if W.shape[1] != model.info.d_model:
            raise SAEMismatch(f"Cannot map the decoder of {hook} ({W.shape[1]} wide) to the residual stream.")
        return W


def ensure_weight_tables(store, sae_id: str, model=None) -> str:
    """Logit effects and similar features of every feature, stored once per weights; the key."""
    import torch

    key = sae_key(sae_id)
    cur = store.cursor()
    if cur.execute("SELECT 1 FROM sae_similar WHERE sae_key = ? LIMIT 1", [key]).fetchall():
        return key
    from ...model import load_model
    from ...saes import load_sae, sae_info

    sae = load_sae(sae_id)
    model = model or load_model(sae_info(sae_id)["model"] or "smollm2-135m")
    ensure_vocab(store, model)
    dirs = feature_directions(model, sae)                                      # [f d_model]
    with torch.inference_mode():
        gamma = model.final_norm_scale().float()                             # [d_model]
        w_u = model.unembed_weights()[0].float()                             # [d_vocab d_model]
        feats, ranks, toks, vals = [], [], [], []
        for s in range(0, dirs.shape[0], 512):
            logits = (dirs[s:s + 512] * gamma) @ w_u.T                          # [b d_vocab]
            top = logits.topk(N_LOGIT, dim=-1)
            bot = logits.topk(N_LOGIT, dim=-1, largest=False)
            f = torch.arange(s, s + logits.shape[0]).repeat_interleave(N_LOGIT)
            r = torch.arange(1, N_LOGIT + 1).repeat(logits.shape[0])
            feats += [f, f]
            ranks += [r, -r]
            toks += [top.indices.reshape(-1), bot.indices.reshape(-1)]
            vals += [top.values.reshape(-1), bot.values.reshape(-1)]
        Wn = torch.nn.functional.normalize(sae.W_dec.float(), dim=-1)
        cos = Wn @ Wn.T                                                          # [f f]
        cos.fill_diagonal_(-2.0)
        sim = cos.topk(N_SIMILAR, dim=-1)
    n = Wn.shape[0]
    logit_t = pa.table({"sae_key": pa.array([key] * (2 * N_LOGIT * n)),
                        "feature": torch.cat(feats).numpy().astype(np.int32),
                        "rank": torch.cat(ranks).numpy().astype(np.int16),
                        "token": torch.cat(toks).numpy().astype(np.int32),
                        "value": torch.cat(vals).numpy().astype(np.float32)})
    sim_t = pa.table({"sae_key": pa.array([key] * (N_SIMILAR * n)),
                      "feature": np.repeat(np.arange(n, dtype=np.int32), N_SIMILAR),
                      "rank": np.tile(np.arange(1, N_SIMILAR + 1, dtype=np.int16), n),
                      "other": sim.indices.numpy().reshape(-1).astype(np.int32),
                      "cosine": sim.values.numpy().reshape(-1).astype(np.float32)})
    from ...store import insert_arrow

    with store.transaction() as cur:
        if not cur.execute("SELECT 1 FROM sae_similar WHERE sae_key = ? LIMIT 1", [key]).fetchall():
            for name, t in (("sae_logit_effects", logit_t), ("sae_similar", sim_t)):
                insert_arrow(cur, name, t, order_by="feature, rank")
    return key


def current_index(store, sae_id: str) -> dict | None:
    """The built index of this SAE's current weights (the newest), or None. A stale index
    (other weights) is reported with stale=True so the page can say the SAE was retrained."""
    h = weights_hash(sae_id)
    rows = store.cursor().execute(
        "SELECT ix, weights_hash, model, hook_name, d_sae, corpus, split, context, n_windows, n_tokens, n_rows, "
        "built FROM feature_indexes WHERE sae_id = ? AND built IS NOT NULL ORDER BY (weights_hash = ?) DESC, "
        "built DESC LIMIT 1", [sae_id, h]).fetchall()
    if not rows:
        return None
    r = rows[0]
    return {"ix": r[0], "sae_id": sae_id, "weights_hash": r[1], "model": r[2], "hook_name": r[3], "d_sae": r[4],
            "corpus": r[5], "split": r[6], "context": r[7], "n_windows": r[8], "n_tokens": r[9], "n_rows": r[10],
            "built": str(r[11]), "stale": r[1] != h}
