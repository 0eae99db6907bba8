"""Stored-view reads while the dashboard's process computes, and CLI calls forwarded to it.

    .venv/bin/python benchmarks/bench_shared_store.py [--reads 50]

Serves the dashboard on a fresh store, stores a prompt view through the CLI (forwarded to the
dashboard, which holds the store), then opens that view's link `--reads` times in headless
Chromium: first on an idle dashboard, then while a patching sweep forwarded from the CLI runs
in the dashboard's process (as another session's computation would). For each load it records
the store read time the page reports ("read from the store in X ms") and the time until the
page is drawn; prints p50 / p95 of both, idle and busy (target: read p95 under 200 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

READ = re.compile(r"read from the store in ([0-9.]+) ms")


def cli(store: Path, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "backend", *args, "--format", "json"], cwd=ROOT,
                         env={**os.environ, "DASHBOARD_STORE": str(store)}, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def loads(ctx, url: str, n: int) -> tuple[list[float], list[float]]:
    reads, draws = [], []
    page = ctx.new_page()
    for _ in range(n):
        t = time.perf_counter()
        page.goto(url)
        page.wait_for_function("document.body.innerText.includes('read from the store in')", timeout=120_000)
        draws.append((time.perf_counter() - t) * 1000)
        reads.append(float(READ.search(page.inner_text("body")).group(1)))
    page.close()
    return reads, draws


def main() -> None:
    from playwright.sync_api import sync_playwright

    from browser import browser_context, dashboard

    ap = argparse.ArgumentParser()
    ap.add_argument("--reads", type=int, default=50)
    a = ap.parse_args()
    store = Path(tempfile.mkdtemp(prefix="bench-shared-")) / "store.duckdb"
    text = "The capital of France is"
    with dashboard({"DASHBOARD_STORE": str(store)}) as base, sync_playwright() as p:
        ctx = browser_context(p, tempfile.mkdtemp())
        page = ctx.new_page()
        page.goto(f"{base}/?page=heads")
        page.wait_for_function("document.body.innerText.includes('Head scores')", timeout=300_000)
        t = time.perf_counter()
        key = cli(store, "prompt", "--text", text)["run_key"]
        print(f"CLI prompt forwarded to the dashboard: {time.perf_counter() - t:.2f} s (includes the model load)")
        url = f"{base}/?page=prompt&model=smollm2-135m&text={quote(text)}&key={key}"
        loads(ctx, url, 3)  # warm-up
        idle = loads(ctx, url, a.reads)

        done = threading.Event()
        sweep: dict = {}

        def run_sweep():
            t0 = time.perf_counter()
            sweep.update(cli(store, "patch", "--clean", "When Mary and John went to the store, John gave a drink to",
                             "--corrupt", "When Mary and John went to the store, Mary gave a drink to",
                             "--answer", " Mary", "--wrong", " John", "--site", "head_out"))
            sweep["seconds"] = time.perf_counter() - t0
            done.set()

        threading.Thread(target=run_sweep, daemon=True).start()
        time.sleep(1.0)
        busy = loads(ctx, url, a.reads)
        overlapped = not done.is_set()
        done.wait(1200)
        ctx.close()
    for name, (reads, draws) in (("idle", idle), ("while a sweep runs", busy)):
        print(f"{name:>20}: store read p50 {statistics.median(reads):6.1f} ms, p95 {pct(reads, 0.95):6.1f} ms · "
              f"page drawn p50 {statistics.median(draws):6.0f} ms, p95 {pct(draws, 0.95):6.0f} ms  ({len(reads)} loads)")
    print(f"sweep (head_out, forwarded CLI call): {sweep.get('seconds', float('nan')):.1f} s, "
          f"{'still running when the last read finished' if overlapped else 'finished before the reads did'}; "
          f"error: {sweep.get('error')}")


if __name__ == "__main__":
    main()
