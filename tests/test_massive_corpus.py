"""Massive activations over corpus windows: the per-chunk rows equal a run_with_cache reference,
a planted spike is found with its layer, dim and token kind, resume loses nothing, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.jobs import massive_corpus as mc
from backend.errors import InvalidSpec
from backend.sites import Component, Site, hook_name

from .conftest import DEFAULT_MODEL

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("session_corpus")]   # a small corpus, built once

JOB = mc.MassiveCorpusJob(model=DEFAULT_MODEL, n_windows=4, chunk=2, length=32)


def test_chunk_rows_equal_a_cached_reference(model):
    wins = mc.full_windows(DEFAULT_MODEL, "train", JOB.length, JOB.n_windows)
    ids = torch.as_tensor([w[2] for w in wins[:2]])
    rows = mc.chunk_rows(model, wins[:2], JOB, "k", 0)
    names = [hook_name(Site(Component.RESID_POST, layer)) for layer in range(model.info.n_layers)]
    with model.lock, torch.inference_mode():
        _, cache = model.run_with_cache(ids, names)
    ref = {}
    for layer, name in enumerate(names):
        x = cache[name].float().numpy()                                # [B P D]
        for b in range(x.shape[0]):
            a = np.abs(x[b])
            med = np.sort(a.reshape(-1))[(a.size - 1) // 2]
            for p, d in zip(*np.nonzero(a >= max(JOB.abs_threshold, JOB.ratio_threshold * med))):
                ref.setdefault((layer, int(d)), []).append(float(x[b, p, d]))
    part = rows["massive_part"].to_pylist()
    got = {(r["layer"], r["dim"]): r for r in part if r["kind"] == "all"}
    assert set(got) == set(ref) and ref, "the default model has massive activations on corpus windows"
    for k, v in ref.items():
        assert got[k]["n"] == len(v)
        assert got[k]["sum"] == pytest.approx(sum(v), rel=1e-5)
    # every entry is counted in exactly one token kind
    by_kind = {}
    for r in part:
        if r["kind"] != "all":
            by_kind[(r["layer"], r["dim"])] = by_kind.get((r["layer"], r["dim"]), 0) + r["n"]
    assert by_kind == {k: len(v) for k, v in ref.items()}
    lp = rows["massive_layer_part"].to_pylist()
    assert len(lp) == model.info.n_layers and all(r["n_seqs"] == 2 for r in lp)


def test_planted_spike_is_found_at_its_layer_dim_and_kind(model, store):
    """A spike planted at layer 3, dim 100, on every '.'-token: the corpus stats show it there."""
    wins = mc.full_windows(DEFAULT_MODEL, "train", JOB.length, JOB.n_windows)
    dot = model.encode(".")[0]
    ids = torch.as_tensor([w[2] for w in wins[:2]])
    ids[:, 5] = dot
    site = hook_name(Site(Component.RESID_POST, 3))

    def plant(x, hook):
        x = x.clone()
        x[ids == dot, 100] = 5000.0
        return x
    from kernels.massive import scan
    s, _ = scan(model, ids, top_k=1, n_dims=1, extra_hooks=[(site, plant)])
    m = s.massive
    at3 = m[(m[:, 1] == 3) & (m[:, 3] == 100)]
    assert len(at3) == int((ids == dot).sum())
    toks = [model.tokenizer.decode([int(ids[b, p])]) for b, _, p, _ in at3]
    assert {mc.token_kind(t, int(p)) for t, (_, _, p, _) in zip(toks, at3)} == {"."}
    assert mc.token_kind("\n\n", 4) == "\\n" and mc.token_kind(" the", 0) == "first"


def test_job_resumes_and_summarises(model, store):
    part = mc.run(JOB, store=store, model=model, stop_after=1)
    assert part["finished"] is False and part["done"] == 1
    out = mc.run(JOB, store=store, model=model)
    assert out["finished"]
    n = store.cursor().execute("SELECT count(*), count(DISTINCT (chunk, layer)) FROM massive_layer_part "
                               "WHERE job_key = ?", [JOB.key()]).fetchall()[0]
    assert n == (2 * model.info.n_layers, 2 * model.info.n_layers)
    assert all(r["sequences"] == JOB.n_windows for r in out["layers"])
    assert out["appears"] is not None and out["dims"]


def test_bad_input():
    with pytest.raises(InvalidSpec):
        mc.MassiveCorpusJob(model=DEFAULT_MODEL, abs_threshold=-1)
    with pytest.raises(InvalidSpec):
        mc.MassiveCorpusAblationSpec(model=DEFAULT_MODEL, job_key="nope")
    with pytest.raises(InvalidSpec):
        mc.full_windows(DEFAULT_MODEL, "train", 32, 10 ** 7)
