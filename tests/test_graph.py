"""Attribution graphs: edges checked against an independent forward of the local replacement
model, against circuit-tracer itself when its venv is there, pruning and scores on graphs whose
answer is known, the CLI promise, exports, and bad input. A random transcoder set (written
here, circuit-tracer's format) stands in for a trained one: the maths does not care."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backend import transcoders as tc
from backend.analyses.graph import graph_scores, influence, prune

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"


# -- pruning and scores: pure functions of the adjacency (fast tier) ----------------------------
def _chain():
    """Nodes: f0, f1 (features), e0 (error), t0 (token), k0 (logit). t0 -> f0 -> k0 strongly,
    t0 -> f1 -> k0 weakly, e0 -> k0 moderately."""
    A = torch.zeros(5, 5)
    f0, f1, e0, t0, k0 = range(5)
    A[f0, t0], A[f1, t0] = 1.0, 1.0
    A[k0, f0], A[k0, f1], A[k0, e0] = 8.0, 0.5, 1.5
    return A


def test_influence_sums_paths():
    A = _chain()
    M = A.abs() / A.abs().sum(1, keepdim=True).clamp(min=1e-10)
    w = torch.tensor([0, 0, 0, 0, 1.0])
    inf = influence(M, w)
    assert inf[0] == pytest.approx(0.8) and inf[2] == pytest.approx(0.15)
    assert inf[3] == pytest.approx(0.8 + 0.05)          # the token reaches the logit through both features


def test_scores_of_known_graphs():
    A = _chain()
    rep, comp = graph_scores(A, n_features=2, n_layers=1, n_tokens=1, n_logits=1, probs=torch.tensor([1.0]))
    assert rep == pytest.approx(0.85 / (0.85 + 0.15))
    assert 0 < comp < 1
    A[4, 2] = 0                                           # no error edge: everything through features
    assert graph_scores(A, 2, 1, 1, 1, torch.tensor([1.0])) == (pytest.approx(1.0), pytest.approx(1.0))


def test_pruning_keeps_the_strong_path():
    node_mask, edge_mask, _ = prune(_chain(), n_features=2, n_tokens=1, n_logits=1, probs=torch.tensor([1.0]),
                                    node_threshold=0.8, edge_threshold=0.98)
    assert node_mask.tolist() == [True, False, False, True, True]      # f0 and the token carry 0.8 of the influence
    assert bool(edge_mask[4, 0]) and bool(edge_mask[0, 3]) and not bool(edge_mask[1, 3])


# -- the model tier -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_set(tmp_path_factory, model):
    """30 random JumpReLU transcoders with skip connections, 64 latents each."""
    folder = tmp_path_factory.mktemp("tc") / "random-plt"
    folder.mkdir()
    d = model.info.d_model
    g = torch.Generator().manual_seed(0)
    for layer in range(model.info.n_layers):
        save_file({"W_enc": torch.randn(64, d, generator=g) * 3 / d ** 0.5, "W_dec": torch.randn(64, d, generator=g) * 0.05,
                   "b_enc": torch.full((64,), -0.5), "b_dec": torch.zeros(d), "W_skip": torch.randn(d, d, generator=g) * 0.01,
                   "activation_function.threshold": torch.full((64,), 0.1)}, str(folder / f"layer_{layer}.safetensors"))
    tc.write_config(folder, "smollm2-135m", model.info.n_layers, {"d_transcoder": 64})
    return folder


@pytest.fixture(scope="module")
def small_graph(model, random_set):
    from backend.analyses.graph import graph_ids
    from kernels import graph as kg
    from kernels.patching import fast_model

    tset = tc.load_set(str(random_set))
    fm = fast_model(model)
    ids = graph_ids(model, PROMPT)
    with torch.inference_mode():
        gi = kg.graph_inputs(fm, ids)
        nodes = kg.active_nodes(tset, gi, fm.W_U, 10, 0.95)
        A = kg.adjacency(fm, gi, nodes, tset.W_skip)
    return fm, tset, ids, gi, nodes, A


@pytest.mark.model
def test_reference_forward_reproduces_the_model(small_graph):
    """At scale 1 the frozen replacement forward gives the real pre-activations and logits:
    the linearisation is around the real run, the error terms make it exact."""
    from kernels import graph as kg

    fm, tset, ids, gi, nodes, A = small_graph
    L, T = gi.mlp_in.shape[:2]
    ones = {"features": torch.ones(len(nodes.layer)), "errors": torch.ones(L, T), "tokens": torch.ones(T)}
    with torch.inference_mode():
        pre, logits = kg.replacement_targets(fm, gi, nodes, tset, ones)
    real = torch.stack([tset.pre(int(l), gi.mlp_in[int(l), int(p)])[int(f)]
                        for l, p, f in zip(nodes.layer, nodes.pos, nodes.feature)])
    torch.testing.assert_close(pre, real, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, gi.logits[nodes.logit_ids] - gi.logits.mean(), atol=1e-3, rtol=1e-4)


@pytest.mark.model
def test_each_edge_is_the_effect_of_its_source(small_graph):
    """A one-hot source through the replacement model's linear map moves each target by its
    edge weight (features, errors and tokens sampled; 1e-4 of the column's largest edge)."""
    from kernels import graph as kg

    fm, tset, ids, gi, nodes, A = small_graph
    L, T = gi.mlp_in.shape[:2]
    F, K = len(nodes.layer), len(nodes.logit_ids)
    g = torch.Generator().manual_seed(3)
    sources = torch.randint(0, F, (6,), generator=g).tolist() + [F + 5 * T + 2, F + 20 * T + T - 1, F + L * T + 1]
    for s in sources:
        sc = {"features": torch.zeros(F), "errors": torch.zeros(L, T), "tokens": torch.zeros(T)}
        if s < F:
            sc["features"][s] = 1
        elif s < F + L * T:
            sc["errors"][divmod(s - F, T)] = 1
        else:
            sc["tokens"][s - F - L * T] = 1
        with torch.inference_mode():
            pre, logits = kg.replacement_targets(fm, gi, nodes, tset, sc, linear=True)
        col = torch.cat([A[:F, s], A[-K:, s]])
        assert float(col.abs().max()) > 0
        torch.testing.assert_close(torch.cat([pre, logits]), col, atol=1e-4 * float(col.abs().max()), rtol=0)


def _ct_python() -> str | None:
    p = os.environ.get("CIRCUIT_TRACER_PYTHON", "")
    return p if p and Path(p).exists() else None


@pytest.mark.model
def test_equals_circuit_tracer(small_graph, random_set, tmp_path):
    """The unpruned graph equals circuit-tracer 0.5.0's on the same model, transcoders and
    prompt: same logit targets, same active features, adjacency within 1e-3 of max |A|; and
    the scores within 1e-4. circuit-tracer lives in its own venv (see
    benchmarks/ct_graph_reference.py for the install line; CIRCUIT_TRACER_PYTHON points at it)."""
    py = _ct_python()
    if py is None:
        pytest.skip("set CIRCUIT_TRACER_PYTHON to a venv made by: python3 -m venv ct-venv && ct-venv/bin/pip install "
                    "torch==2.13.0 && ct-venv/bin/pip install circuit-tracer==0.5.0 nnsight==0.6.1")
    from backend.model.loading import OFFLINE_MODELS, converted_dir

    fm, tset, ids, gi, nodes, A = small_graph
    out = tmp_path / "ct.pt"
    r = subprocess.run([py, str(ROOT / "benchmarks" / "ct_graph_reference.py"), "--model-dir",
                        str(converted_dir(OFFLINE_MODELS["smollm2-135m"])), "--transcoders", str(random_set),
                        "--ids", json.dumps(ids), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = torch.load(str(out) + ".plain.pt", weights_only=False)
    assert ref["logit_ids"].tolist() == nodes.logit_ids.tolist()
    assert torch.equal(ref["active_features"].long(), torch.stack([nodes.layer, nodes.pos, nodes.feature], 1))
    B = ref["adjacency_matrix"]
    assert float((A - B).abs().max()) <= 1e-3 * float(B.abs().max())
    F, L, T, K = len(nodes.layer), gi.mlp_in.shape[0], len(ids), len(nodes.logit_ids)
    rep, comp = graph_scores(A, F, L, T, K, nodes.logit_probs.float())
    assert rep == pytest.approx(ref["scores"][0], abs=1e-4) and comp == pytest.approx(ref["scores"][1], abs=1e-4)


@pytest.mark.model
def test_cli_graph_is_stored_and_exported(random_set, tmp_path):
    from backend.cli import execute

    argv = ["graph", "--text", PROMPT, "--transcoders", str(random_set), "--format", "json"]
    code, out = execute(argv)
    assert code == 0, out
    for field in ("run_key", "tokens", "logits", "nodes", "edges", "replacement_score", "completeness_score",
                  "replacement_score_unpruned", "completeness_score_unpruned", "n_active_features", "seconds"):
        assert field in out
    assert out["tokens"][0] == "<|im_start|>" and out["logits"][0]["token"] == " Paris"
    kinds = {n["kind"] for n in out["nodes"]}
    assert {"embedding", "logit"} <= kinds and kinds <= {"embedding", "feature", "error", "logit"}
    ids = {n["id"] for n in out["nodes"]}
    assert all(e["source"] in ids and e["target"] in ids for e in out["edges"])
    for n in out["nodes"]:
        assert {"id", "kind", "layer", "pos", "feature", "activation", "influence", "label"} <= set(n)
    assert 0 <= out["replacement_score"] <= 1 and 0 <= out["completeness_score_unpruned"] <= 1
    code, again = execute(argv)
    assert again["from_store"] and again["run_key"] == out["run_key"]

    code, js = execute(["export", "graph", "--key", out["run_key"], "--format", "neuronpedia", "--out",
                        str(tmp_path / "g.json")])
    assert code == 0, js
    doc = json.loads((tmp_path / "g.json").read_text())
    assert {"metadata", "qParams", "nodes", "links"} <= set(doc) and len(doc["links"]) == len(out["edges"])
    code, pt = execute(["export", "graph", "--key", out["run_key"], "--format", "circuit-tracer", "--out",
                        str(tmp_path / "g.pt")])
    assert code == 0, pt
    d = torch.load(tmp_path / "g.pt", weights_only=False)
    assert d["adjacency_matrix"].shape[0] == pt["nodes"] and d["active_features"].shape[1] == 3
    py = _ct_python()
    if py:   # circuit-tracer reads the file as its own Graph
        r = subprocess.run([py, "-c", "import sys; from circuit_tracer.graph import Graph, compute_graph_scores; "
                            "g = Graph.from_pt(sys.argv[1]); print(len(g.logit_targets), g.n_pos)", str(tmp_path / "g.pt")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split() == [str(len(out["logits"])), str(len(out["tokens"]))]


@pytest.mark.model
@pytest.mark.parametrize("argv, code", [
    (["--node-threshold", "0"], "out_of_range"), (["--edge-threshold", "1.5"], "out_of_range"),
    (["--max-logits", "0"], "out_of_range"), (["--max-logits", "51"], "out_of_range"),
    (["--transcoders", "no-such-set"], "unknown_transcoders"), (["--text", "   "], "empty_prompt"),
    (["--text", "word " * 60], "prompt_too_long")])
def test_bad_input_is_typed_and_nothing_stored(random_set, argv, code):
    from backend.cli import execute
    from backend.store import default_store

    base = {"--text": PROMPT, "--transcoders": str(random_set)}
    for k, v in zip(argv[::2], argv[1::2]):
        base[k] = v
    before = default_store().count_runs("graph")
    rc, out = execute(["graph", *[x for kv in base.items() for x in kv], "--format", "json"])
    assert rc == 2 and out["error"]["code"] == code, out
    assert default_store().count_runs("graph") == before


@pytest.mark.model
def test_damaged_set_is_refused(random_set, tmp_path):
    import shutil

    from backend.cli import execute

    bad = tmp_path / "bad"
    shutil.copytree(random_set, bad)
    (bad / "layer_7.safetensors").unlink()
    rc, out = execute(["graph", "--text", PROMPT, "--transcoders", str(bad), "--format", "json"])
    assert rc == 2 and out["error"]["code"] == "damaged_transcoders" and "7" in out["error"]["message"]


@pytest.mark.model
def test_intervention_identity_and_zeroing_equal_hooks(model, small_graph):
    """Setting features to their own activation changes nothing, bitwise; zeroing a feature
    equals the same edit written as two plain hooks on the bridge (logits within 1e-4)."""
    from backend.analyses.graph_intervention import intervene

    fm, tset, ids, gi, nodes, A = small_graph
    early = nodes.layer < 20          # a feature of the last layer off the last position reaches no logit
    picks = [int(i) for i in torch.argsort(nodes.activation * early, descending=True)[:3]]
    own = [(int(nodes.layer[i]), int(nodes.pos[i]), int(nodes.feature[i]), "set", float(nodes.activation[i])) for i in picks]
    clean, same, _ = intervene(model, tset, ids, [(l, p, f, "scale", 1.0) for l, p, f, _, _ in own])
    assert torch.equal(clean, same)
    l, p, f = own[0][:3]
    _, zeroed, seen = intervene(model, tset, ids, [(l, p, f, "set", 0.0)])
    assert seen[0][0] == pytest.approx(float(nodes.activation[picks[0]]), rel=1e-4) and seen[0][1] == 0.0
    held = {}

    def keep(x, hook):
        held["x"] = x

    def edit(y, hook):
        a = tset.encode(l, held["x"][0, p].float())[f]
        y = y.clone()
        y[0, p] -= a * tset.W_dec[l][f]
        return y
    with torch.inference_mode():
        ref = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{l}.mlp.hook_in", keep), (f"blocks.{l}.hook_mlp_out", edit)])
    ref = ref[0, -1] if ref.dim() == 3 else ref[-1]
    torch.testing.assert_close(zeroed, ref.float(), atol=1e-4, rtol=1e-4)
    assert float((zeroed - clean).abs().max()) > 1e-3


@pytest.mark.model
def test_cli_intervention(random_set, small_graph):
    from backend.cli import execute

    fm, tset, ids, gi, nodes, A = small_graph
    i = int(torch.argmax(nodes.activation * (nodes.layer < 20)))
    node = f"{int(nodes.layer[i])}_{int(nodes.feature[i])}_{int(nodes.pos[i])}"
    code, out = execute(["graph-intervene", "--text", PROMPT, "--transcoders", str(random_set), "--set", f"{node}=x5",
                         "--format", "json"])
    assert code == 0, out
    assert out["edits"][0]["after"] == pytest.approx(5 * out["edits"][0]["before"], rel=1e-5)
    assert out["target"]["token"] == out["top_before"][0]["token"]
    for bad, err in [("nonsense", "invalid_spec"), ("99_0_1=0", "out_of_range")]:
        code, out = execute(["graph-intervene", "--text", PROMPT, "--transcoders", str(random_set), "--set", bad,
                             "--format", "json"])
        assert code == 2 and out["error"]["code"] == err, out


@pytest.mark.model
def test_model_without_transcoders_names_the_ones_that_have_them(monkeypatch, tmp_path, random_set):
    from backend.cli import execute

    monkeypatch.setattr(tc, "TRANSCODER_DIR", tmp_path)          # no shipped set at all
    rc, out = execute(["graph", "--text", PROMPT, "--format", "json"])
    assert rc == 2 and out["error"]["code"] == "unknown_transcoders"
    assert "no transcoders" in out["error"]["message"] and "none" in out["error"]["message"]
