"""Features you can read at a glance: output-centric descriptions and the input and output
scores of every SAE feature, and a label built from them.

    build_scores("smollm2-135m", "all")          # python -m backend feature-scores --sae all
    feature_scores(store, sae_id, feature)       # one feature's block of the dashboard / CLI

Every feature f has a residual-stream direction d_f: what one unit of its activation adds to
the residual stream. It is the SAE's effective decoder row (W_dec[f] as SAELens's decode uses it: divided by
its norm when the SAE rescales activations by the decoder norm), for an attention-output (hook_z) SAE mapped through
that layer's W_O, for an MLP-neuron SAE through the MLP's output matrix.

VocabProj (Gur-Arieh et al.)  logits W_U · final_norm(d_f): the model's final norm applied to
    the direction itself (scale-free), then the unembedding (no bias). Top VOCAB_K and bottom
    VOCAB_K tokens.
Output score (Arad, Mueller & Belinkov), exactly: lens = the top LENS_K token ids of
    softmax(W_U · final_norm(d_f)) (= VocabProj's top LENS_K); the prompt PROMPT tokenised as
    the model does (no BOS for SmolLM2); at the LAST position of the SAE's hook, a_max = the
    largest activation of any latent there; add OUT_SCALE · a_max · W_dec[f] (the effective
    decoder row, in the hook's own space: heads × d_head for hook_z) at that position only;
    finish the forward; p = softmax(logits at the last position); r = the smallest rank of a
    lens token in p (0 = most likely); score = (1 − r / d_vocab) · max over lens of p[token].
    Batched: the prompt runs once up to the block of the SAE's hook; each feature is one row
    of a batch that continues from there (LoadedModel.run_from), OUT_CHUNK rows per forward.
Input score (Arad et al.): the feature's top-activating examples in the corpus index (one per
    indexed window: the window's most-activating position; the best IN_MAX windows), the
    fraction whose token is among the lens tokens. Needs IN_MIN examples, else NULL.
TokenChange (Gur-Arieh et al.): TC_WINDOWS held-out corpus windows of TC_LEN tokens; at every
    position >= 1 add s · c_f · d_f to the SAE's hook (s = +1 and −1); the change of the
    next-token logits averaged over windows and positions >= 1, its top TC_K increased and
    decreased tokens for each sign. For a latent that is off (almost everywhere, for a sparse
    feature) that is clamping it to ±c_f; where it is on it differs by its own value, and
    c_f = 0 changes nothing. Position 0 is left alone, as everywhere in the index: it carries
    the massive activations and the SAEs were not trained on it.
    c_f = C_MULT × the median of f's nonzero activations in the corpus index (stored in
    feature_stats). Fallback (no index, or f never fires in it): C_MULT × s / ‖d_f‖, where s is
    the median size ‖a · row‖ of one active (feature, token) pair of the SAE, measured on the
    index, or without one on the TokenChange windows; so a fallback feature is pushed as hard
    as a typical active feature. `c_source` says which.
    Precision: the continued forwards run in kernels.forward.bulk_precision() (bfloat16 where
    the CPU multiplies it fast, AMX/AVX512-BF16, or on a GPU; float32 elsewhere), recorded in
    the job's parameters. Measured on 16 features each of L15 resid and L23 z: the top-10
    lists agree with float32 on 98.3 % / 99.4 % of their tokens (the rest near-ties), values
    within 0.3 % of the largest; 2.8x / 3.0x faster.
    Cheap enough: the windows run once up to the block of the hook; every (feature, sign,
    window) is a row continuing from there; the logits are never formed per row: the final
    norm's output is averaged first (logits are linear in it) and unembedded once per row of
    features.
Label  "fires on: <tokens at its top corpus examples> · promotes: <top VocabProj tokens>":
    a listing of stored evidence, not an explanation written by a model; without an index,
    only the promotes half.

The job (`build_scores`) is resumable and idempotent: VocabProj, output score and TokenChange
are chunked jobs (backend/jobs/__init__.py, each chunk's rows and its done-mark in one transaction); the
input score is one SQL insert. The parts that need the corpus index (input score, and
TokenChange whose c comes from it) are reported as pending without it and filled in by a later
run once the index is built. Rows are keyed by `sae_key` ("<sae id>@<weights hash>"), so a
retrained SAE never reads stale scores; rows of the input score and TokenChange also carry the
index they used.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa

from ... import corpus, jobs
from ..driver import CorpusJob, Finished, drive
from ...corpus import CorpusUnavailable
from ...errors import FeatureIndexMissing, SAEMismatch
from ...saes import write_hook
from .index import QUANTILES

PROMPT = "From my experience,"
OUT_SCALE = 10.0
LENS_K = 20
VOCAB_K = 50
IN_MIN, IN_MAX = 10, 100
C_MULT = 10.0
TC_WINDOWS, TC_LEN, TC_K = 32, 16, 10
TC_SEED = 0
VP_CHUNK, OUT_CHUNK, TC_CHUNK = 512, 128, 8
VERSION = 1
LABEL_TOKENS = 3

# The tables of this module (created here, not by a store migration: they belong to it).
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS feature_vocab_proj(sae_key VARCHAR NOT NULL, feature INTEGER NOT NULL,
           top_ids INTEGER[] NOT NULL, top_values FLOAT[] NOT NULL, bottom_ids INTEGER[] NOT NULL,
           bottom_values FLOAT[] NOT NULL)""",
    # score as defined above; best_rank = r, max_prob = max over lens of p, best_token = the lens
    # token of highest p, a_max = the prompt's largest latent at the last position
    """CREATE TABLE IF NOT EXISTS feature_output_scores(sae_key VARCHAR NOT NULL, feature INTEGER NOT NULL,
           score DOUBLE NOT NULL, best_rank INTEGER NOT NULL, max_prob DOUBLE NOT NULL, best_token INTEGER NOT NULL,
           a_max FLOAT NOT NULL)""",
    # n examples (windows; 0 for a feature that never fires there), hits among them; score NULL when
    # n < IN_MIN; ix: the feature index used
    """CREATE TABLE IF NOT EXISTS feature_input_scores(sae_key VARCHAR NOT NULL, ix SMALLINT NOT NULL,
           feature INTEGER NOT NULL, score DOUBLE, n INTEGER NOT NULL, hits INTEGER NOT NULL)""",
    # per sign (pos: +c, neg: −c) the top TC_K increased (up) and decreased (down) tokens, mean
    # change of next-token logits; ix: the index c came from (-1: none)
    """CREATE TABLE IF NOT EXISTS feature_token_change(sae_key VARCHAR NOT NULL, ix SMALLINT NOT NULL,
           feature INTEGER NOT NULL, c FLOAT NOT NULL, c_source VARCHAR NOT NULL, n_windows INTEGER NOT NULL,
           window_len INTEGER NOT NULL, pos_up_ids INTEGER[], pos_up FLOAT[], pos_down_ids INTEGER[],
           pos_down FLOAT[], neg_up_ids INTEGER[], neg_up FLOAT[], neg_down_ids INTEGER[], neg_down FLOAT[])""",
]
TABLES = ("feature_vocab_proj", "feature_output_scores", "feature_input_scores", "feature_token_change")


def _final_in() -> str:
    """The final norm's input (the last residual stream); the norm itself is applied with
    LoadedModel.final_norm (its hook_normalized is taken before the norm's weight)."""
    from ...sites import Component, Site, hook_name

    return hook_name(Site(Component.FINAL_IN))


def ensure_tables(store) -> None:
    if getattr(store, "_scores_tables", False):
        return
    cur = store.cursor()
    with store.locked():
        for sql in SCHEMA:
            cur.execute(sql)
    store._scores_tables = True


# -- directions ---------------------------------------------------------------------------
def decoder_rows(sae):
    """[d_sae d_in]: what one unit of each latent adds at the SAE's hook (heads flattened), as
    SAELens's decode computes it (W_dec, row-normalised when the SAE rescales its activations
    by the decoder norm)."""
    import torch

    with torch.inference_mode():
        W = sae.W_dec.detach().float()
        if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
            W = W / W.norm(dim=-1, keepdim=True)
        return W


def _hook_site(model, hook: str):
    from ...sites import Component, Site, hook_name

    for layer in range(model.info.n_layers):
        for c in (Component.RESID_PRE, Component.RESID_MID, Component.RESID_POST, Component.ATTN_OUT,
                  Component.MLP_OUT, Component.Z, Component.MLP_POST):
            if hook_name(Site(c, layer)) == hook:
                return Site(c, layer)
    raise SAEMismatch(f"Cannot map the SAE's hook {hook!r} to the residual stream of {model.info.model_id}.")


def residual_directions(model, sae, rows=None):
    """[d_sae d_model] residual-stream directions d_f (hook_z through W_O, mlp_post through the
    MLP's output matrix, residual-stream hooks as they are)."""
    import torch

    from ...sites import Component

    rows = decoder_rows(sae) if rows is None else rows
    site = _hook_site(model, write_hook(sae))
    with torch.inference_mode():
        if site.component == Component.Z:
            W_O = model.W_O()[site.layer].float()                                  # [head d_head d_model]
            return torch.einsum("fhd,hdm->fm", rows.reshape(len(rows), *W_O.shape[:2]), W_O)
        if site.component == Component.MLP_POST:
            return rows @ model.mlp_out_weight(site.layer).float().T                 # [f d_model]
        if rows.shape[1] != model.info.d_model:
            raise SAEMismatch(f"The SAE's decoder is {rows.shape[1]} wide; {site} is {model.info.d_model}.")
        return rows


def vocab_logits(model, dirs):
    """[n d_vocab] W_U · final_norm(d) of residual-stream directions [n d_model]."""
    import torch

    W_U, _ = model.unembed_weights()
    with torch.inference_mode():
        return model.final_norm(dirs.to(W_U.dtype)).float() @ W_U.float().T


def vocab_proj(model, dirs, k: int = VOCAB_K):
    """(top ids, top values, bottom ids, bottom values), each [n k], of VocabProj."""
    logits = vocab_logits(model, dirs)
    top, bot = logits.topk(k, dim=-1), logits.topk(k, dim=-1, largest=False)
    return top.indices, top.values, bot.indices, bot.values


# -- output score -------------------------------------------------------------------------
def prompt_state(model, sae, prompt: str = PROMPT) -> dict:
    """The prompt run once up to the SAE's hook: ids, the resid_pre of the hook's block, and
    a_max (the largest latent at the last position)."""
    from kernels.sae_encode import fused_encode

    from ...model.interface import hook_layer
    from ...sites import Component, Site, hook_name

    hook = sae.cfg.metadata.hook_name
    ids = model.tokenize(prompt)
    layer = hook_layer(hook)
    pre = hook_name(Site(Component.RESID_PRE, layer))
    cap = model.capture(ids, [pre, hook], flatten_heads=True)
    v, _ = fused_encode(sae, cap[hook][0, -1:].float())                             # [1 k] sorted desc
    return {"ids": ids, "layer": layer, "resid": cap[pre], "a_max": float(v[0, 0]), "hook": write_hook(sae)}


def _adder(rows_delta, positions: slice | int):
    """A hook adding rows_delta [batch d_in] (one vector per batch row) at the given positions,
    reshaped to the hook's own layout (heads × d_head for hook_z)."""
    def fn(x, hook):
        d = rows_delta.to(x.dtype).reshape(x.shape[0], *x.shape[2:])              # [batch (head) d]
        x = x.clone()
        if isinstance(positions, int):
            x[:, positions] += d
        else:
            x[:, positions] += d[:, None]
        return x
    return fn


def score_from_logits(logits, lens):
    """Output scores of rows of last-position logits [b d_vocab] with their lens [b LENS_K]:
    (score, r, max p, token of max p) as arrays."""
    import torch

    p = torch.softmax(logits.float(), dim=-1)                                        # [b V]
    lp = p.gather(1, lens)                                                           # [b K]
    best, arg = lp.max(-1)
    rank = (p > best[:, None]).sum(-1)                  # the lens token of highest p has the smallest rank
    score = (1.0 - rank.double() / p.shape[-1]) * best.double()
    return (score.cpu().numpy(), rank.cpu().numpy().astype(np.int64), best.double().cpu().numpy(),
            lens.gather(1, arg[:, None])[:, 0].cpu().numpy().astype(np.int64))


def output_scores(model, sae, features, rows, lens, state: dict | None = None, chunk: int = OUT_CHUNK) -> dict:
    """Output scores of `features` with their lens token ids [n LENS_K]: each feature one extra
    row of a batch continuing from the prompt's resid_pre of the hook's block, OUT_SCALE · a_max ·
    rows[f] added at the last position."""
    import torch

    st = state or prompt_state(model, sae)
    feats = np.asarray(features, dtype=np.int64)
    T = len(st["ids"])
    out = {k: [] for k in ("score", "rank", "max_prob", "best_token")}
    for s in range(0, len(feats), chunk):
        f = torch.as_tensor(feats[s:s + chunk])
        delta = OUT_SCALE * st["a_max"] * rows[f]                                   # [b d_in]
        resid = st["resid"].expand(len(f), T, -1)                                    # [b T d_model]
        got = model.run_from(st["layer"], resid, [_final_in()], fwd_hooks=[(st["hook"], _adder(delta, T - 1))])
        with torch.inference_mode():
            logits = model.unembed(model.final_norm(got[_final_in()][:, -1]))        # [b V]
        for k, v in zip(out, score_from_logits(logits, lens[s:s + chunk])):
            out[k].append(v)
    res = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
    res["a_max"] = st["a_max"]
    return res


# -- TokenChange ----------------------------------------------------------------------------
def heldout_windows(model_id: str, n: int = TC_WINDOWS, length: int = TC_LEN, corpus_name: str = corpus.DEFAULT_NAME,
                    root=None) -> list[list[int]]:
    """n windows of exactly `length` tokens from the held-out split, in a seeded permutation."""
    wins = corpus.pick_windows(model_id, "heldout", length, n, order="seeded", seed=TC_SEED, full=True,
                               name=corpus_name, root=root, error=CorpusUnavailable)
    return [w[2] for w in wins]


def _rest(model, layer: int, resid, hook: str, add=None, precision: str = "float32"):
    """The final norm's input [b T d_model] of the forward continued from block `layer` with
    `add` (a TransformerLens-style hook fn) at `hook`: through the dense kernel
    (kernels/forward.py) in `precision` where the model has one, else LoadedModel.run_from."""
    from kernels import forward as kf

    dm = kf.dense_model(model, *kf.PRECISIONS[precision])
    if dm is not None:
        hooks = {} if add is None else {hook: lambda x: add(x, None)}
        return kf.run(dm, resid, start=layer, capture=[kf.FINAL], hooks=hooks)[kf.FINAL]
    final = _final_in()
    return model.run_from(layer, resid, [final], fwd_hooks=[] if add is None else [(hook, add)])[final]


def windows_state(model, sae, windows: list[list[int]], precision: str = "float32") -> dict:
    """The windows run once up to the hook's block: resid_pre there, the clean mean of the
    final norm's output over windows and positions >= 1, and the SAE's codes (for c fallback).
    `precision`: of the continued forwards (kernels/forward.PRECISIONS)."""
    import torch

    from kernels.sae_encode import fused_encode

    from ...model.interface import hook_layer
    from ...sites import Component, Site, hook_name

    hook = sae.cfg.metadata.hook_name
    layer = hook_layer(hook)
    pre = hook_name(Site(Component.RESID_PRE, layer))
    ids = model.tensor(windows)                                                    # [w T]
    cap = model.capture(ids, [pre, hook], flatten_heads=True)
    with torch.inference_mode():
        rest = _rest(model, layer, cap[pre], hook, precision=precision)
        clean = model.final_norm(rest[:, 1:].to(cap[pre].dtype)).float().mean((0, 1))
    v, i = fused_encode(sae, cap[hook][:, 1:].reshape(-1, cap[hook].shape[-1]).float())
    return {"layer": layer, "hook": write_hook(sae), "resid": cap[pre], "clean": clean, "codes": (v, i),
            "precision": precision}


def token_change(model, sae, features, rows, c, state: dict, chunk: int = TC_CHUNK, k: int = TC_K) -> dict:
    """TokenChange of `features` with strengths c [n]: ids and values [n 4 k] for (+c up, +c
    down, −c up, −c down), the mean change of next-token logits over windows, positions >= 1."""
    import torch

    W_U, _ = model.unembed_weights()
    feats = np.asarray(features, dtype=np.int64)
    c = torch.as_tensor(np.asarray(c, dtype=np.float32))
    resid = state["resid"]                                                         # [w T d_model]
    nw = resid.shape[0]
    ids_out, val_out = [], []
    for s in range(0, len(feats), chunk):
        f = torch.as_tensor(feats[s:s + chunk])
        b = len(f)
        signed = torch.stack([c[s:s + b], -c[s:s + b]], 1).reshape(-1, 1) * rows[f].repeat_interleave(2, 0)  # [2b d_in]
        delta = signed.repeat_interleave(nw, 0)                                    # [2b·w d_in]
        batch = resid.repeat(2 * b, 1, 1)                                          # [2b·w T d_model]
        got = _rest(model, state["layer"], batch, state["hook"], _adder(delta, slice(1, None)),
                    state.get("precision", "float32"))
        with torch.inference_mode():
            normed = model.final_norm(got[:, 1:].to(resid.dtype)).float()          # [2b·w T-1 d_model]
            mean = normed.mean(1).reshape(2 * b, nw, -1).mean(1)                   # [2b d_model]
            dl = (mean - state["clean"]) @ W_U.float().T                           # [2b V]
            up, down = dl.topk(k, dim=-1), dl.topk(k, dim=-1, largest=False)
            ids = torch.stack([up.indices, down.indices], 1).reshape(b, 4, k)       # (+up, +down, −up, −down)
            vals = torch.stack([up.values, down.values], 1).reshape(b, 4, k)
        ids_out.append(ids.numpy())
        val_out.append(vals.numpy())
    return {"ids": np.concatenate(ids_out) if ids_out else np.zeros((0, 4, k), np.int64),
            "values": np.concatenate(val_out) if val_out else np.zeros((0, 4, k), np.float32)}


def strengths(store, sae_id: str, rows, index=None, codes=None) -> tuple[np.ndarray, np.ndarray]:
    """(c [d_sae], source [d_sae]) as described in the module docstring."""
    norms = rows.norm(dim=-1).cpu().numpy().astype(np.float64)                      # [d_sae]
    n = len(norms)
    med = np.full(n, np.nan)
    typical = None
    if index is not None:
        for f, q in store.cursor().execute(f"SELECT feature, quantiles[{QUANTILES.index(0.5) + 1}] FROM feature_stats WHERE ix = ?",
                                           [index.ix]).fetchall():
            med[f] = q
        # one active pair's size, |a|·‖row‖, summarised by the median over features of their medians
        alive = np.isfinite(med)
        if alive.any():
            typical = float(np.median(med[alive] * norms[alive]))
    if typical is None and codes is not None:
        v, i = codes
        on = v > 0
        if bool(on.any()):
            typical = float(np.median((v[on].double() * rows.norm(dim=-1)[i[on]].double()).cpu().numpy()))
    if typical is None:
        typical = 1.0
    fallback = typical / np.where(norms > 0, norms, 1.0)
    use = np.isfinite(med) & (med > 0)
    c = C_MULT * np.where(use, med, fallback)
    src = np.where(use, "index median", "fallback" + ("" if index is not None else " (no index)"))
    return c.astype(np.float32), src


# -- the job ------------------------------------------------------------------------------
@dataclass
class _Ctx:
    """What the parts of one SAE share, made on first use (the model loads only if needed)."""

    model_id: str
    sae_id: str
    _model: object = None
    _sae: object = None
    _rows: object = None
    _dirs: object = None
    _lens: object = None

    @property
    def model(self):
        if self._model is None:
            from ...model import load_model

            self._model = load_model(self.model_id)
        return self._model

    @property
    def sae(self):
        if self._sae is None:
            from ...saes import load_sae

            self._sae = load_sae(self.sae_id)
        return self._sae

    @property
    def rows(self):
        if self._rows is None:
            self._rows = decoder_rows(self.sae)
        return self._rows

    @property
    def dirs(self):
        if self._dirs is None:
            self._dirs = residual_directions(self.model, self.sae, self.rows)
        return self._dirs

    def lens(self, store, key: str):
        """[d_sae LENS_K] lens token ids, from the stored VocabProj (else computed)."""
        import torch

        if self._lens is None:
            t = store.cursor().sql("SELECT feature, top_ids FROM feature_vocab_proj WHERE sae_key = ? ORDER BY feature",
                                   params=[key]).to_arrow_table()
            n = int(self.sae.cfg.d_sae)
            if t.num_rows == n and len(set(t["feature"].to_pylist())) == n:
                ids = np.array(t["top_ids"].to_pylist(), dtype=np.int64)[:, :LENS_K]
                self._lens = torch.as_tensor(ids)
            else:
                self._lens = vocab_logits(self.model, self.dirs).topk(LENS_K, dim=-1).indices
        return self._lens


def _job_key(part: str, key: str, **params) -> str:
    payload = json.dumps({"part": part, "sae_key": key, "v": VERSION, **params}, sort_keys=True)
    return f"feature_scores_{part}-" + hashlib.sha256(payload.encode()).hexdigest()[:20]


def _present(store, table: str, key: str, feats: np.ndarray, ix: int | None = None) -> set[int]:
    q = f"SELECT DISTINCT feature FROM {table} WHERE sae_key = ? AND list_contains(?, feature)"
    args = [key, feats.tolist()]
    if ix is not None:                  # (TokenChange shipped beside the SAE counts as present)
        q += " AND ix IN (?, ?)" if table == "feature_token_change" else " AND ix = ?"
        args += [ix, SHIPPED_IX] if table == "feature_token_change" else [ix]
    return {r[0] for r in store.cursor().execute(q, args).fetchall()}


def _vp_table(key, feats, top_i, top_v, bot_i, bot_v) -> pa.Table:
    return pa.table({"sae_key": pa.array([key] * len(feats)), "feature": pa.array(feats, pa.int32()),
                     "top_ids": pa.array(top_i.tolist(), pa.list_(pa.int32())),
                     "top_values": pa.array(top_v.tolist(), pa.list_(pa.float32())),
                     "bottom_ids": pa.array(bot_i.tolist(), pa.list_(pa.int32())),
                     "bottom_values": pa.array(bot_v.tolist(), pa.list_(pa.float32()))})


def _out_table(key, feats, r) -> pa.Table:
    return pa.table({"sae_key": pa.array([key] * len(feats)), "feature": pa.array(feats, pa.int32()),
                     "score": pa.array(r["score"], pa.float64()), "best_rank": pa.array(r["rank"], pa.int32()),
                     "max_prob": pa.array(r["max_prob"], pa.float64()),
                     "best_token": pa.array(r["best_token"], pa.int32()),
                     "a_max": pa.array([r["a_max"]] * len(feats), pa.float32())})


def _tc_table(key, ix, feats, c, src, r, n_windows, length) -> pa.Table:
    cols = {"sae_key": pa.array([key] * len(feats)), "ix": pa.array([ix] * len(feats), pa.int16()),
            "feature": pa.array(feats, pa.int32()), "c": pa.array(c, pa.float32()),
            "c_source": pa.array(list(src)), "n_windows": pa.array([n_windows] * len(feats), pa.int32()),
            "window_len": pa.array([length] * len(feats), pa.int32())}
    for j, name in enumerate(("pos_up", "pos_down", "neg_up", "neg_down")):
        cols[name + "_ids"] = pa.array(r["ids"][:, j].tolist(), pa.list_(pa.int32()))
        cols[name] = pa.array(r["values"][:, j].tolist(), pa.list_(pa.float32()))
    return pa.table(cols)


PART_TABLE = {"vocab": "feature_vocab_proj", "output": "feature_output_scores", "token_change": "feature_token_change"}


def part_work(part: str, ctx: _Ctx, key: str, inputs: dict) -> Callable[[np.ndarray], pa.Table]:
    """The rows of one part for an array of features, from the model and SAE (loaded on first
    use) and `inputs` the driver computed before the job, so it never reads the store (a Ray
    worker cannot: the driver holds it):
      output:       lens [n LENS_K] int token ids (VocabProj's top LENS_K of features 0..n-1)
      token_change: windows (the held-out windows), c [n] and c_source [n] (`strengths`),
                    precision, ix (the index c came from), length
    Both engines build their work with it (ScoresPartJob.work, here or rebuilt in a Ray worker by the driver)."""
    import torch

    if part == "vocab":
        def fn(feats):
            with torch.inference_mode():
                ti, tv, bi, bv = vocab_proj(ctx.model, ctx.dirs[torch.as_tensor(feats)])
            return _vp_table(key, feats, ti.numpy(), tv.numpy(), bi.numpy(), bv.numpy())
        return fn
    if part == "output":
        lens = np.asarray(inputs["lens"], dtype=np.int64)
        state: dict = {}                                   # the prompt's state, made once

        def fn(feats):
            if not state:
                state.update(prompt_state(ctx.model, ctx.sae))
            r = output_scores(ctx.model, ctx.sae, feats, ctx.rows, torch.as_tensor(lens[feats]), state)
            return _out_table(key, feats, r)
        return fn
    if part == "token_change":
        c = np.asarray(inputs["c"], dtype=np.float32)
        src = np.asarray(inputs["c_source"])
        wins, length = inputs["windows"], inputs["length"]
        st: dict = {}                                      # the windows' state, made once

        def fn(feats):
            if not st:
                st.update(windows_state(ctx.model, ctx.sae, wins, inputs["precision"]))
            r = token_change(ctx.model, ctx.sae, feats, ctx.rows, c[feats], st)
            return _tc_table(key, inputs["ix"], feats, c[feats], src[feats], r, len(wins), length)
        return fn
    raise ValueError(f"No chunked part {part!r}")


def _chunk_features(chunk: int, size: int, n: int, stored: Callable[[np.ndarray], set]) -> np.ndarray:
    """The features of a chunk that are not stored yet."""
    feats = np.arange(chunk * size, min(n, (chunk + 1) * size), dtype=np.int64)
    have = stored(feats)
    return np.array([f for f in feats if f not in have], dtype=np.int64)


def _chunk_work(part: str, fn: Callable, size: int, n: int, stored: Callable[[np.ndarray], set]):
    table = PART_TABLE[part]

    def work(chunk: int) -> dict[str, pa.Table]:
        feats = _chunk_features(chunk, size, n, stored)
        return {table: fn(feats)} if len(feats) else {}
    return work


@dataclass(frozen=True)
class ScoresPartJob(CorpusJob):
    """One part (vocab, output, token_change) of one SAE's scores as a corpus job over chunks of
    `size` features. Features already stored (on demand, by a dashboard) are skipped: by the
    local engine when it reaches their chunk, by Ray as they were when the run started.
    `make_inputs()` (called only when there is work left) makes what part_work needs from the
    store, here in the driver; `ctx` shares the model and SAE between the parts of one run."""

    part: str
    model: str
    sae_id: str
    sae_key: str
    n: int
    size: int
    ix: int | None = None
    params: tuple = ()                     # (name, value) pairs of the job key and spec
    make_inputs: Callable | None = field(default=None, compare=False, repr=False)
    ctx: _Ctx | None = field(default=None, compare=False, repr=False)

    @property
    def kind(self) -> str:
        return f"feature_scores_{self.part}"

    def key(self) -> str:
        return _job_key(self.part, self.sae_key, size=self.size, ix=self.ix, n=self.n, **dict(self.params))

    @property
    def n_chunks(self) -> int:
        return (self.n + self.size - 1) // self.size

    def fields(self) -> dict:
        return {k: getattr(self, k) for k in ("part", "model", "sae_id", "sae_key", "n", "size", "ix", "params")}

    def prepare(self, store, model, progress) -> dict:
        return {"sae_key": self.sae_key, "part": self.part, "ix": self.ix, **dict(self.params)}

    def inputs(self, store, spec, model) -> dict:
        table = PART_TABLE[self.part]
        skip = sorted(_present(store, table, self.sae_key, np.arange(self.n, dtype=np.int64), self.ix))
        return {"inp": self.make_inputs() if self.make_inputs else {}, "skip": skip}

    def work(self, spec, inputs, model, store=None):
        ctx = self.ctx or _Ctx(self.model, self.sae_id)
        table, skip = PART_TABLE[self.part], set(inputs["skip"])
        if store is None:
            stored = lambda f: skip  # noqa: E731
        else:
            stored = lambda f: _present(store, table, self.sae_key, f, self.ix)  # noqa: E731
        return _chunk_work(self.part, part_work(self.part, ctx, self.sae_key, inputs["inp"]), self.size, self.n,
                           stored)

    def _summary(self, done: int, run) -> dict:
        have = set(run.inputs.get("skip", ()))
        computed = sum(len(_chunk_features(c, self.size, self.n, lambda f: have)) for c in run.new_chunks)
        return {"part": self.part, "chunks_done": done, "n_chunks": self.n_chunks, "computed": computed,
                "seconds": round(run.seconds, 2),
                "features_per_s": round(computed / run.seconds, 2) if computed else None}

    def partial(self, store, done, run) -> dict:
        return {**self._summary(done, run), "status": "partial"}

    def finish(self, store, spec, run) -> Finished:
        return Finished({**self._summary(self.n_chunks, run), "status": "done"})

    def result(self, store, run) -> dict:
        summary = jobs.state(store, self.key()).summary or {}
        if run is None:
            return {"part": self.part, "status": "done", "already_done": True, **summary}
        return summary


def _chunked(store, ctx: _Ctx, part: str, key: str, n: int, size: int, inputs: Callable[[], dict], progress,
             ix: int | None = None, stop_after: int | None = None, engine: str = "local", **params) -> dict:
    """One part of one SAE, run (or resumed) by the corpus-job driver (ScoresPartJob)."""
    job = ScoresPartJob(part, ctx.model_id, ctx.sae_id, key, n, size, ix, tuple(sorted(params.items())),
                        make_inputs=inputs, ctx=ctx)
    return drive(job, store, engine, progress, stop_after)


def _ensure_strings(store, ctx: _Ctx) -> None:
    """Token strings for labels, once per model (the model loads only if they are missing)."""
    from .index import ensure_vocab

    if not store.cursor().execute("SELECT count(*) FROM token_strings WHERE model = ?",
                                  [ctx.model_id]).fetchall()[0][0]:
        ensure_vocab(store, ctx.model)


def _input_scores(store, ctx: _Ctx, key: str, index) -> dict:
    """Input scores of every feature from the index (one SQL statement), unless stored."""
    cur = store.cursor()
    if cur.execute("SELECT 1 FROM feature_input_scores WHERE sae_key = ? AND ix = ? LIMIT 1",
                   [key, index.ix]).fetchall():
        return {"part": "input", "status": "done", "already_done": True}
    t = time.perf_counter()
    context = cur.execute("SELECT context FROM feature_indexes WHERE ix = ?", [index.ix]).fetchall()[0][0]
    sql = f"""
        WITH ex AS (SELECT feature, doc, pos // ? AS w, arg_max(token, value) AS token, max(value) AS v
                    FROM feature_acts_by_feature WHERE ix = ? GROUP BY feature, doc, w),
             top AS (SELECT feature, token FROM ex
                     QUALIFY row_number() OVER (PARTITION BY feature ORDER BY v DESC, doc, w) <= {IN_MAX}),
             agg AS (SELECT t.feature, count(*)::INTEGER AS n,
                            sum(CASE WHEN list_contains(vp.top_ids[1:{LENS_K}], t.token) THEN 1 ELSE 0 END)::INTEGER
                            AS hits
                     FROM top t JOIN feature_vocab_proj vp ON vp.sae_key = ? AND vp.feature = t.feature
                     GROUP BY t.feature)
        SELECT ?, ?::SMALLINT, vp.feature, CASE WHEN coalesce(agg.n, 0) >= {IN_MIN} THEN agg.hits / agg.n END,
               coalesce(agg.n, 0), coalesce(agg.hits, 0)
        FROM feature_vocab_proj vp LEFT JOIN agg ON agg.feature = vp.feature WHERE vp.sae_key = ?
        ORDER BY vp.feature"""
    with store.locked():
        if cur.execute("SELECT 1 FROM feature_input_scores WHERE sae_key = ? AND ix = ? LIMIT 1",
                       [key, index.ix]).fetchall():
            return {"part": "input", "status": "done", "already_done": True}
        cur.execute(f"INSERT INTO feature_input_scores {sql}", [context, index.ix, key, key, index.ix, key])
    n = cur.execute("SELECT count(*) FILTER (n > 0), count(score) FROM feature_input_scores WHERE sae_key = ? AND ix = ?",
                    [key, index.ix]).fetchall()[0]
    return {"part": "input", "status": "done", "features_with_examples": n[0], "scored": n[1],
            "seconds": round(time.perf_counter() - t, 2)}


# -- TokenChange shipped beside an SAE ----------------------------------------------------------
# TokenChange is the long part (an hour for the four shipped SAEs with bfloat16 matmuls, several
# in float32), so the project ships it: `feature-scores --ship` writes the stored rows of each
# SAE's current weights to <SAE folder>/token_change.parquet (with the job's parameters in the
# file's metadata), and every TokenChange pass first imports that file into the store (ix =
# SHIPPED_IX; c_source prefixed "shipped"), so a fresh start has it at once and the job only
# computes what is missing. A file whose sae_key is not the SAE's current one (retrained weights)
# or whose parameters differ is ignored.
SHIPPED_IX = -2
SHIPPED_FILE = "token_change.parquet"


def _tc_params(tc_windows: int, tc_len: int, corpus_name: str) -> dict:
    return {"windows": tc_windows, "length": tc_len, "mult": C_MULT, "corpus": corpus_name, "version": VERSION}


def windows_hash(wins: list[list[int]]) -> str:
    """Fingerprint of the TokenChange windows' token ids: shipped rows are measured on these."""
    return hashlib.sha256(json.dumps(wins).encode()).hexdigest()[:16]


def ship_token_change(store, sae_id: str, folder=None, tc_windows: int = TC_WINDOWS, tc_len: int = TC_LEN,
                      corpus_name: str = corpus.DEFAULT_NAME, root=None) -> dict:
    """Write the stored TokenChange rows of the SAE's current weights (those of its current
    index, else any) beside the SAE, with the fingerprint of the windows they were measured
    on (from the corpus at `root`); returns where and how many. With no rows stored for these
    weights nothing is written (a file already there, e.g. the shipped one, is kept)."""
    import pyarrow.parquet as pq
    from pathlib import Path

    from ...saes import sae_info
    from .index import sae_key

    key = sae_key(sae_id)
    folder = Path(folder or sae_info(sae_id)["path"] or "")
    ensure_tables(store)
    index = _index_or_none(store, sae_id)
    ix = None if isinstance(index, Exception) else index.ix
    t = store.cursor().sql(
        "SELECT * EXCLUDE (ix) FROM feature_token_change WHERE sae_key = ? AND n_windows = ? AND window_len = ? "
        "QUALIFY row_number() OVER (PARTITION BY feature ORDER BY (ix = ?) DESC, ix DESC) = 1 ORDER BY feature",
        params=[key, tc_windows, tc_len, -999 if ix is None else ix]).to_arrow_table()
    path = folder / SHIPPED_FILE
    if t.num_rows == 0:     # nothing of these weights stored: the file beside the SAE stays as it was
        return {"sae_id": sae_id, "path": str(path), "features": 0, "bytes": 0, "written": False,
                "reason": f"no TokenChange of {key} is stored (run the token_change part first: it needs the "
                          "corpus index); the shipped file was left unchanged"}
    wins = heldout_windows(sae_info(sae_id)["model"], tc_windows, tc_len, corpus_name, root)
    meta = {"sae_key": key, **_tc_params(tc_windows, tc_len, corpus_name), "windows_hash": windows_hash(wins),
            "index_windows": None if ix is None else index.n_windows}
    t = t.replace_schema_metadata({"dashboard": json.dumps(meta)})
    pq.write_table(t, path, compression="zstd")
    return {"sae_id": sae_id, "path": str(path), "features": t.num_rows, "bytes": path.stat().st_size,
            "written": True}


def import_shipped(store, sae_id: str, wins: list[list[int]], tc_windows: int = TC_WINDOWS, tc_len: int = TC_LEN,
                   corpus_name: str = corpus.DEFAULT_NAME, folder=None) -> int:
    """Import the TokenChange file shipped beside the SAE (see above); the rows added. Only a
    file of these weights, these parameters and these windows `wins` (another corpus build
    gives other windows) is imported."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from pathlib import Path

    from ...saes import sae_info
    from ...store import insert_arrow
    from .index import sae_key

    folder = folder or sae_info(sae_id).get("path")
    path = Path(folder) / SHIPPED_FILE if folder else None
    if path is None or not path.exists():
        return 0
    try:
        t = pq.read_table(path)
        meta = json.loads((t.schema.metadata or {}).get(b"dashboard", b"{}"))
    except (OSError, ValueError, pa.ArrowInvalid):
        return 0                                            # unreadable: computed instead
    key = sae_key(sae_id)
    if meta.get("sae_key") != key or {k: meta.get(k) for k in _tc_params(0, 0, "")} != _tc_params(tc_windows, tc_len, corpus_name):
        return 0
    if meta.get("windows_hash") != windows_hash(wins):
        return 0
    ensure_tables(store)
    with store.transaction() as cur:
        if cur.execute("SELECT 1 FROM feature_token_change WHERE sae_key = ? AND ix = ? LIMIT 1",
                       [key, SHIPPED_IX]).fetchall():
            return 0
        t = t.append_column("ix", pa.array([SHIPPED_IX] * t.num_rows, pa.int16()))
        t = t.set_column(t.schema.get_field_index("c_source"), "c_source",
                         pc.binary_join_element_wise("shipped", t["c_source"], ": "))
        return insert_arrow(cur, "feature_token_change", t)


def _index_or_none(store, sae_id: str):
    from .query import index_for

    try:
        return index_for(store, sae_id)
    except FeatureIndexMissing as e:
        return e


def build_scores(model_id: str, sae: str | list[str], store=None, progress: Callable[[str], jobs.Progress] | None = None,
                 corpus_name: str = corpus.DEFAULT_NAME, root=None, parts=("vocab", "output", "input", "token_change"),
                 stop_after: int | None = None, features: int | None = None, tc_windows: int = TC_WINDOWS,
                 tc_len: int = TC_LEN, tc_precision: str | None = None, engine: str = "local") -> dict:
    """Compute and store the scores of every feature of the SAE(s); resumable, idempotent.

    Two passes: first VocabProj, output and input score of every SAE (minutes: labels and
    scores appear early), then TokenChange of every SAE (the long part). `progress(description)`
    makes a progress callback per part; `features` limits each SAE to its first N features
    (tests, benchmarks); `stop_after` stops each part after that many new chunks;
    `tc_precision` the forward of TokenChange (default kernels.forward.bulk_precision());
    `engine` "ray" runs the chunks of VocabProj, output score and TokenChange as Ray tasks
    (jobs.run_job): what they read from the store (lens tokens, c) is computed here first."""
    from ...saes import sae_info
    from ...store import default_store
    from .index import resolve_saes, sae_key

    store = store or default_store()
    ensure_tables(store)
    out: dict = {"model": model_id, "saes": {}}
    t_all = time.perf_counter()
    ctxs = {s: _Ctx(model_id, s) for s in resolve_saes(model_id, sae)}

    def bar(s: str, part: str):
        return progress(f"{s} {part}") if progress else None

    for s, ctx in ctxs.items():                                     # pass 1: the fast parts
        key = sae_key(s)
        n = int(sae_info(s)["d_sae"]) if features is None else int(features)
        res: dict = out["saes"].setdefault(s, {"sae_key": key, "features": n})
        if "vocab" in parts:
            def vp_inputs(ctx=ctx):
                _ensure_strings(store, ctx)
                return {}
            res["vocab_proj"] = _chunked(store, ctx, "vocab", key, n, VP_CHUNK, vp_inputs, bar(s, "VocabProj"),
                                         stop_after=stop_after, engine=engine, k=VOCAB_K)
        if "output" in parts:
            def out_inputs(ctx=ctx, key=key, n=n):
                return {"lens": ctx.lens(store, key)[:n].cpu().numpy().astype(np.int64)}
            res["output_score"] = _chunked(store, ctx, "output", key, n, OUT_CHUNK, out_inputs, bar(s, "output score"),
                                           stop_after=stop_after, engine=engine, prompt=PROMPT, scale=OUT_SCALE,
                                           lens=LENS_K)
        if "input" in parts:
            index = _index_or_none(store, s)
            n_vp = store.cursor().execute("SELECT count(DISTINCT feature) FROM feature_vocab_proj WHERE sae_key = ?",
                                          [key]).fetchall()[0][0]
            if isinstance(index, Exception):
                res["input_score"] = {"part": "input", "status": "pending", "reason": str(index)}
            elif n_vp < int(sae_info(s)["d_sae"]):
                res["input_score"] = {"part": "input", "status": "pending",
                                      "reason": f"VocabProj is stored for {n_vp} features, not all"}
            else:
                res["input_score"] = _input_scores(store, ctx, key, index)
    if "token_change" in parts:                                      # pass 2: TokenChange
        from kernels.forward import bulk_precision

        precision = tc_precision or bulk_precision()
        held = None                                 # the held-out windows: read once, for every SAE
        for s, ctx in ctxs.items():
            key = sae_key(s)
            res = out["saes"][s]
            index = _index_or_none(store, s)
            if isinstance(index, Exception):
                res["token_change"] = {"part": "token_change", "status": "pending",
                                       "reason": f"c comes from the feature index: {index}"}
                continue
            if held is None:
                try:
                    held = heldout_windows(model_id, tc_windows, tc_len, corpus_name, root)
                except CorpusUnavailable as e:
                    held = e
            if isinstance(held, CorpusUnavailable):
                res["token_change"] = {"part": "token_change", "status": "pending", "reason": str(held)}
                continue
            wins = held

            res["token_change_shipped"] = import_shipped(store, s, wins, tc_windows, tc_len, corpus_name)

            def tc_inputs(ctx=ctx, s=s, index=index, wins=wins, n=res["features"]):
                c, src = strengths(store, s, ctx.rows, index)
                return {"windows": wins, "length": tc_len, "c": c[:n], "c_source": src[:n].tolist(),
                        "precision": precision, "ix": index.ix}
            res["token_change"] = _chunked(store, ctx, "token_change", key, res["features"], TC_CHUNK, tc_inputs,
                                           bar(s, "TokenChange"), ix=index.ix, stop_after=stop_after, engine=engine,
                                           windows=tc_windows, length=tc_len, mult=C_MULT, corpus=corpus_name,
                                           **({} if precision == "float32" else {"precision": precision}))
    out["seconds"] = round(time.perf_counter() - t_all, 2)
    return out


# -- reads --------------------------------------------------------------------------------
def _tok(strings, t: int) -> str:
    return strings[t] if 0 <= t < len(strings) else f"<{t}>"


def _short(tok: str) -> str:
    s = tok.replace("\n", "⏎").replace("\t", "⇥").strip()
    return s or repr(tok)[1:-1] or "∅"


def make_label(fires_on: list[str] | None, promotes: list[str]) -> str:
    """'fires on: a, b, c · promotes: x, y, z' from token strings (distinct shown forms)."""
    def pick(toks):
        seen, out = set(), []
        for t in toks:
            s = _short(t)
            if s.lower() not in seen:
                seen.add(s.lower())
                out.append(s)
            if len(out) == LABEL_TOKENS:
                break
        return ", ".join(out)
    parts = []
    if fires_on is not None:
        parts.append("fires on: " + (pick(fires_on) if fires_on else "(never in the index)"))
    parts.append("promotes: " + (pick(promotes) or "?"))
    return " · ".join(parts)


def labels(store, sae_id: str) -> dict[int, str]:
    """A label for every feature with a stored VocabProj (feature -> text)."""
    from ...saes import sae_info
    from .index import sae_key
    from .query import vocab

    ensure_tables(store)
    key = sae_key(sae_id)
    index = _index_or_none(store, sae_id)
    cur = store.cursor()
    strings = vocab(store, sae_info(sae_id)["model"])
    promotes = {f: [_tok(strings, t) for t in ids] for f, ids in cur.execute(
        f"SELECT feature, top_ids[1:{2 * LABEL_TOKENS}] FROM feature_vocab_proj WHERE sae_key = ?", [key]).fetchall()}
    fires: dict[int, list[str]] | None = None
    if not isinstance(index, Exception):
        fires = {}
        for f, t in cur.execute("SELECT feature, token FROM feature_top_tokens WHERE ix = ? QUALIFY row_number() OVER "
                                f"(PARTITION BY feature ORDER BY n DESC, token) <= {2 * LABEL_TOKENS} "
                                "ORDER BY feature, n DESC, token", [index.ix]).fetchall():
            fires.setdefault(f, []).append(_tok(strings, t))
    return {f: make_label(None if fires is None else fires.get(f, []), p) for f, p in promotes.items()}


def score_table(store, sae_id: str) -> dict:
    """Arrays over all features (index = feature id): output_score, input_score, density
    (NaN where not stored), label ('' where no VocabProj yet), and what is missing."""
    from ...saes import sae_info
    from .index import sae_key

    ensure_tables(store)
    n = int(sae_info(sae_id)["d_sae"])
    key = sae_key(sae_id)
    cur = store.cursor()
    out = {k: np.full(n, np.nan) for k in ("output_score", "input_score", "density")}
    for f, v in cur.execute("SELECT feature, any_value(score) FROM feature_output_scores WHERE sae_key = ? "
                            "GROUP BY feature", [key]).fetchall():
        out["output_score"][f] = v
    index = _index_or_none(store, sae_id)
    if not isinstance(index, Exception):
        for f, v in cur.execute("SELECT feature, any_value(score) FROM feature_input_scores WHERE sae_key = ? AND "
                                "ix = ? GROUP BY feature", [key, index.ix]).fetchall():
            out["input_score"][f] = np.nan if v is None else v
        out["density"][:] = 0.0
        for f, d in cur.execute("SELECT feature, density FROM feature_stats WHERE ix = ?", [index.ix]).fetchall():
            out["density"][f] = d
    lab = labels(store, sae_id)
    out["label"] = [lab.get(f, "") for f in range(n)]
    out["indexed"] = not isinstance(index, Exception)
    out["n_output"] = int(np.isfinite(out["output_score"]).sum())
    out["n_input"] = int(np.isfinite(out["input_score"]).sum())
    out["n_vocab"] = len(lab)
    return out


def _stored(store, key: str, feature: int, index) -> dict:
    from .query import vocab

    cur = store.cursor()
    r: dict = {}
    vp = cur.execute("SELECT top_ids, top_values, bottom_ids, bottom_values FROM feature_vocab_proj WHERE sae_key = ? "
                     "AND feature = ? LIMIT 1", [key, feature]).fetchall()
    r["vocab_proj"] = vp[0] if vp else None
    o = cur.execute("SELECT score, best_rank, max_prob, best_token, a_max FROM feature_output_scores WHERE sae_key = ? "
                    "AND feature = ? LIMIT 1", [key, feature]).fetchall()
    r["output"] = o[0] if o else None
    ix = -1 if isinstance(index, Exception) else index.ix
    i = cur.execute("SELECT score, n, hits FROM feature_input_scores WHERE sae_key = ? AND ix = ? AND feature = ? "
                    "LIMIT 1", [key, ix, feature]).fetchall()
    r["input"] = i[0] if i else None
    tc = cur.execute("SELECT ix, c, c_source, n_windows, window_len, pos_up_ids, pos_up, pos_down_ids, pos_down, "
                     "neg_up_ids, neg_up, neg_down_ids, neg_down FROM feature_token_change WHERE sae_key = ? AND "
                     "feature = ? ORDER BY (ix = ?) DESC, ix DESC LIMIT 1", [key, feature, ix]).fetchall()
    r["token_change"] = tc[0] if tc else None
    return r


def compute_feature(store, sae_id: str, feature: int, model_id: str | None = None, corpus_name: str = corpus.DEFAULT_NAME,
                    root=None, which=("vocab", "output", "input", "token_change")) -> None:
    """Compute and store the missing parts of one feature (loads the model)."""
    import torch

    from ...saes import sae_info
    from .index import sae_key

    ensure_tables(store)
    key = sae_key(sae_id)
    model_id = model_id or sae_info(sae_id)["model"]
    ctx = _Ctx(model_id, sae_id)
    index = _index_or_none(store, sae_id)
    have = _stored(store, key, feature, index)
    f = np.array([feature], dtype=np.int64)
    tables: dict[str, pa.Table] = {}
    lens = None
    if "vocab" in which and have["vocab_proj"] is None:
        from .index import ensure_vocab

        ensure_vocab(store, ctx.model)
        with torch.inference_mode():
            ti, tv, bi, bv = vocab_proj(ctx.model, ctx.dirs[torch.as_tensor(f)])
        tables["feature_vocab_proj"] = _vp_table(key, f, ti.numpy(), tv.numpy(), bi.numpy(), bv.numpy())
        lens = ti[:, :LENS_K]
    if "output" in which and have["output"] is None:
        if lens is None:
            lens = vocab_logits(ctx.model, ctx.dirs[torch.as_tensor(f)]).topk(LENS_K, dim=-1).indices
        tables["feature_output_scores"] = _out_table(key, f, output_scores(ctx.model, ctx.sae, f, ctx.rows, lens))
    ix_now = None if isinstance(index, Exception) else index.ix
    tc = have["token_change"]
    if "token_change" in which and (tc is None or (ix_now is not None and tc[0] != ix_now)):
        try:
            wins = heldout_windows(model_id, TC_WINDOWS, TC_LEN, corpus_name, root)
        except CorpusUnavailable:
            wins = None
        if wins is not None:
            st = windows_state(ctx.model, ctx.sae, wins)
            c, src = strengths(store, sae_id, ctx.rows, None if ix_now is None else index, st["codes"])
            r = token_change(ctx.model, ctx.sae, f, ctx.rows, c[f], st)
            tables["feature_token_change"] = _tc_table(key, -1 if ix_now is None else ix_now, f, c[f], src[f], r,
                                                       len(wins), TC_LEN)
    from ...store import insert_arrow

    with store.transaction() as cur:
        for name, t in tables.items():
            insert_arrow(cur, name, t)
    cur = store.cursor()
    if "input" in which and ix_now is not None and have["input"] is None:
        if cur.execute("SELECT count(*) FROM feature_vocab_proj WHERE sae_key = ?", [key]).fetchall()[0][0] \
                >= int(sae_info(sae_id)["d_sae"]):
            _input_scores(store, ctx, key, index)


def feature_scores(store, sae_id: str, feature: int, compute: bool = True, **kw) -> dict:
    """One feature's label, VocabProj, TokenChange, input and output score (token strings
    included). With compute, missing parts are computed and stored first (loads the model);
    without, they are None and `missing` lists them."""
    from ...saes import sae_info
    from .index import sae_key
    from .query import check_feature, vocab

    check_feature(sae_id, feature)
    ensure_tables(store)
    key = sae_key(sae_id)
    index = _index_or_none(store, sae_id)
    have = _stored(store, key, feature, index)
    ix_now = None if isinstance(index, Exception) else index.ix
    stale_tc = have["token_change"] is not None and ix_now is not None and have["token_change"][0] != ix_now
    if compute and (have["vocab_proj"] is None or have["output"] is None or have["token_change"] is None or stale_tc
                    or (ix_now is not None and have["input"] is None)):
        compute_feature(store, sae_id, feature, **kw)
        have = _stored(store, key, feature, index)
    strings = vocab(store, sae_info(sae_id)["model"])
    item = lambda t, v: {"token": _tok(strings, int(t)), "id": int(t), "value": float(v)}  # noqa: E731
    out: dict = {"sae_key": key, "missing": []}
    vp = have["vocab_proj"]
    out["vocab_proj"] = None if vp is None else {"top": [item(t, v) for t, v in zip(vp[0], vp[1])],
                                                 "bottom": [item(t, v) for t, v in zip(vp[2], vp[3])],
                                                 "definition": "W_U · final_norm(d_f)"}
    o = have["output"]
    out["output_score"] = None if o is None else float(o[0])
    out["output_score_detail"] = None if o is None else {
        "best_rank": int(o[1]), "max_prob": float(o[2]), "best_token": item(o[3], o[2])["token"],
        "a_max": float(o[4]), "prompt": PROMPT, "scale": OUT_SCALE, "lens_k": LENS_K}
    i = have["input"]
    out["input_score"] = None if i is None or i[0] is None else float(i[0])
    out["input_score_detail"] = None if i is None else {"examples": int(i[1]), "hits": int(i[2]), "min_examples": IN_MIN,
                                                        "max_examples": IN_MAX}
    tc = have["token_change"]
    if tc is None:
        out["token_change"] = None
    else:
        lists = {name: [item(t, v) for t, v in zip(tc[5 + 2 * j], tc[6 + 2 * j])]
                 for j, name in enumerate(("plus_increased", "plus_decreased", "minus_increased", "minus_decreased"))}
        out["token_change"] = {"c": float(tc[1]), "c_source": tc[2], "windows": int(tc[3]), "window_len": int(tc[4]),
                               "index_ix": int(tc[0]), **lists}
    if isinstance(index, Exception):
        fires = None
    else:
        fires = [_tok(strings, t) for (t,) in store.cursor().execute(
            "SELECT token FROM feature_top_tokens WHERE ix = ? AND feature = ? ORDER BY n DESC, token LIMIT ?",
            [index.ix, feature, 2 * LABEL_TOKENS]).fetchall()]
    out["label"] = None if vp is None else make_label(fires, [_tok(strings, t) for t in vp[0][:2 * LABEL_TOKENS]])
    for name in ("vocab_proj", "output_score", "token_change"):
        if out[name] is None:
            out["missing"].append(name)
    if out["input_score_detail"] is None:
        out["missing"].append("input_score")
    if isinstance(index, Exception):
        out["no_index"] = str(index)
    return out


__all__ = ["build_scores", "feature_scores", "score_table", "labels", "make_label", "ensure_tables",
           "output_scores", "token_change", "vocab_proj", "residual_directions", "decoder_rows", "PROMPT"]
