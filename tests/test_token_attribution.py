"""Token attribution (backend/analyses/token_attribution.py): saliency and input x gradient
against a plain gradient through the Hugging Face model, Integrated Gradients against a
hand-written Gauss-Legendre loop and against captum's LayerIntegratedGradients, the two
engines (dense, hooks) against each other, completeness with auto steps, the layer view,
the store, the CLI and bad inputs. Short prompts keep it fast."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backend.analyses.token_attribution import (MAX_STEPS, TokenAttributionSpec, attribute, baseline_embeddings,
                                                gauss_legendre, integrated_gradients)
from backend.errors import EmptyPrompt, IdenticalAnswers, InvalidSpec, NotSingleToken, OutOfRange
from backend.runner import lookup, run

pytestmark = pytest.mark.model   # loads the real model

M = "smollm2-135m"
FRANCE = "The capital of France is"


def _spec(text=FRANCE, **kw):
    return TokenAttributionSpec(model=M, text=text, **kw)


def _close(got, ref, rel=1e-4):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= rel, f"max |diff| / max |ref| = {err:.2e}\n{got}\n{ref}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These are many small forwards: on a shared 2-core machine one torch thread is 4-40x faster
    than two (no OpenMP barrier waits on a descheduled thread). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def hf(model):
    """A separate Hugging Face copy of the model (float32, eager): the independent reference."""
    return model.reference_hf_model()


def _f(hf, embeds, target, against=None):
    logits = hf(inputs_embeds=embeds).logits[:, -1]
    return logits[:, target] - (logits[:, against] if against is not None else 0)


def _hf_grad(hf, ids, target, against=None):
    e = hf.get_input_embeddings().weight[ids].detach().clone().requires_grad_(True)
    f = _f(hf, e[None], target, against)[0]
    g, = torch.autograd.grad(f, e)
    return e.detach().double(), g.double(), float(f.detach())


def _hf_ig(hf, x, b, n, target, against=None):
    """Hand-written IG: one forward + backward per Gauss-Legendre node on [0, 1]."""
    alphas, weights = np.polynomial.legendre.leggauss(n)
    total = torch.zeros_like(x, dtype=torch.float64)
    for t, w in zip(alphas, weights):
        a = (t + 1) / 2
        p = (b + a * (x - b)).detach().float().requires_grad_(True)
        g, = torch.autograd.grad(_f(hf, p[None], target, against)[0], p)
        total += (w / 2) * g.double()
    return ((x.double() - b.double()) * total).sum(-1).numpy()


# ---------------------------------------------------------------------------------------
# 1. saliency and input x gradient = a plain gradient through Hugging Face
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["dense", "hooks"])
def test_gradient_methods_equal_a_plain_hf_gradient(model, hf, engine):
    ids = model.encode(FRANCE)
    paris, london = (model.tokenizer.encode(s, add_special_tokens=False) for s in (" Paris", " London"))
    e, g, f = _hf_grad(hf, ids, paris[0])
    sal = attribute(_spec(method="saliency", target=" Paris"), model, prefer=engine)
    ixg = attribute(_spec(method="input-x-gradient", target=" Paris"), model, prefer=engine)
    assert sal.engine == ixg.engine == engine
    _close(sal.scores, g.norm(dim=-1).numpy())
    _close(ixg.scores, (e * g).sum(-1).numpy())
    assert abs(ixg.target_logit - f) < 1e-3 and sal.target == {"token": " Paris", "id": paris[0]}
    assert ixg.baseline_logit is None and ixg.completeness_gap is None and ixg.steps_used is None
    # a contrast differentiates the logit difference
    e, g, f = _hf_grad(hf, ids, paris[0], london[0])
    c = attribute(_spec(method="input-x-gradient", contrast=(" Paris", " London")), model, prefer=engine)
    _close(c.scores, (e * g).sum(-1).numpy())
    assert abs(c.target_logit - f) < 1e-3 and c.against["id"] == london[0]


# ---------------------------------------------------------------------------------------
# 2. Integrated Gradients = a hand-written Gauss-Legendre loop; completeness with auto steps
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(target=" Paris", baseline="pad"),
    dict(contrast=(" Paris", " London"), baseline="zero", interpolate_first=True),
    dict(baseline="mask"),
])
def test_ig_equals_a_hand_written_gauss_legendre_loop(model, hf, kw):
    n = 8
    got = attribute(_spec(steps=n, **kw), model)
    ids = model.encode(FRANCE)
    W = hf.get_input_embeddings().weight.detach()
    x = W[ids].double()
    b = {"pad": W[model.tokenizer.pad_token_id][None].expand(len(ids), -1).double(),
         "zero": torch.zeros_like(x), "mask": W.double().mean(0)[None].expand(len(ids), -1)}[kw["baseline"]].clone()
    if not kw.get("interpolate_first"):
        b[0] = x[0]
    t, a = got.target["id"], (got.against or {}).get("id")
    ref = _hf_ig(hf, x, b, n, t, a)
    _close(got.scores, ref)
    with torch.no_grad():
        fx, fb = (float(_f(hf, v[None].float(), t, a)[0]) for v in (x, b))
    assert abs(got.target_logit - fx) < 1e-3 and abs(got.baseline_logit - fb) < 1e-3
    assert got.steps_used == n and got.steps_requested == n and len(got.rounds) == 1
    assert got.held_positions == ([] if kw.get("interpolate_first") else [0])
    if not kw.get("interpolate_first"):
        assert got.scores[0] == 0.0          # held: baseline = input at position 0


def test_ig_auto_steps_complete_on_france(model):
    r = run(_spec(target=" Paris")).result
    delta = r.target_logit - r.baseline_logit
    assert r.completeness_gap == pytest.approx(float(r.scores.sum()) - delta, abs=1e-9)
    assert r.completeness_gap_rel == pytest.approx(abs(r.completeness_gap) / abs(delta), rel=1e-12)
    steps = [x["steps"] for x in r.rounds]
    assert steps == [16 * 2 ** i for i in range(len(steps))] and steps[-1] <= MAX_STEPS
    assert r.steps_used == steps[-1] and r.steps_requested == "auto" and r.steps_cap == MAX_STEPS
    assert r.converged == (r.completeness_gap_rel <= 0.01)
    assert all(x["gap_rel"] > 0.01 for x in r.rounds[:-1])          # stopped at the first complete round
    # measured: 16 steps 39.7 %, 32 steps 7.1 %, 64 steps 1.1 %, 128 steps 0.014 % (converged)
    assert r.converged and r.steps_used <= 256
    assert r.top_next[0]["token"] == " Paris" and r.target["token"] == " Paris"


def test_engines_agree_on_ig_and_at_a_layer(model):
    a = attribute(_spec(steps=4, baseline="pad"), model, prefer="dense")
    b = attribute(_spec(steps=4, baseline="pad"), model, prefer="hooks")
    assert (a.engine, b.engine) == ("dense", "hooks")
    _close(a.scores, b.scores)
    assert a.target_logit == pytest.approx(b.target_logit, abs=1e-3)
    # IG on the residual stream entering block 10, each engine
    from kernels.token_attribution import DenseEngine, HookEngine, Readout
    from kernels.forward import dense_model

    ids = model.encode(FRANCE)
    engines = [DenseEngine(dense_model(model)), HookEngine(model, ids)]
    x = engines[0].embed(ids)
    base = baseline_embeddings(engines[0], model, x, "zero", False)
    _, f, resid = engines[0].run(torch.stack([x, base]), Readout(a.target["id"]), resid=True)
    xl, bl = resid[10, 0], resid[10, 1].clone()
    bl[0] = xl[0]
    s = [integrated_gradients(e, xl, bl, 10, Readout(a.target["id"]), float(f[0]), float(f[1]), 4)[0]
         for e in engines]
    _close(s[0], s[1])


def test_one_token_prompt_with_position_0_held_is_trivially_complete(model):
    r = attribute(_spec(text="Paris"), model)
    assert list(r.scores) == [0.0] and r.baseline_logit == r.target_logit and r.completeness_gap == 0.0
    assert r.converged and r.steps_used == 0
    r = attribute(_spec(text="Paris", steps=4, interpolate_first=True), model)
    assert r.steps_used == 4 and r.scores[0] != 0.0 and r.held_positions == []


# ---------------------------------------------------------------------------------------
# 3. captum's LayerIntegratedGradients on the embedding layer, Gauss-Legendre
# ---------------------------------------------------------------------------------------
def test_ig_equals_captum_layer_integrated_gradients(model, hf):
    captum_attr = pytest.importorskip("captum.attr")
    n = 8
    got = attribute(_spec(steps=n, baseline="pad", target=" Paris"), model)
    ids = model.encode(FRANCE)
    pad = model.tokenizer.pad_token_id
    t = got.target["id"]

    def fwd(input_ids):
        return hf(input_ids=input_ids).logits[:, -1, t]

    lig = captum_attr.LayerIntegratedGradients(fwd, hf.get_input_embeddings())
    ref = lig.attribute(inputs=torch.tensor([ids]), baselines=torch.tensor([[ids[0]] + [pad] * (len(ids) - 1)]),
                        n_steps=n, method="gausslegendre")
    _close(got.scores, ref[0].sum(-1).detach().double().numpy())
    alphas, weights = gauss_legendre(n)
    assert weights.sum() == pytest.approx(1.0) and 0 < alphas.min() < alphas.max() < 1


# ---------------------------------------------------------------------------------------
# layer view
# ---------------------------------------------------------------------------------------
def test_layer_view(model):
    L = model.info.n_layers
    ixg = run(_spec(method="input-x-gradient", layers=True)).result
    assert ixg.layer_scores.shape == (L, 5)
    np.testing.assert_allclose(ixg.layer_scores[0], ixg.scores, atol=1e-5 * np.abs(ixg.scores).max())
    ig = run(_spec(steps=2, layers=True, baseline="pad")).result
    assert ig.layer_scores.shape == (L, 5) and ig.layer_gap_rel.shape == (L,) and list(ig.layer_steps) == [2] * L
    np.testing.assert_array_equal(ig.layer_scores[0], ig.scores)      # resid_pre 0 is the embedding
    assert (ig.layer_scores[:, 0] == 0).all()                          # position 0 held at every layer
    # the last layer is close to linear in its input: 2 steps nearly complete there
    assert ig.layer_gap_rel[-1] < ig.layer_gap_rel[0]


# ---------------------------------------------------------------------------------------
# 4. store and bad inputs
# ---------------------------------------------------------------------------------------
def test_stored_and_reread(model):
    spec = _spec(method="saliency", target=" Paris")
    first = run(spec)
    second = run(spec)
    assert second.from_store and second.run_key == first.run_key and second.compute_seconds == 0.0
    np.testing.assert_array_equal(second.result.scores, first.result.scores)
    assert second.result.target == first.result.target and second.result.top_next == first.result.top_next
    assert lookup(spec).from_store
    assert TokenAttributionSpec.from_dict(json.loads(spec.to_json())) == spec
    # steps / baseline do not apply to saliency: they do not split the key
    assert _spec(method="saliency", target=" Paris", steps=8, baseline="pad").key() == spec.key()
    c = _spec(contrast=[" Paris", " London"], steps=8)
    assert TokenAttributionSpec.from_dict(json.loads(c.to_json())) == c and c.contrast == (" Paris", " London")


def test_bad_inputs(model):
    with pytest.raises(EmptyPrompt):
        _spec(text="  ")
    for steps in (0, MAX_STEPS + 1, -3):
        with pytest.raises(OutOfRange):
            _spec(steps=steps)
    with pytest.raises(IdenticalAnswers):
        _spec(contrast=(" Paris", " Paris"))
    with pytest.raises(InvalidSpec):
        _spec(method="gradcam")
    with pytest.raises(InvalidSpec):
        _spec(baseline="noise")
    with pytest.raises(InvalidSpec):
        _spec(target=" Paris", contrast=(" Paris", " London"))
    with pytest.raises(InvalidSpec):
        _spec(contrast=(" Paris",))
    for spec, err in [(_spec(target=" Parisian capital"), NotSingleToken),
                      (_spec(contrast=(" Paris", " Lond on")), NotSingleToken),
                      (_spec(target_id=model.info.d_vocab), OutOfRange)]:
        with pytest.raises(err):
            run(spec)
        assert lookup(spec) is None                 # nothing stored


# ---------------------------------------------------------------------------------------
# 5. the CLI promise
# ---------------------------------------------------------------------------------------
def test_cli(model):
    from backend.cli import execute

    code, out = execute(["attribute", "--model", M, "--text", FRANCE, "--target", " Paris",
                         "--method", "integrated-gradients", "--steps", "8", "--baseline", "pad", "--format", "json"])
    assert code == 0, out
    json.dumps(out)                                  # JSON-able as it is
    for field in ("run_key", "tokens", "scores", "target_logit", "baseline_logit", "completeness_gap",
                  "completeness_gap_rel", "steps_used", "converged", "method", "target"):
        assert field in out, field
    assert out["tokens"] == ["The", " capital", " of", " France", " is"] and len(out["scores"]) == 5
    assert out["method"] == "integrated-gradients" and out["target"] == {"token": " Paris", "id": 7042}
    assert out["steps_used"] == 8 and out["baseline"] == "pad"
    assert out["completeness_gap"] == pytest.approx(sum(out["scores"]) - (out["target_logit"] - out["baseline_logit"]),
                                                    abs=1e-9)
    code, again = execute(["attribute", "--model", M, "--text", FRANCE, "--target", " Paris", "--steps", "8",
                           "--baseline", "pad", "--format", "json"])
    assert code == 0 and again["from_store"] and again["run_key"] == out["run_key"]

    code, c = execute(["attribute", "--text", FRANCE, "--contrast", " Paris", " London", "--method",
                       "input-x-gradient", "--layers", "--format", "json"])
    assert code == 0 and c["against"]["token"] == " London" and c["baseline_logit"] is None
    assert len(c["layer_scores"]) == model.info.n_layers and len(c["layer_scores"][0]) == 5

    code, t = execute(["attribute", "--text", FRANCE, "--target-id", "7042", "--method", "saliency", "--format", "json"])
    assert code == 0 and t["target"]["token"] == " Paris" and min(t["scores"]) >= 0

    for args, err in [(["--steps", "0"], "OutOfRange"), (["--steps", "513"], "OutOfRange"),
                      (["--steps", "many"], "OutOfRange"), (["--method", "gradcam"], "InvalidSpec"),
                      (["--contrast", " Paris", " Paris"], "IdenticalAnswers"),
                      (["--target", " Parisian capital"], "NotSingleToken")]:
        code, e = execute(["attribute", "--text", FRANCE, *args, "--format", "json"])
        assert code == 2 and e["error"]["type"] == err, (args, e)
    code, e = execute(["attribute", "--text", " ", "--format", "json"])
    assert code == 2 and e["error"]["type"] == "EmptyPrompt"
