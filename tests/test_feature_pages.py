"""The feature pages: dashboard, map, search under AppTest with a real (tiny) index in the
session store, bad links, and a real browser clicking a map point onto its dashboard."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from backend import corpus
from backend.jobs.features import fmap
from backend.jobs.features import index as fidx
from backend.jobs.features import query

from .browser import browser_context, dashboard, wait_for_plots
from .conftest import DEFAULT_MODEL, ROOT

pytestmark = pytest.mark.model   # loads the real model

APP = str(ROOT / "app" / "main.py")
SAE = "smollm2-135m-L5-resid_pre"
OTHER = "smollm2-135m-L25-resid_pre"     # never indexed here


def _app(**params) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=600)
    for k, v in params.items():
        at.query_params[k] = str(v)
    at.run()
    return at


def _text(at: AppTest) -> str:
    return " | ".join([m.value for m in at.markdown] + [h.value for h in at.header] + [s.value for s in at.subheader]
                      + [c.value for c in at.caption] + [i.value for i in at.info] + [w.value for w in at.warning])


@pytest.fixture(scope="module")
def indexed(model, tmp_path_factory):
    """A tiny index of SAE in the session store (what the pages read), and its map."""
    from backend.store import default_store

    root = tmp_path_factory.mktemp("pcorpus")
    corpus.build(["stdlib"], root=root, max_words=4000)
    corpus.tokenize(model.info.model_id, root=root)
    store = default_store()
    fidx.build_index(model.info.model_id, SAE, 8, store=store, root=root)
    fmap.build_map(store, SAE, write_file=False)       # reads the shipped map when it matches the weights
    idx = query.index_for(store, SAE)
    f = store.cursor().execute("SELECT feature FROM feature_stats WHERE ix = ? ORDER BY n DESC, feature LIMIT 1 "
                               "OFFSET 20", [idx.ix]).fetchall()[0][0]
    return {"store": store, "feature": int(f), "index": idx}


def test_feature_dashboard_page(indexed):
    f = indexed["feature"]
    at = _app(page="feature", sae=SAE, feature=f)
    assert not at.exception and not at.error, [e.value for e in at.error]
    text = _text(at)
    assert f"Feature #{f} of {SAE}" in text and "Top activating examples" in text
    assert "density" in [m.label for m in at.metric]
    titles = [c.proto.spec for c in at.get("plotly_chart")]
    assert len(titles) >= 2 and any("Logit effects" in t for t in titles) and any("activation value" in t for t in titles)
    sims = [b for b in at.button if b.label.startswith("#")]
    assert len(sims) == fidx.N_SIMILAR
    sims[0].click().run()                                   # a similar feature opens its own dashboard
    other = int(sims[0].label[1:].split(" ")[0])
    assert at.query_params["feature"] == [str(other)] or at.query_params["feature"] == str(other)
    assert f"Feature #{other} of {SAE}" in _text(at)


def test_dashboard_without_index_offers_to_build_it(indexed):
    at = _app(page="feature", sae=OTHER, feature=7)
    assert not at.exception and not at.error
    assert "feature-index" in _text(at) and any("Build the corpus index" in b.label for b in at.button)
    assert any("Logit effects" in c.proto.spec for c in at.get("plotly_chart"))


def test_map_and_search_pages(indexed):
    at = _app(page="featuremap", sae=SAE, feature=indexed["feature"])
    assert not at.exception and not at.error
    spec = at.get("plotly_chart")[0].proto.spec
    assert "log10 density" in spec and "UMAP 1" in spec
    at = _app(page="featuremap", sae=OTHER)
    assert not at.exception
    assert "feature-map --sae " + OTHER in _text(at) or "log10" not in _text(at)
    at = _app(page="search", sae=SAE, mode="token", q=" the")
    assert not at.exception and not at.error
    assert len(at.dataframe) == 1 and len(at.dataframe[0].value) > 0
    at = _app(page="search", sae=SAE, mode="text", q="The capital of France is Paris")
    assert not at.exception and not at.error
    df = at.dataframe[0].value
    assert list(df.columns)[:2] == ["feature", "dashboard"] and df["max"].is_monotonic_decreasing
    assert df["dashboard"].iloc[0].startswith("?page=feature") and f"feature={df['feature'].iloc[0]}" in df["dashboard"].iloc[0]


@pytest.mark.parametrize("params, expected", [
    ({"page": "feature", "sae": "no-such-sae", "feature": 3}, "unknown sae"),
    ({"page": "feature", "sae": SAE, "feature": 99999}, "does not exist"),
    ({"page": "featuremap", "sae": "no-such-sae"}, "unknown sae"),
    ({"page": "search", "sae": SAE, "mode": "token", "q": "   "}, "type a token"),
    ({"page": "search", "sae": SAE, "mode": "token", "q": "not one token at all"}, "not a single token"),
    ({"page": "search", "sae": SAE, "mode": "sideways", "q": "x"}, "unknown search mode"),
    ({"page": "search", "sae": "no-such-sae", "q": "x"}, "unknown sae"),
])
def test_bad_feature_links(indexed, params, expected):
    from backend.store import default_store

    before = default_store().count_runs()
    at = _app(**params)
    assert not at.exception, at.exception
    assert expected in " | ".join(e.value for e in at.error).lower()
    assert default_store().count_runs() == before


def _isolated_feature(xy: np.ndarray) -> int:
    """The feature farthest from its nearest neighbour (a click there cannot hit another)."""
    d = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return int(d.min(1).argmax())


@pytest.mark.browser
def test_clicking_a_map_point_opens_that_feature(indexed, tmp_path):
    from playwright.sync_api import sync_playwright

    from backend.store import Store

    xy = fmap.get_map(indexed["store"], SAE)
    f = _isolated_feature(xy)
    e2e = Store(tmp_path / "e2e.duckdb")                       # the server's own store: map + weight tables
    fmap._store_map(e2e, fidx.sae_key(SAE), xy)
    fidx.ensure_weight_tables(e2e, SAE)
    e2e.close()
    with dashboard({"DASHBOARD_STORE": str(tmp_path / "e2e.duckdb")}) as base, sync_playwright() as p:
        ctx = browser_context(p, str(tmp_path / "erin"))
        page = ctx.new_page()
        page.goto(f"{base}/?page=featuremap&model={DEFAULT_MODEL}&sae={SAE}")
        wait_for_plots(page)
        page.wait_for_timeout(1000)
        px = page.evaluate("""([x, y]) => { const gd = document.querySelectorAll('.js-plotly-plot')[0];
            const fl = gd._fullLayout, r = gd.getBoundingClientRect();
            return [r.left + fl._size.l + fl.xaxis.l2p(x), r.top + fl._size.t + fl.yaxis.l2p(y)]; }""",
                           [float(xy[f, 0]), float(xy[f, 1])])
        page.mouse.click(*px)
        page.wait_for_function("window.location.search.includes('page=feature&') || "
                               "window.location.search.endsWith('page=feature')", timeout=120_000)
        page.wait_for_function(f"document.body.innerText.includes('Feature #{f} of')", timeout=120_000)
        q = parse_qs(urlparse(page.url).query)
        assert q["page"] == ["feature"] and q["feature"] == [str(f)] and q["sae"] == [SAE]
        page.screenshot(path=str(tmp_path / "landed.png"), full_page=True)

        # the per-prompt features page: a click on a cell opens that feature's dashboard
        page.goto(f"{base}/?page=features&model={DEFAULT_MODEL}&sae={SAE}&text=The+capital+of+France+is+Paris")
        page.wait_for_function("[...document.querySelectorAll('.js-plotly-plot')].some(p => "
                               "(p.layout.title.text || '').includes('SAE features active'))", timeout=300_000)
        page.wait_for_timeout(1000)
        label, px = page.evaluate("""() => { const gd = [...document.querySelectorAll('.js-plotly-plot')].find(p =>
            (p.layout.title.text || '').includes('SAE features active'));
            const fl = gd._fullLayout, r = gd.getBoundingClientRect();
            return [fl.yaxis.ticktext[0], [r.left + fl.xaxis._offset + fl.xaxis.l2p(2),
                                           r.top + fl.yaxis._offset + fl.yaxis.l2p(0)]]; }""")
        page.mouse.click(*px)
        g = int(label.lstrip("#"))
        page.wait_for_function(f"window.location.search.includes('page=feature&') && "
                               f"window.location.search.includes('feature={g}')", timeout=120_000)
        page.wait_for_function(f"document.body.innerText.includes('Feature #{g} of')", timeout=120_000)
        ctx.close()
