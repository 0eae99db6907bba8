"""Time from navigation to a fully drawn page, in the real browser, on a given store.

    .venv/bin/python benchmarks/bench_pages.py --store data/store.duckdb [--repeat 5] [QUERY ...]

Serves the dashboard on the store, opens each query string in headless Chromium several times
(one warm-up, then `repeat` timed loads) and prints the median milliseconds until Streamlit has
finished the run (no "running" indicator) and the page's plots are drawn. The defaults are the
feature pages of issue 5 (target: a feature page in the browser within 1.5 s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

DEFAULT = ["page=feature&sae=smollm2-135m-L15-resid_pre&feature=178",
           "page=featuremap&sae=smollm2-135m-L15-resid_pre",
           "page=search&sae=smollm2-135m-L15-resid_pre&mode=token&q=+the"]

DONE = """() => { const s = document.querySelector('[data-testid="stStatusWidget"]');
  const plots = [...document.querySelectorAll('.js-plotly-plot')];
  return document.querySelector('h1') && !(s && s.innerText.toLowerCase().includes('running'))
         && plots.every(p => p.querySelector('.main-svg')); }"""


def main() -> None:
    from playwright.sync_api import sync_playwright

    from browser import browser_context, dashboard

    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("queries", nargs="*", default=DEFAULT)
    a = ap.parse_args()
    with dashboard({"DASHBOARD_STORE": a.store}) as base, sync_playwright() as p:
        ctx = browser_context(p, tempfile.mkdtemp())
        page = ctx.new_page()
        print(f"{'page':60s} {'median ms':>10s} {'min':>7s} {'max':>7s}")
        for q in a.queries:
            times = []
            for i in range(a.repeat + 1):
                page.goto("about:blank")
                t = time.perf_counter()
                page.goto(f"{base}/?{q}")
                page.wait_for_timeout(150)            # let the script run start
                page.wait_for_function(DONE, timeout=300_000, polling=50)
                if i:
                    times.append((time.perf_counter() - t) * 1000)
            print(f"{q[:60]:60s} {statistics.median(times):10.0f} {min(times):7.0f} {max(times):7.0f}")
        ctx.close()


if __name__ == "__main__":
    main()
