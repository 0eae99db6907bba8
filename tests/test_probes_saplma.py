"""Truth probe (SAPLMA): the leave-one-topic-out accuracies equal scikit-learn's MLPClassifier and
LogisticRegression on the same activations, split and seed (2 points); the few-shot margin
equals the model's own logits; the CLI's JSON; a layer's probe becomes a direction; bad sets
are typed errors with nothing stored. Small subsets (20 true + 20 false per topic, one layer)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend import cli
from backend.analyses.probes import saplma as S
from backend.analyses.probes.activations import ProbeSetError, collect
from backend.runner import lookup, run

pytestmark = pytest.mark.model

LAYER = 15
SMALL = dict(layers=(LAYER,), max_per_topic=20, epochs=30)


@pytest.fixture(scope="module")
def small(model):
    spec = S.SaplmaSpec(model=model.info.model_id, **SMALL)
    out = run(spec)
    rows = S.select(spec)
    ids = [model.encode(r["text"]) for r in rows]
    acts = collect(model, ids, [[-1]] * len(ids), [LAYER])[0, :, 0].astype(np.float64)
    labels = np.array([r["label"] for r in rows])
    topics = out.result.topics
    topic_of = np.array([topics.index(r["topic"]) for r in rows])
    return spec, out, rows, acts, labels, topic_of


def test_shipped_set_meets_the_protocol():
    rows = S.read_statements(S.SHIPPED)
    topics = sorted({r["topic"] for r in rows})
    assert len(topics) == 6
    for t in topics:
        for label in (0, 1):
            assert sum(r["topic"] == t and r["label"] == label for r in rows) >= 150, (t, label)
    assert len({r["text"] for r in rows}) == len(rows)                      # no statement twice


def test_accuracies_equal_scikit_learn(small):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    spec, out, rows, acts, labels, topic_of = small
    r = out.result
    assert r.layers == [LAYER] and r.mlp_acc.shape == (1, 6)
    mine = {s: S.loto(acts, labels, topic_of, r.topics, s, spec.epochs) for s in (0, 1, 2)}
    np.testing.assert_array_equal(mine[0][0], r.mlp_acc[0])              # the stored run is that fit
    np.testing.assert_array_equal(mine[0][1], r.logreg_acc[0])
    sk_mlp, sk_lr = np.zeros((3, 6)), np.zeros(6)
    for k in range(6):
        tr, te = topic_of != k, topic_of == k
        (Xtr, Xte), _ = S.standardize(acts[tr], acts[te])
        sk_lr[k] = LogisticRegression(C=1.0, max_iter=10_000, tol=1e-10).fit(Xtr, labels[tr]).score(Xte, labels[te])
        for s in range(3):
            clf = MLPClassifier((256, 128, 64), solver="adam", max_iter=spec.epochs, random_state=s, tol=0.0,
                                n_iter_no_change=10_000, shuffle=True).fit(Xtr, labels[tr])
            sk_mlp[s, k] = clf.score(Xte, labels[te])
    # logistic regression is convex: the same optimum, topic by topic
    assert np.max(np.abs(r.logreg_acc[0] - sk_lr)) <= 0.02
    # the MLP is seed-dependent: mean held-out accuracy over three seeds each
    ours = np.mean([mine[s][0].mean() for s in mine])
    assert abs(ours - sk_mlp.mean()) <= 0.02, (ours, sk_mlp.mean())
    assert r.logreg_acc.mean() > 0.6                                       # a real signal at this layer


def test_few_shot_equals_the_models_logits(model, small):
    import torch

    rows = small[2][:5]
    got = S.few_shot_margins(model, [r["text"] for r in rows])
    yes, no = (model.tokenizer.encode(a, add_special_tokens=False)[0] for a in S.ANSWERS)
    for r, g in zip(rows, got):
        with torch.inference_mode():
            logits = model.logits([model.encode(S.few_shot_prompt(r["text"]))])[0, -1].double()
        assert g == pytest.approx(float(logits[yes] - logits[no]), abs=1e-4)
    right = (S.few_shot_margins(model, [r["text"] for r in small[2]]) > 0) == (small[4] == 1)
    assert small[1].result.few_shot_acc == pytest.approx(right.mean())


def test_cli_json_and_direction(model, small):
    spec, out = small[0], small[1]
    code, payload = cli.execute(["probe-study", "--study", "saplma", "--layers", str(LAYER), "--max-per-topic", "20",
                                 "--direction-layer", str(LAYER), "--format", "json"])
    assert code == 0, payload
    assert payload["run_key"] == out.run_key and payload["from_store"] and payload["study"] == "saplma"
    row = payload["layers"][0]
    assert set(row) == {"layer", "mlp_acc", "logreg_acc", "per_topic"} and row["layer"] == LAYER
    assert set(row["per_topic"]) == set(payload["topics"]) and len(payload["topics"]) == 6
    assert 0 <= payload["few_shot_acc"] <= 1
    json.dumps(payload)
    direction = S.layer_direction(model.info.model_id, out.run_key, LAYER)
    assert direction.run_key == payload["direction_key"]
    v = direction.result.vector
    np.testing.assert_array_equal(v, out.result.directions[0])
    assert direction.result.hook_name == f"blocks.{LAYER}.hook_resid_post"
    # the direction separates the classes it was fitted on: true statements project higher
    acts, labels = small[3], small[4]
    proj = acts @ (v / np.linalg.norm(v))
    assert proj[labels == 1].mean() > proj[labels == 0].mean()


def _write(tmp_path, rows) -> str:
    p = tmp_path / "s.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_bad_sets_are_typed_and_store_nothing(model, tmp_path):
    full = [{"text": f"Fact {i} of {t} is so.", "label": i % 2, "topic": t} for t in ("a", "b") for i in range(40)]
    cases = {
        "one class": [r for r in full if r["label"] == 1],
        "too few": [r for r in full if r["label"] == 1] + [r for r in full if r["label"] == 0][:15],
        "one topic": [r for r in full if r["topic"] == "a"],
    }
    for name, rows in cases.items():
        spec = S.SaplmaSpec(model=model.info.model_id, statements=_write(tmp_path, rows), layers=(1,))
        with pytest.raises(ProbeSetError):
            run(spec)
        assert lookup(spec) is None, name
    spec = S.SaplmaSpec(model=model.info.model_id, statements=_write(tmp_path, full), topics=("a", "nope"), layers=(1,))
    with pytest.raises(ProbeSetError, match="no statements"):
        run(spec)
    assert lookup(spec) is None
    code, payload = cli.execute(["probe-study", "--study", "saplma", "--statements-file", _write(tmp_path, cases["one class"]),
                                 "--layers", "1", "--format", "json"])
    assert code == 2 and payload["error"]["code"] == "bad_probe_set"
