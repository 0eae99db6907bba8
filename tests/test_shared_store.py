"""One store for the dashboard and the CLI: CLI calls made while a dashboard holds the store run
in the dashboard's process (backend/serve.py); the dashboard shows their results from the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.browser import ROOT, browser_context, dashboard

pytestmark = pytest.mark.browser


def _cli(store, *args) -> dict:
    env = {**os.environ, "DASHBOARD_STORE": str(store)}
    out = subprocess.run([sys.executable, "-m", "backend", *args, "--format", "json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cli_writers_and_the_dashboard_share_one_store(tmp_path, model):
    from playwright.sync_api import sync_playwright

    store = tmp_path / "shared.duckdb"
    texts = [f"The {w} sat on the mat and" for w in ("cat", "dog", "bird", "fox")]
    with dashboard({"DASHBOARD_STORE": str(store)}) as base, sync_playwright() as p:
        ctx = browser_context(p, tempfile.mkdtemp())
        page = ctx.new_page()
        page.goto(f"{base}/?page=heads")           # a session: the page script opens the store
        page.wait_for_function("document.body.innerText.includes('Head scores')", timeout=120_000)
        server_info = store.with_name(store.name + ".server.json")
        for _ in range(100):
            if server_info.exists():
                break
            page.wait_for_timeout(200)
        assert server_info.exists(), "the dashboard did not serve its store"
        assert oct(server_info.stat().st_mode & 0o777) == "0o600"

        # Two CLI writers at once, while the dashboard holds the store.
        with ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(lambda t: _cli(store, "prompt", "--text", t), texts))
        assert all("error" not in o for o in outs), outs
        keys = [o["run_key"] for o in outs]
        again = _cli(store, "prompt", "--text", texts[0])
        assert again["from_store"] and again["run_key"] == keys[0]
        bad = _cli(store, "prompt", "--text", "   ")
        assert bad["error"]["type"] == "EmptyPrompt"

        # The dashboard shows a CLI result from the store, without a restart or a recompute.
        fresh = browser_context(p, tempfile.mkdtemp())
        page2 = fresh.new_page()
        from urllib.parse import quote

        page2.goto(f"{base}/?page=prompt&model=smollm2-135m&text={quote(texts[1])}&key={keys[1]}")
        page2.wait_for_function("document.body.innerText.includes('read from the store')", timeout=120_000)
        fresh.close()
        ctx.close()

    # Afterwards the store opens cleanly and holds every result exactly once.
    from backend.store import Store

    s = Store(store)
    try:
        for k in keys:
            assert s.cursor().execute("SELECT count(*) FROM runs WHERE run_key = ?", [k]).fetchall()[0][0] == 1
        assert s.count_runs("prompt") == len(texts)
    finally:
        s.close()
    assert not server_info.exists(), "the server file outlived the dashboard"
