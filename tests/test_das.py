"""DAS and the illusion check on the real default model.

- For a fixed rotation, the project's interchange intervention (the fast run-from-site engine
  and the hooked reference) equals pyvene's RotatedSpaceIntervention on the same model, site
  and positions (logits within 1e-4), at resid_pre, attn_z (o_proj's input) and mlp_post
  (down_proj's input).
- A planted variable (written by hooks into a known direction of the residual stream) is
  recovered by DAS with IIA >= 0.95 and cosine >= 0.9.
- The illusion check says "illusion" on the paper's distilled example (a direction half in the
  nullspace of W_out, carrying the variable, half along a dormant rowspace direction) and not
  on a direction whose effect runs through the rowspace.
- Bad input: typed errors, nothing stored. The CLI's JSON fields.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backend.analyses.das import DASSpec, DASTask, examples, fit, make_engine
from backend.analyses.illusion import check, next_weights, decompose
from kernels.das import Batch, HookEngine, engine, site_width

pytestmark = pytest.mark.model
BASES = ["When Mary and John went to the store, John gave a drink to",
         "When Tom and Anna went to the park, Tom gave a ball to"]
SOURCES = ["When Mary and John went to the store, Mary gave a drink to",
           "When Tom and Anna went to the park, Anna gave a ball to"]
PYVENE = {"resid_pre": "block_input", "attn_z": "attention_value_output",
          "mlp_post": "model.layers[{L}].mlp.down_proj.input"}


@pytest.fixture(scope="module")
def hf(model):
    return model.reference_hf_model()


@pytest.mark.parametrize("site,layer,pos", [("resid_pre", 5, 13), ("attn_z", 7, 9), ("mlp_post", 12, 13)])
def test_interchange_equals_pyvene_rotated_space_intervention(model, hf, site, layer, pos):
    pv = pytest.importorskip("pyvene")
    ib, is_ = model.tensor([model.encode(t) for t in BASES]), model.tensor([model.encode(t) for t in SOURCES])
    w, K = site_width(site, model.info), 3
    Q, _ = torch.linalg.qr(torch.randn(w, w, generator=torch.Generator().manual_seed(layer)))
    comp = PYVENE[site].format(L=layer)
    ivm = pv.IntervenableModel(pv.IntervenableConfig(representations=[{
        "layer": layer, "component": comp, "unit": "pos", "max_number_of_units": 1,
        "intervention": pv.RotatedSpaceIntervention(embed_dim=w)}]), hf)
    iv = list(ivm.interventions.values())[0]
    iv = iv[0] if isinstance(iv, tuple) else iv
    iv.rotate_layer.weight = Q
    iv.set_interchange_dim(K)
    with torch.no_grad():
        _, out = ivm({"input_ids": ib}, [{"input_ids": is_}], {"sources->base": ([[[pos]] * 2], [[[pos]] * 2])})
        ref = out.logits[:, -1]
        batch = Batch(ib, is_, pos, pos)
        fast = engine(model, site, layer, batch)
        hooked = HookEngine(model, site, layer, batch)
        B = Q[:, :K].T.contiguous()                    # pyvene swaps the first K rotated coordinates
        got, got_ref = fast.logits([0, 1], B), hooked.logits([0, 1], B)
        plain = hooked.logits([0, 1], None, replace=hooked.site_values()[0])
    assert fast.name == "run-from-site"
    assert (got - ref).abs().max() < 1e-4
    assert (got_ref - ref).abs().max() < 1e-4
    assert (plain - ref).abs().max() > 1e-3          # the intervention changes the logits (measured 6e-3 to 8e-3 for a random K = 3)


# -- planted variables --------------------------------------------------------------------
NOUNS = ["box", "car", "cup", "door", "hat", "bag", "wall", "ship"]
COLOURS = {" red": 1.0, " blue": -1.0, " green": 0.0}     # the planted variable's value per colour word
TEMPLATE = "The {n} is{c} and the"


def _plant(model, write, layer: int, point: str):
    """Hooks that read which colour word the prompt has (its embedding at position 3) and call
    write(x_at_last_position, var) at `point` of block `layer`, var = COLOURS[colour]."""
    E = model.weights().embed.float()
    rows = torch.stack([E[model.tokenizer.encode(c, add_special_tokens=False)[0]] for c in COLOURS])
    values = torch.tensor(list(COLOURS.values()))
    state = {}

    def read(x):
        state["var"] = values[torch.cdist(x[:, 3].float(), rows).argmin(-1)]

    def put(x):
        x = x.clone()
        x[:, -1] = write(x[:, -1], state["var"].to(x.dtype))
        return x
    return {"hook_embed": read, f"blocks.{layer}.{point}": put}


def _colour_pairs():
    cs = list(COLOURS)
    return [(TEMPLATE.format(n=n, c=cs[(i + j) % 3]), TEMPLATE.format(n=m, c=cs[(i * j + 2 * j) % 3]))
            for i, n in enumerate(NOUNS) for j, m in enumerate(NOUNS) if i != j]


def _colour_triples(answer: dict[str, str]):
    """(base, source, expected) over red/blue pairs, expected = answer[the source's colour]."""
    colour = lambda t: next(c for c in COLOURS if c in t)   # noqa: E731
    return tuple((b, s, answer[colour(s)]) for b, s in _colour_pairs()
                 if colour(b) in answer and colour(s) in answer)


def _direction(model, a: str = " yes", b: str = " no"):
    """The residual direction that raises logit(a) - logit(b) most through the final norm's scale
    and the unembedding: the later layers read nothing else as strongly, so a partial alignment
    cannot borrow another pathway (with a random direction, DAS finds mixtures that write the
    planted difference into some direction the model reads: the illusion, planted)."""
    W_U = model.weights().W_U.detach().float()
    ia, ib = (model.tokenizer.encode(t, add_special_tokens=False)[0] for t in (a, b))
    return torch.nn.functional.normalize(model.final_norm_scale().float() * (W_U[ia] - W_U[ib]), dim=0).detach()


def _counterfactual_triples(model, site, layer, hooks, set_value):
    """(base, source, expected): expected = what the planted model says on the base prompt with
    the site's vector set as the source's variable says (set_value(x_base, var_source)); only
    those whose answer is one token and differs between the variable's values somewhere."""
    pairs = _colour_pairs()
    probe = DASTask(model=model.info.model_id, task="custom", triples=tuple((b, s, " x") for b, s in pairs))
    ex = examples(model, probe, hooks)
    eng = make_engine(model, ex, site, layer, -1, hooks=hooks)
    xb, _ = eng.site_values()
    var_s = torch.tensor([COLOURS[next(c for c in COLOURS if c in t[1])] for t in ex.texts])
    with torch.no_grad():
        top = eng.logits(list(range(len(ex.base))), None, replace=set_value(xb, var_s)).argmax(-1)
    out = []
    for (b, s, _), t in zip(ex.texts, top.tolist()):
        tok = model.str_tokens([t])[0]
        if model.tokenizer.encode(tok, add_special_tokens=False) == [t]:
            out.append((b, s, tok))
    return tuple(out)


def test_planted_variable_is_recovered(model):
    """A two-valued variable (red +1, blue -1) planted along d at the last position of resid_pre.
    (With green = 0 as a third value, 100 steps reached cosine 0.977 but held-out IIA 0.82 on a
    loaded machine: a value that must be set exactly needs more steps than this test affords.)"""
    L, sigma = model.info.n_layers - 3, 3000.0   # the last position's residual norm is ~540 there
    d = _direction(model)

    def set_value(x, var):
        return x - (x @ d)[:, None] * d + sigma * var[:, None] * d
    hooks = _plant(model, set_value, L, "hook_resid_pre")
    triples = tuple(t for t in _counterfactual_triples(model, "resid_pre", L, hooks, set_value)
                    if " green" not in t[0] + t[1])
    assert len(triples) >= 16 and len({t[2] for t in triples}) >= 2
    spec = DASSpec(model=model.info.model_id, task="custom", triples=triples, site="resid_pre",
                   layer=L, pos=-1, dim=1, steps=100, batch=16, lr=0.05, test_fraction=0.3)
    r = fit(model, spec, hooks=hooks)
    cos = abs(float(torch.as_tensor(r.basis[0]) @ d))
    assert r.iia >= 0.95 and r.iia_train >= 0.95, (r.iia, r.iia_train, cos)
    assert cos >= 0.9, cos
    assert np.allclose(r.basis @ r.basis.T, np.eye(1), atol=1e-4)


def _mlp_plant_case(model, carrier: str):
    """The distilled example at block L's MLP hidden units (mlp_post): e_null in the nullspace of
    W_out, e_row in its row space, aligned with a residual direction that moves the answer.
    carrier "null": the variable is written along e_null and e_row is dormant (held at 0), so
    v = (e_null + e_row)/sqrt 2 works only through the dormant pathway; carrier "row": the
    variable is written along e_row (a real rowspace feature)."""
    L = model.info.n_layers - 2
    W, _ = next_weights(model, "mlp_post", L)                          # [d_model d_mlp]
    _, S, Vh = torch.linalg.svd(W.double())
    e_null = Vh[-1].float()                                            # W e_null ~ 0
    d = _direction(model)
    e_row = torch.nn.functional.normalize(W.T @ d, dim=0)              # in the row space
    sigma = 3000.0 / float((W @ e_row).norm())                         # writes ~3000 into the residual

    def write(x, var):
        x = x - (x @ e_null)[:, None] * e_null - (x @ e_row)[:, None] * e_row
        return x + sigma * var[:, None] * (e_null if carrier == "null" else e_row)
    hooks = _plant(model, write, L, "mlp.hook_post")
    return L, hooks, e_null, e_row, sigma


def _expected_by_pushing(model, L, hooks, e_row, sigma):
    """Expected answers: what the model says with the rowspace direction pushed ±."""
    out = {}
    for c, s in ((" red", 1.0), (" blue", -1.0)):
        pushed = dict(hooks)
        inner = pushed[f"blocks.{L}.mlp.hook_post"]

        def put(x, inner=inner, s=s):
            x = inner(x).clone()
            x[:, -1] = x[:, -1] + s * sigma * e_row
            return x
        pushed[f"blocks.{L}.mlp.hook_post"] = put
        t = DASTask(model=model.info.model_id, task="custom", triples=((TEMPLATE.format(n="box", c=c),) * 2 + (" x",),
                                                                      (TEMPLATE.format(n="cup", c=c),) * 2 + (" x",)))
        out[c] = model.str_tokens([examples(model, t, pushed).base_answer[0]])[0]
    assert out[" red"] != out[" blue"], out
    return out


def test_illusion_verdict_on_the_distilled_example(model):
    L, hooks, e_null, e_row, sigma = _mlp_plant_case(model, "null")
    answer = _expected_by_pushing(model, L, hooks, e_row, sigma)
    triples = tuple(t for t in _colour_triples(answer) if (" red" in t[0]) != (" red" in t[1]))
    ex = examples(model, DASTask(model=model.info.model_id, task="custom", triples=triples), hooks)
    v = (e_null + e_row) / 2 ** 0.5
    out = check(model, ex, "mlp_post", L, -1, v.numpy(), hooks=hooks)
    assert out["next_weight"].startswith("W_out")
    assert abs(out["v_row_norm"] - 2 ** -0.5) < 1e-3 and abs(out["v_null_norm"] - 2 ** -0.5) < 1e-3
    e = out["effects"]
    assert e["v"]["effect"] > 1.0 and abs(e["v_row"]["effect"]) < 0.05 * e["v"]["effect"]
    assert abs(e["v_null"]["effect"]) < 0.05 * e["v"]["effect"]
    assert out["verdict"] == "illusion", out["verdict_text"]


def test_no_illusion_when_the_effect_runs_through_the_rowspace(model):
    L, hooks, e_null, e_row, sigma = _mlp_plant_case(model, "row")
    answer = _expected_by_pushing(model, L, hooks, e_row, sigma)
    triples = tuple(t for t in _colour_triples(answer) if (" red" in t[0]) != (" red" in t[1]))
    ex = examples(model, DASTask(model=model.info.model_id, task="custom", triples=triples), hooks)
    v = torch.nn.functional.normalize(e_row + 0.5 * e_null, dim=0)
    out = check(model, ex, "mlp_post", L, -1, v.numpy(), hooks=hooks)
    assert out["effects"]["v"]["effect"] > 1.0
    assert out["verdict"] == "rowspace", out["verdict_text"]


def test_decompose_is_a_projection(model):
    W, _ = next_weights(model, "mlp_post", 3)
    v = torch.randn(W.shape[1], generator=torch.Generator().manual_seed(0))
    row, null, rank = decompose(W, v)
    assert rank == min(W.shape)
    assert (W.double() @ null).norm() < 1e-6 * v.norm() * W.norm()
    assert abs(float(row @ null)) < 1e-6 * float(v.norm()) ** 2


# -- bad input and the command line -------------------------------------------------------
def _count(store) -> int:
    return store.count_runs()


@pytest.mark.parametrize("kw,err", [
    (dict(task="custom", triples=(("The capital of France is", "The capital of Japan is", " Tokyo Tower"),) * 4),
     "NotSingleToken"),
    (dict(task="custom", triples=(("The capital of France is", "The capital of the United States is", " Paris"),) * 4,
          pos=2), "PromptLengthMismatch"),
    (dict(task="country-capital", dim=100_000), "OutOfRange"),
    (dict(task="country-capital", layer=99), "InvalidSite"),
    (dict(task="country-capital", site="mlp_out"), "InvalidSite"),
    (dict(task="bogus"), "InvalidSpec"),
])
def test_bad_input_is_a_typed_error_and_nothing_is_stored(model, store, kw, err):
    from backend.errors import DashboardError
    from backend.runner import run

    before = _count(store)
    with pytest.raises(DashboardError) as e:
        run(DASSpec(model=model.info.model_id, **{"layer": 3, "steps": 2, **kw}), store=store)
    assert type(e.value).__name__ == err, e.value
    assert _count(store) == before


def _cli(capsys, *args) -> tuple[int, dict]:
    from backend import cli

    code = cli.main(list(args) + ["--format", "json"])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_json_and_illusion_of_the_stored_direction(model, capsys):
    """The CLI's main() in this process (as test_directions / test_steering do; a command in a
    fresh process cost a model load each, three of them, two thirds of this module's time; real
    processes on one store are test_real_use's)."""
    args = ["das", "--task", "country-capital", "--site", "resid_pre", "--layer", "20", "--pos", "last", "--dim", "2",
            "--steps", "4", "--n", "12", "--batch", "8"]
    code, d = _cli(capsys, *args)
    assert code == 0, d
    for k in ("direction_key", "iia", "iia_train", "logit_diff_recovered", "site", "layer", "pos", "dim", "basis",
              "hook_name", "run_key", "curve"):
        assert k in d, k
    B = np.array(d["basis"])
    assert B.shape == (2, model.info.d_model) and np.allclose(B @ B.T, np.eye(2), atol=1e-4)
    assert d["hook_name"] == "blocks.20.hook_resid_pre" and d["pos"] == -1 and d["dim"] == 2
    assert 0.0 <= d["iia"] <= 1.0 and len(d["curve"]) == 4
    code, again = _cli(capsys, *args)
    assert code == 0 and again["from_store"] and again["direction_key"] == d["direction_key"]
    assert again["basis"] == d["basis"]
    code, ill = _cli(capsys, "illusion", "--direction", d["direction_key"])
    assert code == 0, ill                                     # (a weight that kept its grad once broke this)
    for k in ("site", "layer", "next_weight", "v_row_norm", "v_null_norm", "cos_rowspace", "effects", "verdict"):
        assert k in ill, (k, ill)
    assert set(ill["effects"]) == {"full_activation", "v", "v_row", "v_null"}
    assert all({"iia", "logit_diff"} <= set(e) for e in ill["effects"].values())
    assert ill["site"] == "resid_pre" and ill["layer"] == 20 and ill["next_weight"].startswith("the next block")
