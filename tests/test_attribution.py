"""Attribution patching (AtP): against the exact sweep, against finite differences of hooked
runs, on identity patches, through the store and the CLI, and on bad inputs.

The short France/Italy pair keeps every exact sweep cheap (the exact sweeps it needs are the
ones tests/test_patching.py stores in the same session store).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backend import PatchSpec, run
from backend.analyses.attribution import AtPSpec, attribution, correlation
from backend.errors import (EmptyDataset, IdenticalAnswers, InvalidSite, InvalidSpec, NotSingleToken,
                            PromptLengthMismatch)
from backend.sites import Component, Site, hook_name
from backend.tasks import PromptPair, encode_pair
from kernels import patching as kp

pytestmark = pytest.mark.model   # loads the real model

FACT = PromptPair("The capital of France is", "The capital of Italy is", " Paris", " Rome")


def _spec(pair=FACT, **kw):
    return AtPSpec(model="smollm2-135m", clean=pair.clean, corrupt=pair.corrupt, answer=pair.answer,
                   wrong=pair.wrong, **kw)


# Measured on this machine (logit_diff_norm, denoising): France/Italy r = 0.990 (resid_pre),
# 0.998 (head_out); IOI (s2 corruption) r = 0.854 (resid_pre), 0.980 (head_out).
@pytest.mark.parametrize("site,min_r", [("resid_pre", 0.95), ("head_out", 0.95)])
def test_atp_correlates_with_exact_sweep(model, site, min_r):
    spec = _spec(site=site, metric="logit_diff_norm")
    atp = run(spec).result
    exact = run(PatchSpec(model="smollm2-135m", clean=FACT.clean, corrupt=FACT.corrupt, answer=FACT.answer,
                          wrong=FACT.wrong, site=site, metric="logit_diff_norm")).result
    assert atp.values.shape == exact.values.shape and atp.axes == exact.axes
    assert atp.layers == exact.layers and atp.positions == exact.positions and atp.heads == exact.heads
    r = correlation(atp.values, exact.values)
    assert r > min_r, f"Pearson r {r:.3f}"
    # same baselines as the exact sweep (both are plain forwards of the clean and corrupted prompts)
    assert atp.clean_logit_diff == pytest.approx(exact.clean_logit_diff, abs=1e-3)
    assert atp.corrupt_logit_diff == pytest.approx(exact.corrupt_logit_diff, abs=1e-3)
    if site == "resid_pre":   # positions before the first differing token: identical activations
        assert np.all(atp.values[:, :3] == 0.0)


def test_estimate_is_the_directional_derivative(model):
    """AtP of a cell = d/dt M(a_base + t (a_src - a_base)) at t=0, checked by central differences
    of hooked forwards (resid_pre at one position; hook_z of one head at all positions)."""
    e = encode_pair(model, FACT)
    metric = kp.LogitDiff(e.answer_id, e.wrong_id)
    base_t, src_t = model.tensor(e.corrupt_ids), model.tensor(e.clean_ids)
    eps = 0.05
    for site, comp in (("resid_pre", Component.RESID_PRE), ("head_out", Component.Z)):
        with model.lock:
            d = attribution(model, e.corrupt_ids, e.clean_ids, site, metric)[0]
            if site == "resid_pre":
                layer, cell = 12, 3
            else:                                   # the head with the largest estimate
                layer, cell = np.unravel_index(int(d.abs().argmax()), tuple(d.shape))
                layer, cell = int(layer), int(cell)
            name = hook_name(Site(comp, layer))
            with torch.inference_mode():
                _, cb = model.run_with_cache(base_t, [name])
                _, cs = model.run_with_cache(src_t, [name])
                a, s = cb[name].clone(), cs[name].clone()

                def m_at(t):
                    def hook(act, hook):
                        act = act.clone()
                        if site == "resid_pre":
                            act[:, cell] = a[:, cell] + t * (s[:, cell] - a[:, cell])
                        else:
                            act[:, :, cell] = a[:, :, cell] + t * (s[:, :, cell] - a[:, :, cell])
                        return act
                    logits = model.run_with_hooks(base_t, fwd_hooks=[(name, hook)])
                    return float(metric.from_logits(logits[:, -1].float())[0])

                fd = (m_at(eps) - m_at(-eps)) / (2 * eps)
        est = float(d[layer, cell])
        assert abs(fd) > 0.05, (site, fd)          # a cell that matters
        assert est == pytest.approx(fd, rel=0.03, abs=2e-3), (site, est, fd)


def test_clean_into_clean_is_exactly_zero(model):
    e = encode_pair(model, FACT)
    metric = kp.LogitDiff(e.answer_id, e.wrong_id)
    with model.lock:
        for site in ("resid_pre", "head_out"):
            d, base_m, src_m, _, _ = attribution(model, e.clean_ids, e.clean_ids, site, metric)
            assert torch.count_nonzero(d) == 0, site
            assert base_m == pytest.approx(src_m, abs=1e-5)


def test_stored_and_reread(model):
    spec = _spec(site="mlp_out", metric="logit_diff", direction="noising")
    first = run(spec)
    second = run(spec)
    assert second.from_store and second.run_key == first.run_key and second.compute_seconds == 0.0
    np.testing.assert_array_equal(second.result.values, first.result.values)
    np.testing.assert_array_equal(second.result.deltas, first.result.deltas)
    r = first.result
    assert r.method == "atp" and r.axes == ["layer", "pos"] and r.values.shape == (30, len(r.clean_tokens))
    # noising: the base is the clean run, values = clean LD + estimated change
    np.testing.assert_allclose(r.values, r.clean_logit_diff + r.deltas, atol=1e-4)
    assert AtPSpec.from_dict(json.loads(spec.to_json())) == spec


def test_bad_inputs(model):
    with pytest.raises(InvalidSite):
        _spec(site="head_out_pos")
    with pytest.raises(InvalidSpec):
        _spec(metric="accuracy")
    with pytest.raises(InvalidSpec):
        _spec(direction="sideways")
    with pytest.raises(EmptyDataset):
        AtPSpec(model="smollm2-135m")
    with pytest.raises(PromptLengthMismatch):
        run(_spec(PromptPair(FACT.clean, "The capital of the United Kingdom is", " Paris", " London")))
    with pytest.raises(NotSingleToken):
        run(_spec(PromptPair(FACT.clean, FACT.corrupt, " Parisian capital", " Rome")))
    with pytest.raises(IdenticalAnswers):
        run(_spec(PromptPair(FACT.clean, FACT.corrupt, " Paris", " Paris")))


def test_cli(model, capsys, tmp_path, monkeypatch):
    from backend.cli import main

    # A store of its own: whether the exact sweep is stored must not depend on the tests before.
    monkeypatch.setenv("DASHBOARD_STORE", str(tmp_path / "atp-cli.duckdb"))

    args = ["atp", "--clean", FACT.clean, "--corrupt", FACT.corrupt, "--answer", FACT.answer,
            "--wrong", FACT.wrong, "--site", "attn_out", "--metric", "logit_diff_norm", "--format", "json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert "correlation_with_exact" not in out       # the exact sweep is not stored: not computed
    assert len(out["values"]) == 30 and len(out["values"][0]) == len(out["positions"]) == 5
    run(PatchSpec(model="smollm2-135m", clean=FACT.clean, corrupt=FACT.corrupt, answer=FACT.answer,
                  wrong=FACT.wrong, site="attn_out", metric="logit_diff_norm"))
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["from_store"] and again["run_key"] == out["run_key"]
    assert again["correlation_with_exact"] > 0.95     # measured 1.000
    assert main(["atp", "--clean", FACT.clean, "--corrupt", FACT.corrupt, "--answer", " Paris",
                 "--wrong", " Paris", "--format", "json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["type"] == "IdenticalAnswers"
