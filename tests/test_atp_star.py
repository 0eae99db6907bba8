"""AtP* (QK fix + GradDrop): its plain row equals AtP, each gradient-dropped row equals a
separate run with that layer's gradient stopped, the QK fix equals an exact pattern change
times the pattern gradient, and the fix brings query/key estimates closer to the exact sweep."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend import PatchSpec, run
from backend.analyses.atp_star import AtPStarSpec, compare_with_exact, false_negatives, star_attribution
from backend.analyses.attribution import attribution, correlation
from backend.errors import InvalidSite
from backend.sites import Component, Site, hook_name
from backend.tasks import PromptPair, encode_pair
from kernels import patching as kp

from .patching_refs import qk_pattern_change

pytestmark = pytest.mark.model   # loads the real model

IOI = PromptPair("When Mary and John went to the store, John gave a drink to",
                 "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")


def test_plain_row_is_atp_and_graddrop_rows_stop_one_layer(model):
    e = encode_pair(model, IOI)
    metric = kp.LogitDiff(e.answer_id, e.wrong_id)
    with model.lock:
        plain, fixed, gd, *_ = star_attribution(model, e.corrupt_ids, e.clean_ids, "resid_pre", metric)
        atp = attribution(model, e.corrupt_ids, e.clean_ids, "resid_pre", metric)[0]
    torch.testing.assert_close(plain, atp, atol=1e-4, rtol=1e-4)
    assert torch.equal(plain, fixed)                        # no QK fix outside q/k sites
    # GradDrop by hand: one single-row run per dropped layer, its |estimate| averaged over layers
    L = model.info.n_layers
    layer = 20
    names = [hook_name(Site(Component.RESID_PRE, j)) for j in range(L)]
    with torch.inference_mode():
        _, cache = model.run_with_cache(e.clean_ids, names)
    acts = {}
    hooks = [(hook_name(Site(Component.EMBED)), lambda a, hook: a.detach().requires_grad_(True))]
    hooks += [(n, (lambda n: lambda a, hook: acts.__setitem__(n, a) or a)(n)) for n in names]
    hooks += [(hook_name(Site(c, layer)), lambda a, hook: a.detach()) for c in (Component.ATTN_OUT, Component.MLP_OUT)]
    with model.lock, torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        m = metric.from_logits(model.forward(e.corrupt_ids)[:, -1].float())[0]
        grads = torch.autograd.grad(m, [acts[n] for n in names])
    dropped = torch.stack([((cache[n] - acts[n].detach()) * g).sum(-1)[0] for n, g in zip(names, grads)]).double()
    assert torch.allclose(dropped[layer + 1:], plain[layer + 1:], atol=1e-4)   # later layers: unaffected
    assert (dropped[:layer + 1] - plain[:layer + 1]).abs().max() > 1e-2         # earlier: paths through it cut
    assert gd.shape == plain.shape and torch.all(gd >= 0)
    assert gd.max() > 0


def test_qk_fix_is_the_exact_pattern_change(model):
    """For one query head: (softmax of the patched scores - base pattern) . dM/dpattern, where the
    patched pattern is the hooked bridge's pattern with that head's queries from the clean run."""
    e = encode_pair(model, IOI)
    metric = kp.LogitDiff(e.answer_id, e.wrong_id)
    with model.lock:
        plain, fixed, *_ = star_attribution(model, e.corrupt_ids, e.clean_ids, "head_q", metric)
    layer, head = 23, 3
    want = qk_pattern_change(model, e, metric, layer, head)
    assert float(fixed[layer, head]) == pytest.approx(want, abs=2e-3, rel=2e-3)
    assert float(fixed[layer, head]) != pytest.approx(float(plain[layer, head]), abs=1e-3)


def test_qk_fix_moves_estimates_towards_the_exact_sweep(model):
    """Measured on IOI (logit_diff_norm): Pearson r with the exact head_q sweep 0.85 plain, 0.97 fixed;
    head_k 0.89 -> 1.00."""
    kw = dict(model="smollm2-135m", clean=IOI.clean, corrupt=IOI.corrupt, answer=IOI.answer,
              wrong=IOI.wrong, site="head_k", metric="logit_diff_norm")
    star = run(AtPStarSpec(**kw)).result
    exact = run(PatchSpec(**kw)).result
    assert star.values.shape == exact.values.shape == (30, 3) and star.axes == ["layer", "kv_head"]
    ed = exact.values - exact.corrupt_metric
    assert correlation(star.deltas, ed) > correlation(star.atp_deltas, ed) + 0.02
    assert np.abs(star.deltas - ed).sum() < np.abs(star.atp_deltas - ed).sum()
    cmp = compare_with_exact(AtPStarSpec(**kw))
    assert cmp is not None and set(cmp["methods"]) == {"atp", "graddrop", "atp_qk_fix", "atp_star"}
    assert run(AtPStarSpec(**kw)).from_store


def test_false_negative_count():
    exact = np.array([[0.5, 0.0], [0.0, -0.3]])
    out = false_negatives(exact, {"good": exact, "bad": np.array([[0.0, 0.9], [0.1, 0.0]])}, budget=1.0)
    assert out["important"] == 2 and out["methods"]["good"]["false_negatives"] == 0
    assert out["methods"]["bad"]["false_negatives"] == 2
    assert out["methods"]["bad"]["missed"][0] == {"cell": 0, "exact": 0.5}


def test_bad_site():
    with pytest.raises(InvalidSite):
        AtPStarSpec(model="smollm2-135m", clean=IOI.clean, corrupt=IOI.corrupt, answer=IOI.answer,
                    wrong=IOI.wrong, site="head_out_pos")


def test_cli_reads_the_stored_estimate_and_reports_false_negatives(model, capsys):
    import json

    from backend.cli import main

    kw = dict(model="smollm2-135m", clean=IOI.clean, corrupt=IOI.corrupt, answer=IOI.answer,
              wrong=IOI.wrong, site="head_k", metric="logit_diff_norm")
    run(PatchSpec(**kw))            # the exact sweep the comparison needs (stored once per session)
    argv = ["atp-star", "--clean", IOI.clean, "--corrupt", IOI.corrupt, "--answer", IOI.answer,
            "--wrong", IOI.wrong, "--site", "head_k", "--metric", "logit_diff_norm", "--format", "json"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0          # the second call reads the stored estimate
    d = json.loads(capsys.readouterr().out)
    assert d["from_store"] and d["compute_seconds"] == 0 and d["axes"] == ["layer", "kv_head"]
    assert np.array(d["values"]).shape == np.array(d["graddrop"]).shape == (30, 3)
    assert set(d["false_negatives"]["methods"]) == {"atp", "graddrop", "atp_qk_fix", "atp_star"}
