"""Corpus statistics of every MLP neuron (after Voita et al. 2023, "Neurons in Large Language
Models: Dead, N-gram, Positional"), computed as a resumable job over corpus windows.

A neuron of block L is one coordinate of blocks.L.mlp.hook_post. SmolLM2's MLP is gated SiLU,
post = silu(x W_gate) * (x W_up), so a neuron is never exactly zero and `value > 0` holds for
about half of all entries: "active" needs a threshold. Here

    active  ⇔  value > t_L,   t_L = ACTIVE_FRACTION (0.1) × the 99th percentile of |value|
                               over all (token, neuron) entries of layer L on the job's
                               first THRESHOLD_WINDOWS (4) windows (~500 tokens × 1536).

The 30 thresholds are measured once, before the first chunk, and fixed in the job spec (a
resumed job reads them back, so every chunk uses the same ones).

One forward per chunk of windows, with one hook on all 30 `mlp.hook_post` points that reduces
each layer's [tokens d_mlp] tensor on the fly and lets it go. Each chunk writes, per layer, one
row of partial aggregates (table neuron_part; arrays of length d_mlp) in one transaction with
its done-mark (backend/jobs/__init__.py), so an interrupted job resumes with no row lost or doubled:

    n, active count, Σv, Σv², activation mass Σ_{active} v, and for the variance shares
    SS_total, SS_between(position), SS_between(token) and the group counts of the chunk;
    a histogram over fixed asinh-spaced bins (HIST_EDGES);
    the chunk's top-20 (value, doc, pos) per neuron; the chunk's TOKEN_K token ids of largest
    activation mass per neuron, with that mass and count.

`finish_rows` merges the chunks into neuron_stats (one row per neuron), neuron_top (the
top-20 contexts), neuron_hist, and drops the big partial rows (histograms, candidates).

Definitions of the final statistics:
    freq          active count / n
    dead          never active on the corpus (active count = 0)
    mean, std     over all n entries; max: the largest value seen
    top1_share, top5_share   share of the activation mass (Σ of v over active entries) on
                  the neuron's 1 / 5 token ids of largest mass. The per-chunk candidates keep
                  TOKEN_K ids per neuron, so the shares are lower bounds (exact when a token
                  is in every chunk's candidates, as a detector's token is).
    pos_share, tok_share     adjusted η² (share of variance explained, corrected for the number
                  of groups) of the activation by the position in the window, and by the token
                  id; groups are (chunk, position) and (chunk, token id).
    token_detector   not dead, ≥ MIN_ACTIVE activations, and top1_share ≥ 0.5 or top5_share ≥ 0.8
    positional       pos_share ≥ 0.3 and pos_share > tok_share
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from .. import jobs
from .driver import Finished, WindowJob, drive, stored_spec

# This job's tables (store migration 3): per-chunk partial rows, then the merged tables.
SCHEMA = [
    """CREATE TABLE neuron_part(job_key VARCHAR NOT NULL, chunk INTEGER NOT NULL, layer SMALLINT NOT NULL,
               n BIGINT, active INTEGER[], sum DOUBLE[], sumsq DOUBLE[], mass DOUBLE[], ss_tot DOUBLE[],
               ssb_pos DOUBLE[], ssb_tok DOUBLE[], g_pos INTEGER, g_tok INTEGER)""",
    """CREATE TABLE neuron_part_big(job_key VARCHAR NOT NULL, chunk INTEGER NOT NULL,
               layer SMALLINT NOT NULL, hist INTEGER[], k SMALLINT, top_value FLOAT[], top_doc INTEGER[],
               top_pos INTEGER[], kt SMALLINT, tok_id INTEGER[], tok_mass FLOAT[], tok_count INTEGER[])""",
    """CREATE TABLE neuron_stats(job_key VARCHAR NOT NULL, layer SMALLINT NOT NULL, neuron SMALLINT NOT NULL,
               n BIGINT, active BIGINT, freq DOUBLE, mean DOUBLE, std DOUBLE, max FLOAT, dead BOOLEAN,
               mass DOUBLE, top1_share DOUBLE, top5_share DOUBLE, top_tokens INTEGER[],
               top_token_mass FLOAT[], top_token_count INTEGER[], pos_share DOUBLE, tok_share DOUBLE,
               token_detector BOOLEAN, is_positional BOOLEAN)""",
    """CREATE TABLE neuron_top(job_key VARCHAR NOT NULL, layer SMALLINT NOT NULL, neuron SMALLINT NOT NULL,
               rank SMALLINT NOT NULL, doc INTEGER, pos INTEGER, value FLOAT)""",
    """CREATE TABLE neuron_hist(job_key VARCHAR NOT NULL, layer SMALLINT NOT NULL, neuron SMALLINT NOT NULL,
               counts INTEGER[])""",
]
from ..errors import InvalidSite, InvalidSpec
from ..sites import Component, Site, hook_name

KIND = "neuron_stats"
VERSION = 1
ACTIVE_FRACTION = 0.1
ACTIVE_QUANTILE = 0.99
TOP_K = 20                 # contexts kept per neuron
TOKEN_K = 8                # token candidates per neuron and chunk
MIN_ACTIVE = 20
DETECTOR_TOP1, DETECTOR_TOP5 = 0.5, 0.8
POSITIONAL_SHARE = 0.3
DEFAULT_WINDOWS = 128
DEFAULT_CHUNK = 16
THRESHOLD_WINDOWS = 4      # the first windows of the first chunk, on which t_L is measured
# Histogram bins: uniform in asinh(v / HIST_SCALE) over ±HIST_LIMIT; values beyond fall in the end bins.
HIST_SCALE, HIST_LIMIT, HIST_BINS = 0.02, 3.0e4, 96
_A = math.asinh(HIST_LIMIT / HIST_SCALE)
HIST_EDGES = (HIST_SCALE * np.sinh(np.linspace(-_A, _A, HIST_BINS + 1))).astype(np.float64)

DEFINITION = (f"active ⇔ value > {ACTIVE_FRACTION:g} × the layer's {ACTIVE_QUANTILE * 100:g}th-percentile |value| "
              f"(measured on the job's first {THRESHOLD_WINDOWS} windows and fixed in the job spec)")


@dataclass(frozen=True)
class NeuronStatsJob(WindowJob):
    """What a neuron-statistics job reads: N windows of `length` tokens, evenly spaced over the
    corpus split, processed `chunk` windows at a time."""

    KIND = KIND
    VERSION = VERSION
    model: str
    n_windows: int = DEFAULT_WINDOWS
    split: str = "train"
    length: int = 128
    chunk: int = DEFAULT_CHUNK
    corpus: str = "default"

    def pick_windows(self) -> list[tuple[int, int, list[int]]]:
        from .. import corpus

        return corpus.pick_windows(self.model, self.split, self.length, self.n_windows, name=self.corpus)

    def prepare(self, store, model, progress) -> dict:
        if progress:
            progress(0, self.n_chunks, "measuring the activity thresholds on the first windows")
        return {**asdict(self), "thresholds": measure_thresholds(model(), self.chunks()[0][:THRESHOLD_WINDOWS]),
                "definition": DEFINITION, "hist_edges": HIST_EDGES.tolist()}

    def work(self, spec, inputs, model, store=None):
        chunks, m, key, thresholds = self.chunks(), model(), self.key(), spec["thresholds"]
        return lambda c: chunk_rows(m, chunks[c], thresholds, key, c)

    def finish(self, store, spec, run) -> Finished:
        n_tok = sum(len(ids) for _, _, ids in self.windows())
        return finish_rows(store, self, {"seconds_last_run": round(run.seconds, 2), "tokens": n_tok})

    def result(self, store, run) -> dict:
        return summary(store, self)



class _Stop(Exception):
    """Raised after the last hooked layer: the unembedding of thousands of tokens is not needed."""


def _batch(model, wins):
    """Right-padded token batch [B P], validity mask [B P] (padding after a window's end cannot
    change earlier positions of a causal model), docs, absolute positions [B P]."""
    import torch

    p = max(len(ids) for _, _, ids in wins)
    toks = torch.zeros(len(wins), p, dtype=torch.long)
    mask = torch.zeros(len(wins), p, dtype=torch.bool)
    for b, (_, _, ids) in enumerate(wins):
        toks[b, :len(ids)] = torch.as_tensor(ids)
        toks[b, len(ids):] = ids[-1]
        mask[b, :len(ids)] = True
    docs = torch.as_tensor([d for d, _, _ in wins])[:, None].expand(-1, p)
    pos = torch.as_tensor([s for _, s, _ in wins])[:, None] + torch.arange(p)[None, :]
    return toks, mask, docs, pos


def layer_activations(model, wins, reduce) -> None:
    """One forward over `wins`; reduce(layer, x[T d_mlp] float32 of valid tokens, ctx) per layer."""
    import torch

    n_layers = model.info.n_layers
    names = [hook_name(Site(Component.MLP_POST, layer)) for layer in range(n_layers)]
    toks, mask, docs, pos = _batch(model, wins)
    ctx = {"tokens": toks[mask], "docs": docs[mask], "pos": pos[mask],
           "wpos": torch.arange(toks.shape[1])[None, :].expand_as(toks)[mask]}
    fired = set()
    with model.lock, torch.inference_mode():
        points = model.hook_points()
        layer_of = {id(points[name]): layer for layer, name in enumerate(names)}

        def dispatch(x, hook):  # x: [B P d_mlp]
            layer = layer_of[id(hook)]
            reduce(layer, x.detach()[mask].float(), ctx)
            fired.add(layer)
            if layer == n_layers - 1:
                raise _Stop
        try:
            model.run_with_hooks(toks, fwd_hooks=[(lambda n: n in names, dispatch)], return_type=None)
        except _Stop:
            pass
    if len(fired) != n_layers:
        raise RuntimeError(f"neuron hooks did not fire at layers {sorted(set(range(n_layers)) - fired)}")


def measure_thresholds(model, wins) -> list[float]:
    """t_L = ACTIVE_FRACTION × the ACTIVE_QUANTILE quantile of |value| per layer, on `wins`."""
    out = [0.0] * model.info.n_layers

    def reduce(layer, x, ctx):
        a = x.abs().reshape(-1)
        k = max(1, int(math.ceil(ACTIVE_QUANTILE * a.numel())))
        out[layer] = ACTIVE_FRACTION * float(a.kthvalue(k).values)
    layer_activations(model, wins, reduce)
    return out


class _Groups:
    """Rows grouped by a label; group sums as a sparse one-hot [G T] (CSR) times the rows, 3–4×
    faster here than index_add_ or a cumulative sum over sorted rows."""

    def __init__(self, labels):
        import warnings

        import torch

        self.uniq, inv, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        t = len(labels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.onehot = torch.sparse_coo_tensor(torch.stack([inv, torch.arange(t)]),
                                                  torch.ones(t, dtype=torch.float64),
                                                  (len(self.uniq), t)).to_sparse_csr()
        self.counts = counts.double()

    def sums(self, v):
        """Σ of v's rows per group, float64 [G d]."""
        return self.onehot @ v.double()

    def ss_between(self, x):
        """Σ_g S_g²/n_g per column (float64 [d])."""
        return (self.sums(x) ** 2 / self.counts[:, None]).sum(0)


def chunk_rows(model, wins, thresholds: list[float], job_key: str, chunk: int) -> dict[str, pa.Table]:
    """The partial aggregates of one chunk of windows (see the module docstring)."""
    import torch

    d_mlp = model.info.d_mlp
    part, big = [], []
    width = 2 * _A / HIST_BINS
    groups = {}

    def reduce(layer, x, ctx):   # x: [T d_mlp]
        if not groups:           # the same groups at every layer
            groups["pos"], groups["tok"] = _Groups(ctx["wpos"]), _Groups(ctx["tokens"])
        gpos, gtok = groups["pos"], groups["tok"]
        t = x.shape[0]
        active = x > thresholds[layer]
        s = x.sum(0, dtype=torch.float64)
        ss = (x * x).sum(0, dtype=torch.float64)
        mass_x = torch.where(active, x, torch.zeros((), dtype=x.dtype))
        mean_term = s ** 2 / t
        ss_tot = ss - mean_term
        sbp, gp = gpos.ss_between(x), len(gpos.uniq)
        sbt, gt = gtok.ss_between(x), len(gtok.uniq)
        uniq = gtok.uniq
        # histogram: bin index from asinh, clamped into the end bins
        b = ((torch.asinh(x * (1.0 / HIST_SCALE)) + _A) * (1.0 / width)).floor_().clamp_(0, HIST_BINS - 1).long()
        b += torch.arange(d_mlp)[None, :] * HIST_BINS
        hist = torch.bincount(b.reshape(-1), minlength=d_mlp * HIST_BINS)
        del b
        tmass = gtok.sums(mass_x).float()                                    # [U d_mlp]
        tcount = gtok.sums(active.float()).round().int()
        kt = min(TOKEN_K, len(uniq))
        tk = tmass.topk(kt, dim=0)                                           # [kt d_mlp]
        k = min(TOP_K, t)
        top = x.topk(k, dim=0)                                               # [k d_mlp]
        part.append({"layer": layer, "n": t, "active": active.sum(0).int().numpy(),
                     "sum": s.numpy(), "sumsq": ss.numpy(), "mass": mass_x.sum(0, dtype=torch.float64).numpy(),
                     "ss_tot": ss_tot.numpy(), "ssb_pos": (sbp - mean_term).numpy(),
                     "ssb_tok": (sbt - mean_term).numpy(), "g_pos": gp, "g_tok": gt})
        big.append({"layer": layer, "hist": hist.int().numpy(), "k": k,
                    "top_value": top.values.T.contiguous().numpy().reshape(-1),           # neuron-major
                    "top_doc": ctx["docs"][top.indices].T.contiguous().int().numpy().reshape(-1),
                    "top_pos": ctx["pos"][top.indices].T.contiguous().int().numpy().reshape(-1),
                    "kt": kt, "tok_id": uniq[tk.indices].T.contiguous().int().numpy().reshape(-1),
                    "tok_mass": tk.values.T.contiguous().numpy().reshape(-1),
                    "tok_count": tcount.gather(0, tk.indices).T.contiguous().int().numpy().reshape(-1)})

    layer_activations(model, wins, reduce)
    n = len(part)
    f32, f64, i32 = pa.list_(pa.float32()), pa.list_(pa.float64()), pa.list_(pa.int32())
    key, ch = pa.array([job_key] * n), pa.array([chunk] * n, pa.int32())
    p = pa.table({"job_key": key, "chunk": ch, "layer": pa.array([r["layer"] for r in part], pa.int16()),
                  "n": pa.array([r["n"] for r in part], pa.int64()),
                  "active": pa.array([r["active"] for r in part], i32),
                  **{c: pa.array([r[c] for r in part], f64)
                     for c in ("sum", "sumsq", "mass", "ss_tot", "ssb_pos", "ssb_tok")},
                  "g_pos": pa.array([r["g_pos"] for r in part], pa.int32()),
                  "g_tok": pa.array([r["g_tok"] for r in part], pa.int32())})
    g = pa.table({"job_key": key, "chunk": ch, "layer": pa.array([r["layer"] for r in big], pa.int16()),
                  "hist": pa.array([r["hist"] for r in big], i32),
                  "k": pa.array([r["k"] for r in big], pa.int16()),
                  "top_value": pa.array([r["top_value"] for r in big], f32),
                  "top_doc": pa.array([r["top_doc"] for r in big], i32),
                  "top_pos": pa.array([r["top_pos"] for r in big], i32),
                  "kt": pa.array([r["kt"] for r in big], pa.int16()),
                  "tok_id": pa.array([r["tok_id"] for r in big], i32),
                  "tok_mass": pa.array([r["tok_mass"] for r in big], f32),
                  "tok_count": pa.array([r["tok_count"] for r in big], i32)})
    return {"neuron_part": p, "neuron_part_big": g}


# ----------------------------------------------------------------------------------------
# Running and finishing the job


def job_spec(store, job: NeuronStatsJob) -> dict | None:
    """The stored spec of a job (with its thresholds), or None if it never started."""
    return stored_spec(store, job.key())


def run(job: NeuronStatsJob, store=None, progress=None, stop_after: int | None = None,
        model=None, engine: str = "local") -> dict:
    """Run (or resume) a neuron-statistics job and finish it; returns its summary (or state)."""
    return drive(job, store, engine, progress, stop_after, model)


def _eta_adj(ss_tot, ssb, df_within, df_total):
    """Adjusted η² pooled over chunks: 1 − (SS_within/df_within) / (SS_total/df_total), where
    SS_total is taken about each chunk's mean (df_total = n − chunks) and the groups are
    (chunk, position) or (chunk, token) (df_within = n − groups)."""
    ss_within = ss_tot - ssb
    df_w = max(float(df_within), 1.0)
    df_t = max(float(df_total), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = 1.0 - (ss_within / df_w) / (ss_tot / df_t)
    return np.where(ss_tot > 0, v, 0.0)


def finish_rows(store, job: NeuronStatsJob, extra: dict | None = None) -> Finished:
    """Merge the chunks into neuron_stats / neuron_top / neuron_hist (SQL run in the finishing
    transaction) and drop the big per-chunk rows."""
    key = job.key()
    cur = store.cursor()
    stats, tops, hists = [], [], []
    layers = [r[0] for r in cur.execute("SELECT DISTINCT layer FROM neuron_part WHERE job_key = ? ORDER BY 1",
                                        [key]).fetchall()]
    n_chunks_total = 0
    for layer in layers:
        p = cur.sql("SELECT * FROM neuron_part WHERE job_key = ? AND layer = ? ORDER BY chunk",
                    params=[key, layer]).to_arrow_table()
        b = cur.sql("SELECT * FROM neuron_part_big WHERE job_key = ? AND layer = ? ORDER BY chunk",
                    params=[key, layer]).to_arrow_table()
        n_chunks_total = p.num_rows

        def arr(t, c, dtype=np.float64):
            return np.stack([np.asarray(x, dtype=dtype) for x in t[c].to_pylist()])   # [chunks d]
        n = int(np.sum(p["n"].to_numpy()))
        active = arr(p, "active", np.int64).sum(0)
        s, ss, mass = arr(p, "sum").sum(0), arr(p, "sumsq").sum(0), arr(p, "mass").sum(0)
        ss_tot = arr(p, "ss_tot").sum(0)
        g_pos, g_tok = int(np.sum(p["g_pos"].to_numpy())), int(np.sum(p["g_tok"].to_numpy()))
        pos_share = _eta_adj(ss_tot, arr(p, "ssb_pos").sum(0), n - g_pos, n - len(p))
        tok_share = _eta_adj(ss_tot, arr(p, "ssb_tok").sum(0), n - g_tok, n - len(p))
        d = active.shape[0]
        mean = s / n
        std = np.sqrt(np.maximum(ss / n - mean ** 2, 0.0))
        hist = arr(b, "hist", np.int64).sum(0).reshape(d, HIST_BINS)
        # top contexts: all chunks' candidates, neuron-major
        k = b["k"].to_pylist()
        tv = np.concatenate([np.asarray(v, np.float32).reshape(d, kk) for v, kk in zip(b["top_value"].to_pylist(), k)], 1)
        td = np.concatenate([np.asarray(v, np.int32).reshape(d, kk) for v, kk in zip(b["top_doc"].to_pylist(), k)], 1)
        tp = np.concatenate([np.asarray(v, np.int32).reshape(d, kk) for v, kk in zip(b["top_pos"].to_pylist(), k)], 1)
        order = _top_order(tv, td, tp)
        rank_v = np.take_along_axis(tv, order, 1)
        rank_d = np.take_along_axis(td, order, 1)
        rank_p = np.take_along_axis(tp, order, 1)
        kk = order.shape[1]
        tops.append(pa.table({
            "job_key": pa.array([key] * (d * kk)), "layer": pa.array(np.full(d * kk, layer, np.int16)),
            "neuron": pa.array(np.repeat(np.arange(d, dtype=np.int16), kk)),
            "rank": pa.array(np.tile(np.arange(kk, dtype=np.int16), d)),
            "doc": pa.array(rank_d.reshape(-1)), "pos": pa.array(rank_p.reshape(-1)),
            "value": pa.array(rank_v.reshape(-1))}))
        hists.append(pa.table({"job_key": pa.array([key] * d), "layer": pa.array(np.full(d, layer, np.int16)),
                               "neuron": pa.array(np.arange(d, dtype=np.int16)),
                               "counts": pa.array(list(hist.astype(np.int32)), pa.list_(pa.int32()))}))
        # token mass: merge every chunk's candidates per (neuron, token)
        kt = b["kt"].to_pylist()
        ids = np.concatenate([np.asarray(v, np.int64).reshape(d, x) for v, x in zip(b["tok_id"].to_pylist(), kt)], 1)
        tm = np.concatenate([np.asarray(v, np.float64).reshape(d, x) for v, x in zip(b["tok_mass"].to_pylist(), kt)], 1)
        tc = np.concatenate([np.asarray(v, np.int64).reshape(d, x) for v, x in zip(b["tok_count"].to_pylist(), kt)], 1)
        top_ids, top_mass, top_cnt = _merge_tokens(ids, tm, tc, 5)
        with np.errstate(divide="ignore", invalid="ignore"):
            top1 = np.where(mass > 0, top_mass[:, 0] / mass, 0.0)
            top5 = np.where(mass > 0, top_mass.sum(1) / mass, 0.0)
        dead = active == 0
        detector = ~dead & (active >= MIN_ACTIVE) & ((top1 >= DETECTOR_TOP1) | (top5 >= DETECTOR_TOP5))
        positional = (pos_share >= POSITIONAL_SHARE) & (pos_share > tok_share)
        stats.append(pa.table({
            "job_key": pa.array([key] * d), "layer": pa.array(np.full(d, layer, np.int16)),
            "neuron": pa.array(np.arange(d, dtype=np.int16)), "n": pa.array(np.full(d, n, np.int64)),
            "active": pa.array(active), "freq": pa.array(active / n), "mean": pa.array(mean),
            "std": pa.array(std), "max": pa.array(tv.max(1).astype(np.float32)), "dead": pa.array(dead),
            "mass": pa.array(mass), "top1_share": pa.array(top1), "top5_share": pa.array(top5),
            "top_tokens": pa.array(list(top_ids.astype(np.int32)), pa.list_(pa.int32())),
            "top_token_mass": pa.array(list(top_mass.astype(np.float32)), pa.list_(pa.float32())),
            "top_token_count": pa.array(list(top_cnt.astype(np.int32)), pa.list_(pa.int32())),
            "pos_share": pa.array(pos_share), "tok_share": pa.array(tok_share),
            "token_detector": pa.array(detector), "is_positional": pa.array(positional)}))
    all_stats, all_tops, all_hists = (pa.concat_tables(x) for x in (stats, tops, hists))
    per_layer = {
        "dead": [int(t["dead"].to_numpy().sum()) for t in stats],
        "token_detectors": [int(t["token_detector"].to_numpy().sum()) for t in stats],
        "positional": [int(t["is_positional"].to_numpy().sum()) for t in stats],
        "mean_freq": [round(float(np.mean(t["freq"].to_numpy())), 5) for t in stats]}
    summ = {"job_key": key, "layers": len(layers), "chunks": n_chunks_total, **(extra or {}),
            "per_layer": per_layer}
    cols = lambda t: ", ".join(t.column_names)  # noqa: E731
    return Finished(summ, sql=[
        "DELETE FROM neuron_stats WHERE job_key = ?", "DELETE FROM neuron_top WHERE job_key = ?",
        "DELETE FROM neuron_hist WHERE job_key = ?",
        f"INSERT INTO neuron_stats({cols(all_stats)}) SELECT {cols(all_stats)} FROM _ns_stats",
        f"INSERT INTO neuron_top({cols(all_tops)}) SELECT {cols(all_tops)} FROM _ns_top ORDER BY layer, neuron, rank",
        f"INSERT INTO neuron_hist({cols(all_hists)}) SELECT {cols(all_hists)} FROM _ns_hist",
        "DELETE FROM neuron_part_big WHERE job_key = ?"],
        params=[[key], [key], [key], [], [], [], [key]],
        tables={"_ns_stats": all_stats, "_ns_top": all_tops, "_ns_hist": all_hists})


def _top_order(tv, td, tp):
    """Per neuron the TOP_K candidates by value (ties: lower doc, then lower pos), [d k]."""
    return np.lexsort((tp, td, -tv), axis=1)[:, :TOP_K]


def _merge_tokens(ids, mass, count, k):
    """Sum the candidates' mass per (neuron, token); the k tokens of largest mass per neuron."""
    d, m = ids.shape
    neuron = np.repeat(np.arange(d), m)
    key = neuron * (int(ids.max()) + 2) + ids.reshape(-1) + 1
    u, inv = np.unique(key, return_inverse=True)
    msum = np.bincount(inv, weights=mass.reshape(-1), minlength=len(u))
    csum = np.bincount(inv, weights=count.reshape(-1), minlength=len(u))
    un = u // (int(ids.max()) + 2)
    ut = u % (int(ids.max()) + 2) - 1
    order = np.lexsort((ut, -msum, un))                       # by neuron, mass desc, token
    un, ut, msum, csum = un[order], ut[order], msum[order], csum[order]
    first = np.searchsorted(un, np.arange(d))
    rank = np.arange(len(un)) - first[un]
    keep = (rank < k) & (msum > 0)
    top_ids = np.full((d, k), -1, np.int64)
    top_mass = np.zeros((d, k))
    top_cnt = np.zeros((d, k), np.int64)
    top_ids[un[keep], rank[keep]] = ut[keep]
    top_mass[un[keep], rank[keep]] = msum[keep]
    top_cnt[un[keep], rank[keep]] = csum[keep].round().astype(np.int64)
    return top_ids, top_mass, top_cnt


# ----------------------------------------------------------------------------------------
# Reading the results (no torch needed)


def finished_job(store, model: str) -> NeuronStatsJob | None:
    """The most recent finished neuron-statistics job of a model, or None."""
    rows = store.cursor().execute(
        "SELECT spec FROM jobs WHERE kind = ? AND model = ? AND finished IS NOT NULL ORDER BY finished DESC",
        [KIND, model]).fetchall()
    if not rows:
        return None
    s = json.loads(rows[0][0])
    return NeuronStatsJob(**{k: s[k] for k in ("model", "n_windows", "split", "length", "chunk", "corpus")})


def summary(store, job: NeuronStatsJob) -> dict:
    st = jobs.state(store, job.key())
    if st is None or not st.finished:
        return {"job_key": job.key(), "finished": False, "done": st.done if st else 0,
                "n_chunks": job.n_chunks}
    spec = job_spec(store, job)
    return {"job_key": job.key(), "finished": True, "job": asdict(job), "definition": DEFINITION,
            "thresholds": [round(t, 5) for t in spec["thresholds"]], **st.summary}


def check_site(n_layers: int, d_mlp: int, layer, neuron=None) -> None:
    """InvalidSite unless layer (and neuron, if given) exist."""
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise InvalidSite(f"Layer {layer!r} does not exist: the model has layers 0–{n_layers - 1}.")
    if neuron is not None and (not isinstance(neuron, int) or isinstance(neuron, bool) or not 0 <= neuron < d_mlp):
        raise InvalidSite(f"Neuron {neuron!r} does not exist: the MLPs have neurons 0–{d_mlp - 1}.")


def layer_summaries(store, job_key: str):
    """Per layer: dead, mean/median frequency, token detectors, positional (pyarrow table)."""
    return store.cursor().sql(
        "SELECT layer, count(*) AS neurons, sum(dead::INT) AS dead, avg(freq) AS mean_freq, "
        "median(freq) AS median_freq, sum(token_detector::INT) AS token_detectors, "
        "sum(is_positional::INT) AS n_positional, max(max) AS max_value FROM neuron_stats WHERE job_key = ? "
        "GROUP BY layer ORDER BY layer", params=[job_key]).to_arrow_table()


def layer_neurons(store, job_key: str, layer: int):
    """Every neuron of a layer with its statistics (pyarrow table, by neuron)."""
    return store.cursor().sql(
        "SELECT neuron, freq, dead, mean, std, max, top1_share, top5_share, top_tokens, pos_share, "
        "tok_share, token_detector, is_positional FROM neuron_stats WHERE job_key = ? AND layer = ? "
        "ORDER BY neuron", params=[job_key, layer]).to_arrow_table()


def neuron_stats(store, job_key: str, layer: int, neuron: int) -> dict | None:
    cur = store.cursor()
    t = cur.sql("SELECT * FROM neuron_stats WHERE job_key = ? AND layer = ? AND neuron = ?",
                params=[job_key, layer, neuron]).to_arrow_table()
    if t.num_rows == 0:
        return None
    row = {c: t[c][0].as_py() for c in t.column_names}
    top = cur.sql("SELECT rank, doc, pos, value FROM neuron_top WHERE job_key = ? AND layer = ? AND neuron = ? "
                  "ORDER BY rank", params=[job_key, layer, neuron]).to_arrow_table()
    row["top"] = top.to_pylist()
    h = cur.execute("SELECT counts FROM neuron_hist WHERE job_key = ? AND layer = ? AND neuron = ?",
                    [job_key, layer, neuron]).fetchall()
    row["hist"] = list(h[0][0]) if h else []
    return row


# ----------------------------------------------------------------------------------------
# Command line: python -m backend neuron-stats


def add_cli_args(p) -> None:
    from ..model import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help="corpus windows (evenly spaced)")
    p.add_argument("--length", type=int, default=128, help="tokens per window")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="windows per chunk (one forward)")
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many new chunks")
    p.add_argument("--layer", type=int, default=None, help="also print this layer's notable neurons")
    jobs.add_engine_args(p)


def run_cli(a) -> dict:
    from ..store import default_store

    job = NeuronStatsJob(model=a.model, n_windows=a.windows, split=a.split, length=a.length, chunk=a.chunk)
    t = time.perf_counter()
    out = run(job, progress=jobs.tqdm_progress("neuron-stats"), stop_after=a.stop_after, engine=a.engine)
    out["wall_seconds"] = round(time.perf_counter() - t, 2)
    if out.get("finished") and out.get("tokens") and out.get("seconds_last_run"):
        out["tokens_per_second"] = round(out["tokens"] / out["seconds_last_run"], 1)
    if a.layer is not None and out.get("finished"):
        store = default_store()
        info = store.get_model_info(a.model) or {"n_layers": 30, "d_mlp": 1536}
        check_site(info["n_layers"], info["d_mlp"], a.layer)
        t = layer_neurons(store, job.key(), a.layer).to_pylist()
        out["layer_neurons"] = {
            "layer": a.layer,
            "token_detectors": [{k: r[k] for k in ("neuron", "freq", "top1_share", "top_tokens")}
                                for r in t if r["token_detector"]][:20],
            "positional": [{k: r[k] for k in ("neuron", "freq", "pos_share", "tok_share")}
                           for r in t if r["is_positional"]][:20],
            "dead": [r["neuron"] for r in t if r["dead"]]}
    return out


# ----------------------------------------------------------------------------------------
# A neuron's top contexts with the activation at every token (for colouring), as a stored analysis

from ..runner import analysis  # noqa: E402
from ..spec import Result, Spec  # noqa: E402


@dataclass(frozen=True)
class NeuronContextsSpec(Spec):
    KIND = "neuron_contexts"
    job_key: str = ""
    layer: int = 0
    neuron: int = 0
    before: int = 24          # tokens shown before the max (within the job's window)
    after: int = 6

    def validate(self):
        if not isinstance(self.job_key, str) or not self.job_key.startswith(KIND + "-"):
            raise InvalidSpec(f"job_key must name a {KIND} job, got {self.job_key!r}.")
        for name in ("layer", "neuron"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InvalidSite(f"{name.capitalize()} must be an integer ≥ 0, got {v!r}.")
        for name in ("before", "after"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 128:
                raise InvalidSpec(f"{name} must be an integer in 0–128, got {v!r}.")


@dataclass(frozen=True)
class NeuronContextsResult(Result):
    contexts: list[dict]      # rank, doc, pos, value, first (absolute pos of tokens[0]), tokens, acts
    max_abs_diff: float       # |recomputed activation at the max − stored value|, over contexts


@analysis(NeuronContextsSpec, NeuronContextsResult)
def compute_contexts(spec: NeuronContextsSpec, model, progress=None, store=None) -> NeuronContextsResult:
    from .. import corpus
    from ..analyses.neurons import neuron_activations
    from ..store import default_store

    store = store or default_store()
    check_site(model.info.n_layers, model.info.d_mlp, spec.layer, spec.neuron)
    rows = store.cursor().execute("SELECT spec, finished IS NOT NULL FROM jobs WHERE job_key = ?",
                                  [spec.job_key]).fetchall()
    if not rows or not rows[0][1]:
        from .massive_corpus import JobNotRun
        raise JobNotRun(f"The neuron-statistics job {spec.job_key} has not finished.")
    job = json.loads(rows[0][0])
    top = neuron_stats(store, spec.job_key, spec.layer, spec.neuron)["top"]
    t = corpus.token_table(spec.model, name=job["corpus"])
    docs = dict(zip(t["doc_id"].to_pylist(), t["ids"].to_pylist()))
    out, diff = [], 0.0
    for k, c in enumerate(top):
        if progress:
            progress(f"context {k + 1}/{len(top)}")
        ids = docs[c["doc"]]
        start = c["pos"] // job["length"] * job["length"]
        end = min(c["pos"] + spec.after + 1, start + job["length"], len(ids))
        acts = neuron_activations(model, ids[start:end], spec.layer)[:, spec.neuron].numpy()
        diff = max(diff, abs(float(acts[c["pos"] - start]) - c["value"]))
        first = max(start, c["pos"] - spec.before)
        out.append({**c, "first": first, "tokens": model.str_tokens(ids[first:end]),
                    "acts": [round(float(a), 5) for a in acts[first - start:]]})
    return NeuronContextsResult(contexts=out, max_abs_diff=diff)
