"""The patch-site table and the task spec base, without a model: every site's setter writes
exactly its cell, the AtP reductions give one value per cell, and the run keys of the task
specs are the ones stored before the base existed (links and stores stay valid)."""

from __future__ import annotations

import numpy as np
import pytest

from backend.analyses.atp_star import AtPStarSpec
from backend.analyses.attribution import AtPSpec
from backend.analyses.circuits import CircuitSpec, EdgeScoresSpec
from backend.analyses.patching import InterventionSpec, PatchSpec
from backend.errors import EmptyDataset, InvalidSite, InvalidSpec
from backend.patch_sites import ATP_SITES, SITE_AXES, SITES, STAR_SITES, TABLE
from backend.sites import Component

SHAPES = {Component.PATTERN: (1, 4, 5, 5)}          # [batch head q_pos k_pos]; others [batch pos ...]


@pytest.mark.parametrize("site", SITES)
def test_setter_writes_exactly_the_cell(site):
    s = TABLE[site]
    shape = SHAPES.get(s.component, (1, 5, 4, 3) if "head" in s.index else (1, 5, 6))
    act, src = np.zeros(shape), np.arange(np.prod(shape), dtype=float).reshape(shape) + 1
    cell = (2, 3) if len(s.axes) == 2 else (2, 3, 1)
    s.put(act, src, cell)
    changed = act != 0
    want = {"pos": (slice(None), 3), "head": (slice(None), slice(None), 3), "pattern": (slice(None), 3),
            "pos_head": (slice(None), 3, 1)}[s.index]
    mask = np.zeros(shape, bool)
    mask[want] = True
    assert np.array_equal(changed, mask) and np.array_equal(act[mask], src[mask])


def test_table_is_the_one_source():
    assert SITES == tuple(SITE_AXES) and set(ATP_SITES) <= set(STAR_SITES) <= set(SITES)
    assert ATP_SITES == ("resid_pre", "attn_out", "mlp_out", "head_out")
    for name in STAR_SITES:                        # AtP sums to one value per cell
        s = TABLE[name]
        x = np.ones((5, 4, 3)) if s.atp_sum == "pos_d" else np.ones((5, 6))
        assert x.sum(axis=s.atp_dims(batched=False)).shape == ((4,) if s.atp_sum == "pos_d" else (5,))
    from kernels import patching as kp             # the kernel reads the same table
    assert kp.SITES is SITES and kp.SITE_AXES is SITE_AXES


KW = dict(model="smollm2-135m", clean="a b", corrupt="a c", answer=" x", wrong=" y")
DS = dict(KW, dataset=(("p q", "p r", " x", " y"),))
KEYS = [  # measured on the branch before PairTaskSpec and the site table (commit of issue 12, slice 4)
    (PatchSpec(**KW), "patch-ded833b44d43e5327e6b"),
    (PatchSpec(**DS, site="head_k", metric="kl", direction="noising"), "patch-f2eab647ac233a06273c"),
    (InterventionSpec(**KW, layer=3, pos=1), "intervention-5f2f9d9d6e6f59f6447a"),
    (AtPSpec(**KW, site="head_out"), "atp-938f4a41878074089c62"),
    (AtPStarSpec(**DS, site="head_q"), "atpstar-3078562aa90c045510fd"),
    (EdgeScoresSpec(**KW, method="eap-ig"), "edge_scores-f13119ba80fbe0401fc2"),
    (CircuitSpec(**DS, top_n=20, removed=("A1.2",)), "circuit-5990b1da3606c00fa342"),
    (CircuitSpec(**KW).scores_spec(), "edge_scores-5a93009a609bf413d983"),
    (AtPSpec(**KW).patch_spec(), "patch-1c039eed5e0d04ef35a2"),
    (InterventionSpec(**DS, site="head_out", layer=2, head=1).patch_spec(), "patch-e2d45813a980baad76fa"),
    (PatchSpec.from_pairs("m", [("a", "b", "c", "d")]), "patch-e7432ec25d269ed58f86"),
    (EdgeScoresSpec.from_pairs("m", [("a", "b", "c", "d")]), "edge_scores-bb50eb7c329f3901672b"),
]


@pytest.mark.parametrize("spec,key", KEYS, ids=[k for _, k in KEYS])
def test_run_keys_are_unchanged(spec, key):
    assert spec.key() == key


def test_pair_checks_live_in_the_base():
    for cls in (PatchSpec, AtPSpec, EdgeScoresSpec, CircuitSpec):
        with pytest.raises(EmptyDataset):
            cls(model="m")
        with pytest.raises(EmptyDataset):
            cls.from_pairs("m", [])
        with pytest.raises(InvalidSpec):
            cls(**KW, dataset=(("only", "three", "strings"),))
    with pytest.raises(InvalidSite):                # the site is checked before the pairs
        PatchSpec(model="m", site="resid_sideways")
    a = AtPStarSpec(**DS, site="head_q", metric="prob")
    assert a.as_task(PatchSpec) == PatchSpec(**DS, site="head_q", metric="prob")
    assert CircuitSpec(**DS, top_n=7).scores_spec() == EdgeScoresSpec(**DS)
