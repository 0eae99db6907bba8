"""Directions: vectors against Hugging Face's own hidden states, the CAA answer letter, the
probe on synthetic data, the CLI's JSON and bad inputs (typed error, nothing stored)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend import cli
from backend.analyses import directions as D
from backend.runner import run
from backend.store import default_store

pytestmark = pytest.mark.model


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def hf(model):
    return model.reference_hf_model()


def _hidden(hf, ids) -> np.ndarray:
    """Hugging Face hidden states [n_layers + 1, P, d] of one prompt (float64)."""
    import torch

    with torch.inference_mode():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    return torch.stack(out.hidden_states)[:, 0].double().numpy()


def test_diff_means_equals_hugging_face(model, hf):
    sets = D.shipped("sentiment")
    spec = D.DirectionSpec(model=model.info.model_id, method="diff-means", site="resid_pre", layer=10,
                           positive=tuple(sets["positive"][:6]), negative=tuple(sets["negative"][:6]))
    r = run(spec).result
    mean = {}
    for side in ("positive", "negative"):
        # hidden_states[l] is the input of block l (resid_pre), read at the prompt's last token
        mean[side] = np.mean([_hidden(hf, model.encode(t))[:-1, -1] for t in sets[side][:6]], 0)
    ref = mean["positive"] - mean["negative"]                               # [n_layers d]
    assert r.vector.shape == (model.info.d_model,) and r.norm == pytest.approx(np.linalg.norm(ref[10]), rel=1e-5)
    assert _rel(r.vector, ref[10]) < 1e-5
    for layer in range(model.info.n_layers):
        assert _rel(r.layer_vectors[layer], ref[layer]) < 1e-5, layer
    assert len(r.layer_accuracy) == model.info.n_layers and r.made["n_positive"] == 6
    # a click on layer 11 of the curve: built from the stored pass, equal to computing it
    import dataclasses
    moved = D.at_layer(spec, r, 11)
    direct = D.compute(dataclasses.replace(spec, layer=11), model)
    np.testing.assert_array_equal(moved.result.vector, direct.vector)
    assert moved.result.hook_name == "blocks.11.hook_resid_pre" and run(moved.spec).from_store


def test_post_instruction_diff_means_equals_hugging_face(model, hf):
    sets = D.shipped("refusal")
    pos, neg = tuple(sets["positive"][:3]), tuple(sets["negative"][:3])
    spec = D.DirectionSpec(model=model.info.model_id, method="diff-means", site="resid_pre", layer=12,
                           position="post-instruction", chat=True, positive=pos, negative=neg)
    r = run(spec).result
    n = D.post_instruction_length(model)
    assert n >= 2 and model.str_tokens(D.user_chat(model, "Hi")[-n:])[0] == "<|im_end|>"
    ref = (np.mean([_hidden(hf, D.user_chat(model, t))[12, -n:].mean(0) for t in pos], 0)
           - np.mean([_hidden(hf, D.user_chat(model, t))[12, -n:].mean(0) for t in neg], 0))
    assert _rel(r.vector, ref) < 1e-5


def test_caa_reads_the_answer_letter_and_equals_hugging_face(model, hf):
    pairs = D.shipped("optimism")["pairs"][:4]
    q, a, b = pairs[0]
    ids, j = D.answer_position(model, q, a)
    assert model.str_tokens([ids[j]])[0] == a and model.str_tokens([ids[j - 1]])[0] == "("
    assert j != len(ids) - 2          # SmolLM2's template ends "(A<|im_end|>\n": the letter is at -3
    spec = D.DirectionSpec(model=model.info.model_id, method="caa", site="resid_post", layer=8,
                           pairs=tuple(tuple(p) for p in pairs))
    r = run(spec).result
    diffs = []
    for q, a, b in pairs:
        (ia, ja), (ib, jb) = D.answer_position(model, q, a), D.answer_position(model, q, b)
        # resid_post of block l is hidden_states[l + 1] (the last one is after the final norm)
        diffs.append(_hidden(hf, ia)[1:, ja] - _hidden(hf, ib)[1:, jb])
    ref = np.mean(diffs, 0)
    assert _rel(r.vector, ref[8]) < 1e-5
    for layer in range(model.info.n_layers - 1):
        assert _rel(r.layer_vectors[layer], ref[layer]) < 1e-5, layer
    assert r.made["letter_tokens"] == ["A", "B"]


def test_actadd_pads_with_spaces(model):
    spec = D.DirectionSpec(model=model.info.model_id, method="actadd", site="resid_pre", layer=6,
                           positive=(" Love",), negative=(" Hate",))
    r = run(spec).result
    assert model.encode(" Love") != model.encode(" Hate") and len(model.encode(" Hate")) == 2
    assert r.made["k"] == 2 and r.made["positive_tokens"] == [" Love", " "]
    assert r.position_vectors.shape == (2, model.info.d_model)
    np.testing.assert_array_equal(r.vector, r.position_vectors[-1])


def test_probe_on_synthetic_sets():
    rng = np.random.default_rng(0)
    n, d = 400, 32
    X = rng.normal(size=(2, n, d))
    w = rng.normal(size=d)
    y = (X[0] @ w > 0).astype(int)
    X[0] += np.outer(2 * y - 1, w / np.linalg.norm(w))   # a margin: separable with room to spare
    X[1] = rng.normal(size=(n, d))                  # layer 1 carries nothing about y
    train, test = D.split_indices(y, 0.25, 0)
    W, B, acc_tr, acc_te, sep = D.fit_probes(X, y, train, test)
    assert acc_te[0] > 0.98 and 0.35 < acc_te[1] < 0.65
    cos = W[0] @ w / np.linalg.norm(W[0]) / np.linalg.norm(w)
    assert cos > 0.9
    shuffled = rng.permutation(y)
    _, _, _, acc_sh, _ = D.fit_probes(X, shuffled, *D.split_indices(shuffled, 0.25, 0))
    assert 0.35 < acc_sh[0] < 0.65
    # raw-unit weights: the score x·w + b on the raw activations classifies as the fitted probe
    # did (its held-out accuracy), at every layer
    assert set(np.unique(y[test])) == {0, 1} and len(set(train) & set(test)) == 0
    for layer in range(2):
        raw = ((X[layer][test] @ W[layer] + B[layer]) > 0).astype(int)
        assert np.mean(raw == y[test]) == pytest.approx(acc_te[layer], abs=1e-9)


def _cli(capsys, *args) -> tuple[int, dict]:
    code = cli.main(list(args) + ["--format", "json"])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_direction_cli_fields(model, tmp_path, capsys):
    pos, neg = tmp_path / "p.txt", tmp_path / "n.jsonl"
    pos.write_text("I love sunny days.\nWhat a great gift!\n")
    neg.write_text('{"text": "I hate rainy days."}\n{"text": "What an awful gift!"}\n')
    code, d = _cli(capsys, "direction", "--method", "diff-means", "--positive-file", str(pos),
                   "--negative-file", str(neg), "--site", "resid_pre", "--layer", "9", "--position", "last")
    assert code == 0
    assert {"direction_key", "site", "layer", "norm", "vector"} <= set(d)
    assert d["site"] == "resid_pre" and d["layer"] == 9 and len(d["vector"]) == model.info.d_model
    assert d["norm"] == pytest.approx(float(np.linalg.norm(d["vector"])), rel=1e-5)
    _, stored = D.load_direction(d["direction_key"])
    np.testing.assert_array_equal(np.array(d["vector"], np.float32), stored.vector)
    code, d = _cli(capsys, "direction", "--method", "probe", "--data-file", str(D.DATA / "truefalse.jsonl"),
                   "--layer", "12")
    assert code == 0 and len(d["accuracy_by_layer"]) == model.info.n_layers
    assert all(0 <= a <= 1 for a in d["accuracy_by_layer"]) and len(d["vector"]) == model.info.d_model
    code, d = _cli(capsys, "direction", "--method", "actadd", "--positive", " Love", "--negative", " Hate",
                   "--layer", "6")
    assert code == 0 and len(d["vector"]) == model.info.d_model and len(d["position_vectors"]) == 2
    code, d = _cli(capsys, "direction", "--method", "caa", "--pairs-file", str(D.DATA / "behaviour_ab.jsonl"),
                   "--layer", "10")
    assert code == 0 and d["site"] == "resid_post"


def test_bad_direction_inputs(model, tmp_path, capsys):
    empty, one = tmp_path / "empty.txt", tmp_path / "one.txt"
    empty.write_text("\n\n")
    one.write_text("A happy sentence.\n")
    bad_pairs = tmp_path / "pairs.jsonl"
    bad_pairs.write_text(json.dumps({"question": "Pick one.\n(A) yes\n(B) no", "positive": "C", "negative": "A"}) + "\n")
    before = default_store().count_runs()
    cases = [
        (["--method", "diff-means", "--positive-file", str(empty), "--negative-file", str(one), "--layer", "3"], "empty_set"),
        (["--method", "diff-means", "--positive-file", str(one), "--layer", "3"], "empty_set"),
        (["--method", "caa", "--pairs-file", str(bad_pairs), "--layer", "3"], "answer_not_found"),
        (["--method", "diff-means", "--positive-file", str(one), "--negative-file", str(one), "--layer", "99"],
         "invalid_site"),
        (["--method", "diff-means", "--positive-file", str(one), "--negative-file", str(one), "--layer", "3",
          "--site", "q"], "invalid_site"),
        (["--method", "diff-means", "--positive-file", str(tmp_path / "missing.txt"), "--negative-file", str(one),
          "--layer", "3"], "bad_data_file"),
        (["--method", "sae", "--sae", "smollm2-135m-L5-resid_pre", "--feature", "999999"], "out_of_range"),
    ]
    for args, code in cases:
        rc, d = _cli(capsys, "direction", *args)
        assert rc == 2 and d["error"]["code"] == code, (args, d)
    assert default_store().count_runs() == before
