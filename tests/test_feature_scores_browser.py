"""Feature scores in a real browser: rank every feature by output score on the search page,
open the top one, and see its label, its score badges and the link to steer with it."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest

from .browser import browser_context, dashboard
from .conftest import DEFAULT_MODEL

pytestmark = [pytest.mark.browser, pytest.mark.model]

SAE = "smollm2-135m-L25-resid_pre"
N_OUT = 128            # one batch of output scores


def test_sort_by_output_score_open_top_feature_see_badges_and_steer_link(model, tmp_path):
    from playwright.sync_api import sync_playwright

    from backend.jobs.features import index as fidx
    from backend.jobs.features import scores as S
    from backend.jobs.features.search import rank_features
    from backend.store import Store

    path = tmp_path / "e2e.duckdb"
    store = Store(path)                                     # the server's own store: no corpus index
    S.build_scores(model.info.model_id, SAE, store=store, parts=("vocab",))
    S.build_scores(model.info.model_id, SAE, store=store, parts=("output",), features=N_OUT)
    fidx.ensure_weight_tables(store, SAE)                   # similar features: the page never loads the model
    top = rank_features(store, SAE, "output_score", limit=1)["results"][0]
    store.close()
    with dashboard({"DASHBOARD_STORE": str(path)}) as base, sync_playwright() as p:
        ctx = browser_context(p, str(tmp_path / "chrome"))
        page = ctx.new_page()
        page.goto(f"{base}/?page=search&model={DEFAULT_MODEL}&sae={SAE}&mode=token&sort=output_score")
        page.wait_for_selector("[data-testid='stDataFrame']", timeout=180_000)
        page.wait_for_function("document.body.innerText.includes('ranked by output score')", timeout=60_000)
        page.wait_for_timeout(1500)
        box = page.locator("[data-testid='stDataFrame']").first.bounding_box()
        page.mouse.click(box["x"] + 18, box["y"] + 35 + 17)      # the first row's selection box
        page.wait_for_function("window.location.search.includes('page=feature')", timeout=120_000)
        page.wait_for_function(f"document.body.innerText.includes('Feature #{top['feature']} of')", timeout=120_000)
        q = parse_qs(urlparse(page.url).query)
        assert q["feature"] == [str(top["feature"])] and q["sae"] == [SAE]
        text = page.inner_text("body")
        assert f"output score {top['output_score']:.3f}" in text and "input score —" in text
        assert "promotes: " in text
        link = page.get_by_text("Steer with this feature")
        href = link.locator("xpath=ancestor-or-self::a").first.get_attribute("href")
        sq = parse_qs(urlparse(href).query)
        assert sq == {"page": ["steering"], "sae": [SAE], "feature": [str(top["feature"])]}
        page.screenshot(path=str(tmp_path / "feature.png"), full_page=True)
        ctx.close()
