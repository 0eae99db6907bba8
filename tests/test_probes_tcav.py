"""TCAV: directional derivatives equal a finite difference along the CAV (1e-3 relative), the
scores are the fraction of positive derivatives, the p-value equals scipy.stats.ttest_ind on
the same scores, the CLI's JSON, and bad sets are typed errors with nothing stored."""

from __future__ import annotations

import numpy as np
import pytest

from backend import cli
from backend.analyses.probes import tcav as T
from backend.analyses.probes.activations import ProbeSetError, collect
from backend.runner import lookup, run

pytestmark = pytest.mark.model

SMALL = dict(layers=(15, 6), n_random=3, set_size=10)


@pytest.fixture(scope="module")
def small(model):
    spec = T.TcavSpec(model=model.info.model_id, **SMALL)
    return spec, run(spec)


def _f(hf, ids, layer, target, shift) -> float:
    """Hugging Face's target logit at the last position (float64 copy of the model) with `shift`
    added to block `layer`'s output (resid_post) there."""
    import torch

    def hook(module, inputs, out):
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[0, -1] += torch.as_tensor(shift, dtype=h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = hf.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            return float(hf(torch.tensor([ids])).logits[0, -1, target])
    finally:
        handle.remove()


def test_directional_derivative_equals_finite_difference(model, small):
    """Central differences on a float64 copy of the model (eps 0.5: truncation ~1e-9, rounding
    ~1e-14). Our gradient is float32: its components carry ~1e-6 of ||grad||, so a derivative
    that cancels to < 1 % of ||grad|| cannot be held to 1e-3 and is left out (most are kept)."""
    spec, out = small
    prompts = T.read_set("sea")[:8]
    target, _ = T.target_ids(model, " sea", "")
    cav = out.result.cavs[0].astype(np.float64)
    grads = T.class_gradients(model, prompts, [15], target, None, batch_size=3)[0]     # padded batches
    hf = model.reference_hf_model().double()
    checked = 0
    for p, g in zip(prompts, grads):
        ids = model.encode(p)
        eps = 0.5
        fd = (_f(hf, ids, 15, target, eps * cav) - _f(hf, ids, 15, target, -eps * cav)) / (2 * eps)
        if abs(fd) < 0.01 * np.linalg.norm(g):
            continue
        assert float(g @ cav) == pytest.approx(fd, rel=1e-3), p
        checked += 1
    assert checked >= 5


def test_scores_and_p_value(model, small):
    from scipy import stats

    spec, out = small
    r = out.result
    assert r.tcav_scores.shape == (2, 3) and r.random_scores.shape == (2, 3)
    for li in range(2):
        assert r.p_values[li] == pytest.approx(stats.ttest_ind(r.tcav_scores[li], r.random_scores[li]).pvalue, rel=1e-12)
    # a random CAV's score, rebuilt by hand from the same seeded sets
    pool = T.read_set("random")
    m = 10
    perm = np.random.default_rng(spec.seed).permutation(len(pool))[:(spec.n_random + 1) * m]
    acts = collect(model, [model.encode(pool[i]) for i in perm], [[-1]] * len(perm), [15])[0, :, 0].astype(float)
    cav = T.cav_of(acts[:m], acts[m:2 * m])
    target, _ = T.target_ids(model, " sea", "")
    grads = T.class_gradients(model, T.read_set("sea"), [15], target, None)[0]
    assert r.random_scores[0, 0] == pytest.approx(np.mean(grads @ cav > 0))
    assert np.linalg.norm(r.cav) == pytest.approx(1.0, rel=1e-5)


def test_cli_json(model, small):
    spec, out = small
    code, p = cli.execute(["probe-study", "--study", "tcav", "--layer", "15,6", "--n-random", "3", "--set-size", "10",
                           "--format", "json"])
    assert code == 0, p
    assert p["run_key"] == out.run_key and p["study"] == "tcav" and p["layer"] == 15
    assert {"tcav_score", "p_value", "random_scores", "significant", "cav"} <= set(p)
    assert len(p["cav"]) == model.info.d_model and len(p["random_scores"]) == 3
    assert p["bonferroni"] == 2 and p["significant"] == (p["p_value"] < 0.025)
    assert p["tcav_score"] == pytest.approx(out.result.tcav_scores[0].mean())


def test_bad_sets_are_typed_and_store_nothing(model, tmp_path):
    few = tmp_path / "few.txt"
    few.write_text("\n".join(f"Water sentence {i}." for i in range(6)))
    overlap = tmp_path / "overlap.txt"
    overlap.write_text("\n".join(T.read_set("random")[:20]))
    cases = [dict(concept=str(few)),                                   # < 10 concept items
             dict(classes=str(few)),                                   # < 10 class prompts
             dict(concept=str(overlap)),                               # concept = random: one class
             dict(target=" seashore"),                                 # not one token
             dict(n_random=40, set_size=10)]                           # 41 sets of 10 > 400 items
    for fields in cases:
        spec = T.TcavSpec(model=model.info.model_id, **{"layers": (3,), "n_random": 2, "set_size": 10, **fields})
        with pytest.raises(ProbeSetError):
            run(spec)
        assert lookup(spec) is None, fields
    code, p = cli.execute(["probe-study", "--study", "tcav", "--n-random", "40", "--set-size", "10", "--layer", "3",
                           "--format", "json"])
    assert code == 2 and p["error"]["code"] == "bad_probe_set" and "pool has 400" in p["error"]["message"]
