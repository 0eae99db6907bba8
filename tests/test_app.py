"""The pages: every page under Streamlit's AppTest, bad links, and one real-browser test."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlparse

import pytest
from streamlit.testing.v1 import AppTest

from .browser import browser_context, dashboard, wait_for_plots, wait_idle
from .conftest import DEFAULT_MODEL, ROOT

pytestmark = pytest.mark.model   # loads the real model

APP = str(ROOT / "app" / "main.py")


def _app(**params) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=600)
    for k, v in params.items():
        at.query_params[k] = str(v)
    at.run()
    return at


@pytest.mark.parametrize("page", ["prompt", "attention", "heads", "patching", "massive", "features", "neurons"])
def test_every_page_runs_without_exception(page, model):
    at = _app(page=page, model=DEFAULT_MODEL, text="The capital of France is", layer=2, head=1, atp=1,
              clean="The capital of France is", corrupt="The capital of Italy is", answer=" Paris", wrong=" Rome")
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) >= 1
    assert at.query_params["page"] == [page] or at.query_params["page"] == page


@pytest.mark.parametrize("page", ["neuron", "feature", "featuremap", "search", "circuits"])
def test_corpus_pages_run_on_an_empty_store(page, model):
    """Pages fed by corpus jobs say what to build instead of failing; circuits computes."""
    at = _app(page=page, model=DEFAULT_MODEL, layer=2, clean="The capital of France is",
              corrupt="The capital of Italy is", answer=" Paris", wrong=" Rome", top_n=20)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    if page == "circuits":
        assert len(at.get("plotly_chart")) >= 1
        faith = [m for m in at.metric if m.label == "faithfulness"]
        assert faith and -5 < float(faith[0].value) < 5


def test_atp_star_beside_the_exact_sweep(model):
    at = _app(page="patching", model=DEFAULT_MODEL, site="head_q", atp=2, clean="The capital of France is",
              corrupt="The capital of Italy is", answer=" Paris", wrong=" Rome")
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    titles = " ".join(str(c.proto.spec) for c in at.get("plotly_chart"))
    assert "AtP* estimate" in titles and "AtP and AtP*" in titles
    assert any("False negatives" in m.value for m in at.markdown)


def _errors(at: AppTest) -> str:
    return " | ".join(e.value for e in at.error) + " | ".join(w.value for w in at.warning)


@pytest.mark.parametrize("params, expected", [
    ({"page": "prompt", "text": "   "}, "prompt is empty"),
    ({"page": "prompt", "text": "word " * 400}, "limit is 256"),
    ({"page": "prompt", "model": "definitely-not-a-model"}, "Unknown model"),
    ({"page": "prompt", "model": "gpt2-small"}, "offline"),
    ({"page": "prompt", "model": "<script>alert(1)</script>"}, "Unknown model"),
    ({"page": "patching", "model": "../x"}, "Unknown model"),
    ({"page": "attention", "layer": 99}, "Layer 99 does not exist"),
    ({"page": "attention", "head": -1}, "Head -1 does not exist"),
    ({"page": "attention", "layer": "three"}, "not a whole number"),
    ({"page": "nowhere"}, "unknown page"),
    ({"page": "prompt", "text": "Edited text", "key": "prompt-00000000000000000000"}, "link was altered"),
    ({"page": "prompt", "lens": "token", "token": " Paris is lovely"}, "not a single token"),
    ({"page": "patching", "corrupt": "When Mary and John went to the big store, Mary gave a drink to"},
     "token"),
    ({"page": "patching", "answer": " Maryanne Smith"}, "exactly one token"),
    ({"page": "patching", "wrong": " Mary"}, "differ"),
    ({"page": "patching", "site": "resid_sideways"}, "site"),
    ({"page": "patching", "cell": "99,99"}, "not a cell"),
    ({"page": "massive", "abs_thr": "-5"}, "threshold"),
    ({"page": "massive", "text": ""}, "prompt is empty"),
    ({"page": "features", "sae": "no-such-sae"}, "sae"),
    ({"page": "neurons", "layer": 31}, "Layer 31 does not exist"),
    ({"page": "attribution_tokens", "asteps": "9999"}, "steps must be"),
    ({"page": "attribution_tokens", "asteps": "many"}, "steps"),
    ({"page": "attribution_tokens", "amethod": "gradcam"}, "Unknown attribution method"),
    ({"page": "attribution_tokens", "acontrast": " London"}, "preferred token"),
])
def test_bad_links_give_clear_messages_and_store_nothing(params, expected, model):
    from backend.store import default_store

    before = default_store().count_runs()
    at = _app(**params)
    assert not at.exception, at.exception
    assert expected.lower() in _errors(at).lower()
    # warned, then shown (a valid sweep is stored even when the link's clicked cell is not in it)
    falls_back = params.get("page") == "nowhere" or params.get("layer") == "three" or "cell" in params
    if not falls_back and "lens" not in params:
        assert default_store().count_runs() == before


def test_token_attribution_page_reads_a_stored_result(model):
    """A stored IG result renders from the store with its completeness gap said above 1 %; the
    layer view (saliency: one backward pass, cheap) renders; a link that marks a position the
    prompt does not have is said on the prompt page. (The IG layer view: the browser test.)"""
    from backend.analyses.token_attribution import TokenAttributionSpec
    from backend.runner import run

    text = "The capital of France is"
    out = run(TokenAttributionSpec(model=DEFAULT_MODEL, text=text, steps=4))
    at = _app(page="attribution_tokens", model=DEFAULT_MODEL, text=text, asteps=4, key=out.run_key)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert any("token attribution: read from the store" in c.value for c in at.caption)
    assert "attribution of logit" in str(at.get("plotly_chart")[0].proto.spec)
    gap = out.result.completeness_gap_rel
    assert gap > 0.01 and any(f"Completeness gap {gap * 100:.1f} %, above 1 %" in w.value for w in at.warning)
    at = _app(page="attribution_tokens", model=DEFAULT_MODEL, text=text, amethod="saliency", alayers=1)
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert "Layer view" in " ".join(str(c.proto.spec) for c in at.get("plotly_chart"))
    at = _app(page="prompt", model=DEFAULT_MODEL, text=text, lens="token", token=" Paris", lpos=99)
    assert not at.exception and "not a position of this prompt" in _errors(at)


def _figure_data(page) -> str:
    wait_idle(page)
    return page.evaluate("""() => JSON.stringify([...document.querySelectorAll('.js-plotly-plot')]
        .filter(p => !p.closest('[data-stale="true"]') && (p.layout.title.text || '').includes('Logit lens'))
        .map(p => p.data.map(t => t.z)))""")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real dashboard process and one Playwright driver for the browser tests."""
    from playwright.sync_api import sync_playwright

    store = tmp_path_factory.mktemp("e2e") / "e2e.duckdb"
    with dashboard({"DASHBOARD_STORE": str(store)}) as base, sync_playwright() as p:
        yield base, p


def click_cell(page, plot_index: int, x: float, y: float) -> None:
    """Click the data point (x, y) of the plot_index-th Plotly chart on the page (scrolled into
    view first: a mouse click outside the viewport goes nowhere)."""
    page.evaluate("i => document.querySelectorAll('.js-plotly-plot')[i].scrollIntoView({block: 'center'})",
                  plot_index)
    page.wait_for_timeout(300)
    px = page.evaluate("""([i, x, y]) => { const gd = document.querySelectorAll('.js-plotly-plot')[i];
        const fl = gd._fullLayout, r = gd.getBoundingClientRect();
        return [r.left + fl._size.l + fl.xaxis.l2p(x), r.top + fl._size.t + fl.yaxis.l2p(y)]; }""",
                       [plot_index, x, y])
    page.mouse.click(*px)


@pytest.mark.browser
def test_clicking_a_head_opens_its_attention_pattern(server, tmp_path):
    base, p = server
    ctx = browser_context(p, str(tmp_path / "carol"))
    page = ctx.new_page()
    page.goto(f"{base}/?page=heads&model={DEFAULT_MODEL}")
    wait_for_plots(page, n=2)
    click_cell(page, 0, 6, 18)  # induction heatmap, layer 18 head 6
    page.wait_for_function("window.location.search.includes('page=attention') && "
                           "window.location.search.includes('layer=18') && window.location.search.includes('head=6')",
                           timeout=300_000)
    page.wait_for_function("[...document.querySelectorAll('.js-plotly-plot')].some(p => "
                           "(p.layout.title.text || '').includes('layer 18 head 6'))", timeout=300_000)
    ctx.close()


@pytest.mark.browser
def test_shared_link_reopens_the_same_view_from_the_store(server, tmp_path):
    """Type a prompt, see the logit lens, open the page's URL in a new browser: same figure, no run."""
    base, p = server
    prompt = "The Eiffel Tower is in the city of"
    ctx = browser_context(p, str(tmp_path / "alice"))
    page = ctx.new_page()
    page.goto(f"{base}/?page=prompt&model={DEFAULT_MODEL}")
    wait_for_plots(page)
    page.locator("textarea").fill(prompt)
    page.get_by_role("button", name="Run").click()
    page.wait_for_function("document.body.innerText.includes('prompt analysis: computed in') && "
                           "[...document.querySelectorAll('.js-plotly-plot')].some(p => "
                           "(p.layout.title.text || '').includes('Logit lens') && "
                           "JSON.stringify(p.layout.xaxis.ticktext).includes('Tower'))", timeout=400_000)
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
                            timeout=120_000)
    assert "computed in" not in page2.inner_text("body").split("Logit lens shows")[0]
    assert _figure_data(page2) == figure and json.loads(figure)
    page2.screenshot(path=str(tmp_path / "reopened.png"), full_page=True)
    ctx2.close()


@pytest.mark.browser
def test_click_to_patch_runs_the_clicked_patch(server, tmp_path):
    """Click a cell of the patching heatmap: that patch runs and its result equals the sweep's cell."""
    base, p = server
    ctx = browser_context(p, str(tmp_path / "dave"))
    page = ctx.new_page()
    page.goto(f"{base}/?page=patching&model={DEFAULT_MODEL}")
    page.wait_for_function("[...document.querySelectorAll('.js-plotly-plot')].some(p => "
                           "(p.layout.title.text || '').includes('resid_pre'))", timeout=400_000)
    page.wait_for_timeout(1000)
    click_cell(page, 0, 9, 10)  # resid_pre at layer 10, position 9 (the second name)
    page.wait_for_function("document.body.innerText.includes('Patch at layer 10, pos 9')", timeout=120_000)
    page.wait_for_function("window.location.search.includes('cell=10%2C9') || "
                           "window.location.search.includes('cell=10,9')", timeout=30_000)
    page.wait_for_function("document.querySelectorAll(\"[data-testid='stMetricValue']\").length >= 3",
                           timeout=60_000)
    values = page.eval_on_selector_all("[data-testid='stMetricValue']", "els => els.map(e => e.innerText)")
    before, after, stored = (float(v) for v in values[:3])
    assert after == pytest.approx(stored, abs=2e-3) and after > 0.5 and before == pytest.approx(0.0, abs=1e-3)
    ctx.close()


_REOPEN = """
import json, sys
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=600)
for kv in sys.argv[2:]:
    k, v = kv.split("=", 1)
    at.query_params[k] = v
at.run()
print(json.dumps({"torch": "torch" in sys.modules, "errors": [e.value for e in at.error],
                  "exception": [str(x.value) for x in at.exception], "charts": len(at.get("plotly_chart"))}))
"""


def test_a_task_link_reopens_from_the_store_without_torch(tmp_path):
    """A patching link that names a task (IOI, 2 pairs): the first open generates the pairs with
    the model and stores them with the result; reopening it in a fresh process reads both from
    the store and never imports torch."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DASHBOARD_STORE": str(tmp_path / "s.duckdb"), "DASHBOARD_BOOTSTRAP": "0"}
    params = [f"model={DEFAULT_MODEL}", "page=patching", "task=ioi", "n_pairs=2", "site=resid_pre"]

    def open_link():
        r = subprocess.run([sys.executable, "-c", _REOPEN, APP, *params], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])
    first = open_link()
    assert not first["exception"] and not first["errors"] and first["charts"] >= 1, first
    again = open_link()
    assert not again["exception"] and not again["errors"] and again["charts"] >= 1, again
    assert not again["torch"], "reopening a stored task link imported torch"


def test_a_page_runs_a_corpus_job_from_its_button(model, session_corpus):
    """The neuron page's "Compute neuron statistics" (app.common.run_job_button): the job runs
    under a progress bar and the rerun page shows the statistics it stored."""
    at = _app(page="neuron", model=DEFAULT_MODEL, layer=2)
    buttons = [b for b in at.button if b.label == "Compute neuron statistics"]
    if not buttons:
        pytest.skip("this session's store already holds neuron statistics")
    at.number_input(key="w_ns_windows").set_value(4)
    buttons[0].click()
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert not [b for b in at.button if b.label == "Compute neuron statistics"]
    assert len(at.get("plotly_chart")) >= 1
