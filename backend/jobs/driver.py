"""The one driver of corpus jobs: a job says WHAT (its key, its chunks, the rows of a chunk, how
it finishes, what it answers); `drive(job, store, engine)` does the rest the same way for every
job, on this process or on Ray:

    state in the store -> finished? answer from the store
    the spec stored with the job (made once by `prepare`: thresholds, settings)
    the run's inputs (made by `inputs` here, in the driver, when work is left)
    jobs.run_job over the chunks not yet done (local: `work` here; Ray: `work` rebuilt in each
    worker from the job's plain fields by `rebuild`, so no job names a worker factory)
    every chunk done -> `finish` (a summary, and SQL run in the finishing transaction)

A job whose chunks are files rather than rows (the SAE training's activation cache, one .npz per
chunk, in a work folder and no store) runs through `drive_files(job, engine)`: a chunk is done
when its file is there (`chunk_done`), and the same `work` runs here or rebuilt in Ray workers.

A job is a frozen dataclass of plain (picklable) fields subclassing `CorpusJob`. Its windows
come from the one picker, `corpus.pick_windows`. Adding a corpus job = a dataclass with `key`,
`n_chunks`, `work` and `finish` (and `prepare` / `inputs` / `result` when it needs them).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar

import pyarrow as pa

from . import Progress, check_windows, done_chunks, finish, run_job, state

Work = Callable[[int], dict[str, pa.Table]]


@dataclass
class Run:
    """What one call of drive() did: its seconds so far, the chunks it completed, its engine."""
    engine: str
    model: "ModelLoader"
    new_chunks: set[int] = field(default_factory=set)
    seconds: float = 0.0                    # until the last chunk (and until the end, in result())
    finish_seconds: float = 0.0
    inputs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Finished:
    """A job's finishing: the summary stored with it, and SQL run in the same transaction."""
    summary: dict[str, Any]
    sql: list[str] = field(default_factory=list)
    params: list[list] = field(default_factory=list)
    tables: dict[str, pa.Table] = field(default_factory=dict)   # registered by name for the SQL


class ModelLoader:
    """The job's model, loaded on first use (a Ray driver never needs it: its workers do)."""

    def __init__(self, model_id: str, model=None):
        self.model_id, self._model = model_id, model

    def __call__(self):
        if self._model is None:
            from ..model import load_model

            self._model = load_model(self.model_id)
        return self._model


class CorpusJob:
    """Base of a corpus job (subclasses are frozen dataclasses; `model` is a field)."""

    KIND: ClassVar[str] = "job"

    @property
    def kind(self) -> str:
        """The jobs table's kind (KIND; a job may name its variants)."""
        return self.KIND

    def key(self) -> str:
        raise NotImplementedError

    @property
    def n_chunks(self) -> int:
        raise NotImplementedError

    def fields(self) -> dict:
        """The plain fields a worker rebuilds the job from (cls(**fields))."""
        return asdict(self)

    def windows(self) -> list:
        """The job's corpus windows (`pick_windows`, through corpus.pick_windows), picked once per
        job object: the driver, `work` and `finish` all ask, and a pick reads the token table."""
        if "_windows" not in self.__dict__:
            self.__dict__["_windows"] = self.pick_windows()     # not a field: keys and equality ignore it
        return self.__dict__["_windows"]

    def pick_windows(self) -> list:
        raise NotImplementedError

    def prepare(self, store, model: ModelLoader, progress: Progress | None) -> dict:
        """The spec stored with the job at its first run (a later run reads it back)."""
        return self.fields()

    def inputs(self, store, spec: dict, model: ModelLoader) -> dict:
        """What this run's chunks need from the store, made here (plain values: they travel to workers)."""
        return {}

    def work(self, spec: dict, inputs: dict, model: ModelLoader, store=None) -> Work:
        """chunk -> {table: rows}. `store` is the driver's store locally, None in a worker."""
        raise NotImplementedError

    def finish(self, store, spec: dict, run: Run) -> Finished:
        raise NotImplementedError

    def result(self, store, run: Run | None) -> dict:
        """The answer: run None when the job was already finished before this call."""
        st = state(store, self.key())
        return {"job_key": self.key(), "finished": True, **(st.summary or {})}

    def partial(self, store, done: int, run: Run) -> dict:
        """The answer when chunks are left (stop_after, a stop)."""
        return {"job_key": self.key(), "finished": False, "done": done, "n_chunks": self.n_chunks}


@dataclass(frozen=True)
class WindowJob(CorpusJob):
    """Base of a corpus-job config over n_windows windows of `length` tokens of a corpus split,
    `chunk` windows per chunk. Subclasses add fields and set KIND and VERSION; the job key
    hashes them all, so a job with other settings is another job."""

    KIND: ClassVar[str] = "job"
    VERSION: ClassVar[int] = 1

    def __post_init__(self):
        if isinstance(getattr(self, "model", None), str):   # a local folder: its path and fingerprint
            from ..model.local import canonical_id

            object.__setattr__(self, "model", canonical_id(self.model))
        check_windows(self)

    def key(self) -> str:
        payload = json.dumps({"v": self.VERSION, **asdict(self)}, sort_keys=True)
        return f"{self.KIND}-" + hashlib.sha256(payload.encode()).hexdigest()[:20]

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_windows / self.chunk)

    def chunks(self) -> list[list]:
        """The job's windows (`windows()`, from corpus.pick_windows) cut into chunks."""
        wins = self.windows()
        return [wins[i:i + self.chunk] for i in range(0, len(wins), self.chunk)]



def stored_spec(store, job_key: str) -> dict | None:
    rows = store.cursor().execute("SELECT spec FROM jobs WHERE job_key = ?", [job_key]).fetchall()
    return json.loads(rows[0][0]) if rows else None


def rebuild(job_class: str, fields: dict, spec: dict, inputs: dict) -> Work:
    """A job's work function in another process (a Ray worker): the job made again from its
    plain fields, its model loaded there once."""
    module, name = job_class.split(":")
    job = getattr(importlib.import_module(module), name)(**fields)
    return job.work(spec, inputs, ModelLoader(job.model), None)


def remote(job: CorpusJob, spec: dict, inputs: dict):
    """How a worker rebuilds the job's work: jobs.Remote over `rebuild`."""
    from .chunks import Remote

    cls = type(job)
    return Remote(f"{__name__}:rebuild", (f"{cls.__module__}:{cls.__qualname__}", job.fields(), spec, inputs))


def drive(job: CorpusJob, store=None, engine: str = "local", progress: Progress | None = None,
          stop_after: int | None = None, model=None) -> dict:
    """Run (or resume, or just read) a corpus job; see the module's docstring."""
    from ..store import default_store

    store = store or default_store()
    key = job.key()
    st = state(store, key)
    if st is not None and st.finished:
        return job.result(store, None)
    loader = ModelLoader(job.model, model)
    if model is not None and model.info.model_id != job.model:
        from ..errors import InvalidSpec

        raise InvalidSpec(f"The job is for {job.model!r}, not {model.info.model_id!r}.")
    spec = stored_spec(store, key)
    if spec is None:
        spec = job.prepare(store, loader, progress)
    run = Run(engine, loader)
    before = done_chunks(store, key)
    t0 = time.perf_counter()
    inputs = run.inputs = job.inputs(store, spec, loader) if len(before) < job.n_chunks else {}
    work = job.work(spec, inputs, loader, store) if engine == "local" else None
    st = run_job(store, key, job.kind, job.model, spec, job.n_chunks, work, progress=progress,
                 stop_after=stop_after, engine=engine, remote=remote(job, spec, inputs))
    run.new_chunks = done_chunks(store, key) - before
    run.seconds = time.perf_counter() - t0
    if st.done < st.n_chunks:
        return job.partial(store, st.done, run)
    t1 = time.perf_counter()
    fin = job.finish(store, spec, run)
    cur = store.cursor()
    for name, table in fin.tables.items():
        cur.register(name, table)
    try:
        finish(store, key, fin.summary, sql=fin.sql, params=fin.params)
    finally:
        for name in fin.tables:
            cur.unregister(name)
    run.finish_seconds = time.perf_counter() - t1
    run.seconds = time.perf_counter() - t0
    return job.result(store, run)


def drive_files(job: CorpusJob, engine: str = "local", on_chunk: Callable[[int, Any], None] | None = None,
                model=None) -> list[int]:
    """Run the chunks of a file-sink job (`job.chunk_done(c)` false) here or on Ray, calling
    on_chunk(chunk, work's return) as each lands; the work writes its own file, atomically
    (temporary name, then rename), so a stopped or killed chunk leaves none. Returns the chunks
    run now. Stops between chunks on jobs.STOP, as drive() does."""
    from . import ENGINES, STOP, JobStopped

    if engine not in ENGINES:
        from ..errors import InvalidSpec

        raise InvalidSpec(f"Unknown engine {engine!r}; use one of {', '.join(ENGINES)}.")
    todo = [c for c in range(job.n_chunks) if not job.chunk_done(c)]
    if not todo:
        return []
    loader = ModelLoader(job.model, model)
    spec = job.prepare(None, loader, None)
    done = on_chunk or (lambda c, r: None)
    if engine == "ray":
        from .ray_engine import Stopped, map_chunks

        try:
            map_chunks(remote(job, spec, {}), todo, done, stop=STOP)
        except Stopped as e:
            raise JobStopped(f"{job.kind} {e}") from None
        return todo
    work = job.work(spec, {}, loader, None)
    for c in todo:
        if STOP.is_set():
            raise JobStopped(f"{job.kind} stopped at chunk {c + 1}/{job.n_chunks} (the process is stopping); "
                             "it resumes there.")
        done(c, work(c))
    return todo
