"""The token attribution page in a real browser: integrated gradients for "The capital of France
is" with the layer view computed on the page; its link reopened in a fresh browser context shows
the same scores read from the store; a click on a cell of the layer view opens the logit lens
(following the explained token) with that position marked."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, quote, urlparse

import pytest

from tests.browser import browser_context, click_plot_point, dashboard, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.model]
PROMPT = "The capital of France is"
# 8 fixed steps: the layer view runs one IG per layer, and this test is about the page, not the
# integral (the gap is large at 8 steps, which the page must say)
QUERY = (f"/?page=attribution_tokens&model=smollm2-135m&text={quote(PROMPT)}&amethod=integrated-gradients"
         "&asteps=8&alayers=1")

_SHOWN = """() => {
    const plots = [...document.querySelectorAll('.js-plotly-plot')].filter(p => !p.closest('[data-stale="true"]'));
    const by = s => plots.find(p => (p.layout.title.text || '').includes(s));
    const m = {};
    document.querySelectorAll("[data-testid='stMetric']").forEach(e => {
        const l = e.querySelector("[data-testid='stMetricLabel']"), v = e.querySelector("[data-testid='stMetricValue']");
        if (l && v) m[l.innerText.trim()] = v.innerText.trim(); });
    const s = by('to each input token'), l = by('Layer view');
    return JSON.stringify({scores: s && s.data[0].z, text: s && s.data[0].text, layers: l && l.data[0].z, metrics: m}); }"""


def _shown(page) -> dict:
    """The scores of both figures and the metrics, once both figures are drawn."""
    page.wait_for_function("['to each input token', 'Layer view'].every(t => [...document.querySelectorAll("
                           "'.js-plotly-plot')].some(p => (p.layout.title.text || '').includes(t) && p.data))",
                           timeout=120_000)
    wait_idle(page)
    return json.loads(page.evaluate(_SHOWN))


def _click_layer_cell(page, pos: int, layer: int) -> None:
    """Click the cell (position, layer) of the layer view: its square marker (the heatmap
    itself reports no single-cell clicks in select mode)."""
    click_plot_point(page, "Layer view", pos, layer)


def test_attribution_link_reopens_from_the_store_and_a_cell_opens_the_lens(tmp_path):
    from playwright.sync_api import sync_playwright

    env = {"DASHBOARD_STORE": str(tmp_path / "attr.duckdb"), "DASHBOARD_BOOTSTRAP": "0"}
    with dashboard(env) as base, sync_playwright() as p:
        ctx = browser_context(p, str(tmp_path / "ann"))
        page = ctx.new_page()
        page.goto(base + QUERY)
        page.wait_for_selector("text=token attribution: computed in", timeout=600_000)
        page.wait_for_function("window.location.search.includes('key=token_attribution')", timeout=60_000)
        first = _shown(page)
        assert first["scores"] and first["layers"], first
        assert len(first["scores"][0]) == 5 and first["scores"][0][0] == 0.0    # position 0 held
        assert len(first["layers"]) == 30 and first["metrics"]["steps used"] == "8"
        assert page.get_by_text("above 1 %").count() >= 1                    # 8 steps: the gap is said
        link = page.url
        ctx.close()

        ctx2 = browser_context(p, str(tmp_path / "bob"))
        page2 = ctx2.new_page()
        page2.goto(link)
        page2.wait_for_selector("text=token attribution: read from the store", timeout=300_000)
        assert page2.get_by_text("token attribution: computed in").count() == 0
        assert _shown(page2) == first

        _click_layer_cell(page2, 3, 10)      # " France" at layer 10
        page2.wait_for_function("window.location.search.includes('page=prompt') && "
                                "window.location.search.includes('lpos=3')", timeout=120_000)
        q = parse_qs(urlparse(page2.url).query)
        assert q["page"] == ["prompt"] and q["lens"] == ["token"] and q["token"] == [" Paris"] and q["lpos"] == ["3"]
        assert q["text"] == [PROMPT]
        page2.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].some(p => "
                                "(p.layout.title.text || '').includes('Logit lens: probability of ␣Paris') && "
                                "(p.layout.shapes || []).some(s => s.x0 === 2.5 && s.x1 === 3.5))", timeout=300_000)
        ctx2.close()
