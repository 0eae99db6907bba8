"""Massive activations over a corpus (Sun et al. 2024), and the paper's ablation on held-out text.

MassiveCorpusJob: a resumable job (backend/jobs/__init__.py) over N full-length corpus windows,
evenly spaced over the split. Each chunk runs kernels.massive.scan (one forward, every
layer's hook_resid_post reduced on the fly, no activation cache) and writes per chunk:

  massive_part        (layer, dim, kind) → n entries, sequences having one, Σv, Σv², min, max;
                      kind is the token the entry sits on: 'first' (window position 0), '.', ',',
                      '\\n' (a token of only newlines), 'other', and 'all' (every kind)
  massive_layer_part  per layer: sequences, sequences with any massive entry, Σ median |value|,
                      Σ and max of the top |value|, the largest top/median ratio, tokens

A massive entry: |value| ≥ abs_threshold and ≥ ratio_threshold × the median |value| of that
sequence's layer (the paper's 100 and 1000 by default). Aggregates are summed in SQL at read
time (`layers`, `dims`): which dims carry them, where they appear (first layer where at least
half the sequences have one) and vanish, on which token kinds, how constant (mean, std).

MassiveCorpusAblationSpec → MassiveCorpusAblationResult (a runner analysis, stored): on
held-out windows, at the layer where they appear, every massive entry of each window is set
to zero, and separately to the corpus mean of its (layer, dim) from the job; the next-token
loss and perplexity are reported next to the original. One forward per pair of windows, with
the original, zeroed and mean-set copies in one batch; the entries are found on the original
copy at that layer with the job's criterion.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from .. import jobs
from .driver import Finished, WindowJob, drive

# This job's tables (store migration 3): per-chunk partial rows, then the merged tables.
SCHEMA = [
    """CREATE TABLE massive_part(job_key VARCHAR NOT NULL, chunk INTEGER NOT NULL, layer SMALLINT NOT NULL,
               dim SMALLINT NOT NULL, kind VARCHAR NOT NULL, n BIGINT, n_seqs INTEGER, sum DOUBLE,
               sumsq DOUBLE, vmin FLOAT, vmax FLOAT)""",
    """CREATE TABLE massive_layer_part(job_key VARCHAR NOT NULL, chunk INTEGER NOT NULL,
               layer SMALLINT NOT NULL, n_seqs INTEGER, seqs_with INTEGER, median_sum DOUBLE,
               top_sum DOUBLE, top_max FLOAT, ratio_max DOUBLE, n_tokens BIGINT)""",
]
from ..errors import DashboardError, InvalidSpec, NoMassiveActivations
from ..runner import analysis
from ..sites import Component, Site, hook_name
from ..spec import Result, Spec

KIND = "massive_corpus"
VERSION = 1
KINDS = ("first", ".", ",", "\\n", "other")
APPEAR_SHARE = 0.5     # a layer "has" massive activations when ≥ half the sequences do


class JobNotRun(DashboardError):
    """A view needs a corpus job that has not been run (or finished) yet."""

    code = "job_not_run"


@dataclass(frozen=True)
class MassiveCorpusJob(WindowJob):
    KIND = KIND
    VERSION = VERSION
    model: str
    n_windows: int = 256
    split: str = "train"
    length: int = 128
    chunk: int = 8
    abs_threshold: float = 100.0
    ratio_threshold: float = 1000.0
    corpus: str = "default"

    def __post_init__(self):
        super().__post_init__()
        for name in ("abs_threshold", "ratio_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or not math.isfinite(v):
                raise InvalidSpec(f"{name} must be a positive number, got {v!r}.")

    def pick_windows(self):
        return full_windows(self.model, self.split, self.length, self.n_windows, self.corpus)

    def work(self, spec, inputs, model, store=None):
        chunks, m, key = self.chunks(), model(), self.key()
        return lambda c: chunk_rows(m, chunks[c], self, key, c)

    def finish(self, store, spec, run) -> Finished:
        return Finished({"seconds_last_run": round(run.seconds, 2), "windows": self.n_windows,
                         "tokens": self.n_windows * self.length})

    def result(self, store, run) -> dict:
        return summary(store, self)


def full_windows(model_id: str, split: str, length: int, n: int, corpus: str = "default"):
    """n windows of exactly `length` tokens, evenly spaced over the split (equal lengths: the
    scan batches without padding)."""
    from .. import corpus as corpus_mod

    return corpus_mod.pick_windows(model_id, split, length, n, full=True, name=corpus)


def token_kind(text: str, pos: int) -> str:
    if pos == 0:
        return "first"
    s = text.strip(" ")
    if s in (".", ","):
        return s
    if text and set(text) <= {"\n"}:
        return "\\n"
    return "other"


def chunk_rows(model, wins, job: MassiveCorpusJob, job_key: str, chunk: int) -> dict[str, pa.Table]:
    from kernels.massive import scan

    ids = np.array([w[2] for w in wins], dtype=np.int64)                 # [B P]
    s, _ = scan(model, _tensor(ids), top_k=1, n_dims=1,
                abs_threshold=job.abs_threshold, ratio_threshold=job.ratio_threshold)
    m = s.massive                                                         # [M 4] b, layer, pos, dim
    vals = s.massive_values.astype(np.float64)
    decoded = {}
    kinds = []
    for b, _, p, _ in m:
        tid = int(ids[b, p])
        if tid not in decoded:
            decoded[tid] = model.tokenizer.decode([tid])
        kinds.append(token_kind(decoded[tid], int(p)))
    kinds = np.array(kinds, dtype=object)
    rows = []
    for kind in KINDS + ("all",):
        sel = np.ones(len(m), bool) if kind == "all" else kinds == kind
        if not sel.any():
            continue
        mk, vk = m[sel], vals[sel]
        for (layer, dim) in sorted({(int(a), int(c)) for a, c in mk[:, [1, 3]]}):
            e = (mk[:, 1] == layer) & (mk[:, 3] == dim)
            v = vk[e]
            rows.append((layer, dim, kind, int(e.sum()), len(set(mk[e, 0].tolist())), float(v.sum()),
                         float((v ** 2).sum()), float(v.min()), float(v.max())))
    n_layers = s.median.shape[1]
    top = np.abs(s.top_values[:, :, 0]).astype(np.float64)                # [B L]
    med = s.median.astype(np.float64)
    ratio = top / np.maximum(med, 1e-30)
    with_any = np.zeros((len(wins), n_layers), bool)
    with_any[m[:, 0], m[:, 1]] = True
    cols = list(zip(*rows)) if rows else [[]] * 9
    part = pa.table({
        "job_key": pa.array([job_key] * len(rows), pa.string()), "chunk": pa.array([chunk] * len(rows), pa.int32()),
        "layer": pa.array(cols[0], pa.int16()), "dim": pa.array(cols[1], pa.int16()),
        "kind": pa.array(cols[2], pa.string()), "n": pa.array(cols[3], pa.int64()),
        "n_seqs": pa.array(cols[4], pa.int32()), "sum": pa.array(cols[5], pa.float64()),
        "sumsq": pa.array(cols[6], pa.float64()), "vmin": pa.array(cols[7], pa.float32()),
        "vmax": pa.array(cols[8], pa.float32())})
    layer_part = pa.table({
        "job_key": pa.array([job_key] * n_layers), "chunk": pa.array([chunk] * n_layers, pa.int32()),
        "layer": pa.array(np.arange(n_layers, dtype=np.int16)),
        "n_seqs": pa.array(np.full(n_layers, len(wins), np.int32)),
        "seqs_with": pa.array(with_any.sum(0).astype(np.int32)),
        "median_sum": pa.array(med.sum(0)), "top_sum": pa.array(top.sum(0)),
        "top_max": pa.array(top.max(0).astype(np.float32)), "ratio_max": pa.array(ratio.max(0)),
        "n_tokens": pa.array(np.full(n_layers, ids.size, np.int64))})
    return {"massive_part": part, "massive_layer_part": layer_part}


def _tensor(ids: np.ndarray):
    import torch

    return torch.as_tensor(ids, dtype=torch.long)


def run(job: MassiveCorpusJob, store=None, progress=None, stop_after: int | None = None, model=None,
        engine: str = "local") -> dict:
    return drive(job, store, engine, progress, stop_after, model)


# ----------------------------------------------------------------------------------------
# Reading (SQL over the chunks' rows; no torch)


def layers(store, job_key: str) -> list[dict]:
    """Per layer: share of sequences with a massive entry, mean median |value|, mean and max
    top |value|, largest top/median ratio."""
    rows = store.cursor().execute(
        "SELECT layer, sum(n_seqs), sum(seqs_with), sum(median_sum) / sum(n_seqs), sum(top_sum) / sum(n_seqs), "
        "max(top_max), max(ratio_max) FROM massive_layer_part WHERE job_key = ? GROUP BY layer ORDER BY layer",
        [job_key]).fetchall()
    return [{"layer": r[0], "sequences": int(r[1]), "share_with_massive": r[2] / r[1], "mean_median": r[3],
             "mean_top": r[4], "max_top": float(r[5]), "max_ratio": r[6]} for r in rows]


def dims(store, job_key: str, kind: str = "all") -> list[dict]:
    """Per (layer, dim): entries, share of sequences, mean, std, min, max of the massive values."""
    n = store.cursor().execute("SELECT max(s) FROM (SELECT sum(n_seqs) s FROM massive_layer_part "
                               "WHERE job_key = ? GROUP BY layer)", [job_key]).fetchall()[0][0] or 1
    rows = store.cursor().execute(
        "SELECT layer, dim, sum(n), sum(n_seqs), sum(sum) / sum(n), "
        "sqrt(greatest(sum(sumsq) / sum(n) - pow(sum(sum) / sum(n), 2), 0)), min(vmin), max(vmax) "
        "FROM massive_part WHERE job_key = ? AND kind = ? GROUP BY layer, dim ORDER BY layer, dim",
        [job_key, kind]).fetchall()
    return [{"layer": r[0], "dim": r[1], "n": int(r[2]), "share_sequences": r[3] / n, "mean": r[4], "std": r[5],
             "min": float(r[6]), "max": float(r[7])} for r in rows]


def kinds(store, job_key: str) -> list[dict]:
    """Entries per (dim, token kind), over all layers, with the share of that dim's entries."""
    rows = store.cursor().execute(
        "SELECT dim, kind, sum(n) FROM massive_part WHERE job_key = ? AND kind <> 'all' GROUP BY dim, kind "
        "ORDER BY dim, kind", [job_key]).fetchall()
    tot: dict[int, int] = {}
    for d, _, c in rows:
        tot[d] = tot.get(d, 0) + int(c)
    return [{"dim": d, "kind": k, "n": int(c), "share": int(c) / tot[d]} for d, k, c in rows]


def summary(store, job: MassiveCorpusJob) -> dict:
    key = job.key()
    st = jobs.state(store, key)
    if st is None or not st.finished:
        return {"job_key": key, "finished": False, "done": st.done if st else 0, "n_chunks": job.n_chunks}
    ls = layers(store, key)
    ds = dims(store, key)
    present = [r["layer"] for r in ls if r["share_with_massive"] >= APPEAR_SHARE]
    by_dim: dict[int, dict] = {}
    for r in ds:
        if r["share_sequences"] >= APPEAR_SHARE:
            e = by_dim.setdefault(r["dim"], {"dim": r["dim"], "layers": [], "mean": [], "std": []})
            e["layers"].append(r["layer"])
            e["mean"].append(r["mean"])
            e["std"].append(r["std"])
    dims_out = [{"dim": d, "appears": min(e["layers"]), "last": max(e["layers"]), "n_layers": len(e["layers"]),
                 "mean_value": float(np.mean(e["mean"])), "mean_std": float(np.mean(e["std"]))}
                for d, e in sorted(by_dim.items())]
    return {"job_key": key, "finished": True, "job": asdict(job), **(st.summary or {}),
            "appears": min(present) if present else None, "vanishes_after": max(present) if present else None,
            "dims": dims_out, "kinds": kinds(store, key),
            "layers": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in ls]}


def finished_job(store, model: str) -> MassiveCorpusJob | None:
    rows = store.cursor().execute(
        "SELECT spec FROM jobs WHERE kind = ? AND model = ? AND finished IS NOT NULL ORDER BY finished DESC",
        [KIND, model]).fetchall()
    return MassiveCorpusJob(**json.loads(rows[0][0])) if rows else None


# ----------------------------------------------------------------------------------------
# The ablation on held-out text, with corpus means


@dataclass(frozen=True)
class MassiveCorpusAblationSpec(Spec):
    KIND = "massive_corpus_ablation"
    job_key: str = ""              # the MassiveCorpusJob whose means and criterion are used
    n_heldout: int = 32            # held-out windows of the job's length
    layer: int | None = None       # None: the first layer where ≥ half the job's sequences have one

    def validate(self):
        if not isinstance(self.job_key, str) or not self.job_key.startswith(KIND + "-"):
            raise InvalidSpec(f"job_key must name a {KIND} job, got {self.job_key!r}.")
        if not isinstance(self.n_heldout, int) or isinstance(self.n_heldout, bool) or not 1 <= self.n_heldout <= 1024:
            raise InvalidSpec(f"n_heldout must be an integer in 1–1024, got {self.n_heldout!r}.")
        if self.layer is not None and (not isinstance(self.layer, int) or isinstance(self.layer, bool)
                                       or self.layer < 0):
            raise InvalidSpec(f"layer must be an integer ≥ 0 or empty, got {self.layer!r}.")


@dataclass(frozen=True)
class MassiveCorpusAblationResult(Result):
    layer: int
    layer_chosen: str
    dims: list[dict]              # dim, corpus mean, std, entries at that layer in the job
    n_windows: int
    n_tokens: int                 # predicted tokens
    n_entries: int                # massive entries set on the held-out windows
    n_without_mean: int           # entries in a dim without a corpus mean (left unchanged in "mean")
    loss_original: float
    loss_zero: float
    loss_mean: float
    ppl_original: float
    ppl_zero: float
    ppl_mean: float
    window_losses: np.ndarray     # [n 3] float64: original, zero, mean


def _nll(logits, ids):
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)                 # [B P-1 V]
    return -logp.gather(2, ids[:, 1:, None]).squeeze(2).sum(1).double()     # [B]


@analysis(MassiveCorpusAblationSpec, MassiveCorpusAblationResult)
def compute_ablation(spec: MassiveCorpusAblationSpec, model, progress=None, store=None) -> MassiveCorpusAblationResult:
    import torch

    from ..store import default_store

    store = store or default_store()
    rows = store.cursor().execute("SELECT spec, finished IS NOT NULL FROM jobs WHERE job_key = ?",
                                  [spec.job_key]).fetchall()
    if not rows or not rows[0][1]:
        raise JobNotRun(f"The corpus job {spec.job_key} has not been run to the end: run "
                        "`python -m backend massive-corpus` (or the page's button) first.")
    job = MassiveCorpusJob(**json.loads(rows[0][0]))
    if job.model != spec.model:
        raise InvalidSpec(f"The job {spec.job_key} is for {job.model!r}, not {spec.model!r}.")
    n_layers = model.info.n_layers
    ls = layers(store, spec.job_key)
    if spec.layer is None:
        present = [r["layer"] for r in ls if r["share_with_massive"] >= APPEAR_SHARE]
        if not present:
            raise NoMassiveActivations("No layer has massive activations in at least half the corpus sequences "
                                       "under the job's criterion: lower its thresholds.")
        layer, chosen = min(present), "first layer where ≥ half the corpus sequences have one"
    else:
        Site(Component.RESID_POST, spec.layer).check(n_layers, model.info.n_heads)
        layer, chosen = spec.layer, "given"
    ds = [r for r in dims(store, spec.job_key) if r["layer"] == layer]
    mean_of = {r["dim"]: r["mean"] for r in ds}
    wins = full_windows(job.model, "heldout", job.length, spec.n_heldout, job.corpus)
    site = hook_name(Site(Component.RESID_POST, layer))
    out, counts = [], [0, 0]
    for i in range(0, len(wins), 2):
        if progress:
            progress(f"ablation: windows {i + 1}–{min(i + 2, len(wins))} of {len(wins)}")
        ids = torch.as_tensor([w[2] for w in wins[i:i + 2]], dtype=torch.long)    # [b P]
        b = ids.shape[0]
        fired = []

        def ablate(x, hook, b=b):   # x: [3b P D]: original, zeroed, mean-set copies
            x = x.clone()
            a = x[:b].abs().float()
            med = a.reshape(b, -1).median(dim=1).values                               # [b]
            thr = torch.clamp(med * job.ratio_threshold, min=job.abs_threshold)
            mask = a >= thr[:, None, None]                                             # [b P D]
            x[b:2 * b][mask] = 0.0
            idx = mask.nonzero()
            fill = x[:b][mask].clone()
            known = torch.tensor([int(d) in mean_of for d in idx[:, 2]], dtype=torch.bool)
            if len(idx):
                fill[known] = torch.tensor([mean_of[int(d)] for d in idx[known, 2]], dtype=x.dtype)
            x[2 * b:][mask] = fill
            counts[0] += int(mask.sum())
            counts[1] += int((~known).sum())
            fired.append(True)
            return x

        with model.lock, torch.inference_mode():
            logits = model.run_with_hooks(ids.repeat(3, 1), fwd_hooks=[(site, ablate)], return_type="logits")
        if not fired:
            raise RuntimeError(f"the ablation hook at {site} did not fire")
        nll = _nll(logits, ids.repeat(3, 1)).reshape(3, b).T                        # [b 3]
        out.append(nll.numpy())
    nll = np.concatenate(out)                                                       # [n 3] sums
    per = job.length - 1
    loss = nll.sum(0) / (per * len(wins))
    safe = lambda v: math.exp(v) if v < 700 else float("inf")  # noqa: E731
    return MassiveCorpusAblationResult(
        layer=layer, layer_chosen=chosen,
        dims=[{"dim": r["dim"], "mean": r["mean"], "std": r["std"], "n": r["n"]} for r in ds],
        n_windows=len(wins), n_tokens=per * len(wins), n_entries=counts[0], n_without_mean=counts[1],
        loss_original=float(loss[0]), loss_zero=float(loss[1]), loss_mean=float(loss[2]),
        ppl_original=safe(loss[0]), ppl_zero=safe(loss[1]), ppl_mean=safe(loss[2]),
        window_losses=(nll / per).astype(np.float64))


# ----------------------------------------------------------------------------------------
# Command line: python -m backend massive-corpus


def add_cli_args(p) -> None:
    from ..model import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--windows", type=int, default=256, help="train windows scanned (full length, evenly spaced)")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--abs-threshold", type=float, default=100.0)
    p.add_argument("--ratio-threshold", type=float, default=1000.0)
    p.add_argument("--heldout", type=int, default=32, help="held-out windows for the ablation (0: skip it)")
    p.add_argument("--layer", type=int, default=None, help="ablation layer (default: where they appear)")
    p.add_argument("--stop-after", type=int, default=None)
    jobs.add_engine_args(p)


def run_cli(a) -> dict:
    from ..runner import run as run_spec

    job = MassiveCorpusJob(model=a.model, n_windows=a.windows, length=a.length, chunk=a.chunk,
                           abs_threshold=a.abs_threshold, ratio_threshold=a.ratio_threshold)
    t = time.perf_counter()
    out = run(job, progress=jobs.tqdm_progress("massive-corpus"), stop_after=a.stop_after, engine=a.engine)
    out["wall_seconds"] = round(time.perf_counter() - t, 2)
    if out.get("finished") and a.heldout:
        ab = run_spec(MassiveCorpusAblationSpec(model=a.model, job_key=job.key(), n_heldout=a.heldout,
                                                layer=a.layer))
        r = ab.result
        out["ablation"] = {"run_key": ab.run_key, "from_store": ab.from_store,
                           "compute_seconds": round(ab.compute_seconds, 2), "layer": r.layer,
                           "layer_chosen": r.layer_chosen, "dims": r.dims, "n_windows": r.n_windows,
                           "n_tokens": r.n_tokens, "n_entries": r.n_entries, "n_without_mean": r.n_without_mean,
                           "loss": {"original": r.loss_original, "zero": r.loss_zero, "mean": r.loss_mean},
                           "perplexity": {"original": r.ppl_original, "zero": r.ppl_zero, "mean": r.ppl_mean}}
    return out
