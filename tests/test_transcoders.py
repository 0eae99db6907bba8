"""Transcoders: the sparse training step against dense autograd, the circuit-tracer folder
format (written, listed, loaded, refused when damaged), and the shipped set's quality.
No model is loaded here except in the tests marked `model`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from backend import transcoders as tc
from backend.errors import InvalidSpec
from kernels.transcoder_train import Transcoder, choose, reference_loss, sparse_step


def _tc(skip: bool, d=16, m=64, seed=0):
    torch.manual_seed(seed)
    t = Transcoder(d, d, m, skip=skip, dtype=torch.float64)
    with torch.no_grad():
        t.b_enc.normal_()
        t.b_dec.normal_()
        if skip:
            t.W_skip.normal_()
    return t


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("with_aux", [True, False])
def test_sparse_step_equals_dense_autograd(skip, with_aux):
    t = _tc(skip)
    x, y = torch.randn(37, 16, dtype=torch.float64), torch.randn(37, 16, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    chosen, aux = choose(t, x, 4, dead if with_aux else None, 8, select_dtype=torch.float64)
    assert (aux is not None) == with_aux
    n_dead = int(dead.sum()) if with_aux else 0
    mse, aux_loss = reference_loss(t, x, y, chosen, aux, n_dead)
    (mse + aux_loss).backward()
    ref = {n: p.grad.clone() for n, p in t.named_parameters()}
    t.zero_grad(set_to_none=True)
    out = sparse_step(t, x, y, chosen, aux, n_dead)
    assert out["mse"] == pytest.approx(float(mse), rel=1e-12)
    assert out["aux"] == pytest.approx(float(aux_loss), rel=1e-12, abs=1e-15)
    for name, p in t.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-10, atol=1e-12)
    assert any(float(g.abs().max()) > 0 for g in ref.values())


def test_choose_is_batch_topk_grouped_by_row():
    t = _tc(True)
    x = torch.randn(50, 16, dtype=torch.float64)
    chosen, _ = choose(t, x, 3, None, 0, select_dtype=torch.float64)
    pre = (x @ t.W_enc.t() + t.b_enc).detach()
    vals = pre[chosen.rows, chosen.cols]
    assert len(chosen.rows) <= 150 and bool((vals > 0).all())
    assert bool((chosen.rows[1:] >= chosen.rows[:-1]).all())
    # every value left out is below the smallest kept one (within the per-row cap of 4k)
    mask = torch.zeros_like(pre, dtype=torch.bool)
    mask[chosen.rows, chosen.cols] = True
    assert float(pre[~mask].max()) <= float(vals.min()) + 1e-12


def _write_set(folder, n_layers=3, d=8, m=16, extra=None, skip=True):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for i in range(n_layers):
        t = {"W_enc": torch.randn(m, d, generator=g), "W_dec": torch.randn(m, d, generator=g), "b_enc": torch.zeros(m),
             "b_dec": torch.zeros(d), "activation_function.threshold": torch.full((m,), 0.5)}
        if skip:
            t["W_skip"] = torch.randn(d, d, generator=g)
        t.update(extra or {})
        save_file({k: v.half() for k, v in t.items()}, str(folder / f"layer_{i}.safetensors"))
    tc.write_config(folder, "tiny", n_layers, {"d_transcoder": m, "skip": skip})
    return folder


def test_set_is_listed_and_loaded(tmp_path):
    _write_set(tmp_path / "tiny-plt")
    (tmp_path / "tiny-plt" / "quality.json").write_text(json.dumps({"layers": [{"layer": 0, "fvu": 0.3, "l0": 5, "dead_pct": 1.0}]}))
    sets = tc.list_sets(root=tmp_path)
    assert [s["id"] for s in sets] == ["tiny-plt"]
    s = sets[0]
    assert s["model"] == "tiny" and s["n_layers"] == 3 and s["d_transcoder"] == 16 and s["activation"] == "jumprelu"
    assert s["layers"][0]["fvu"] == 0.3
    loaded = tc.load_set("tiny-plt", root=tmp_path)
    assert loaded.n_layers == 3 and loaded.d_transcoder == 16 and loaded.W_enc[0].dtype == torch.float32
    x = torch.randn(4, 8)
    pre = x @ loaded.W_enc[1].t() + loaded.b_enc[1]
    torch.testing.assert_close(loaded.encode(1, x), pre * (pre > 0.5))
    a = loaded.encode(1, x)
    torch.testing.assert_close(loaded.forward(1, x), a @ loaded.W_dec[1] + loaded.b_dec[1] + x @ loaded.W_skip[1].t())


def test_circuit_tracer_layout(tmp_path):
    """The keys and shapes circuit-tracer's load_relu_transcoder reads, and nothing else
    (any other key fails its load_state_dict)."""
    folder = _write_set(tmp_path / "s")
    t = load_file(str(folder / "layer_0.safetensors"))
    assert set(t) == {"W_enc", "W_dec", "b_enc", "b_dec", "W_skip", "activation_function.threshold"}
    assert t["W_enc"].shape == (16, 8) and t["W_dec"].shape == (16, 8) and t["W_skip"].shape == (8, 8)
    import yaml

    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    assert cfg["model_kind"] == "transcoder_set"
    assert cfg["feature_input_hook"] == "mlp.hook_in" and cfg["feature_output_hook"] == "mlp.hook_out"


@pytest.mark.parametrize("damage", ["missing_layer", "wrong_shape", "extra_key", "not_safetensors", "bad_config"])
def test_damaged_sets_are_refused(tmp_path, damage):
    folder = _write_set(tmp_path / "d")
    if damage == "missing_layer":
        (folder / "layer_1.safetensors").unlink()
    elif damage == "wrong_shape":
        t = load_file(str(folder / "layer_2.safetensors"))
        t["W_dec"] = torch.zeros(16, 9).half()
        save_file(t, str(folder / "layer_2.safetensors"))
    elif damage == "extra_key":
        t = load_file(str(folder / "layer_0.safetensors"))
        t["scale"] = torch.ones(1).half()
        save_file(t, str(folder / "layer_0.safetensors"))
    elif damage == "not_safetensors":
        (folder / "layer_0.safetensors").write_bytes(b"not a safetensors file")
    else:
        (folder / "config.yaml").write_text("model_kind: [unclosed")
    with pytest.raises(tc.DamagedTranscoders):
        tc.load_set(str(folder))


def test_unknown_set_names_the_shipped_ones(tmp_path):
    _write_set(tmp_path / "tiny-plt")
    with pytest.raises(tc.UnknownTranscoders, match="tiny-plt"):
        tc.resolve("nope", root=tmp_path)
    with pytest.raises(tc.UnknownTranscoders):
        tc.resolve("", root=tmp_path)


def test_shipped_set_quality_is_listed():
    """The shipped set of the default model: every layer there with its measured quality."""
    sets = tc.list_sets("smollm2-135m")
    if not sets:
        pytest.skip("no transcoder set shipped yet")
    s = sets[0]
    assert s["n_layers"] == 30 and s["d_transcoder"] >= 1024
    for row in s["layers"]:
        assert {"layer", "fvu", "l0", "dead_pct"} <= set(row)
        assert 0 <= row["fvu"] < 0.75 and 0 <= row["dead_pct"] <= 100 and 20 <= row["l0"] <= 48
    fvu = sorted(r["fvu"] for r in s["layers"])
    assert fvu[len(fvu) // 2] < 0.40                  # floors just below the shipped set's figures
    fid = s["fidelity"]["heldout"]["positions_ge_1"]
    assert 0.2 < fid["top1_agreement"] <= 1 and 0 <= fid["kl"] < 3.5


@pytest.mark.model
def test_training_run_writes_a_loadable_set(tmp_path, model, session_corpus):
    """Two layers trained for a few steps on the test corpus: the export loads, its encode is
    the folded form of the trained weights, and a rerun resumes from the checkpoint."""
    from backend.train_transcoders import TCConfig, train

    cfg = TCConfig(layers=(0, 1), width=64, k=4, tokens=3 * 2048, warmup=2, dead_window=2048)
    out = train(cfg, tmp_path / "set", tmp_path / "work", log=lambda m: None)
    assert out["steps"] == 3 and out["tokens"] > 0
    s = tc.load_set(str(tmp_path / "set"))
    assert s.n_layers == 2 and s.d_transcoder == 64 and s.W_skip[0] is not None
    assert float(s.threshold[0][0]) > 0
    again = train(cfg, tmp_path / "set", tmp_path / "work", log=lambda m: None)
    assert again["steps"] == 3 and again["tokens"] == out["tokens"]     # nothing left to do


@pytest.mark.model
def test_warm_start_continues_from_a_trained_set(tmp_path, model, session_corpus):
    """--init-from: the first step of a warm run starts at the trained set's error (not a new
    set's), the corpus continues after the windows the set saw, and the token count adds up."""
    from backend.train_transcoders import TCConfig, train

    cold = TCConfig(layers=(0,), width=64, k=4, tokens=8 * 2048, warmup=2, dead_window=2048, lr=5e-3)
    first = train(cold, tmp_path / "a", tmp_path / "work", log=lambda m: None)
    lines: list[str] = []
    one = dict(tokens=2048, warmup=1000, lr=1e-9)           # ~no update: the step measures the start
    warm = train(TCConfig(layers=(0,), width=64, k=4, init_from=str(tmp_path / "a"), **one),
                 tmp_path / "b", tmp_path / "work", log=lines.append)
    fresh = train(TCConfig(layers=(0,), width=64, k=4, seed=5, **one), tmp_path / "c", tmp_path / "work",
                  log=lambda m: None)
    assert any("warm start" in m for m in lines)
    assert abs(warm["train_fvu"][0] - first["train_fvu"][0]) < 0.1      # where the set left off
    assert warm["train_fvu"][0] < fresh["train_fvu"][0] - 0.15
    assert tc._read_config(tmp_path / "b")["training_tokens"] == first["tokens"] + warm["tokens"]
    with pytest.raises(InvalidSpec):
        train(TCConfig(layers=(0,), width=32, k=4, init_from=str(tmp_path / "a"), **one),
              tmp_path / "d", tmp_path / "work2", log=lambda m: None)


@pytest.mark.model
def test_a_transcoder_layer_is_a_feature_source_like_an_sae(model):
    """"<set>.L<layer>" loads as SAELens's JumpReLUSkipTranscoder whose encode and forward equal
    the set's own (circuit-tracer format) on real MLP inputs; it reads the MLP's input and writes
    its output; the feature pages list every layer; a missing layer is a typed error."""
    from backend import saes
    from backend.errors import UnknownSAE
    from kernels import forward as kf

    sid = f"{tc.default_set_id(model.info.model_id)}.L7"
    s = saes.load_sae(sid)
    info = saes.sae_info(sid)
    assert type(s).__name__ == "JumpReLUSkipTranscoder" and info["source"] == "transcoder"
    assert s.cfg.metadata.hook_name == info["hook_name"] == "blocks.7.mlp.hook_in"
    assert saes.write_hook(s) == info["hook_out"] == "blocks.7.hook_mlp_out"
    ts = tc.load_set(tc.default_set_id(model.info.model_id))
    ids = model.tensor([model.tokenize("The capital of France is Paris, and the capital of Spain is")])
    x = kf.run(kf.dense_model(model), ids, capture=["blocks.7.mlp.hook_in"])["blocks.7.mlp.hook_in"][0].float()
    with torch.inference_mode():
        a, out = s.encode(x), s(x)
    ref = ts.encode(7, x)
    assert torch.equal(a, ref) and int((a > 0).sum()) > 0
    assert torch.allclose(out, ts.decode(7, ref, x), atol=1e-5)
    src = saes.feature_sources(model.info.model_id)
    assert sid in src and f"{tc.default_set_id(model.info.model_id)}.L29" in src
    with pytest.raises(UnknownSAE):
        saes.sae_info(f"{tc.default_set_id(model.info.model_id)}.L99")


@pytest.mark.model
def test_a_transcoder_feature_steers_at_the_mlp_output(model):
    """A transcoder feature's direction is its decoder row added at the MLP's output (where the
    transcoder writes), not at its input hook."""
    from backend.analyses.directions import DirectionSpec, compute
    from backend.saes import load_sae

    sid = f"{tc.default_set_id(model.info.model_id)}.L7"
    res = compute(DirectionSpec(model=model.info.model_id, method="sae", sae=sid, feature=11), model)
    row = load_sae(sid).W_dec[11].detach().float()
    assert res.site == "mlp_out" and res.layer == 7 and res.hook_name == "blocks.7.hook_mlp_out"
    assert torch.equal(torch.as_tensor(res.vector), row)
