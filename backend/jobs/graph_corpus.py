"""Attribution graphs over many prompts, as a corpus job: which prompts each transcoder feature
carries an answer in.

    python -m backend graph-corpus --model smollm2-135m --windows 16 --length 12 [--engine ray]

Each prompt is a held-out corpus window of `length` tokens (decoded to text), traced as the
`graph` analysis traces one prompt (backend/analyses/graph.py, its default logit targets and
the job's node / edge thresholds). A chunk's rows are, for every prompt of the chunk, the
graph itself — stored as the ordinary `graph` run of that prompt (runs and arrays rows, an
existing run is kept), so its Attribution graph page opens from the store — and one row per
feature node of the pruned graph in `graph_features` (layer, position, feature, activation,
influence). The feature dashboard of a transcoder feature reads that table: "graphs this
feature appears in", each a link to its graph.

Runs through the one corpus-job driver (jobs/driver.py): resumable chunk by chunk, here or on
Ray, the rows written with the chunk's done-mark in one transaction.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import pyarrow as pa

from .. import jobs
from ..errors import InvalidSpec
from .driver import Finished, WindowJob, drive

KIND = "graph_corpus"
VERSION = 1

SCHEMA = [
    """CREATE TABLE graph_features(job_key VARCHAR NOT NULL, run_key VARCHAR NOT NULL, prompt VARCHAR NOT NULL,
               transcoders VARCHAR NOT NULL, layer SMALLINT NOT NULL, pos SMALLINT NOT NULL,
               feature INTEGER NOT NULL, activation FLOAT, influence FLOAT)""",
]


@dataclass(frozen=True)
class GraphCorpusJob(WindowJob):
    """Graphs of n_windows held-out windows of `length` tokens, `chunk` prompts per chunk."""

    KIND = KIND
    VERSION = VERSION
    model: str
    n_windows: int = 16
    split: str = "heldout"
    length: int = 12
    chunk: int = 2
    corpus: str = "default"
    transcoders: str = ""            # pinned to "<set>@<fingerprint>" (the key follows the weights)
    node_threshold: float = 0.8
    edge_threshold: float = 0.98

    def __post_init__(self):
        super().__post_init__()
        from ..analyses.graph import MAX_GRAPH_TOKENS
        from ..transcoders import reference

        if not 2 <= self.length < MAX_GRAPH_TOKENS:
            raise InvalidSpec(f"length must lie in 2–{MAX_GRAPH_TOKENS - 1} tokens, not {self.length}.")
        for name in ("node_threshold", "edge_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise InvalidSpec(f"{name} must lie in (0, 1], not {v!r}.")
        object.__setattr__(self, "transcoders", reference(self.transcoders, self.model))

    def pick_windows(self):
        from .. import corpus

        return corpus.pick_windows(self.model, self.split, self.length, self.n_windows, order="seeded", seed=VERSION,
                                   full=True, name=self.corpus)

    def prompts(self, model) -> list[str]:
        """The windows as text (the tokenizer's special tokens dropped; graph_ids adds its own)."""
        return [model.tokenizer.decode(w[2], skip_special_tokens=True) for w in self.windows()]

    def spec_of(self, text: str):
        from ..analyses.graph import GraphSpec

        return GraphSpec(model=self.model, text=text, transcoders=self.transcoders,
                         node_threshold=self.node_threshold, edge_threshold=self.edge_threshold)

    def inputs(self, store, spec, model) -> dict:
        """The prompts whose graph is stored already (computed on a page): read, not traced."""
        m = model()
        return {"stored": [t for t in self.prompts(m) if store.has(self.spec_of(t).key())]}

    def work(self, spec, inputs, model, store=None):
        m = model()
        texts, key, stored = self.prompts(m), self.key(), set(inputs.get("stored", ()))
        return lambda c: self.chunk_rows(m, texts[c * self.chunk:(c + 1) * self.chunk], key, stored, store)

    def chunk_rows(self, model, texts: list[str], key: str, stored: set, store=None) -> dict[str, pa.Table]:
        from ..analyses.graph import GraphResult, compute
        from ..store import record_tables

        runs, arrays, feats = [], [], []
        for text in texts:
            gspec = self.spec_of(text)
            rk = gspec.key()
            if text in stored and store is not None:
                rec = store.get(rk)
                r = GraphResult.from_record(rec["meta"], rec["arrays"])
            else:
                t = time.perf_counter()
                r = compute(gspec, model)
                meta, arr = r.to_record()
                tabs = record_tables(rk, gspec.KIND, gspec.model, gspec.to_json(), meta, arr, time.perf_counter() - t)
                runs.append(tabs["runs"])
                arrays.append(tabs["arrays"])
            feats += [(rk, text, n["layer"], n["pos"], n["feature"], n["activation"], n["influence"])
                      for n in r.nodes if n["kind"] == "feature"]
        out = {"graph_features": pa.table({
            "job_key": pa.array([key] * len(feats)), "run_key": pa.array([f[0] for f in feats]),
            "prompt": pa.array([f[1] for f in feats]), "transcoders": pa.array([self.transcoders] * len(feats)),
            "layer": pa.array([f[2] for f in feats], pa.int16()), "pos": pa.array([f[3] for f in feats], pa.int16()),
            "feature": pa.array([f[4] for f in feats], pa.int32()),
            "activation": pa.array([f[5] for f in feats], pa.float32()),
            "influence": pa.array([f[6] for f in feats], pa.float32())})}
        if runs:
            out["runs"], out["arrays"] = pa.concat_tables(runs), pa.concat_tables(arrays)
        return out

    def finish(self, store, spec, run) -> Finished:
        n = store.cursor().execute("SELECT count(DISTINCT run_key), count(*) FROM graph_features WHERE job_key = ?",
                                   [self.key()]).fetchall()[0]
        return Finished({"graphs": int(n[0]), "feature_nodes": int(n[1]), "seconds_last_run": round(run.seconds, 2)})

    def result(self, store, run) -> dict:
        st = jobs.state(store, self.key())
        return {"job_key": self.key(), "finished": True, "job": asdict(self), **(st.summary or {})}


def run(job: GraphCorpusJob, store=None, progress=None, stop_after: int | None = None, engine: str = "local") -> dict:
    return drive(job, store, engine, progress, stop_after)


def graphs_with_feature(store, transcoder_set: str, layer: int, feature: int, limit: int = 20) -> list[dict]:
    """The stored graphs (of graph-corpus jobs) in which a transcoder feature is a node of the
    pruned graph, most influential first: prompt, run key, position, activation, influence."""
    try:
        rows = store.cursor().execute(
            "SELECT prompt, run_key, pos, activation, influence, transcoders FROM graph_features "
            "WHERE split_part(transcoders, '@', 1) = ? AND layer = ? AND feature = ? "
            "ORDER BY influence DESC, run_key, pos LIMIT ?", [transcoder_set, layer, feature, limit]).fetchall()
    except Exception:     # noqa: BLE001 - a store without the table has no such graphs
        return []
    return [{"prompt": r[0], "run_key": r[1], "pos": int(r[2]), "activation": float(r[3]),
             "influence": float(r[4]), "transcoders": r[5]} for r in rows]


def add_cli_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=16, help="prompts (held-out corpus windows)")
    p.add_argument("--length", type=int, default=12, help="tokens per prompt")
    p.add_argument("--chunk", type=int, default=2, help="prompts per chunk")
    p.add_argument("--transcoders", default="", help="a transcoder set (default: the model's shipped set)")
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many new chunks (resumable)")
    jobs.add_engine_args(p)


def run_cli(a) -> dict:
    job = GraphCorpusJob(a.model, a.windows, length=a.length, chunk=a.chunk, transcoders=a.transcoders,
                         node_threshold=a.node_threshold, edge_threshold=a.edge_threshold)
    return run(job, progress=jobs.tqdm_progress("graph-corpus"), stop_after=a.stop_after, engine=a.engine)


