"""Harmfulness vs refusal (backend/analyses/probes/harm_refusal.py): the two directions are the
diff-means at t_inst and t_post-inst computed by hand, they enter the directions table and steer,
and bad sets are typed errors with nothing stored."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from backend.analyses.probes import harm_refusal as H
from backend.analyses.probes.activations import ProbeSetError

pytestmark = pytest.mark.model


def _small(model_id="smollm2-135m", n=10, **kw) -> H.HarmRefusalSpec:
    full = H.spec_of(model_id)
    return H.HarmRefusalSpec(model=model_id, harmful=full.harmful[:n], harmless=full.harmless[:n],
                             heldout_harmful=full.heldout_harmful[:2], heldout_harmless=full.heldout_harmless[:2],
                             max_new_tokens=kw.pop("max_new_tokens", 4), source="test", **kw)


@pytest.fixture(scope="module")
def study(model, tmp_path_factory):
    from backend.store import Store

    store = Store(tmp_path_factory.mktemp("hr") / "store.duckdb")
    spec = _small(layer=5)
    yield spec, H.run_study(spec, store=store), store
    store.close()


def test_directions_equal_hand_diff_means(model, study):
    """Per prompt, one forward through run_with_cache; the template's post-instruction tokens
    found by comparing two chats; means in float64."""
    import torch

    from backend.analyses.directions import user_chat
    from backend.sites import Component, Site, hook_name

    spec, s, _ = study
    r = s.main.result
    L = model.info.n_layers
    names = [hook_name(Site(Component.RESID_POST, layer)) for layer in range(L)]
    a, b = user_chat(model, "Say yes."), user_chat(model, "Name a colour, please")
    n_post = next(k for k in range(1, len(a)) if a[-k - 1] != b[-k - 1])

    def states(texts):
        inst, post = [], []
        for t in texts:
            ids = user_chat(model, t)
            with torch.inference_mode():
                _, cache = model.run_with_cache(model.tensor(ids), names)
            inst.append(np.stack([cache[n][0, len(ids) - n_post - 1].double().numpy() for n in names]))
            post.append(np.stack([cache[n][0, len(ids) - 1].double().numpy() for n in names]))
        return np.stack(inst, 1), np.stack(post, 1)                       # [L n d]

    hi, hp = states(spec.harmful)
    ni, npst = states(spec.harmless)
    harm, refusal = hi.mean(1) - ni.mean(1), hp.mean(1) - npst.mean(1)
    for got, want in ((r.harm_vectors, harm), (r.refusal_vectors, refusal)):
        scale = np.linalg.norm(want, axis=-1).max()
        assert np.abs(got - want).max() <= 1e-5 * max(scale, 1.0), np.abs(got - want).max()
    cos = (harm * refusal).sum(-1) / np.linalg.norm(harm, axis=-1) / np.linalg.norm(refusal, axis=-1)
    np.testing.assert_allclose(r.cosine, cos, atol=1e-5)
    assert r.layer == 5 and r.proj_harm.shape == (L, 24)
    # the t_inst token is the instruction's own last token, not a template token
    assert r.made["t_inst_example"].strip() == spec.harmful[0].strip()[-1]


def test_directions_open_and_steer(model, study):
    from backend.analyses.directions import load_direction
    from backend.analyses.steering import SteerSpec
    from backend.runner import run

    spec, s, store = study
    r = s.main.result
    for key, vecs in ((s.harm.run_key, r.harm_vectors), (s.refusal.run_key, r.refusal_vectors)):
        dspec, d = load_direction(key, store)
        assert dspec.method == "derived" and d.layer == 5 and d.site == "resid_post"
        np.testing.assert_array_equal(d.vector, vecs[5])
        out = run(SteerSpec(model=spec.model, prompt="Tell me about your day.", direction=key, strength=8.0,
                            chat=True, max_new_tokens=6), store=store)
        assert out.result.hook_name == "blocks.5.hook_resid_post"
        assert out.result.steered_tokens != out.result.default_tokens
    assert s.harm.run_key != s.refusal.run_key
    # the steering evaluation ran with each direction, side by side
    for name in ("harm", "refusal"):
        e = s.steering[name].result
        assert e.conditions == ["baseline", "ablated", "added"] and e.harmless_text.shape == (2, 3)
        assert all(0 <= v <= 1 for v in e.harmless_rate)
    # a second run reads everything back
    again = H.run_study(spec, store=store)
    assert again.main.from_store and again.harm.from_store and all(o.from_store for o in again.steering.values())


def test_payload_fields(study):
    _, s, _ = study
    d = H.payload(s)
    assert {"layers", "harm_direction_key", "refusal_direction_key", "run_key", "projections", "steering"} <= set(d)
    assert all({"layer", "cosine"} <= set(x) for x in d["layers"])
    assert len(d["projections"]["items"]) == 4
    assert set(d["steering"]) == {"strength", "harm", "refusal"}


def test_bad_sets_are_typed_errors_and_nothing_is_stored(store):
    from backend.analyses.directions import UnknownDirection, derive
    from backend.errors import InvalidSite
    from backend.runner import run

    with pytest.raises(ProbeSetError):                   # fewer than 10 per class
        _small(n=9)
    full = H.spec_of("smollm2-135m")
    with pytest.raises(ProbeSetError):                   # one class
        H.HarmRefusalSpec(model="smollm2-135m", harmful=full.harmful, harmless=(),
                          heldout_harmful=full.heldout_harmful, heldout_harmless=full.heldout_harmless)
    with pytest.raises(ProbeSetError):                   # the same set twice
        H.HarmRefusalSpec(model="smollm2-135m", harmful=full.harmful, harmless=full.harmful,
                          heldout_harmful=full.heldout_harmful, heldout_harmless=full.heldout_harmless)
    with pytest.raises(ProbeSetError):                   # no held-out instructions
        H.HarmRefusalSpec(model="smollm2-135m", harmful=full.harmful, harmless=full.harmless)
    with pytest.raises(ProbeSetError):                   # an empty instruction
        H.HarmRefusalSpec(model="smollm2-135m", harmful=full.harmful[:-1] + ("  ",), harmless=full.harmless,
                          heldout_harmful=full.heldout_harmful, heldout_harmless=full.heldout_harmless)
    with pytest.raises(ProbeSetError):
        H.spec_of("smollm2-135m", harmful_file="/nonexistent")
    with pytest.raises(InvalidSite):                     # a layer the model does not have: at compute, before storing
        run(_small(layer=99), store=store)
    with pytest.raises(UnknownDirection):                # a study that is not there
        derive("smollm2-135m", H.HarmRefusalSpec.KIND, "probe-harm-refusal-0000", "harm", store)
    assert store.count_runs() == 0


def test_cli_no_steer(model):
    """The CLI promise (steering skipped to stay fast): fields and the two direction keys."""
    from backend.analyses import probe_study

    p = argparse.ArgumentParser()
    probe_study.add_cli_args(p)
    d = probe_study.run_cli(p.parse_args(["--study", "harm-refusal", "--harm-no-steer", "--harm-layer", "3"]))
    assert d["study"] == "harm-refusal" and d["layer"] == 3
    assert [x["layer"] for x in d["layers"]] == list(range(model.info.n_layers))
    assert all(-1.0 <= x["cosine"] <= 1.0 for x in d["layers"])
    assert d["harm_direction_key"].startswith("direction-") and d["refusal_direction_key"].startswith("direction-")
