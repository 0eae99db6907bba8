"""The directions & steering page in a real browser: make a direction from two typed sets,
steer, see the two generations; the link opened in a fresh browser context shows the same
view from the store."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest

from .browser import ROOT, browser_context, dashboard, wait_for_plots
from .conftest import DEFAULT_MODEL

pytestmark = pytest.mark.browser

POSITIVE = "I love this sunny day.\nWhat a wonderful gift!\nThe party was great fun."
NEGATIVE = "I hate this rainy day.\nWhat an awful gift!\nThe party was dreadful."
GRAINS_PAIRS = "\n".join([ln for ln in (ROOT / "data" / "directions" / "grains_sentiment.jsonl").read_text().splitlines()
                          if ln.strip()][:3])


def _generations(page) -> list[str]:
    return page.evaluate("() => [...document.querySelectorAll('.generation')].map(e => e.innerText)")


def test_make_direction_steer_and_reopen(tmp_path):
    from playwright.sync_api import sync_playwright

    with dashboard({"DASHBOARD_STORE": str(tmp_path / "e2e.duckdb")}) as base, sync_playwright() as p:
        ctx = browser_context(p, str(tmp_path / "ann"))
        page = ctx.new_page()
        page.goto(f"{base}/?page=steering&model={DEFAULT_MODEL}")
        page.get_by_text("Directions & steering", exact=True).first.wait_for(timeout=60_000)
        page.get_by_text("type", exact=True).click()
        page.get_by_label("Positive set, one prompt per line").fill(POSITIVE)
        page.get_by_label("Negative set (label 0), one prompt per line").fill(NEGATIVE)
        page.get_by_role("button", name="Make direction").click()
        page.wait_for_function("window.location.search.includes('dkey=direction-')", timeout=400_000)
        wait_for_plots(page)                                          # the per-layer curve
        page.get_by_role("button", name="Steer").click()
        page.wait_for_function("document.querySelectorAll('.generation').length == 2", timeout=400_000)
        page.wait_for_timeout(1000)
        first = _generations(page)
        assert len(first) == 2 and all(g.startswith("I went for a walk today and the weather") for g in first)
        assert first[0] != first[1]                                   # strength 6 changes the text
        q = parse_qs(urlparse(page.url).query)
        assert q["page"] == ["steering"] and q["steer"] == ["1"] and q["key"][0].startswith("steer-")
        page.screenshot(path=str(tmp_path / "steered.png"), full_page=True)
        url = page.url
        ctx.close()

        fresh = browser_context(p, str(tmp_path / "bob"))           # a colleague opens the link
        page = fresh.new_page()
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('.generation').length == 2", timeout=120_000)
        page.wait_for_timeout(1000)
        assert _generations(page) == first
        assert page.get_by_text("steered generation: read from the store").count() == 1

        # a click on layer 20 of the separation curve picks that layer's direction (from the stored pass)
        page.wait_for_function("[...document.querySelectorAll('.js-plotly-plot')].some(p => p._fullLayout && "
                               "(p.layout.title.text || '').includes('separates'))", timeout=120_000)
        page.wait_for_timeout(1000)
        px = page.evaluate("""() => { const gd = [...document.querySelectorAll('.js-plotly-plot')].find(p =>
            p._fullLayout && (p.layout.title.text || '').includes('separates'));
            const fl = gd._fullLayout, r = gd.getBoundingClientRect();
            return [r.left + fl.xaxis._offset + fl.xaxis.l2p(20), r.top + fl.yaxis._offset + fl.yaxis.l2p(gd._fullData[0].y[20])]; }""")
        page.mouse.click(*px)
        page.wait_for_function(f"!window.location.search.includes('{q['dkey'][0]}')", timeout=120_000)
        page.wait_for_function("document.body.innerText.includes('blocks.20.hook_resid_pre')", timeout=120_000)
        assert parse_qs(urlparse(page.url).query)["dkey"][0].startswith("direction-")
        fresh.close()


def test_a_grains_direction_steers_and_its_link_reopens(tmp_path, model):
    """GrAInS (attribution-guided) made on the page from three typed sentence starts (the first
    three of the shipped set: each pair costs a 32-step integrated-gradients run, and the shipped
    set's 12 training pairs made this the slowest browser test; the GrAInS arithmetic on a
    prompt is checked against plain loops in test_grains.py), steers, and the steered view's
    link reopens from the store in a fresh context."""
    from playwright.sync_api import sync_playwright

    with dashboard({"DASHBOARD_STORE": str(tmp_path / "grains.duckdb")}) as base, sync_playwright() as p:
        ctx = browser_context(p, str(tmp_path / "ann"))
        page = ctx.new_page()
        page.goto(f"{base}/?page=steering&model={DEFAULT_MODEL}&strength=8")
        page.get_by_text("Directions & steering", exact=True).first.wait_for(timeout=60_000)
        page.get_by_text("GrAInS (IG picks the tokens)", exact=True).click()
        page.wait_for_function("document.body.innerText.includes('Tokens per prompt on each side')", timeout=60_000)
        page.get_by_text("type", exact=True).click()
        page.get_by_label("Pairs, JSON Lines", exact=False).fill(GRAINS_PAIRS)
        page.get_by_role("button", name="Make direction").click()
        page.wait_for_function("window.location.search.includes('dkey=direction-')", timeout=600_000)
        page.wait_for_function("document.body.innerText.includes('GrAInS')", timeout=120_000)
        page.get_by_role("button", name="Steer").click()
        page.wait_for_function("document.querySelectorAll('.generation').length == 2", timeout=400_000)
        page.wait_for_timeout(1000)
        first = _generations(page)
        page.screenshot(path=str(tmp_path / "grains.png"), full_page=True)
        url = page.url
        ctx.close()

        fresh = browser_context(p, str(tmp_path / "bob"))
        page = fresh.new_page()
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('.generation').length == 2", timeout=120_000)
        page.wait_for_timeout(1000)
        assert _generations(page) == first
        assert page.get_by_text("steered generation: read from the store").count() == 1
        assert page.get_by_text("GrAInS (IG picks the tokens) at blocks.10.hook_resid_pre").count() == 1
        fresh.close()
