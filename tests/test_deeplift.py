"""DeepLIFT (kernels/deeplift.py, method "deeplift" of backend/analyses/token_attribution.py):
the kernel's rules against float64 references written independently (explicit secants of f
between x_ref and x) on tiny hand-built blocks, summation-to-delta, the limit x_ref -> x
(multipliers -> gradient), captum's DeepLift on a tiny pure-MLP torch module, and on SmolLM2
the completeness, the CLI promise and the store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kernels.deeplift import SMALL, multiplier, product, rescale

M = "smollm2-135m"
FRANCE = "The capital of France is"


def _silu(z):
    return z / (1.0 + np.exp(-z))


def _secant(f, z, zr):
    """Independent reference multiplier: (f(z) - f(zr)) / (z - zr) by explicit differences, f'(z)
    by a central difference where |z - zr| < SMALL."""
    d = z - zr
    small = np.abs(d) < SMALL
    fd = (f(z + 1e-6) - f(z - 1e-6)) / 2e-6
    return np.where(small, fd, (f(z) - f(zr)) / np.where(small, 1.0, d))


def _kernel_mlp(params, x, xr):
    """f(x) = w3 . silu(W2 silu(W1 x + b1) + b2) with the kernel's rules (float64 torch)."""
    W1, b1, W2, b2, w3 = (torch.as_tensor(p) for p in params)
    x = torch.as_tensor(x).clone().requires_grad_(True)
    xr = torch.as_tensor(xr)
    h, hr = rescale(torch.nn.functional.silu, x @ W1.T + b1, xr @ W1.T + b1)
    g, gr = rescale(torch.nn.functional.silu, h @ W2.T + b2, hr @ W2.T + b2)
    f, fr = g @ w3, gr @ w3
    grad, = torch.autograd.grad(f, x)
    return (grad * (x - xr)).detach().numpy(), float(f.detach()), float(fr)


def _reference_mlp(params, x, xr):
    """The same by hand in numpy: multipliers as explicit secants, chained as matrices."""
    W1, b1, W2, b2, w3 = params
    z1, z1r = W1 @ x + b1, W1 @ xr + b1
    z2, z2r = W2 @ _silu(z1) + b2, W2 @ _silu(z1r) + b2
    m1, m2 = _secant(_silu, z1, z1r), _secant(_silu, z2, z2r)
    mult = W1.T @ (m1 * (W2.T @ (m2 * w3)))          # d delta f / d delta x
    return mult * (x - xr), float(w3 @ _silu(z2)), float(w3 @ _silu(z2r))


def _params(seed=0, d=6, h=16):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(h, d)), rng.normal(size=h), rng.normal(size=(h, h)) / 2, rng.normal(size=h),
            rng.normal(size=h))


# ---------------------------------------------------------------------------------------
# 1. exact cases against independent float64 references
# ---------------------------------------------------------------------------------------
def test_rescale_on_an_elementwise_mlp_equals_explicit_secants_and_sums_to_delta():
    params = _params()
    rng = np.random.default_rng(1)
    for _ in range(3):
        x, xr = rng.normal(size=6) * 2, rng.normal(size=6)
        xr[2] = x[2]                                  # one input held: no score, fallback path
        got, f, fr = _kernel_mlp(params, x, xr)
        ref, f_ref, fr_ref = _reference_mlp(params, x, xr)
        assert f == pytest.approx(f_ref, abs=1e-12) and fr == pytest.approx(fr_ref, abs=1e-12)
        np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10)
        assert got[2] == 0.0
        assert abs(got.sum() - (f - fr)) <= 1e-6 * max(1.0, abs(f - fr))     # summation-to-delta


def test_gated_block_with_norm_sums_to_delta_and_matches_a_hand_reference():
    """A gated MLP block as the model's (RMSNorm, act(gate) * up, down): the rescale rule on the
    SiLU, the symmetric split on the product and x * rsqrt(mean x^2 + eps): exact in float64."""
    rng = np.random.default_rng(2)
    d, h, eps = 5, 12, 1e-5
    Wg, Wu, Wd, w = rng.normal(size=(h, d)), rng.normal(size=(h, d)), rng.normal(size=(d, h)), rng.normal(size=d)
    x, xr = rng.normal(size=d) * 3, rng.normal(size=d) * 0.5

    def f_np(v):
        n = v / np.sqrt((v ** 2).mean() + eps)
        return float(w @ (Wd @ (_silu(Wg @ n) * (Wu @ n))))

    # the kernel
    from kernels.deeplift import square
    xt = torch.as_tensor(x).clone().requires_grad_(True)
    xrt = torch.as_tensor(xr)
    sq, sqr = square(xt, xrt)
    r, rr = rescale(torch.rsqrt, sq.mean() + eps, sqr.mean() + eps)
    n, nr = product(xt, xrt, r, rr)
    g, gr = rescale(torch.nn.functional.silu, n @ torch.as_tensor(Wg).T, nr @ torch.as_tensor(Wg).T)
    u, ur = n @ torch.as_tensor(Wu).T, nr @ torch.as_tensor(Wu).T
    p, pr = product(g, gr, u, ur)
    out = (p @ torch.as_tensor(Wd).T) @ torch.as_tensor(w)
    grad, = torch.autograd.grad(out, xt)
    got = (grad * (xt - xrt)).detach().numpy()

    # by hand: multipliers of every step as explicit differences, chained backwards
    s, sr = (x ** 2).mean() + eps, (xr ** 2).mean() + eps
    rs, rsr = s ** -0.5, sr ** -0.5
    nn_, nnr = x * rs, xr * rsr
    zg, zgr = Wg @ nn_, Wg @ nnr
    a, ar = _silu(zg), _silu(zgr)
    uu, uur = Wu @ nn_, Wu @ nnr
    m_post = Wd.T @ w                                         # d f / d post
    m_a, m_u = m_post * (uu + uur) / 2, m_post * (a + ar) / 2  # split of a * u
    m_n = Wg.T @ (m_a * _secant(_silu, zg, zgr)) + Wu.T @ m_u
    m_x = m_n * (rs + rsr) / 2                                 # split of x * rsqrt(s): x's share
    m_r = float(m_n @ (x + xr) / 2)                            # ... rsqrt's share
    m_s = m_r * (rs - rsr) / (s - sr)                          # rescale of rsqrt
    m_x = m_x + m_s * (x + xr) / d                             # s = mean(x^2): secant x + xr
    ref = m_x * (x - xr)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    assert abs(got.sum() - (f_np(x) - f_np(xr))) <= 1e-6


# ---------------------------------------------------------------------------------------
# 2. the limit x_ref -> x: multipliers -> the gradient
# ---------------------------------------------------------------------------------------
def test_multipliers_approach_the_gradient_as_the_reference_approaches_the_input():
    params = _params(3)
    rng = np.random.default_rng(4)
    x, v = rng.normal(size=6) * 2, rng.normal(size=6)
    xt = torch.as_tensor(x).clone().requires_grad_(True)
    W1, b1, W2, b2, w3 = (torch.as_tensor(p) for p in params)
    f = torch.nn.functional.silu(W2 @ torch.nn.functional.silu(W1 @ xt + b1) + b2) @ w3
    grad, = torch.autograd.grad(f, xt)
    errs = {}
    for eps in (1.0, 1e-2, 1e-4):
        got, _, _ = _kernel_mlp(params, x, x - eps * v)
        ixg = grad.numpy() * (eps * v)                        # input x gradient on (x - x_ref)
        errs[eps] = np.abs(got - ixg).max() / np.abs(ixg).max()
    assert errs[1e-4] < 1e-3 and errs[1e-2] < 3e-2, errs
    assert errs[1.0] > 0.05 and errs[1.0] > 10 * errs[1e-4], errs   # it can fail: far from x it differs
    # elementwise: the multiplier tends to f'
    z = torch.linspace(-4, 4, 9, dtype=torch.float64)
    for eps in (1e-3, 1e-5):
        m = multiplier(torch.nn.functional.silu, z, z - eps)
        s = torch.sigmoid(z)
        assert torch.allclose(m, s * (1 + z * (1 - s)), atol=eps)


# ---------------------------------------------------------------------------------------
# 4. captum's DeepLift on a tiny pure-MLP torch module
# ---------------------------------------------------------------------------------------
def test_equals_captum_deeplift_on_a_tiny_mlp():
    captum = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 11), torch.nn.Tanh(), torch.nn.Linear(11, 9), torch.nn.Sigmoid(),
                              torch.nn.Linear(9, 1)).double()
    x, xr = torch.randn(3, 7, dtype=torch.float64) * 2, torch.randn(3, 7, dtype=torch.float64) * 0.3
    ref = captum.DeepLift(net).attribute(x, baselines=xr, target=0)

    L1, _, L2, _, L3 = net
    xt = x.clone().requires_grad_(True)
    h, hr = rescale(torch.tanh, L1(xt), L1(xr))
    g, gr = rescale(torch.sigmoid, L2(h), L2(hr))
    f, fr = L3(g)[:, 0], L3(gr)[:, 0]
    grad, = torch.autograd.grad(f.sum(), xt)
    got = (grad * (x - xr)).detach()
    assert torch.allclose(got, ref.detach(), rtol=1e-8, atol=1e-10), (got, ref)
    assert torch.allclose(got.sum(1), (f - fr).detach(), atol=1e-9)


# ---------------------------------------------------------------------------------------
# On SmolLM2
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.model
def test_smollm2_sums_to_delta_and_approaches_input_x_gradient(model, one_thread):
    from backend.analyses.token_attribution import baseline_embeddings
    from kernels.deeplift import attribute, deeplift_model
    from kernels.token_attribution import DenseEngine, Readout

    dl = deeplift_model(model)
    eng = DenseEngine(dl)
    x = eng.embed(model.encode(FRANCE))
    readout = Readout(7042)                                   # " Paris"
    for base in ("zero", "pad", "mask"):
        b = baseline_embeddings(eng, model, x, base, False)
        r = attribute(dl, x, b, readout)
        assert r["tokens"][0] == 0.0                          # position 0 held
        assert abs(r["gap"]) <= 1e-4 * abs(r["f"] - r["f_ref"]), (base, r["gap"])
    # x_ref = x - eps v: the scores tend to input x gradient on (x - x_ref)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(x.shape, generator=g)
    v[0] = 0
    _, grad = eng.grads(x[None], 0, readout, torch.ones(1, dtype=torch.float64))
    errs = {}
    for eps in (1.0, 1e-3, 1e-4):     # SmolLM2's embeddings are small: 1e-2 is already far (measured 1.05)
        r = attribute(dl, x, x - eps * v, readout)
        ixg = (grad * (eps * v).double()).sum(-1)
        errs[eps] = float((r["tokens"] - ixg).abs().max() / ixg.abs().max())
    # measured 0.55, 0.107, 0.0106: first order in eps, as a secant should be
    assert errs[1e-4] < 3e-2 and errs[1e-4] < errs[1e-3] / 3 and errs[1.0] > 10 * errs[1e-4], errs


@pytest.mark.model
def test_cli_promise_and_store(model, one_thread):
    from backend.analyses.token_attribution import TokenAttributionSpec
    from backend.cli import execute
    from backend.runner import lookup

    args = ["attribute", "--model", M, "--text", FRANCE, "--target", " Paris", "--method", "deeplift",
            "--baseline", "pad", "--format", "json"]
    code, out = execute(args)
    assert code == 0, out
    json.dumps(out)
    for field in ("tokens", "scores", "target_logit", "baseline_logit", "completeness_gap", "steps_used", "run_key"):
        assert field in out, field
    assert out["tokens"] == ["The", " capital", " of", " France", " is"] and len(out["scores"]) == 5
    assert out["method"] == "deeplift" and out["baseline"] == "pad" and out["held_positions"] == [0]
    assert out["steps_used"] is None and out["scores"][0] == 0.0
    assert out["completeness_gap"] == pytest.approx(sum(out["scores"]) - (out["target_logit"] - out["baseline_logit"]),
                                                    abs=1e-9)
    assert out["completeness_gap_rel"] <= 1e-4
    code, again = execute(args)
    assert code == 0 and again["from_store"] and again["run_key"] == out["run_key"]
    assert again["scores"] == out["scores"]
    # the reference is part of the question; steps are not
    spec = TokenAttributionSpec(model=M, text=FRANCE, target=" Paris", method="deeplift", baseline="pad", steps=8)
    assert spec.steps is None and spec.key() == out["run_key"] and lookup(spec).from_store
    assert TokenAttributionSpec(model=M, text=FRANCE, target=" Paris", method="deeplift").key() != out["run_key"]

    code, lay = execute(["attribute", "--text", FRANCE, "--method", "deeplift", "--layers", "--format", "json"])
    assert code == 0 and len(lay["layer_scores"]) == model.info.n_layers
    np.testing.assert_allclose(lay["layer_scores"][0], lay["scores"], rtol=1e-12)
    delta = lay["target_logit"] - lay["baseline_logit"]
    for row in lay["layer_scores"]:                       # every layer's row adds up too
        assert abs(sum(row) - delta) <= 1e-3 * abs(delta)


def test_existing_run_keys_unchanged():
    """DeepLIFT adds a method, not a field: the other methods' keys are those of the commit before it
    (computed there)."""
    from backend.analyses.token_attribution import TokenAttributionSpec

    kws = (dict(), dict(method="saliency", baseline="pad"), dict(method="lrp"), dict(baseline="pad", steps=8),
           dict(method="input-x-gradient", layers=True, contrast=(" Paris", " London")))
    keys = [TokenAttributionSpec(model=M, text=FRANCE, **kw).key() for kw in kws]
    assert keys == ["token_attribution-8167f54db497e8eeeba2", "token_attribution-76423d6a3c94ce4aa691",
                    "token_attribution-67766f0d320c8452caa3", "token_attribution-04ed37177c85e6e0d38c",
                    "token_attribution-22dd9a71d4e85e9c5200"]
