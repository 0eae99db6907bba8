"""The probes' activation collector: batched, right-padded, early-stopping passes equal Hugging
Face's own `output_hidden_states` (relative 1e-5) and one forward per item; bad positions and
sites are typed errors."""

from __future__ import annotations

import numpy as np
import pytest

from backend.analyses.probes import activations as A
from backend.errors import DashboardError, InvalidSite, InvalidSpec

pytestmark = pytest.mark.model

TEXTS = ["Paris is a city in France.", "Gold has the chemical symbol Au.", "The whale is a mammal.",
         "The telephone was invented by Alexander Graham Bell, a Scottish-born inventor.", "Yes."]


@pytest.fixture(scope="module")
def hf(model):
    return model.reference_hf_model()


def _hidden(hf, ids) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    return torch.stack(out.hidden_states)[:, 0].double().numpy()     # [n_layers + 1, P, d]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_equals_hugging_face_hidden_states(model, hf):
    ids = [model.encode(t) for t in TEXTS]
    assert len({len(i) for i in ids}) > 2                  # really padded batches
    layers = [0, 7, 3, model.info.n_layers - 2]
    pos = [[-1, 1] for _ in ids]                           # last token and the second token
    post = A.collect(model, ids, pos, layers, batch_size=2)
    pre = A.collect(model, ids, pos, layers, site="resid_pre", batch_size=3)
    assert post.shape == (len(layers), len(TEXTS), 2, model.info.d_model) and post.dtype == np.float32
    for n, item in enumerate(ids):
        h = _hidden(hf, item)
        for li, layer in enumerate(layers):
            for k, p in enumerate((len(item) - 1, 1)):
                assert _rel(post[li, n, k], h[layer + 1, p]) < 1e-5, (n, layer, p)
                assert _rel(pre[li, n, k], h[layer, p]) < 1e-5, (n, layer, p)
    # the texts' last token, as collect_texts reads it
    np.testing.assert_array_equal(A.collect_texts(model, TEXTS, layers, batch_size=2)[:, :, 0], post[:, :, 0])


def test_batched_equals_one_at_a_time(model):
    ids = [model.encode(t) for t in TEXTS]
    whole = A.collect(model, ids, A.last_positions(ids), [5, 12], batch_size=8)
    single = np.concatenate([A.collect(model, [i], [[-1]], [5, 12], batch_size=1) for i in ids], axis=1)
    assert max(_rel(whole[:, n], single[:, n]) for n in range(len(ids))) < 1e-5


def test_stops_after_the_deepest_layer(model, monkeypatch):
    seen = []
    real = model.capture

    def spy(ids, names, **kw):
        seen.append(list(names))
        return real(ids, names, **kw)

    monkeypatch.setattr(model, "capture", spy)
    A.collect(model, [model.encode("Hello there")], [[-1]], [2, 4])
    assert seen == [["blocks.2.hook_resid_post", "blocks.4.hook_resid_post"]]   # capture stops early


def test_bad_input_is_typed(model):
    ids = [model.encode("Hello there")]
    with pytest.raises(InvalidSpec):
        A.collect(model, ids, [[99]], [1])
    with pytest.raises(InvalidSpec):
        A.collect(model, ids, [[0], [1]], [1])
    with pytest.raises(InvalidSpec):
        A.collect(model, ids, [[-1]], [1], site="mlp_post")
    with pytest.raises(InvalidSite):
        A.collect(model, ids, [[-1]], [model.info.n_layers])
    with pytest.raises(A.ProbeSetError):
        A.collect(model, [], [], [1])
    assert issubclass(A.ProbeSetError, DashboardError)
