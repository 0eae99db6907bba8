"""Dashboards full on first start: the corpus jobs run in the background of the dashboard.

Every time the dashboard starts it calls `ensure_started()`, which looks at the store for each
step of the plan below (for the model's shipped SAEs and the default corpus) and runs the steps
whose result is missing, in plan order, in a daemon thread of the dashboard process; a step
that was interrupted resumes at its first chunk not written (every step is a resumable job). A
finished store starts nothing. The plan:

  1. feature-index --sae all --windows FIRST   (a small slice: the feature dashboards and the
                                                map colours appear within minutes)
  1b. feature-index --sae <transcoder set> --windows 32   (every shipped transcoder set of the
                                                model: its features' dashboards; 30 layers x 2048
                                                features make ~1 k rows per token, hence fewer windows)
  2. neuron-stats --windows FIRST              (the neuron pages' statistics)
  3. feature-scores --parts vocab,output,input (labels, VocabProj, input and output scores: minutes)
  3b. feature-scores --sae <transcoder set> --parts vocab   (the transcoder features' labels)
  4. feature-index --sae all --windows FULL    (replaces the small index when it lands)
  5. feature-scores --parts input,token_change (TokenChange of every feature: the long part, about
                                                an hour for the four shipped SAEs with bfloat16
                                                matmuls (AMX), several in float32)

Why a thread, not a subprocess: DuckDB lets one process open a file for writing, and the
dashboard process holds the store, so a CLI subprocess gets StoreLocked. In the same process
the jobs write through the dashboard's own Store (one connection, a cursor per thread, each
chunk one transaction), pages read the chunks as they land, and the LoadedModel lock takes
turns between a job's forwards and a page's. The jobs are the CLI's own: each step parses
that subcommand's arguments with its registered parser and calls its run function, so the
background build is exactly `python -m backend <step>`.

Progress is read from the store's `jobs` / `job_chunks` tables (every corpus job uses them),
so the page shows chunk-level progress of any step without the step knowing about it.

A clean stop: when the process exits (Ctrl-C or SIGTERM to the dashboard), an exit hook sets
jobs.STOP, so the running job stops before its next chunk (the chunk being written is one
transaction: whole or not at all), and waits for the thread up to STOP_WAIT seconds; a thread
still inside a forward then is left by ending the process at once (os._exit), never by
finalising the interpreter under a native thread (that aborted: "terminate called without an
active exception").

Settings: DASHBOARD_BOOTSTRAP=0 turns it off (unset: on, except under pytest); DASHBOARD_BOOTSTRAP_FIRST (default 128) and
DASHBOARD_BOOTSTRAP_WINDOWS (default 1024; 0 skips step 4) and DASHBOARD_BOOTSTRAP_TRANSCODER_WINDOWS
(default 32; 0 skips steps 1b and 3b) set the window counts.
This module imports neither torch nor streamlit at import time.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable


STOP_WAIT = 8.0   # seconds the exit hook waits for the running chunk


@dataclass
class Step:
    name: str                 # CLI subcommand
    args: list[str]
    label: str
    status: str = "pending"   # pending | running | done | skipped | failed
    message: str = ""
    seconds: float = 0.0
    done: Callable[[object], bool] | None = field(default=None, repr=False)   # done(store): its result is stored


@dataclass
class Bootstrap:
    steps: list[Step]
    started: float = field(default_factory=time.time)
    finished: float | None = None
    thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.finished is None

    @property
    def completed(self) -> int:
        return sum(s.status in ("done", "skipped", "failed") for s in self.steps)


_lock = threading.Lock()
_current: Bootstrap | None = None
_checked = False          # the store was looked at once in this process


def enabled() -> bool:
    """DASHBOARD_BOOTSTRAP=1/0 decides; unset, on except under pytest (the tests' dashboards
    start on empty stores and must not start corpus jobs unless a test asks for it)."""
    v = os.environ.get("DASHBOARD_BOOTSTRAP")
    if v is None:
        return "PYTEST_CURRENT_TEST" not in os.environ
    return v not in ("0", "false", "no", "")


def plan(model: str | None = None) -> list[Step]:
    from .model import DEFAULT_MODEL

    first = int(os.environ.get("DASHBOARD_BOOTSTRAP_FIRST", "128"))
    full = int(os.environ.get("DASHBOARD_BOOTSTRAP_WINDOWS", "1024"))
    mid = model or DEFAULT_MODEL
    m = ["--model", model] if model else []
    tc_windows = int(os.environ.get("DASHBOARD_BOOTSTRAP_TRANSCODER_WINDOWS", "32"))
    tc_sets = _transcoder_sets(mid) if tc_windows > 0 else []
    steps = [Step("feature-index", [*m, "--sae", "all", "--windows", str(first)],
                  f"feature index ({first} windows)", done=lambda st: _indexed(st, mid, first))]
    steps += [Step("feature-index", [*m, "--sae", set_id, "--windows", str(tc_windows)],
                   f"transcoder feature index ({set_id}, {tc_windows} windows)",
                   done=lambda st, set_id=set_id: _indexed(st, mid, tc_windows, _layers_of(set_id)))
              for set_id in tc_sets]
    steps += [Step("neuron-stats", [*m, "--windows", str(first)], f"neuron statistics ({first} windows)",
                  done=lambda st: _neuron_stats(st, mid, first)),
             Step("feature-scores", [*m, "--sae", "all", "--parts", "vocab,output,input"],
                  "feature labels, VocabProj, input and output scores",
                  done=lambda st: _scored(st, mid, ("n_vocab", "n_output", "n_input")))]
    steps += [Step("feature-scores", [*m, "--sae", set_id, "--parts", "vocab"],
                   f"transcoder feature labels and VocabProj ({set_id})",
                   done=lambda st, set_id=set_id: _scored(st, mid, ("n_vocab",), _layers_of(set_id)))
              for set_id in tc_sets]
    if full > first:
        steps.append(Step("feature-index", [*m, "--sae", "all", "--windows", str(full)],
                          f"feature index ({full} windows)", done=lambda st: _indexed(st, mid, full)))
    # TokenChange last: the long part (its strengths come from the index, so after the full one),
    # with the input scores of the full index
    steps.append(Step("feature-scores", [*m, "--sae", "all", "--parts", "input,token_change"],
                      "feature TokenChange (every feature)",
                      done=lambda st: _scored(st, mid, ("n_input", "n_token_change"))))
    return steps


# -- is a step's result in the store? (cheap reads; a reader that fails counts as "not yet") --
def _shipped_saes(model: str) -> list[str]:
    from .saes import list_saes

    return [s["sae_id"] for s in list_saes(model)]


def _transcoder_sets(model: str) -> list[str]:
    from .transcoders import list_sets

    return [t["id"] for t in list_sets(model)]


def _layers_of(set_id: str) -> list[str]:
    from .saes import transcoder_features

    return transcoder_features(set_id)


def _indexed(store, model: str, windows: int, saes: list[str] | None = None) -> bool:
    from .jobs.features.index import current_index

    for sae in (_shipped_saes(model) if saes is None else saes):
        ix = current_index(store, sae)
        if ix is None or ix["stale"] or int(ix["n_windows"]) < windows:
            return False
    return True


def _neuron_stats(store, model: str, windows: int) -> bool:
    from .jobs.neuron_stats import finished_job

    job = finished_job(store, model)
    return job is not None and job.n_windows >= windows


def _scored(store, model: str, counts: tuple[str, ...], saes: list[str] | None = None) -> bool:
    from .jobs.features.index import current_index, sae_key
    from .jobs.features.scores import ensure_tables, score_table
    from .saes import sae_info

    ensure_tables(store)
    for sae in (_shipped_saes(model) if saes is None else saes):
        n = int(sae_info(sae)["d_sae"])
        t = score_table(store, sae)
        if "n_token_change" in counts:
            ix = current_index(store, sae)
            if ix is None:
                return False
            tc = store.cursor().execute("SELECT count(DISTINCT feature) FROM feature_token_change WHERE sae_key = ? "
                                        "AND ix = ?", [sae_key(sae), ix["ix"]]).fetchall()[0][0]
            t = {**t, "n_token_change": tc}
        if any(int(t[c]) < n for c in counts):
            return False
    return True


def pending_steps(store, model: str | None = None) -> list[Step]:
    """The plan's steps whose result is not in the store, in plan order."""
    out = []
    for step in plan(model):
        try:
            done = step.done is not None and step.done(store)
        except Exception:    # noqa: BLE001 - an unreadable result is a missing one
            done = False
        if not done:
            out.append(step)
    return out


def store_is_empty(store) -> bool:
    """No built feature index and no finished neuron statistics in the store."""
    cur = store.cursor()
    built = cur.execute("SELECT count(*) FROM feature_indexes WHERE built IS NOT NULL").fetchall()[0][0]
    stats = cur.execute("SELECT count(*) FROM jobs WHERE kind = 'neuron_stats' AND finished IS NOT NULL"
                        ).fetchall()[0][0]
    return built == 0 and stats == 0


def run_step(step: Step) -> None:
    """Run one CLI subcommand in this process, as `python -m backend <name> <args>` would
    (cli.execute, the same entry the store server uses for forwarded calls)."""
    from .cli import SUBCOMMANDS, execute

    if step.name not in SUBCOMMANDS:
        step.status, step.message = "skipped", f"`{step.name}` is not a subcommand of this version"
        return
    t = time.perf_counter()
    step.status = "running"
    code, out = execute([step.name, *step.args, "--format", "json"])
    step.seconds = round(time.perf_counter() - t, 1)
    if code != 0:
        step.status, step.message = "failed", out.get("error", {}).get("message", "failed")
        return
    step.status = "done"
    if isinstance(out, dict):
        step.message = ", ".join(f"{k}={out[k]}" for k in ("n_windows", "tokens", "tok_per_s", "rows")
                                 if k in out)


def _run_all(b: Bootstrap) -> None:
    from .model.loading import import_stack

    import_stack()   # before any page of this process can import the same stack (see there)
    from .jobs import STOP

    for step in b.steps:
        if STOP.is_set():
            break
        try:
            run_step(step)
        except Exception as e:     # noqa: BLE001 - one failing step must not stop the others
            step.status, step.message = "failed", f"{type(e).__name__}: {e}"
            traceback.print_exc()
    b.finished = time.time()


def ensure_started(store=None, model: str | None = None, force: bool = False) -> Bootstrap | None:
    """Start the background build once per process with the plan's steps whose result is not
    stored (all of them with `force`); returns the running (or finished) build, or None when
    nothing was needed."""
    global _current, _checked
    with _lock:
        if _current is not None or (_checked and not force):
            return _current
        _checked = True
        if not enabled() and not force:
            return None
        if store is None:
            from .store import default_store
            store = default_store()
        steps = plan(model) if force else pending_steps(store, model)
        if not steps:
            return None
        b = Bootstrap(steps)
        b.thread = threading.Thread(target=_run_all, args=(b,), name="dashboard-bootstrap", daemon=True)
        _current = b
        atexit.register(_stop_at_exit, b)
        b.thread.start()
        return b


def _stop_at_exit(b: Bootstrap) -> None:
    """The exit hook (see the module's docstring): stop the build between chunks, or end now."""
    from .jobs import STOP

    if b.thread is None or not b.thread.is_alive():
        return
    STOP.set()
    b.thread.join(STOP_WAIT)
    if b.thread.is_alive():     # inside a forward: the unwritten chunk is simply not there
        os._exit(0)


def current() -> Bootstrap | None:
    return _current


def job_progress(store) -> dict | None:
    """The unfinished corpus job with the latest chunk: kind, chunks done and total."""
    rows = store.cursor().execute(
        "SELECT j.kind, j.n_chunks, count(c.chunk) AS done FROM jobs j LEFT JOIN job_chunks c "
        "ON c.job_key = j.job_key WHERE j.finished IS NULL GROUP BY j.job_key, j.kind, j.n_chunks, j.created "
        "ORDER BY j.created DESC LIMIT 1").fetchall()
    if not rows:
        return None
    kind, n, done = rows[0]
    return {"kind": kind, "n_chunks": int(n), "done": int(done)}


def status(store=None) -> dict | None:
    """What the page shows: overall fraction, the running step and its chunk progress."""
    b = _current
    if b is None:
        return None
    if store is None:
        from .store import default_store
        store = default_store()
    running = next((s for s in b.steps if s.status == "running"), None)
    prog = job_progress(store) if running else None
    frac_step = prog["done"] / prog["n_chunks"] if prog and prog["n_chunks"] else 0.0
    return {"running": b.running, "completed": b.completed, "total": len(b.steps),
            "fraction": min(1.0, (b.completed + frac_step) / len(b.steps)),
            "step": running.label if running else None, "job": prog,
            "elapsed_seconds": round((b.finished or time.time()) - b.started, 1),
            "steps": [{"name": s.name, "label": s.label, "status": s.status, "message": s.message,
                       "seconds": s.seconds} for s in b.steps]}
