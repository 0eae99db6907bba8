"""The DAS section of the patching page in a real browser: a small layer x position sweep is
trained on the page, a click on a cell opens that cell's run (stored by the sweep), its illusion
check is opened, and the link reopened in a fresh browser context shows the same numbers, read
from the store with nothing computed."""

from __future__ import annotations

import json

import pytest

from tests.browser import browser_context, click_plot_point, dashboard, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.model]
# country -> capital, 16 examples, 8 steps per cell: this test is about the page, not the search
QUERY = ("/?page=patching&model=smollm2-135m&das_on=1&das_task=country-capital&das_site=resid_pre&das_layer=20"
         "&das_pos=-1&das_dim=1&das_bl=0&das_steps=8&das_n=16&das_sweep=1&das_sl=20&das_sp=3,4&das_ill=0")
SWEEP = "DAS sweep: held-out IIA"

_SHOWN = """() => {
    const plots = [...document.querySelectorAll('.js-plotly-plot')].filter(p => !p.closest('[data-stale="true"]'));
    const by = s => plots.find(p => (p.layout.title.text || '').includes(s));
    const m = {};
    document.querySelectorAll("[data-testid='stMetric']").forEach(e => {
        const l = e.querySelector("[data-testid='stMetricLabel']"), v = e.querySelector("[data-testid='stMetricValue']");
        if (l && v) m[l.innerText.trim()] = v.innerText.trim(); });
    const c = by('DAS training'), i = by('Illusion check at');
    return JSON.stringify({curve: c && Array.from(c._fullData[0].y),        // decoded (data.y may be base64)
                           illusion: i && i._fullData.map(d => Array.from(d.y)), metrics: m}); }"""


def _click_cell(page, col: int, row: int) -> None:
    click_plot_point(page, SWEEP, col, row)


def test_das_cell_illusion_check_and_its_link(tmp_path):
    from playwright.sync_api import sync_playwright

    env = {"DASHBOARD_STORE": str(tmp_path / "das.duckdb"), "DASHBOARD_BOOTSTRAP": "0"}
    with dashboard(env) as base, sync_playwright() as p:
        ctx = browser_context(p, str(tmp_path / "ann"))
        page = ctx.new_page()
        page.goto(base + QUERY)
        page.wait_for_selector("text=DAS sweep: computed in", timeout=900_000)
        page.wait_for_function(f"[...document.querySelectorAll('.js-plotly-plot')].some(p => "
                               f"(p.layout.title.text || '').includes('{SWEEP}'))", timeout=120_000)
        wait_idle(page)
        _click_cell(page, 0, 0)                                   # layer 20, position 3
        page.wait_for_function("window.location.search.includes('das_pos=3')", timeout=120_000)
        page.wait_for_selector("text=DAS run: read from the store", timeout=300_000)   # the sweep stored it
        page.get_by_role("button", name="Illusion check of this run's direction").click()
        page.wait_for_function("window.location.search.includes('das_ill=1')", timeout=120_000)
        page.wait_for_selector("text=illusion check: computed in", timeout=600_000)
        page.wait_for_function("[...document.querySelectorAll('.js-plotly-plot')].some(p => "
                               "(p.layout.title.text || '').includes('Illusion check at') && p.data)", timeout=120_000)
        wait_idle(page)
        first = json.loads(page.evaluate(_SHOWN))
        assert first["curve"] and len(first["curve"]) == 8 and first["illusion"], first
        assert page.get_by_text("Verdict:").count() >= 1
        link = page.locator("a", has_text="Link to this DAS view").get_attribute("href")
        assert "das_ill=1" in link and "das_pos=3" in link
        ctx.close()

        ctx2 = browser_context(p, str(tmp_path / "bob"))
        page2 = ctx2.new_page()
        page2.goto(link if link.startswith("http") else base + "/" + link.lstrip("/"))
        page2.wait_for_selector("text=illusion check: read from the store", timeout=300_000)
        page2.wait_for_function("[...document.querySelectorAll('.js-plotly-plot')].some(p => "
                                "(p.layout.title.text || '').includes('Illusion check at') && p.data)", timeout=120_000)
        wait_idle(page2)
        assert page2.get_by_text("DAS run: read from the store").count() >= 1
        assert page2.get_by_text("DAS run: computed in").count() == 0
        assert page2.get_by_text("illusion check: computed in").count() == 0
        assert json.loads(page2.evaluate(_SHOWN)) == first
        ctx2.close()
