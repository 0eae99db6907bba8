"""Any local checkpoint is a model (issue 28): a Hugging Face folder opened by path.

Tiny random Llama, Gemma-3 (text) and GPT-2 checkpoints are written here with save_pretrained,
with the SmolLM2 tokenizer beside them (vocab 49,152, so its ids fit). They load by path, keep
one id per folder content, take the fast patching path where the canonical-weights reader knows
the architecture (equal to the hooked reference) and the reference path elsewhere. The converted
SmolLM2 folder opened by path gives exactly what `smollm2-135m` gives, and reads its shipped SAE.
Bad paths give typed errors and store nothing. The sidebar takes a path (AppTest).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from backend import FeaturesSpec, PatchSpec, PromptSpec, lookup, run
from backend.cli import execute
from backend.errors import CheckpointChanged, UnknownModel
from backend.model import (OFFLINE_MODELS, canonical_id, check_model_id, converted_dir, load_model,
                           same_weights)
from backend.store import default_store
from backend.tasks import PromptPair, encode_pair
from kernels import patching as kp

from .conftest import DEFAULT_MODEL, ROOT

pytestmark = pytest.mark.model

IOI = PromptPair("When Mary and John went to the store, John gave a drink to",
                 "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")
SAE = "smollm2-135m-L15-resid_pre"
VOCAB = 49152            # the SmolLM2 tokenizer's


def _config(arch: str):
    from transformers import GPT2Config, Gemma3TextConfig, LlamaConfig

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if arch == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, **common)
    if arch == "gemma":    # one sliding-window layer (window 4, shorter than the prompt) and one global
        return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=4,
                                layer_types=["sliding_attention", "full_attention"], initializer_range=0.2,
                                **common)
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2,
                      **{k: v for k, v in common.items() if k != "pad_token_id"})


def _write(folder: Path, arch: str, tokenizer, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(_config(arch)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(model):
    return model.tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: _write(root / f"tiny-{arch}", arch, tokenizer) for arch in ("llama", "gemma", "gpt2")}


def _cli(*args) -> tuple[int, dict]:
    return execute([*args, "--format", "json"])


def _patch_args(path) -> list[str]:
    return ["patch", "--model", str(path), "--clean", IOI.clean, "--corrupt", IOI.corrupt, "--answer", IOI.answer,
            "--wrong", IOI.wrong, "--site", "resid_pre", "--metric", "logit_diff"]


# ---------------------------------------------------------------------------------------------------
# Tiny checkpoints written by the test
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_tiny_checkpoint_loads_by_path_and_takes_the_fast_path(ckpt, arch):
    from transformers import AutoModelForCausalLM

    path = ckpt[arch]
    lm = load_model(str(path))
    assert lm.info.source == "local" and lm.info.hf_name == str(path.resolve())
    assert re.fullmatch(re.escape(str(path.resolve())) + r"#[0-9a-f]{12}", lm.info.model_id)
    assert load_model(lm.info.model_id) is lm                       # the id is accepted back
    assert (lm.info.n_layers, lm.info.d_model, lm.info.n_heads, lm.info.n_kv_heads) == (2, 64, 4, 2)
    ids = lm.encode("The capital of France is")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.inference_mode():
        assert torch.equal(lm.logits(ids)[0], hf(lm.tensor(ids)).logits[0])
    assert lm.weights().architecture == ("llama" if arch == "llama" else "gemma3_text")

    code, p = _cli("prompt", "--model", str(path), "--text", "The capital of France is")
    assert code == 0, p
    assert p["model"] == lm.info.model_id and p["tokens"] == lm.str_tokens(ids) and len(p["top_k"]) == 10

    code, out = _cli(*_patch_args(path))
    assert code == 0, out
    assert out["method"] == "fast" and out["model"] == lm.info.model_id
    fast = np.array(out["values"])
    e = encode_pair(lm, IOI)
    ref = kp.reference_sweep(lm, e.corrupt_ids, e.clean_ids, "resid_pre", kp.LogitDiff(e.answer_id, e.wrong_id),
                             lm.info.n_layers, lm.info.n_heads, n_kv=lm.info.n_kv_heads)
    np.testing.assert_allclose(fast, ref.values.double().numpy(), atol=1e-4, rtol=0)
    assert fast.max() - fast.min() > 1e-2                            # the patches move the metric


def test_pytorch_bin_weights_load_too(ckpt, tmp_path):
    from safetensors.torch import load_file

    folder = shutil.copytree(ckpt["llama"], tmp_path / "bin")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    a, b = load_model(str(folder)), load_model(str(ckpt["llama"]))
    assert a is not b and a.info.model_id != b.info.model_id
    ids = a.encode("Hello world")
    assert torch.equal(a.logits(ids), b.logits(ids))


def test_other_architectures_run_the_reference_path(ckpt):
    lm = load_model(str(ckpt["gpt2"]))
    with pytest.raises(NotImplementedError):
        lm.weights()
    code, p = _cli("prompt", "--model", str(ckpt["gpt2"]), "--text", "Hello there")
    assert code == 0, p
    code, out = _cli(*_patch_args(ckpt["gpt2"]))
    assert code == 0, out
    assert out["method"] == "reference" and np.isfinite(np.array(out["values"])).all()


def test_the_id_follows_the_content_not_the_path_or_the_mtime(ckpt, tokenizer, tmp_path):
    """A copy keeps the id's fingerprint; a checkpoint saved over another at the same path (same
    config, same sizes, other weights) gets a new id, so the old results are never served for it."""
    folder = shutil.copytree(ckpt["llama"], tmp_path / "ft")
    first = canonical_id(str(folder))
    assert first.rpartition("#")[2] == canonical_id(str(ckpt["llama"])).rpartition("#")[2]
    assert canonical_id("./" + os.path.relpath(folder)) == first == check_model_id(str(folder))
    assert PromptSpec(model=str(folder), text="Hi").model == first          # specs are keyed by the id
    from backend import corpus
    assert corpus.tokens_path(first).parent == corpus.corpus_dir() / "tokens"   # never beside the checkpoint
    assert same_weights(str(folder), str(ckpt["llama"])) and not same_weights(str(folder), str(ckpt["gemma"]))
    old = run(PromptSpec(model=str(folder), text="The capital of France is"))

    sizes = {f.name: f.stat().st_size for f in folder.iterdir()}
    _write(folder, "llama", tokenizer, seed=1)                       # "fine-tuned": same shapes, other weights
    assert {f.name: f.stat().st_size for f in folder.iterdir()} == sizes
    second = canonical_id(str(folder))
    assert second != first
    new = run(PromptSpec(model=str(folder), text="The capital of France is"))
    assert not new.from_store and new.run_key != old.run_key
    assert not np.array_equal(new.result.top_probs, old.result.top_probs)
    # the old id still reads its stored result, but computing anything new with it is refused
    assert lookup(PromptSpec(model=first, text="The capital of France is")).from_store
    with pytest.raises(CheckpointChanged) as e:
        load_model(first)
    assert e.value.code == "checkpoint_changed" and second.rpartition("#")[2] in str(e.value)


# ---------------------------------------------------------------------------------------------------
# The converted SmolLM2 folder opened by path is smollm2-135m
# ---------------------------------------------------------------------------------------------------
def test_converted_smollm2_by_path_equals_the_offline_model(model, ckpt):
    folder = converted_dir(OFFLINE_MODELS[DEFAULT_MODEL])
    lm = load_model(str(folder))
    assert lm is not model and lm.info.source == "local"
    assert same_weights(lm.info.model_id, DEFAULT_MODEL)
    assert {k: v for k, v in lm.info.to_dict().items() if k not in ("model_id", "source", "hf_name")} == \
        {k: v for k, v in model.info.to_dict().items() if k not in ("model_id", "source", "hf_name")}
    text = "The capital of France is"
    ids = model.encode(text)
    assert lm.encode(text) == ids                                    # same BOS rule (SmolLM2 adds none)
    with torch.inference_mode():
        assert torch.equal(lm.logits(ids), model.logits(ids))

    a = run(PromptSpec(model=DEFAULT_MODEL, text=text)).result
    b = run(PromptSpec(model=str(folder), text=text)).result
    for f in ("tokens", "token_ids", "top_tokens", "top_ids", "lens_tokens"):
        assert np.array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f))), f
    assert np.array_equal(a.top_probs, b.top_probs) and np.array_equal(a.lens_probs, b.lens_probs)

    pa, pb = (run(PatchSpec(model=m, clean="The capital of France is", corrupt="The capital of Italy is",
                            answer=" Paris", wrong=" Rome", site="resid_pre")).result for m in (DEFAULT_MODEL, str(folder)))
    assert pa.method == pb.method == "fast" and np.array_equal(pa.values, pb.values)
    assert (pa.clean_logit_diff, pa.corrupt_logit_diff) == (pb.clean_logit_diff, pb.corrupt_logit_diff)

    # the shipped SAE (metadata: trained on "smollm2-135m") reads the same weights under the path
    fa = run(FeaturesSpec(model=DEFAULT_MODEL, text=text, sae=SAE)).result
    fb = run(FeaturesSpec(model=str(folder), text=text, sae=SAE)).result
    assert fa.sae_id == fb.sae_id and fa.tokens == fb.tokens
    for f in ("feature_ids", "feature_values", "l0", "act_norm", "recon_error"):
        assert np.array_equal(getattr(fa, f), getattr(fb, f)), f
    code, p = _cli("features", "--model", str(folder), "--text", text, "--sae", SAE)
    assert code == 0, p
    from backend.saes import list_saes
    assert SAE in [s["sae_id"] for s in list_saes(lm.info.model_id)]  # the feature pages list it
    # ... and is refused for other weights (the tiny Llama: another fingerprint)
    code, p = _cli("features", "--model", str(ckpt["llama"]), "--text", text, "--sae", SAE)
    assert code == 2 and p["error"]["code"] == "sae_mismatch", p


# ---------------------------------------------------------------------------------------------------
# Bad paths: typed errors, nothing stored
# ---------------------------------------------------------------------------------------------------
def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def bad_paths(ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    no_config = shutil.copytree(ckpt["llama"], root / "no-config")
    (no_config / "config.json").unlink()
    no_weights = shutil.copytree(ckpt["llama"], root / "no-weights")
    (no_weights / "model.safetensors").unlink()
    (no_weights / "adapter_config.json").write_text("{}")            # a PEFT adapter folder: said so
    return {
        "missing": (root / "does-not-exist", "unknown_model"),
        "file": (ckpt["llama"] / "model.safetensors", "invalid_checkpoint"),
        "no_config": (no_config, "invalid_checkpoint"),
        "no_weights": (no_weights, "invalid_checkpoint"),
        "nonsense": (_edit_config(ckpt["llama"], root / "nonsense", model_type="nonsense"), "unsupported_architecture"),
        "hidden_size": (_edit_config(ckpt["llama"], root / "wider", hidden_size=128), "invalid_checkpoint"),
        "more_layers": (_edit_config(ckpt["llama"], root / "deeper", num_hidden_layers=3), "invalid_checkpoint"),
    }


@pytest.mark.parametrize("case", ["missing", "file", "no_config", "no_weights", "nonsense", "hidden_size",
                                  "more_layers"])
def test_bad_paths_give_typed_errors_and_store_nothing(bad_paths, case):
    path, code = bad_paths[case]
    store = default_store()
    before = store.count_runs()
    for args in (["prompt", "--model", str(path), "--text", "hi"], _patch_args(path)):
        rc, out = _cli(*args)
        assert rc == 2, out
        assert out["error"]["code"] == code, out
        assert "Traceback" not in out["error"]["message"] and len(out["error"]["message"]) < 700
    if case == "no_weights":
        assert "PEFT adapter" in out["error"]["message"]
    with pytest.raises(UnknownModel):                               # every one is an UnknownModel
        load_model(str(path))
    assert store.count_runs() == before


def test_cli_process_prints_the_error_json_and_exits_2(bad_paths, tmp_path):
    path, code = bad_paths["hidden_size"]
    r = subprocess.run([sys.executable, "-m", "backend", "prompt", "--model", str(path), "--text", "hi",
                        "--format", "json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "DASHBOARD_STORE": str(tmp_path / "s.duckdb")})
    assert r.returncode == 2, r.stderr[-2000:]
    e = json.loads(r.stdout)["error"]
    assert e["code"] == code and "hidden_size" not in e["type"] and "model.embed_tokens.weight" in e["message"]
    assert "Traceback" not in r.stderr and "LOAD REPORT" not in r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------------
# Registered folders
# ---------------------------------------------------------------------------------------------------
def test_models_lists_registered_folders(ckpt, bad_paths, tmp_path, monkeypatch):
    monkeypatch.setenv("DASHBOARD_STORE", str(tmp_path / "reg.duckdb"))     # the registry lies beside it
    monkeypatch.setenv("DASHBOARD_MODELS", os.pathsep.join([str(ckpt["gemma"]), str(bad_paths["missing"][0])]))
    rc, out = _cli("models", "add", str(ckpt["llama"]))
    assert rc == 0, out
    assert out["added"]["model_id"] == canonical_id(str(ckpt["llama"]))
    rc, out = _cli("models", "add", str(ckpt["gpt2"]))
    assert rc == 0, out
    rc, out = _cli("models", "add", str(bad_paths["nonsense"][0]))
    assert rc == 2 and out["error"]["code"] == "unsupported_architecture"
    rc, out = _cli("models")
    assert rc == 0, out
    local = {Path(m["path"]).name: m for m in out["local"]}
    assert set(local) == {"tiny-gemma", "does-not-exist", "tiny-llama", "tiny-gpt2"}
    assert local["tiny-gemma"]["registered_by"] == "DASHBOARD_MODELS" and local["tiny-gemma"]["fast_paths"]
    assert local["tiny-llama"]["registered_by"] == "models add" and local["tiny-llama"]["architecture"] == "llama"
    assert local["tiny-llama"]["fast_paths"] and not local["tiny-gpt2"]["fast_paths"]
    assert not local["does-not-exist"]["ok"] and local["does-not-exist"]["problem"]["code"] == "unknown_model"
    assert Path(out["registry"]).read_text().splitlines() == [str(ckpt["llama"].resolve()), str(ckpt["gpt2"].resolve())]
    rc, out = _cli("models", "remove", str(ckpt["gpt2"]))
    assert rc == 0 and out["removed"] and "tiny-gpt2" not in {Path(m["path"]).name for m in out["local"]}
    rc, out = _cli("models", "add")
    assert rc == 2 and out["error"]["code"] == "invalid_spec"


# ---------------------------------------------------------------------------------------------------
# The sidebar takes a path
# ---------------------------------------------------------------------------------------------------
def test_sidebar_model_box_accepts_a_folder_path(ckpt, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DASHBOARD_MODELS", str(ckpt["gemma"]))
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=300)
    at.query_params["page"] = "prompt"
    at.query_params["text"] = "The capital of France is"
    at.run()
    assert not at.exception, at.exception
    box = at.sidebar.selectbox[0]
    gemma_id = canonical_id(str(ckpt["gemma"]))
    assert gemma_id in box.options or "tiny-gemma (local folder" in " ".join(box.options)   # registered
    other = [o for o in box.options if o.startswith("other")][0]
    box.select(other).run()
    field = at.sidebar.text_input[0]
    assert "local folder path" in field.label
    field.input(str(ckpt["llama"])).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    model_id = canonical_id(str(ckpt["llama"]))
    qp = at.query_params["model"]
    assert (qp[0] if isinstance(qp, list) else qp) == model_id
    assert len(at.get("plotly_chart")) >= 1                         # the prompt page ran on the checkpoint
    assert lookup(PromptSpec(model=model_id, text="The capital of France is")) is not None
