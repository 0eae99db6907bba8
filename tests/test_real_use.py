"""Real use, on real processes (issue 28): several commands on one store with no dashboard, a
clean stop of a corpus job (SIGINT / SIGTERM) that resumes where it stopped, and a first start
that finishes after an interruption (the dashboard stopped during step 2, started again)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from backend import corpus

from .browser import ROOT, browser_context, start_dashboard
from .conftest import DEFAULT_MODEL

pytestmark = pytest.mark.model


def _popen(store, *args, env=None) -> subprocess.Popen:
    e = {**os.environ, "DASHBOARD_STORE": str(store), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "backend", *args, "--format", "json"], cwd=ROOT, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(store, sql: str, params=()) -> list:
    from backend.store import Store

    s = Store(store)
    try:
        return s.cursor().execute(sql, list(params)).fetchall()
    finally:
        s.close()


def test_four_commands_at_once_on_one_store(tmp_path, model):
    """Two identical slow sweeps and two prompts started together, no dashboard: every command
    exits 0 (the first to open the store serves it to the others), each result is stored once,
    and the second sweep is read, not computed again."""
    store = tmp_path / "shared.duckdb"
    sweep = ["patch", "--task", "ioi", "--n-pairs", "2", "--site", "head_out"]
    procs = [_popen(store, *sweep), _popen(store, *sweep)]
    time.sleep(1.0)
    procs += [_popen(store, "prompt", "--text", "One two three"), _popen(store, "prompt", "--text", "Four five")]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, (p.args, out[-500:], err[-2000:])
        assert "terminate called" not in err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    a, b = outs[0], outs[1]
    assert a["run_key"] == b["run_key"] and sorted([a["from_store"], b["from_store"]]) == [False, True]
    keys = [o["run_key"] for o in outs]
    for k in set(keys):
        assert _rows(store, "SELECT count(*) FROM runs WHERE run_key = ?", [k])[0][0] == 1
    assert _rows(store, "SELECT count(*) FROM runs")[0][0] == 3
    assert not store.with_name(store.name + ".server.json").exists(), "the server file outlived its command"


def test_a_command_waits_for_a_store_held_without_a_server(tmp_path):
    """A store held by a process that does not serve it: the command waits (one line on stderr),
    then gives up with store_locked after DASHBOARD_STORE_WAIT seconds."""
    import duckdb

    store = tmp_path / "held.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('ok', flush=True); time.sleep(60)", str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        t = time.time()
        p = _popen(store, "prompt", "--text", "hi", env={"DASHBOARD_STORE_WAIT": "2"})
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2 and json.loads(out)["error"]["code"] == "store_locked"
        assert "Waiting for the store" in err and time.time() - t >= 2
    finally:
        holder.kill()
    duckdb.connect(str(store)).close()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    corpus.build(["stdlib"], root=root, max_words=4000)
    corpus.tokenize(DEFAULT_MODEL, root=root)
    return root


def _read_stderr(p: subprocess.Popen, sink: list) -> threading.Thread:
    def rd():
        for ch in iter(lambda: p.stderr.read(1), ""):
            sink.append(ch)
    t = threading.Thread(target=rd, daemon=True)
    t.start()
    return t


NS = ["neuron-stats", "--windows", "8", "--chunk", "2", "--length", "32"]
NS_Q = "SELECT layer, neuron, n, active, mean, max FROM neuron_stats ORDER BY layer, neuron"


@pytest.fixture(scope="module")
def ns_reference(tmp_path_factory, small_corpus):
    """The uninterrupted neuron-stats run the resumed one must equal: started in the background
    as soon as a signal test asks for it, so it runs beside the interrupted command (a model load
    and the job, once, instead of after it); its rows are read when the comparison needs them."""
    d = tmp_path_factory.mktemp("ns-ref")
    ref, log = d / "ref.duckdb", d / "ref.log"
    with open(log, "w") as f:                     # a file, not a pipe nobody reads while it runs
        p = subprocess.Popen([sys.executable, "-m", "backend", *NS, "--format", "json"], cwd=ROOT,
                             env={**os.environ, "DASHBOARD_STORE": str(ref), "DASHBOARD_CORPUS": str(small_corpus)},
                             stdout=subprocess.DEVNULL, stderr=f)
    got: dict = {}

    def rows() -> list:
        if "rows" not in got:
            assert p.wait(900) == 0, log.read_text()[-2000:]
            got["rows"] = _rows(ref, NS_Q)
        return got["rows"]
    yield rows
    if p.poll() is None:
        p.kill()
        p.wait()


@pytest.mark.parametrize("sig,codes", [(signal.SIGINT, (130,)), (signal.SIGTERM, (143,))])
def test_a_signal_stops_a_corpus_job_that_then_resumes(request, tmp_path, model, small_corpus, sig, codes):
    reference = request.getfixturevalue("ns_reference") if sig == signal.SIGINT else None   # starts beside p
    store = tmp_path / "ns.duckdb"
    env = {"DASHBOARD_CORPUS": str(small_corpus)}
    p = _popen(store, *NS, env=env)
    err: list[str] = []
    _read_stderr(p, err)
    deadline = time.time() + 600
    while "chunk 1/4" not in "".join(err):
        assert p.poll() is None and time.time() < deadline, "".join(err)[-2000:]
        time.sleep(0.1)
    t = time.time()
    p.send_signal(sig)
    rc = p.wait(30)
    assert time.time() - t < 10 and rc in codes, (rc, "".join(err)[-1000:])
    time.sleep(0.3)
    assert "terminate called" not in "".join(err)
    done = _rows(store, "SELECT count(*) FROM job_chunks")[0][0]
    assert 1 <= done < 4
    if sig == signal.SIGTERM:
        return     # the resume is checked once, after SIGINT
    # restart: it resumes at the first chunk not written and finishes; the rows equal a run that
    # was never interrupted
    p2 = _popen(store, *NS, env=env)
    out, err2 = p2.communicate(timeout=900)
    assert p2.returncode == 0, err2[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["finished"]
    got, want = _rows(store, NS_Q), reference()
    assert len(got) == len(want) > 0
    assert [r[:4] for r in got] == [r[:4] for r in want]
    assert max(abs(g[4] - w[4]) + abs(g[5] - w[5]) for g, w in zip(got, want)) < 1e-6


@pytest.mark.browser
def test_an_interrupted_first_start_finishes_at_the_next(tmp_path, model, small_corpus):
    """Start on an empty store, stop the dashboard (SIGINT) while step 2 (neuron statistics)
    runs: it stops within 10 s with no abort; start it again on the same store: the build
    resumes with the steps not done and the neuron page fills without a button."""
    from playwright.sync_api import sync_playwright

    env = {"DASHBOARD_STORE": str(tmp_path / "first.duckdb"), "DASHBOARD_CORPUS": str(small_corpus),
           "DASHBOARD_BOOTSTRAP": "1", "DASHBOARD_BOOTSTRAP_FIRST": "8", "DASHBOARD_BOOTSTRAP_WINDOWS": "0",
           "DASHBOARD_BOOTSTRAP_TRANSCODER_WINDOWS": "0"}   # step 2 is the neuron statistics (not the
    # shipped transcoder set's 32-window index, which the plan puts there since da4e73f and this
    # test then interrupted and waited for in place of the step it is about)
    url = f"/?page=neuron&model={DEFAULT_MODEL}&layer=3"
    with sync_playwright() as p:
        proc, base, log = start_dashboard(env)
        try:
            ctx = browser_context(p, str(tmp_path / "chrome1"))
            page = ctx.new_page()
            page.goto(base + url)
            page.wait_for_function("document.body.innerText.includes('(step 2/')", timeout=600_000)
            ctx.close()
            t = time.time()
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(30)
            assert time.time() - t < 10 and rc in (0, 130), rc
        finally:
            if proc.poll() is None:
                proc.kill()
        text = log.read_text()
        assert "terminate called" not in text and "Traceback" not in text, text[-3000:]

        proc, base, log = start_dashboard(env)
        try:
            ctx = browser_context(p, str(tmp_path / "chrome2"))
            page = ctx.new_page()
            page.goto(base + url)
            page.wait_for_function("document.body.innerText.includes('First start: building')", timeout=120_000)
            page.wait_for_function("document.body.innerText.includes('windows of 128')", timeout=900_000)
            assert page.get_by_role("button", name="Compute neuron statistics").count() == 0
            page.screenshot(path=str(tmp_path / "neurons.png"), full_page=True)
            ctx.close()
        finally:
            proc.terminate()
            proc.wait(30)
        assert "terminate called" not in log.read_text()
