"""The attribution-graph page in a real browser: a stored graph opened from its link, a node
clicked, two nodes pinned into a named supernode, the supernode switched off, the prediction
changed; the new link reopened in a fresh context shows the same from the store."""

from __future__ import annotations

from urllib.parse import parse_qs, quote, urlparse

import pytest
import torch
from safetensors.torch import save_file

from tests.browser import browser_context, dashboard, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.model]
PROMPT = "The capital of France is"

_METRICS = """() => { const m = {};
    document.querySelectorAll("[data-testid='stMetric']").forEach(e => {
        const l = e.querySelector("[data-testid='stMetricLabel']"), v = e.querySelector("[data-testid='stMetricValue']"),
              d = e.querySelector("[data-testid='stMetricDelta']");
        if (l && v) m[l.innerText.trim()] = [v.innerText.trim(), d ? d.innerText.trim() : ''];
    }); return m; }"""


def _random_set(folder, model):
    """Random transcoders strong enough that their features carry part of the prediction."""
    from backend import transcoders as tc

    folder.mkdir(parents=True)
    d = model.info.d_model
    g = torch.Generator().manual_seed(5)
    for layer in range(model.info.n_layers):
        save_file({"W_enc": torch.randn(48, d, generator=g) * 3 / d ** 0.5, "W_dec": torch.randn(48, d, generator=g) * 0.6,
                   "b_enc": torch.full((48,), -0.5), "b_dec": torch.zeros(d), "W_skip": torch.zeros(d, d),
                   "activation_function.threshold": torch.full((48,), 0.1)}, str(folder / f"layer_{layer}.safetensors"))
    tc.write_config(folder, "smollm2-135m", model.info.n_layers, {"d_transcoder": 48})
    return folder


def _click_node(page, node_id: str) -> None:
    """Click the marker of a node on the graph (its point on the trace named "nodes")."""
    page.wait_for_function("[...document.querySelectorAll('.js-plotly-plot')].some(p => p._fullLayout && "
                           "(p.layout.title.text || '').includes('Attribution graph'))", timeout=120_000)
    page.evaluate("""() => { const gd = [...document.querySelectorAll('.js-plotly-plot')].find(p =>
        (p.layout.title.text || '').includes('Attribution graph')); gd.scrollIntoView({block: 'center'}); }""")
    page.wait_for_timeout(400)
    px = page.evaluate("""(id) => { const gd = [...document.querySelectorAll('.js-plotly-plot')].find(p =>
        (p.layout.title.text || '').includes('Attribution graph'));
        const t = gd.data.find(d => d.name === 'nodes'); const i = t.customdata.findIndex(c => c.includes('<b>' + id + '</b>'));
        const fl = gd._fullLayout, r = gd.getBoundingClientRect();
        return [r.left + fl._size.l + fl.xaxis.l2p(t.x[i]), r.top + fl._size.t + fl.yaxis.l2p(t.y[i])]; }""", node_id)
    page.mouse.click(*px)


def test_graph_page_pin_supernode_switch_off_and_reopen(tmp_path, model):
    from playwright.sync_api import sync_playwright

    from backend.analyses.graph import GraphSpec
    from backend.runner import run
    from backend.store import Store

    tset = _random_set(tmp_path / "tc", model)
    store_path = tmp_path / "graph.duckdb"
    store = Store(store_path)
    out = run(GraphSpec(model="smollm2-135m", text=PROMPT, transcoders=str(tset)), store=store)
    feats = sorted([n for n in out.result.nodes if n["kind"] == "feature"], key=lambda n: -n["influence"])
    assert len(feats) >= 2, "the random set should give the pruned graph features"
    a, b = feats[0]["id"], feats[1]["id"]
    store.close()
    url = (f"/?page=graph&model=smollm2-135m&text={quote(PROMPT)}&tcs={quote(str(tset), safe='')}"
           f"&node_thr=0.8&edge_thr=0.98&key={out.run_key}")
    with dashboard({"DASHBOARD_STORE": str(store_path)}) as base, sync_playwright() as p:
        ctx = browser_context(p, str(tmp_path / "ann"))
        page = ctx.new_page()
        page.goto(base + url)
        page.wait_for_selector("text=read from the store", timeout=300_000)
        wait_idle(page)
        for node in (a, b):
            _click_node(page, node)
            page.wait_for_function(f"window.location.search.includes('gnode={node}')", timeout=120_000)
            wait_idle(page)
            page.get_by_role("button", name="Pin this node").click()
            page.wait_for_function(f"(new URLSearchParams(window.location.search).get('pinned') || '')"
                                   f".split(';').includes('{node}')", timeout=120_000)
            wait_idle(page)
        assert set(parse_qs(urlparse(page.url).query)["pinned"][0].split(";")) == {a, b}
        page.get_by_label("Supernode name").fill("capital city")
        page.get_by_role("button", name="Group into a supernode").click()
        page.wait_for_function("window.location.search.includes('supers=')", timeout=120_000)
        wait_idle(page)
        page.get_by_role("button", name="Switch off capital city").click()
        page.wait_for_function("window.location.search.includes('iv=')", timeout=300_000)
        page.wait_for_selector("text=Next-token probabilities before and after", timeout=300_000)
        wait_idle(page)
        m = page.evaluate(_METRICS)
        logit = next(v for k, v in m.items() if k.startswith("logit of"))
        assert logit[1] not in ("", "+0.000", "-0.000", "0.000"), m
        q = parse_qs(urlparse(page.url).query)
        assert q["supers"] == [f"capital city:{a},{b}"] and set(q["iv"][0].split(";")) == {f"{a}=0", f"{b}=0"}
        link = page.url
        ctx.close()

        ctx2 = browser_context(p, str(tmp_path / "bob"))
        page2 = ctx2.new_page()
        page2.goto(link)
        page2.wait_for_selector("text=Next-token probabilities before and after", timeout=300_000)
        wait_idle(page2)
        assert page2.get_by_text("intervention: read from the store").count() >= 1
        assert page2.get_by_text("attribution graph: read from the store").count() >= 1
        assert page2.evaluate(_METRICS) == m
        assert page2.get_by_text("capital city").count() >= 1
        ctx2.close()
