"""The pages: every page under Streamlit's AppTest, bad links, and one real-browser test."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlparse

import pytest
from streamlit.testing.v1 import AppTest

from .browser import browser_context, dashboard, wait_for_plots
from .conftest import DEFAULT_MODEL, ROOT

APP = str(ROOT / "app" / "main.py")


def _app(**params) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=600)
    for k, v in params.items():
        at.query_params[k] = str(v)
    at.run()
    return at


@pytest.mark.parametrize("page", ["prompt", "attention", "heads"])
def test_every_page_runs_without_exception(page, model):
    at = _app(page=page, model=DEFAULT_MODEL, text="The capital of France is", layer=2, head=1)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) >= 1
    assert at.query_params["page"] == [page] or at.query_params["page"] == page


def _errors(at: AppTest) -> str:
    return " | ".join(e.value for e in at.error) + " | ".join(w.value for w in at.warning)


@pytest.mark.parametrize("params, expected", [
    ({"page": "prompt", "text": "   "}, "prompt is empty"),
    ({"page": "prompt", "text": "word " * 400}, "limit is 256"),
    ({"page": "prompt", "model": "definitely-not-a-model"}, "Unknown model"),
    ({"page": "prompt", "model": "gpt2-small"}, "offline"),
    ({"page": "attention", "layer": 99}, "Layer 99 does not exist"),
    ({"page": "attention", "head": -1}, "Head -1 does not exist"),
    ({"page": "attention", "layer": "three"}, "not a whole number"),
    ({"page": "nowhere"}, "unknown page"),
    ({"page": "prompt", "text": "Edited text", "key": "prompt-00000000000000000000"}, "link was altered"),
    ({"page": "prompt", "lens": "token", "token": " Paris is lovely"}, "not a single token"),
])
def test_bad_links_give_clear_messages_and_store_nothing(params, expected, model):
    from backend.store import default_store

    before = default_store().count_runs()
    at = _app(**params)
    assert not at.exception, at.exception
    assert expected.lower() in _errors(at).lower()
    falls_back = params.get("page") == "nowhere" or params.get("layer") == "three"  # warned, then shown
    if not falls_back and "lens" not in params:
        assert default_store().count_runs() == before


def _figure_data(page) -> str:
    return page.evaluate("""() => JSON.stringify([...document.querySelectorAll('.js-plotly-plot')]
        .filter(p => (p.layout.title.text || '').includes('Logit lens'))
        .map(p => p.data.map(t => t.z)))""")


def test_shared_link_reopens_the_same_view_from_the_store(tmp_path):
    """Type a prompt, see the logit lens, open the page's URL in a new browser: same figure, no run."""
    from playwright.sync_api import sync_playwright

    prompt = "The Eiffel Tower is in the city of"
    with dashboard({"DASHBOARD_STORE": str(tmp_path / "e2e.duckdb")}) as base, sync_playwright() as p:
        ctx = browser_context(p, str(tmp_path / "alice"))
        page = ctx.new_page()
        page.goto(f"{base}/?page=prompt&model={DEFAULT_MODEL}")
        wait_for_plots(page)
        page.locator("textarea").fill(prompt)
        page.get_by_role("button", name="Run").click()
        page.wait_for_function(f"document.body.innerText.includes('prompt analysis: computed in') && "
                               f"[...document.querySelectorAll('.js-plotly-plot')].some(p => "
                               f"(p.layout.title.text || '').includes('Logit lens') && "
                               f"JSON.stringify(p.layout.xaxis.ticktext).includes('Tower'))", timeout=180_000)
        page.wait_for_function("window.location.search.includes('Tower')", timeout=30_000)
        url = page.url
        assert parse_qs(urlparse(url).query)["text"] == [prompt]
        figure = _figure_data(page)
        ctx.close()

        ctx2 = browser_context(p, str(tmp_path / "bob"))
        page2 = ctx2.new_page()
        page2.goto(url)
        wait_for_plots(page2, n=2)
        page2.wait_for_function("document.body.innerText.includes('prompt analysis: read from the store')",
                                timeout=60_000)
        assert "computed in" not in page2.inner_text("body").split("Logit lens shows")[0]
        assert _figure_data(page2) == figure and json.loads(figure)
        page2.screenshot(path=str(tmp_path / "reopened.png"), full_page=True)
        ctx2.close()
