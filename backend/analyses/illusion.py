"""The subspace-patching illusion check of a 1-D direction (Makelov, Lange & Nanda 2023).

Patching the 1-D subspace spanned by a unit vector v at a site (x' = x_b + v v^T (x_s - x_b))
can move the output without v being where the model keeps the variable: the site's next linear
map W (MLP hidden units -> W_out; attention z -> W_O; the residual stream -> the next block's
input matrices) ignores the component of v in its nullspace, yet that component can carry the
variable's difference between the two runs (a "disconnected" direction), and the patch then
writes that difference along v's rowspace component, which may be a "dormant" direction the
model never uses on its own data but which the later layers read. Decompose

    v = v_row + v_null       (v_row = the projection of v onto the row space of W)

and patch four things on the same (base, source) examples: the whole activation vector at the
site, v, v_row alone, v_null alone (each as the 1-D subspace of its unit vector). Reported per
patch: IIA (the base run now answers `expected`) and the mean logit difference LD =
logit[expected] - logit[base answer]; and ||v_row||, ||v_null|| (v is normalised first), the
cosine of v with the row space (= ||v_row||).

Verdict (effect = mean LD change from the unpatched base runs):
- v moves nothing (|effect(v)| < 10 % of the whole activation's effect, or under 0.1): "no effect
  to explain";
- the next weights have (almost) no nullspace at this site (||v_null|| < 0.05): "no nullspace
  component: the effect runs through the rowspace";
- effect(v_row) >= 1/2 effect(v): "the effect runs through the rowspace";
- else: "most of the effect needs the nullspace component: a dormant pathway, likely an
  illusion" (v_null alone does nothing by construction when W is the only reader; the paper's
  point is that v_row alone does much less than v).

Works for any stored 1-D direction at resid_pre (resid_post L is resid_pre L+1), mlp_post or z
(flattened over heads), using the DAS task it was trained on (its held-out split) or `task`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidSite, InvalidSpec
from ..model import LoadedModel
from ..runner import analysis
from ..spec import Spec
from ..spec import Result
from .das import TASKS, DASSpec, DASTask, cached_examples, check_pos, evaluate, load_run, make_engine
from .directions import load_direction

VERDICTS = ("illusion", "rowspace", "no effect", "no nullspace")
RANK_TOL = 1e-4          # singular values below this fraction of the largest count as zero


@dataclass(frozen=True)
class IllusionSpec(DASTask):
    KIND = "illusion"
    direction: str = ""
    task: str = ""                 # "" = the DAS run's own task (a DAS direction)
    pos: int = -1                  # for a --task (a DAS direction uses its run's position)

    def validate(self):
        if not isinstance(self.direction, str) or not self.direction:
            raise InvalidSpec("The illusion check needs a stored direction (--direction KEY).")
        if self.task:
            self.validate_task()
        elif self.triples:
            raise InvalidSpec("Triples need task 'custom'.")


@dataclass(frozen=True)
class IllusionResult(Result):
    site: str                      # a DAS site name (resid_pre, mlp_post, attn_z)
    layer: int
    position: int
    next_weight: str               # which matrix
    next_weight_shape: list
    rank: int                      # of the next weights
    v_row_norm: float
    v_null_norm: float
    cos_rowspace: float
    effects: dict                  # name -> {iia, logit_diff, effect}
    logit_diff_base: float
    verdict: str                   # one of VERDICTS
    verdict_text: str
    task: dict
    n_examples: int
    v_row: np.ndarray              # [w] (v normalised)
    v_null: np.ndarray

    def payload(self) -> dict:
        d = {k: getattr(self, k) for k in ("site", "layer", "position", "next_weight", "next_weight_shape", "rank",
                                           "v_row_norm", "v_null_norm", "cos_rowspace", "effects",
                                           "logit_diff_base", "verdict", "verdict_text", "task", "n_examples")}
        return d


def next_weights(model: LoadedModel, site: str, layer: int):
    """(W [out w] as the map the site's vector feeds, its name)."""
    import torch

    W = model.weights().layers[layer]
    if site == "mlp_post":
        return W.w_out.detach().float(), "W_out (the MLP's output matrix, d_model x d_mlp)"
    if site == "attn_z":
        return W.wo.detach().float(), "W_O (the attention output matrix over all heads, d_model x n_heads*d_head)"
    mats = [W.wq, W.wk, W.wv] + ([W.w_gate] if W.w_gate is not None else []) + [W.w_in]
    n1 = model.weights().norm_offset + W.norm1.detach().float()
    n2 = model.weights().norm_offset + W.norm2.detach().float()
    stack = [m.detach().float() * (n1 if i < 3 else n2)[None] for i, m in enumerate(mats)]
    return (torch.cat(stack), "the next block's input matrices: W_Q, W_K, W_V (times the attention norm's scale) "
            "and W_gate, W_in (times the MLP norm's scale), stacked")


def decompose(W, v) -> tuple:
    """(v_row, v_null, rank) of v [w] against W [out w]: v_row in the row space of W."""
    import torch

    _, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    r = int((S > S[0] * RANK_TOL).sum())
    V = Vh[:r]                                                            # [r w]
    v = v.double()
    v_row = V.T @ (V @ v)
    return v_row, v - v_row, r


def verdict(effects: dict, v_null_norm: float) -> tuple[str, str]:
    e_v, e_row, e_full = (effects[k]["effect"] for k in ("v", "v_row", "full_activation"))
    if abs(e_v) < max(0.1, 0.1 * abs(e_full)):
        return "no effect", (f"Patching v barely moves the logit difference ({e_v:+.2f}, the whole activation "
                             f"{e_full:+.2f}): there is no effect to explain.")
    if v_null_norm < 0.05:
        return "no nullspace", (f"v lies in the row space of the next weights (nullspace part {v_null_norm:.3f}): "
                                "the effect runs through the rowspace; no dormant pathway of this kind here.")
    share = (f" Patching v moves it {abs(e_v) / abs(e_full):.0%} as far as patching the whole activation "
             f"({e_full:+.2f})." if abs(e_full) > 1e-9 else "")
    if abs(e_row) >= 0.5 * abs(e_v) and np.sign(e_row) == np.sign(e_v):
        return "rowspace", (f"v_row alone moves the logit difference {e_row:+.2f} of v's {e_v:+.2f}: what v does, "
                            f"it does mostly through the rowspace.{share}")
    return "illusion", (f"Most of v's effect needs the nullspace component: v moves the logit difference "
                        f"{e_v:+.2f} but v_row alone only {e_row:+.2f} (v_null alone "
                        f"{effects['v_null']['effect']:+.2f}). A dormant pathway, likely an illusion.{share}")


def site_of(direction_site: str, layer: int, n_layers: int) -> tuple[str, int]:
    if direction_site == "resid_pre":
        return "resid_pre", layer
    if direction_site == "resid_post" and layer + 1 < n_layers:
        return "resid_pre", layer + 1
    if direction_site == "mlp_post":
        return "mlp_post", layer
    if direction_site == "z":
        return "attn_z", layer
    raise InvalidSite(f"The illusion check runs at resid_pre, resid_post (below the last block), mlp_post or z; "
                      f"this direction lives at {direction_site!r}.")


def check(model: LoadedModel, ex, site: str, layer: int, pos: int, v, prefer: str = "fast",
          hooks: dict | None = None, idx=None) -> dict:
    """Every number of the check on examples `ex` (rows idx, default all), as a dict."""
    import torch

    v = torch.as_tensor(np.asarray(v, dtype=np.float64)).reshape(-1)
    v = v / v.norm().clamp_min(1e-30)
    W, name = next_weights(model, site, layer)
    if W.shape[1] != v.shape[0]:
        raise InvalidSite(f"The direction has width {v.shape[0]}; {site} at layer {layer} has {W.shape[1]}.")
    v_row, v_null, rank = decompose(W, v)
    check_pos(model, ex, pos)
    eng = make_engine(model, ex, site, layer, pos, prefer, hooks)
    idx = list(range(len(ex.base))) if idx is None else list(idx)
    _, ld0 = evaluate(eng, ex, idx, replace_with="none")
    effects = {}

    def put(key, tops, ld):
        effects[key] = {"iia": float(np.mean([int(t) == ex.expected[k] for k, t in zip(idx, tops)])),
                        "logit_diff": float(ld.mean()), "effect": float(ld.mean() - ld0.mean())}
    put("full_activation", *evaluate(eng, ex, idx, replace_with="full"))
    for key, u in (("v", v), ("v_row", v_row), ("v_null", v_null)):
        n = float(u.norm())
        if n < 1e-6:
            effects[key] = {"iia": float(np.mean([int(t) == ex.expected[k] for k, t in
                                                  zip(idx, evaluate(eng, ex, idx, replace_with="none")[0])])),
                            "logit_diff": float(ld0.mean()), "effect": 0.0}
            continue
        put(key, *evaluate(eng, ex, idx, (u / n).float()[None]))
    vn = float(v_null.norm())
    word, text = verdict(effects, vn)
    return dict(next_weight=name, next_weight_shape=list(W.shape), rank=rank, v_row_norm=float(v_row.norm()),
                v_null_norm=vn, cos_rowspace=float(v_row.norm()), effects=effects, logit_diff_base=float(ld0.mean()),
                verdict=word, verdict_text=text, n_examples=len(idx),
                v_row=v_row.detach().float().numpy(), v_null=v_null.detach().float().numpy())


@analysis(IllusionSpec, IllusionResult)
def compute(spec: IllusionSpec, model: LoadedModel, progress=None, store=None) -> IllusionResult:
    dspec, d = load_direction(spec.direction, store)
    if dspec.model != spec.model:
        raise InvalidSpec(f"The direction was made on {dspec.model!r}, not {spec.model!r}.")
    site, layer = site_of(d.site, d.layer, model.info.n_layers)
    idx = None
    if spec.task:
        task, pos = DASTask(model=spec.model, **spec.task_fields()), spec.pos
    else:
        kind, run_key, _ = (dspec.source.split(":") + ["", "", ""])[:3] if dspec.method == "derived" else ("", "", "")
        if kind != "das":
            raise InvalidSpec("This direction was not made by DAS: give a task for the check (--task ioi | "
                              f"country-capital | --pairs-file F, and --pos). Tasks: {', '.join(TASKS)}.")
        rspec, _ = load_run(run_key, store)
        task, pos = rspec, rspec.pos
    ex = cached_examples(model, task)
    if not spec.task:
        idx = ex.test                        # the DAS run's held-out split
    if progress:
        progress(f"Illusion check at {site} layer {layer}: patching v, v_row, v_null and the whole activation")
    out = check(model, ex, site, layer, pos, d.vector, idx=idx)
    return IllusionResult(site=site, layer=layer, position=pos % len(ex.base[0]), task=task.task_fields(), **out)


# ---------------------------------------------------------------------------------------
# Command line: python -m backend illusion --direction KEY
# ---------------------------------------------------------------------------------------
def add_cli_args(p) -> None:
    from ..model import DEFAULT_MODEL

    p.add_argument("--model", default=None, help=f"default: the direction's model ({DEFAULT_MODEL})")
    p.add_argument("--direction", required=True, help="a stored direction's key (das prints direction_key)")
    p.add_argument("--task", default="", help="for a direction not made by DAS: ioi | country-capital")
    p.add_argument("--pairs-file", help="JSON Lines {\"base\", \"source\", \"expected\"}")
    p.add_argument("--pos", default="last")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)


def spec_from_args(a) -> IllusionSpec:
    from .das import _pos, read_triples

    model = a.model
    if model is None:
        dspec, _ = load_direction(a.direction)
        model = dspec.model
    task = (dict(task="custom", triples=read_triples(a.pairs_file)) if a.pairs_file
            else dict(task=a.task) if a.task else {})
    return IllusionSpec(model=model, direction=a.direction, **task, pos=_pos(a.pos), n=a.n, seed=a.seed)


def run_cli(a) -> dict:
    import sys

    from ..runner import run

    spec = spec_from_args(a)
    out = run(spec, progress=lambda m: print(m, file=sys.stderr))
    return {"run_key": out.run_key, "from_store": out.from_store, "compute_seconds": round(out.compute_seconds, 4),
            "model": spec.model, "direction": spec.direction, **out.result.payload()}
