"""Quality of the shipped SAEs on the project's own out-of-corpus passages (tests/passages:
a story, a recipe, news, a chat, an e-mail, a review, Python, JavaScript), measured the plain
way: SAELens's own `SAE.load_from_disk`, `encode` and `decode` on the model's activations at
the SAE's hook (hook_z passed as [pos head d_head], SAELens reshapes it), position 0 left out.
The figures must meet the floors below and agree with what quality.json reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backend import train_sae
from backend.saes import SAE_DIR

pytestmark = pytest.mark.model

SHIPPED = [train_sae.sae_id("smollm2-135m", c.value, layer) for c, layer in train_sae.PLAN]
# Variance explained on the passages, pooled (first position left out). Issue 9's targets are
# 0.9 (residual) and 0.8 (hook_z); L5 and L23 z meet theirs pooled, L15 and L25 fall short
# (README: 1.61 M unique tokens, k = 64, 4.5 epochs each). FLOOR holds each
# SAE to what it reaches today, a little below the measured figure (L5 0.943, L15 0.833, L25
# 0.811, L23 z 0.818; earlier SAEs: L5 0.915 then 0.940, L15 0.741 then 0.820, L25 0.711 then 0.800,
# L23 z 0.704 then 0.804), so a regression fails; raise it when better SAEs ship.
TARGET = {"resid_pre": 0.9, "z": 0.8}
FLOOR = {"smollm2-135m-L5-resid_pre": 0.935, "smollm2-135m-L15-resid_pre": 0.825,
         "smollm2-135m-L25-resid_pre": 0.80, "smollm2-135m-L23-z": 0.81}


@pytest.fixture(scope="module")
def passages(model):
    return {name: model.tokenize(text) for name, text in train_sae.passages().items()}


@pytest.mark.parametrize("sid", SHIPPED)
def test_variance_explained_on_out_of_corpus_passages(model, passages, sid):
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(SAE_DIR / sid), device="cpu", dtype="float32").eval()
    hook = sae.cfg.metadata.hook_name
    xs, recs, l0 = [], [], []
    for ids in passages.values():
        x = model.capture(model.tensor(ids), [hook])[hook][0, 1:]      # [pos d] or [pos head d_head]
        with torch.inference_mode():
            f = sae.encode(x)
            rec = sae.decode(f)
        xs.append(x.reshape(len(x), -1))
        recs.append(rec.reshape(len(x), -1))
        l0.append((f > 0).sum(-1).float())
    x, rec = torch.cat(xs), torch.cat(recs)
    ve = 1 - float(((rec - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert float(torch.cat(l0).mean()) <= 64
    reported = json.loads((SAE_DIR / sid / "quality.json").read_text())["quality"]["unlike_training"]
    assert reported["tokens"] == len(x)
    np.testing.assert_allclose(ve, reported["variance_explained"], atol=2e-3)
    assert ve >= FLOOR[sid], f"{sid}: variance explained {ve:.3f} on the passages"
