"""The Probes page in a real browser: a small TCAV study run on the page (one layer, three random
CAVs); its link, opened in a fresh browser context, shows the same bars read from the store."""

from __future__ import annotations

import json

import pytest

from tests.browser import browser_context, dashboard, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.model]
QUERY = "/?page=probes&study=tcav&model=smollm2-135m&tc_layers=12&tc_n=3"

_SHOWN = """() => {
    const plots = [...document.querySelectorAll('.js-plotly-plot')].filter(p => !p.closest('[data-stale="true"]'));
    const f = plots.find(p => (p.layout.title.text || '').includes('TCAV'));
    const m = {};
    document.querySelectorAll("[data-testid='stMetric']").forEach(e => {
        const l = e.querySelector("[data-testid='stMetricLabel']"), v = e.querySelector("[data-testid='stMetricValue']");
        if (l && v) m[l.innerText.trim()] = v.innerText.trim(); });
    return JSON.stringify({bars: f && [f.data[0].y, f.data[1].y].map(a => Array.from(a)), metrics: m}); }"""


def _shown(page) -> dict:
    page.wait_for_function("[...document.querySelectorAll('.js-plotly-plot')].some(p => "
                           "(p.layout.title.text || '').includes('TCAV') && p.data)", timeout=120_000)
    wait_idle(page)
    return json.loads(page.evaluate(_SHOWN))


def test_tcav_study_runs_on_the_page_and_its_link_reopens_from_the_store(tmp_path):
    from playwright.sync_api import sync_playwright

    env = {"DASHBOARD_STORE": str(tmp_path / "probes.duckdb"), "DASHBOARD_BOOTSTRAP": "0"}
    with dashboard(env) as base, sync_playwright() as p:
        ctx = browser_context(p, str(tmp_path / "ann"))
        page = ctx.new_page()
        page.goto(base + QUERY)
        page.get_by_role("button", name="Run the study").click(timeout=120_000)
        page.wait_for_selector("text=TCAV study: computed in", timeout=600_000)
        page.wait_for_function("window.location.search.includes('key=tcav-')", timeout=60_000)
        first = _shown(page)
        assert first["bars"] and len(first["bars"][0]) == 1, first
        assert first["metrics"]["verdict"] in ("significant", "not significant")
        link = page.url
        ctx.close()

        ctx2 = browser_context(p, str(tmp_path / "bob"))
        page2 = ctx2.new_page()
        page2.goto(link)
        page2.wait_for_selector("text=TCAV study: read from the store", timeout=300_000)
        assert page2.get_by_text("TCAV study: computed in").count() == 0
        assert page2.get_by_role("button", name="Run the study").count() == 0
        assert _shown(page2) == first
        ctx2.close()
