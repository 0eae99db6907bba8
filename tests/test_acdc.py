"""ACDC, faithfulness under every ablation, and Gaussian-noise corruption (issue 24).

- ACDC on the fast edge patching equals a plain loop (same visiting order, same τ) whose every
  trial is a whole circuit run node by node over bridge-cached activations
  (kernels.circuits.reference_acdc), on a tiny random Llama and a tiny random Gemma-3 written
  here (the whole graph, 54 edges, so the loop runs in seconds); every removed edge changed the metric by less than τ
  when it was removed, replayed from the log with the batched circuit run.
- The ablation table: every cell's four metric values (clean, ablated, circuit, without it)
  equal the plain node-by-node loop with resample / mean / zero outputs (tiny model); on the
  default model resample / denoising / logit difference is the circuit's own faithfulness.
- Gaussian corruption of the patching sweep equals hooked bridge runs with the noise added at
  hook_embed; the new PatchSpec fields leave every existing key unchanged.
- Bad input: typed errors, nothing stored.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from .conftest import DEFAULT_MODEL

pytestmark = pytest.mark.model

IOI = [("When Mary and John went to the store, John gave a drink to",
        "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
       ("When Tom and Anna went to the park, Anna gave a ball to",
        "When Tom and Anna went to the park, Tom gave a ball to", " Tom", " Anna")]


def _tiny(tmp_path_factory, model, arch: str):
    """A tiny random Llama or Gemma-3 (2 layers x 4 heads, SmolLM2's tokenizer) by path; the
    Gemma has a post-attention norm (every head's share depends on all of them), q/k norms and
    one sliding-window layer."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    from backend.model import load_model

    folder = tmp_path_factory.mktemp("acdc") / f"tiny-{arch}"
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                  vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg = LlamaConfig(**common) if arch == "llama" else Gemma3TextConfig(
        **common, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return load_model(str(folder))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model):
    return _tiny(tmp_path_factory, model, "llama")


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory, model):
    return _tiny(tmp_path_factory, model, "gemma")


def _setup(lm, pairs, metric_name):
    from backend.analyses.circuits import _kernel_metric
    from backend.tasks import encode_pairs
    from kernels import circuits as kc
    from kernels import patching as kp

    e = encode_pairs(lm, pairs)
    fm = kp.fast_model(lm)
    g = kc.Graph(lm.info.n_layers, lm.info.n_heads)
    return e, fm, g, _kernel_metric(lm, fm, e, metric_name), [_kernel_metric(lm, fm, [x], metric_name) for x in e]


@pytest.mark.parametrize("arch,metric_name,tau", [("llama", "kl", 0.003), ("llama", "logit_diff", 0.02),
                                                  ("gemma", "kl", 0.003), ("gemma", "logit_diff", 0.02)])
def test_acdc_equals_the_plain_reference_loop(request, arch, metric_name, tau):
    from kernels import circuits as kc

    tiny = request.getfixturevalue("tiny" if arch == "llama" else "tiny_gemma")
    e, fm, g, metric, per_pair = _setup(tiny, IOI, metric_name)
    sign = 1.0 if metric_name == "kl" else -1.0
    out = kc.acdc(fm, [x.clean_ids for x in e], [x.corrupt_ids for x in e], metric, g, tau, sign=sign)
    ref_edges, ref_log = kc.reference_acdc(tiny, fm, [(x.clean_ids, x.corrupt_ids) for x in e],
                                           lambda i: per_pair[i], g, tau, sign=sign)
    fast_edges = {(g.up[u], g.down[d]) for u, d in out.mask.nonzero().tolist()}
    assert fast_edges == ref_edges
    assert [(g.up[u], g.down[d], r) for u, d, _, r in out.log] == [(u, d, r) for u, d, _, r in ref_log]
    np.testing.assert_allclose([c for *_, c, _ in out.log], [c for *_, c, _ in ref_log], atol=2e-5)
    measured = [row for row, m in zip(out.log, out.evaluated) if m]
    assert all(c < tau for _, _, c, r in out.log if r) and all(c >= tau for _, _, c, r in out.log if not r)
    assert any(r for *_, r in measured) and any(not r for *_, r in measured)      # both decisions happen
    assert 0 < len(fast_edges) < g.n_edges
    assert out.forward_passes == 1 + len(measured) and out.kernel_rows >= out.forward_passes


def test_acdc_cli_store_log_replay_overlaps_and_ablations(tiny, store, capsys):
    """The CLI's ACDC circuit: stored, read back; the removed_log replayed with the batched circuit
    run (each removal measured from the circuit as it was then) gives the recorded change < τ."""
    from backend import cli
    from backend.analyses.acdc import ACDCSpec
    from backend.analyses.circuits import CircuitSpec
    from backend.runner import run
    from kernels import circuits as kc

    tau = 0.003
    args = ["circuit", "--model", tiny.info.model_id, "--clean", IOI[0][0], "--corrupt", IOI[0][1],
            "--answer", IOI[0][2], "--wrong", IOI[0][3], "--method", "acdc", "--threshold", str(tau),
            "--ablations", "--format", "json"]
    assert cli.main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert cli.main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["from_store"] and again["edges"] == first["edges"] and again["removed_log"] == first["removed_log"]
    assert first["metric"] == "kl" and first["method"] == "acdc" and first["threshold"] == tau
    assert first["forward_passes"] > 1 and len(first["edges"]) > 0
    assert all(set(r) >= {"edge", "change"} and r["change"] < tau for r in first["removed_log"])
    assert len(first["ablations"]) == 18 and {(r["ablation"], r["metric"], r["direction"]) for r in first["ablations"]} \
        == {(a, m, d) for a in ("resample", "mean", "zero") for m in ("logit_diff", "prob", "kl")
            for d in ("noising", "denoising")}
    assert [o["method"] for o in first["overlaps"]] == ["eap", "eap-ig"]
    assert all(0 <= o["jaccard"] <= 1 and o["top_n"] == len(first["edges"]) for o in first["overlaps"])
    # replay: the mask before each measured removal = every edge minus those removed before it
    spec = CircuitSpec(model=tiny.info.model_id, clean=IOI[0][0], corrupt=IOI[0][1], answer=IOI[0][2],
                       wrong=IOI[0][3], metric="kl", method="acdc", threshold=tau)
    a = run(spec.as_task(ACDCSpec)).result
    e, fm, g, metric, _ = _setup(tiny, IOI[:1], "kl")
    mask = g.valid.clone()
    masks, checks = [mask.clone()], []
    for f, t, c, r, m in zip(a.log_from, a.log_to, a.log_change, a.log_removed, a.log_measured):
        if not r:
            continue
        mask[g.up_index[str(f)], g.down_index[str(t)]] = False
        if m:
            masks.append(mask.clone())
            checks.append((len(masks) - 2, len(masks) - 1, c))
    cr = kc.corrupt_run(fm, [e[0].corrupt_ids], metric, g)
    vals = kc.run_circuits(fm, [e[0].clean_ids], cr, torch.stack(masks).float(), metric, g)[:, 0].double()
    got = np.array([float(vals[j] - vals[i]) for i, j, _ in checks])
    np.testing.assert_allclose(got, [c for *_, c in checks], atol=2e-5)
    assert (got < tau).all() and len(checks) > 5
    assert float(vals[-1]) == pytest.approx(a.final_value, abs=2e-5)


def test_ablation_table_against_the_plain_loop(tiny, model):
    """Every cell of the table (3 ablations x 3 metrics x 2 directions) = the node-by-node loop
    over bridge-cached outputs (per-pair corrupted / mean / zero), on the tiny model (the loop
    is slow on the real one); on the default model, resample / denoising / logit diff = the
    circuit's own faithfulness, and the three ablations give three different numbers."""
    from backend.analyses.circuits import TABLE_METRICS, CircuitAblationsSpec, CircuitSpec, _kernel_metric
    from backend.runner import run
    from kernels import circuits as kc

    spec = CircuitSpec.from_pairs(tiny.info.model_id, IOI, method="eap-ig", metric="logit_diff", top_n=12)
    circ = run(spec).result
    tab = run(spec.as_task(CircuitAblationsSpec)).result
    rows = {(r["ablation"], r["metric"], r["direction"]): r["faithfulness"] for r in tab.rows}
    vals = {(v["ablation"], v["metric"]): v for v in tab.values}
    assert len(rows) == 18
    e, fm, g, _, _ = _setup(tiny, IOI, "logit_diff")
    edges = set(zip(circ.edge_from.tolist(), circ.edge_to.tolist()))
    assert 0 < len(edges) < g.n_edges
    everything = {(g.up[u], g.down[d]) for u, d in g.valid.nonzero().tolist()}
    outs = [kc.reference_node_outputs(tiny, fm, x.corrupt_ids) for x in e]
    mean = {k: sum(o[k] for o in outs) / len(outs) for k in outs[0]}
    ablated = {"resample": outs, "mean": [mean] * len(e),
               "zero": [{k: torch.zeros_like(v) for k, v in mean.items()}] * len(e)}
    for name in TABLE_METRICS:
        per_pair = [_kernel_metric(tiny, fm, [x], name) for x in e]
        for kind, outs_k in ablated.items():
            def m(es):
                return float(np.mean([kc.reference_circuit_metric(tiny, fm, x.clean_ids, None, es, per_pair[i], g,
                                                                  outs_k[i]) for i, x in enumerate(e)]))
            ref = {"clean": m(everything), "ablated": m(set()), "circuit": m(edges),
                   "without_circuit": m(everything - edges)}
            got = vals[(kind, name)]
            # probabilities of a random model are ~1/vocab: compare them at their own scale
            np.testing.assert_allclose([got[k] for k in ref], list(ref.values()), rtol=1e-3,
                                       atol=1e-8 if name == "prob" else 1e-4, err_msg=f"{kind} {name}")
            gap = got["clean"] - got["ablated"]            # the faithfulness of those values
            assert abs(gap) > 1e-9
            assert rows[(kind, name, "denoising")] == pytest.approx((got["circuit"] - got["ablated"]) / gap, rel=1e-9)
            assert rows[(kind, name, "noising")] == pytest.approx((got["clean"] - got["without_circuit"]) / gap, rel=1e-9)
    # the default model: EAP-IG top 40 (28 edges after pruning; EAP's top edges on these pairs
    # prune to none at every size up to 200, and an empty circuit makes every ablation agree)
    spec = CircuitSpec.from_pairs(DEFAULT_MODEL, IOI, method="eap-ig", metric="logit_diff", top_n=40)
    circ = run(spec).result
    assert len(circ.edge_from) > 10
    rows = {(r["ablation"], r["metric"], r["direction"]): r["faithfulness"]
            for r in run(spec.as_task(CircuitAblationsSpec)).result.rows}
    assert rows[("resample", "logit_diff", "denoising")] == pytest.approx(circ.faithfulness, abs=1e-5)
    assert len({round(rows[(a, "logit_diff", "denoising")], 3) for a in ("resample", "mean", "zero")}) == 3


def test_gaussian_corruption_equals_hooked_runs_and_keys_are_unchanged(model, store):
    from backend.analyses.patching import PatchSpec, embedding_noise
    from backend.runner import run
    from backend.sites import Component, Site, hook_name
    from backend.tasks import encode_pair
    from kernels import patching as kp

    c, k, a, w = IOI[0]
    plain = PatchSpec(model=DEFAULT_MODEL, clean=c, corrupt=k, answer=a, wrong=w)
    old = {"kind": "patch", "model": DEFAULT_MODEL, "clean": c, "corrupt": k, "answer": a, "wrong": w, "dataset": (),
           "site": "resid_pre", "metric": "logit_diff_norm", "direction": "denoising"}
    want = "patch-" + hashlib.sha256(json.dumps({"v": PatchSpec.VERSION, **old}, sort_keys=True, separators=(",", ":"),
                                                ensure_ascii=False).encode()).hexdigest()[:20]
    assert plain.key() == want and "corruption" not in plain.to_json()      # the key of before the fields existed
    for direction in ("denoising", "noising"):
        spec = PatchSpec(model=DEFAULT_MODEL, clean=c, corrupt=k, answer=a, wrong=w, metric="logit_diff",
                         direction=direction, corruption="gaussian", noise_positions=(2, 4), noise_samples=2,
                         noise_seed=3)
        assert spec.key() != plain.key()
        r = run(spec, store=store).result
        e = encode_pair(model, IOI[0])
        fm = kp.fast_model(model)
        T = len(e.clean_ids)
        emb_name = hook_name(Site(Component.EMBED))
        cells = [(0, 2), (5, 4), (12, T - 1), (20, 4)]
        ref = np.zeros(len(cells))
        for s in range(2):
            noise = embedding_noise(fm, T, [2, 4], 3.0, 3, s)
            add = (emb_name, lambda act, hook, n=noise: act + n.to(act.device, act.dtype))
            with torch.inference_mode():
                names = [hook_name(Site(Component.RESID_PRE, lay)) for lay, _ in cells]
                with model.hooks(fwd_hooks=[add]):
                    _, noised = model.run_with_cache(e.clean_ids, names)
                _, clean = model.run_with_cache(e.clean_ids, names)
                src, base_hooks = (clean, [add]) if direction == "denoising" else (noised, [])
                for i, (lay, p) in enumerate(cells):
                    nm = hook_name(Site(Component.RESID_PRE, lay))

                    def put(act, hook, nm=nm, p=p):
                        act = act.clone()
                        act[:, p] = src[nm][:, p]
                        return act
                    logits = model.run_with_hooks(e.clean_ids, fwd_hooks=base_hooks + [(nm, put)])[0, -1]
                    ref[i] += float(logits[e.answer_id] - logits[e.wrong_id]) / 2
        got = np.array([r.values[lay, p] for lay, p in cells])
        np.testing.assert_allclose(got, ref, atol=1e-4)
        assert np.ptp(r.values) > 0.5                                     # the noise moves the answer


def test_bad_input_is_typed_and_stores_nothing(model, store):
    from backend.analyses.acdc import ACDCSpec
    from backend.analyses.attribution import AtPSpec
    from backend.analyses.circuits import CircuitSpec
    from backend.analyses.patching import PatchSpec
    from backend.errors import DashboardError, InvalidSpec
    from backend.runner import run

    c, k, a, w = IOI[0]
    task = dict(model=DEFAULT_MODEL, clean=c, corrupt=k, answer=a, wrong=w)
    before = store.count_runs()
    for tau in (0, -0.1, float("nan"), float("inf"), True):
        with pytest.raises(InvalidSpec, match="τ"):
            CircuitSpec(**task, method="acdc", threshold=tau)
        with pytest.raises(InvalidSpec):
            ACDCSpec(**task, threshold=tau)
    with pytest.raises(InvalidSpec):
        CircuitSpec(**task, method="acdc", threshold=0.1, metric="bits")
    with pytest.raises(InvalidSpec):      # checked before the search runs
        run(CircuitSpec(**task, method="acdc", threshold=0.1, removed=("A99.1",)), store=store)
    # top_n / ig_steps do not apply to ACDC: one question, one key
    assert CircuitSpec(**task, method="acdc", threshold=0.1, top_n=7).key() == \
        CircuitSpec(**task, method="acdc", threshold=0.1).key()
    for bad in (dict(corruption="blur"), dict(corruption="gaussian", noise_samples=0),
                dict(corruption="gaussian", noise_scale=0), dict(corruption="gaussian", noise_positions=(-1,))):
        with pytest.raises(InvalidSpec):
            PatchSpec(**task, **bad)
    with pytest.raises(InvalidSpec):
        AtPSpec(**task, corruption="gaussian")
    with pytest.raises(DashboardError, match="past the prompt"):
        run(PatchSpec(**task, corruption="gaussian", noise_positions=(99,)), store=store)
    with pytest.raises(DashboardError):
        run(CircuitSpec(**{**task, "wrong": " Mary"}, method="acdc", threshold=0.1), store=store)
    assert store.count_runs() == before
