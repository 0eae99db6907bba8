"""Edge-level circuits on the real default model with an IOI pair: the circuit run against a
per-node reference loop, EAP scores against TransformerBridge gradients and finite differences,
store / CLI / links, and a real-browser click that removes a node."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
import torch

from .browser import browser_context, dashboard, wait_for_plots
from .conftest import DEFAULT_MODEL

pytestmark = pytest.mark.model   # loads the real model

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
TASK = dict(model=DEFAULT_MODEL, clean=CLEAN, corrupt=CORRUPT, answer=" Mary", wrong=" John", metric="logit_diff")


def test_graph_has_every_upstream_to_downstream_edge():
    from kernels.circuits import Graph

    g = Graph(30, 9)
    assert len(g.up) == 301 and len(g.down) == 301
    # into a head of layer l: 1 + 10 l sources; into M_l: 10 + 10 l; into logits: all 301
    assert g.n_edges == sum(9 * (1 + 10 * l) + 10 + 10 * l for l in range(30)) + 301 == 44371
    v = g.valid
    assert v[g.up_index["A3.8"], g.down_index["M3"]] and not v[g.up_index["A3.8"], g.down_index["A3.0"]]
    assert not v[g.up_index["M3"], g.down_index["A3.0"]] and v[g.up_index["M2"], g.down_index["A3.0"]]


@pytest.fixture(scope="module")
def pair(model):
    from backend.analyses.circuits import _kernel_metric
    from backend.tasks import encode_pairs
    from kernels import circuits as kc
    from kernels import patching as kp

    e = encode_pairs(model, [(CLEAN, CORRUPT, " Mary", " John")])
    fm = kp.fast_model(model)
    g = kc.Graph(model.info.n_layers, model.info.n_heads)
    metric = _kernel_metric(model, fm, e, "logit_diff")
    return e[0], fm, g, metric


def test_circuit_run_full_empty_and_random_equal_the_reference_loop(model, pair):
    """Every edge: the clean logit diff (bridge); no edge: the corrupt one; a random
    edges (90 %): the plain per-node loop over bridge activations."""
    from kernels import circuits as kc

    e, fm, g, metric = pair
    with model.lock, torch.inference_mode():
        clean_ld, corrupt_ld = (float(model.logits(ids)[0, -1, e.answer_id]
                                      - model.logits(ids)[0, -1, e.wrong_id])
                                for ids in (e.clean_ids, e.corrupt_ids))
    gen = torch.Generator().manual_seed(0)
    U, D = len(g.up), len(g.down)
    rand = (torch.rand(U, D, generator=gen) < 0.9).float() * g.valid
    with model.lock:
        cr = kc.corrupt_run(fm, [e.corrupt_ids], metric, g)
        vals = kc.run_circuits(fm, [e.clean_ids], cr, torch.stack([torch.ones(U, D), torch.zeros(U, D), rand]),
                               metric, g)[:, 0].tolist()
        edges = {(g.up[u], g.down[d]) for u, d in rand.nonzero().tolist()}
        ref = kc.reference_circuit_metric(model, fm, e.clean_ids, e.corrupt_ids, edges, metric, g)
    assert vals[0] == pytest.approx(clean_ld, abs=1e-3) and vals[1] == pytest.approx(corrupt_ld, abs=1e-3)
    assert abs(clean_ld - corrupt_ld) > 5
    assert vals[2] == pytest.approx(ref, abs=1e-3)
    assert abs(vals[2] - vals[0]) > 0.05 and abs(vals[2] - vals[1]) > 0.05   # a circuit in between


def test_eap_scores_equal_bridge_gradients_and_finite_differences(model, pair):
    """score(u -> d) = (corrupt_out_u - clean_out_u) . dM/d in_d. Checked independently with
    TransformerBridge hooks: for every edge into an MLP (ln2.hook_in) and into the logits
    (ln_final.hook_in), and per layer for the sum over heads (ln1.hook_in feeds all heads);
    single head edges by central differences of the circuit run (an edge partly corrupted)."""
    from backend.analyses.circuits import EdgeScoresSpec
    from backend.runner import run
    from backend.sites import Component, Site, hook_name
    from kernels import circuits as kc

    e, fm, g, metric = pair
    sc = run(EdgeScoresSpec(**TASK)).result
    S = torch.as_tensor(sc.scores, dtype=torch.float64)
    L, H, Dh = model.info.n_layers, model.info.n_heads, model.info.d_head
    outs_names = [hook_name(Site(Component.EMBED))] + [hook_name(Site(c, j)) for j in range(L)
                                                        for c in (Component.Z, Component.MLP_OUT)]
    in_names = ([hook_name(Site(Component.LN1_IN, j)) for j in range(L)] + [hook_name(Site(Component.LN2_IN, j)) for j in range(L)]
                + [hook_name(Site(Component.FINAL_IN))])

    def node_outs(cache):        # [U T d] in graph.up order, from bridge activations
        rows = [cache[outs_names[0]][0]]
        for j in range(L):
            z = cache[hook_name(Site(Component.Z, j))][0]
            rows += [z[:, h] @ fm.layers[j]["wo"][:, h * Dh:(h + 1) * Dh].T for h in range(H)]
            rows.append(cache[hook_name(Site(Component.MLP_OUT, j))][0])
        return torch.stack(rows).double()

    with model.lock:
        with torch.inference_mode():
            _, cc = model.run_with_cache(e.corrupt_ids, outs_names)
            corrupt_outs = node_outs(cc)
        acts = {}

        def keep(name):
            def f(act, hook):
                acts[name] = act
                return act
            return f

        def keep_in(name):       # a copy read only by the norm: its grad excludes the residual path
            def f(act, hook):
                acts[name] = act.clone()
                return acts[name]
            return f

        def leaf(act, hook):
            return act.detach().requires_grad_(True)
        with torch.enable_grad(), model.hooks(fwd_hooks=[(outs_names[0], leaf)] + [(n, keep(n)) for n in outs_names[1:]]
                          + [(n, keep_in(n)) for n in in_names]):
            logits = model.forward(e.clean_ids)
            m = logits[0, -1, e.answer_id] - logits[0, -1, e.wrong_id]
            grads = dict(zip(in_names, (x[0].double() for x in torch.autograd.grad(m, [acts[n] for n in in_names]))))
        clean_outs = node_outs({**{n: acts[n].detach() for n in outs_names[1:]},
                                outs_names[0]: fm.embed(model.tensor(e.clean_ids)).detach()})
    delta = corrupt_outs - clean_outs                                           # [U T d]
    checked = 0
    for j in range(L):
        n = g.prefix(f"M{j}")
        want = torch.einsum("utk,tk->u", delta[:n], grads[hook_name(Site(Component.LN2_IN, j))])
        torch.testing.assert_close(S[:n, g.down_index[f"M{j}"]], want, atol=2e-3, rtol=2e-3)
        n = g.prefix(f"A{j}.0")
        want = torch.einsum("utk,tk->u", delta[:n], grads[hook_name(Site(Component.LN1_IN, j))])
        torch.testing.assert_close(S[:n, g.head_cols(j)].sum(1), want, atol=2e-3, rtol=2e-3)
        checked += 1
    want = torch.einsum("utk,tk->u", delta, grads[hook_name(Site(Component.FINAL_IN))])
    torch.testing.assert_close(S[:, g.down_index["logits"]], want, atol=2e-3, rtol=2e-3)
    assert checked == L and float(S.abs().max()) > 1.0          # not trivially zero
    # single head edges: d/d eps of the metric with edge u->d carrying (1 - eps) of its clean delta
    U, D = len(g.up), len(g.down)
    picks = [("M0", "A23.3"), ("A20.0", "A23.3"), ("input", "A5.2"), ("A23.3", "A29.1")]
    eps = 0.05
    masks = []
    for u, d in picks:
        for sgn in (1, -1):
            mk = torch.ones(U, D)
            mk[g.up_index[u], g.down_index[d]] = 1 - sgn * eps
            masks.append(mk)
    with model.lock:
        cr = kc.corrupt_run(fm, [e.corrupt_ids], metric, g)
        vals = kc.run_circuits(fm, [e.clean_ids], cr, torch.stack(masks).double(), metric, g)[:, 0].double()
    fd = (vals[0::2] - vals[1::2]) / (2 * eps)
    eap = torch.tensor([float(S[g.up_index[u], g.down_index[d]]) for u, d in picks], dtype=torch.float64)
    torch.testing.assert_close(fd, eap, atol=0.02, rtol=0.05)


def test_eap_ig_with_one_step_is_eap_and_more_steps_differ(model):
    from backend.analyses.circuits import EdgeScoresSpec
    from backend.runner import run

    eap = run(EdgeScoresSpec(**TASK)).result.scores
    ig1 = run(EdgeScoresSpec(**TASK, method="eap-ig", ig_steps=1)).result.scores
    np.testing.assert_allclose(ig1, eap, atol=1e-5, rtol=1e-4)
    # more steps average the gradient along the path: the scores move (not by rounding)
    ig4 = run(EdgeScoresSpec(**TASK, method="eap-ig", ig_steps=4)).result.scores
    assert np.abs(ig4 - eap).max() > 1e-2 * np.abs(eap).max()
    assert np.corrcoef(ig4.ravel(), eap.ravel())[0, 1] > 0.5          # ... and still measure the same thing


def test_circuit_store_cli_pruning_removal_and_saved(model, store, capsys):
    from backend import cli
    from backend.analyses.circuits import CircuitSpec, prune, save_circuit, saved_circuits, select_edges
    from backend.errors import InvalidSpec, PromptLengthMismatch
    from backend.runner import run
    from kernels import circuits as kc
    from kernels import patching as kp

    args = ["circuit", "--model", DEFAULT_MODEL, "--clean", CLEAN, "--corrupt", CORRUPT, "--answer", " Mary",
            "--wrong", " John", "--metric", "logit_diff", "--method", "eap", "--top-n", "80", "--format", "json"]
    assert cli.main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert cli.main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert first["compute_seconds"] > 0 and again["compute_seconds"] == 0 and again["from_store"]
    assert again["edges"] == first["edges"] and again["faithfulness"] == first["faithfulness"]
    assert {"run_key", "edges", "nodes", "faithfulness"} <= set(first) and "logits" in first["nodes"]
    # the reported faithfulness equals running the same (pruned) circuit again, unpruned
    spec = CircuitSpec(**TASK, top_n=80)
    r = run(spec, store=store).result
    assert r.faithfulness == pytest.approx(first["faithfulness"], abs=1e-6)
    e_graph = kc.Graph(30, 9)
    sc = run(spec.scores_spec()).result
    sel = select_edges(sc.scores, e_graph.valid.numpy(), 80, 0.0)
    pruned = prune(sel, sc.up, sc.down)
    assert pruned.sum() == len(r.edge_score) < sel.sum()
    from backend.analyses.circuits import _kernel_metric
    from backend.tasks import encode_pairs
    e = encode_pairs(model, spec.pairs())
    fm = kp.fast_model(model)
    with model.lock:
        metric = _kernel_metric(model, fm, e, "logit_diff")
        cr = kc.corrupt_run(fm, [e[0].corrupt_ids], metric, e_graph)
        both = kc.run_circuits(fm, [e[0].clean_ids], cr, torch.as_tensor(np.stack([sel, pruned])), metric, e_graph)
    assert float(both[0, 0]) == pytest.approx(float(both[1, 0]), abs=1e-4)          # pruning is exact
    faith = (float(both[0, 0]) - sc.corrupt_raw) / (sc.clean_raw - sc.corrupt_raw)
    assert faith == pytest.approx(r.faithfulness, abs=1e-5)
    # removing the top node changes the faithfulness; the removal is in the key
    top = str(r.edge_from[0]) if str(r.edge_from[0]) != "input" else str(r.edge_to[0])
    r2 = run(spec.replace(removed=(top,)), store=store).result
    assert top not in r2.nodes and abs(r2.faithfulness - r.faithfulness) > 0.01
    assert spec.replace(removed=(top,)).key() != spec.key()
    # bad input: typed errors, nothing stored
    before = store.count_runs()
    with pytest.raises(PromptLengthMismatch):
        run(CircuitSpec(**{**TASK, "corrupt": "When Mary and John went to the big store, Mary gave a drink to"}), store=store)
    with pytest.raises(InvalidSpec):
        run(spec.replace(removed=("A99.1",)), store=store)
    for bad in (dict(top_n=0), dict(method="acdc"), dict(metric="kl")):
        with pytest.raises(InvalidSpec):
            CircuitSpec(**{**TASK, **bad})
    assert store.count_runs() == before
    # saved circuits
    cid = save_circuit("IOI top 80", spec, r.faithfulness, link={"page": "circuits", "top_n": "80"}, store=store)
    rows = saved_circuits(store=store)
    assert [x["id"] for x in rows] == [cid] and rows[0]["spec"] == spec and rows[0]["link"]["circuit"] == cid
    with pytest.raises(InvalidSpec):
        save_circuit("  ", spec, 0.5, store=store)


_METRICS = """() => { const m = {};
    document.querySelectorAll("[data-testid='stMetric']").forEach(e => {
        const l = e.querySelector("[data-testid='stMetricLabel']"), v = e.querySelector("[data-testid='stMetricValue']");
        if (l && v) m[l.innerText.trim()] = v.innerText.trim(); });
    return m; }"""


@pytest.mark.browser
def test_clicking_a_node_removes_it_and_reruns(tmp_path):
    """Real browser: open a circuit, click its top head; the faithfulness changes and the URL
    records the removal."""
    from playwright.sync_api import sync_playwright

    url = ("/?page=circuits&model=smollm2-135m&task=custom&metric=logit_diff&method=eap&top_n=30"
           f"&clean={CLEAN}&corrupt={CORRUPT}&answer=%20Mary&wrong=%20John").replace(" ", "%20")
    with dashboard({"DASHBOARD_STORE": str(tmp_path / "e2e.duckdb")}) as base, sync_playwright() as p:
        ctx = browser_context(p, str(tmp_path / "eve"))
        page = ctx.new_page()
        page.goto(base + url)
        page.wait_for_function("[...document.querySelectorAll('.js-plotly-plot')].some(p => "
                               "(p.layout.title.text || '').includes('Circuit: top 30'))", timeout=400_000)
        wait_for_plots(page)
        page.wait_for_timeout(1000)
        before = page.evaluate(_METRICS)["faithfulness"]
        # the node A23.3 (layer 23, head 3) from its position in the figure
        px = page.evaluate("""() => { const gd = [...document.querySelectorAll('.js-plotly-plot')].find(p =>
            (p.layout.title.text || '').includes('Circuit')); gd.scrollIntoView({block: 'center'});
            const fl = gd._fullLayout, r = gd.getBoundingClientRect();
            return [r.left + fl._size.l + fl.xaxis.l2p(23), r.top + fl._size.t + fl.yaxis.l2p(3)]; }""")
        page.mouse.click(*px)
        page.wait_for_function("window.location.search.includes('removed=A23.3')", timeout=300_000)
        page.wait_for_function("() => { const m = (" + _METRICS + ")(); const b = m['before the last removal'];"
                               " return b !== undefined && b !== '–'; }", timeout=300_000)
        vals = page.evaluate(_METRICS)   # by label: while Streamlit reruns, stale and new elements mix
        assert vals["before the last removal"] == before and vals["faithfulness"] != before, vals
        assert parse_qs(urlparse(page.url).query)["removed"] == ["A23.3"]
        ctx.close()
