"""Real browser helpers: start the dashboard on a free port, drive headless Chromium.

Also a script: `python tests/browser.py OUT_DIR [QUERY ...]` saves a screenshot per query,
for looking at the pages.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dashboard(env: dict | None = None, timeout: float = 60) -> tuple[subprocess.Popen, str, Path]:
    """Start `streamlit run app/main.py` on a free port: (process, base URL, log file)."""
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"streamlit-{port}.log"
    with open(path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            if urllib.request.urlopen(base + "/_stcore/health", timeout=2).read() == b"ok":
                return proc, base, path
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"dashboard did not start; see {path}")
        time.sleep(0.3)


@contextlib.contextmanager
def dashboard(env: dict | None = None, timeout: float = 60):
    """Run `streamlit run app/main.py` on a free port; yield its base URL."""
    proc, base, _ = start_dashboard(env, timeout)
    try:
        yield base
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        proc.kill()


def browser_context(playwright, user_dir: str):
    return playwright.chromium.launch_persistent_context(
        user_dir, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1500, "height": int(os.environ.get("SHOT_HEIGHT", 1100))})


def wait_for_plots(page, n: int = 1, timeout: float = 400_000) -> None:
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n}",
                           timeout=timeout)
    page.wait_for_timeout(800)  # let Plotly finish drawing


def click_plot_point(page, title_part: str, x, y) -> None:
    """Click the data point (x, y) of the Plotly figure whose title contains `title_part`, at
    its pixel position (a real mouse click, scrolled into view first)."""
    find = f"[...document.querySelectorAll('.js-plotly-plot')].find(p => (p.layout.title.text || '').includes('{title_part}'))"
    page.evaluate(f"() => {find}.scrollIntoView({{block: 'center'}})")
    page.wait_for_timeout(400)
    px = page.evaluate(f"""([x, y]) => {{ const gd = {find}; const fl = gd._fullLayout, r = gd.getBoundingClientRect();
        return [r.left + fl._size.l + fl.xaxis.l2p(x), r.top + fl._size.t + fl.yaxis.l2p(y)]; }}""", [x, y])
    page.mouse.click(*px)


def wait_idle(page, timeout: float = 120_000) -> None:
    """Until the script run is over: no element Streamlit marks stale (a rerun keeps the old
    elements beside the new ones until it ends), then a moment for Plotly to draw."""
    page.wait_for_function("document.querySelectorAll('[data-stale=\"true\"]').length === 0", timeout=timeout)
    page.wait_for_timeout(800)


if __name__ == "__main__":
    import tempfile

    from playwright.sync_api import sync_playwright

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    queries = sys.argv[2:] or ["page=prompt", "page=attention&layer=3&head=1", "page=heads"]
    with dashboard() as base, sync_playwright() as p:
        ctx = browser_context(p, tempfile.mkdtemp())
        page = ctx.new_page()
        for i, q in enumerate(queries):
            page.goto(f"{base}/?{q}")
            try:
                wait_for_plots(page, n=int(os.environ.get("SHOT_PLOTS", 1)),
                               timeout=float(os.environ.get("SHOT_WAIT_MS", 60_000)))
            except Exception as e:  # still take the picture: it shows what went wrong
                print("no plot:", e)
            page.screenshot(path=str(out / f"{i:02d}.png"), full_page=True)
            print(out / f"{i:02d}.png", page.url)
        ctx.close()
