"""The Circuits page in a real browser: a circuit's ablation table (3 ablations x 2 directions x 3
metrics) opened by its link; the resample / denoising / logit-difference cell equals the
faithfulness the page shows for the circuit itself."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from tests.browser import browser_context, dashboard, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.model]

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
QUERY = (f"/?page=circuits&model=smollm2-135m&task=custom&metric=logit_diff&method=eap-ig&top_n=40&cview=ablations"
         f"&clean={quote(CLEAN)}&corrupt={quote(CORRUPT)}&answer=%20Mary&wrong=%20John")

_TABLE = """() => { const gd = [...document.querySelectorAll('.js-plotly-plot')].find(p =>
    (p.layout.title.text || '').includes('every way'));
    if (!gd || !gd.data) return null;
    const m = {};
    document.querySelectorAll("[data-testid='stMetric']").forEach(e => {
        const l = e.querySelector("[data-testid='stMetricLabel']"), v = e.querySelector("[data-testid='stMetricValue']");
        if (l && v) m[l.innerText.trim()] = v.innerText.trim(); });
    return {y: gd.data[0].y, x: gd.data[0].x, text: gd.data[0].text, metrics: m}; }"""


def test_ablation_table_of_a_circuit_opens_from_its_link(tmp_path):
    from playwright.sync_api import sync_playwright

    env = {"DASHBOARD_STORE": str(tmp_path / "abl.duckdb"), "DASHBOARD_BOOTSTRAP": "0"}
    with dashboard(env) as base, sync_playwright() as p:
        ctx = browser_context(p, str(tmp_path / "ada"))
        page = ctx.new_page()
        page.goto(base + QUERY)
        page.wait_for_function("(" + _TABLE + ")() !== null", timeout=400_000)
        wait_idle(page)
        t = page.evaluate(_TABLE)
        assert len(t["y"]) == 6 and t["x"] == ["logit difference", "probability", "KL"]
        assert t["y"][0] == "resample · denoising"
        shown = float(t["metrics"]["faithfulness"])
        assert float(t["text"][0][0]) == pytest.approx(shown, abs=1.5e-3)     # the same number, two views
        assert len({c for row in t["text"] for c in row}) > 6                   # not one number 18 times
        ctx.close()
