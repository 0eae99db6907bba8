"""TCAV ("Interpretability Beyond Feature Attribution"; for language models, "Controlling Large
Language Models Through Concept Activation Vectors"): is a class's output sensitive to a concept?

Sets (text files, one item a line; shipped ones in data/probes/tcav/ by short name):
- concept: sentences that show the concept (shipped: `water`, and `cooking` as a control);
- random pool: unrelated sentences (shipped: `random`), cut by a seeded permutation into
  disjoint random sets of m items (m = min(set_size, concept items));
- class: prompts whose next token is the target (shipped: `sea`, target " sea").

At layer L the activation is resid_post of block L at an item's last token (activations.py).
A CAV is the unit normal of a linear classifier (L2 logistic regression on standardised
activations, its normal mapped back to activation space) separating one set from another,
pointing to the first. For i = 1..n_random:
- concept CAV i: m concept items (a seeded sample) vs random set i;
- random CAV i:  random set 0 vs random set i (the null).
A CAV's TCAV score is the fraction of class prompts whose target logit (or logit difference
target − versus) at the last position has a positive directional derivative along it: the
gradient of that logit with respect to layer L's resid_post at the prompt's last token, dotted
with the CAV (one backward for every layer requested). `tcav_score` is the mean over the concept
CAVs; `random_scores` are the null's; `p_value` is the two-sided two-sample t-test (equal
variances, scipy.stats.ttest_ind) of concept scores against random scores; `significant`
when p < 0.05 / (number of layers tested) (Bonferroni). `cav` is the unit mean of the concept
CAVs of the first layer listed.

Bad sets are typed errors (ProbeSetError): fewer than 10 concept items or class prompts, a
random pool too small for n_random + 1 disjoint sets of m, a target that is not one token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import InvalidSpec, OutOfRange
from ...runner import analysis
from ...spec import Result, Spec
from .activations import ProbeSetError, collect
from .saplma import ROOT, fit_logreg, one_thread, standardize

SHIPPED_DIR = ROOT / "data" / "probes" / "tcav"
SHIPPED = {"water": "concept_water.txt", "cooking": "concept_cooking.txt", "random": "random.txt",
           "sea": "class_sea.txt"}
SITE = "resid_post"
MIN_ITEMS = 10
MIN_RANDOM = 20
ALPHA = 0.05


def set_path(name: str) -> Path:
    path = SHIPPED_DIR / SHIPPED[name] if name in SHIPPED else Path(name).expanduser()
    if not path.is_file():
        raise InvalidSpec(f"No set {name!r}: a shipped name ({', '.join(SHIPPED)}) or a text file, one item a line.")
    return path


def read_set(name: str) -> list[str]:
    return [s.strip() for s in set_path(name).read_text(encoding="utf-8").splitlines() if s.strip()]


def sets_digest(*names: str) -> str:
    h = hashlib.sha256()
    for n in names:
        h.update(set_path(n).read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class TcavSpec(Spec):
    KIND = "tcav"
    concept: str = "water"
    random: str = "random"
    classes: str = "sea"
    target: str = " sea"
    versus: str = ""                 # "" : the target logit; else target − versus
    layers: tuple = (15,)            # the first is the headline layer
    n_random: int = MIN_RANDOM
    set_size: int = 15
    seed: int = 0
    digest: str = ""                 # of the three sets' contents (filled on creation)

    def validate(self):
        if not isinstance(self.target, str) or not self.target:
            raise InvalidSpec("A target token is required (e.g. ' sea').")
        try:
            layers = tuple(int(x) for x in self.layers)
        except (TypeError, ValueError):
            raise InvalidSpec(f"Layers must be integers, not {self.layers!r}.") from None
        if not layers or len(set(layers)) != len(layers):
            raise InvalidSpec("Give one or more distinct layers.")
        object.__setattr__(self, "layers", layers)
        if self.n_random < 2:
            raise OutOfRange(f"n_random must be ≥ 2 (≥ {MIN_RANDOM} recommended), not {self.n_random}.")
        if self.set_size < MIN_ITEMS:
            raise OutOfRange(f"set_size must be ≥ {MIN_ITEMS}, not {self.set_size}.")
        digest = sets_digest(self.concept, self.random, self.classes)
        if not self.digest:
            object.__setattr__(self, "digest", digest)


@dataclass(frozen=True)
class TcavResult(Result):
    layers: list
    target: str
    versus: str
    m: int                       # items per concept / random set
    n_class: int
    tcav_scores: np.ndarray      # [n_layers n_random] concept CAVs' scores
    random_scores: np.ndarray    # [n_layers n_random] the null's
    p_values: np.ndarray         # [n_layers]
    cav: np.ndarray              # [d_model] unit mean concept CAV of layers[0]
    cavs: np.ndarray             # [n_layers d_model] the same at every layer

    def payload(self) -> dict:
        n = len(self.layers)
        rows = [{"layer": int(layer), "tcav_score": float(self.tcav_scores[i].mean()),
                 "tcav_scores": self.tcav_scores[i].tolist(), "random_scores": self.random_scores[i].tolist(),
                 "random_mean": float(self.random_scores[i].mean()), "random_std": float(self.random_scores[i].std()),
                 "p_value": float(self.p_values[i]), "significant": bool(self.p_values[i] < ALPHA / n)}
                for i, layer in enumerate(self.layers)]
        head = rows[0]
        return {"layer": head["layer"], "tcav_score": head["tcav_score"], "p_value": head["p_value"],
                "random_scores": head["random_scores"], "significant": head["significant"],
                "alpha": ALPHA / n, "bonferroni": n, "cav": [float(x) for x in self.cav],
                "target": self.target, "versus": self.versus, "set_size": self.m, "n_class": self.n_class,
                "per_layer": rows}


def cav_of(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Unit normal [d] (toward `pos`) of the logistic classifier pos vs neg, in activation space."""
    X = np.concatenate([pos, neg]).astype(np.float64)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    (Xs,), (_, sd) = standardize(X)
    w, _ = fit_logreg(Xs, y)
    u = w / sd
    return u / np.linalg.norm(u)


def target_ids(model, target: str, versus: str) -> tuple[int, int | None]:
    from ..token_lens import single_token_id

    try:
        t = single_token_id(model, target)
        v = single_token_id(model, versus) if versus else None
    except InvalidSpec as e:
        raise ProbeSetError(f"The class target must be one token: {e}") from None
    if v == t:
        raise ProbeSetError("The target and the versus token are the same token.")
    return t, v


def class_gradients(model, prompts: list[str], layers: list[int], target: int, versus: int | None,
                    batch_size: int = 16) -> np.ndarray:
    """d f / d resid_post[L] at each prompt's last token, f = logit(target) [− logit(versus)] at
    that position: [len(layers) n_prompts d_model] float64, one backward per batch for all layers."""
    import torch

    from ...sites import Component, Site, hook_name

    names = [hook_name(Site(Component(SITE), layer)) for layer in layers]
    embed = hook_name(Site(Component.EMBED))
    ids = [model.encode(p) for p in prompts]
    pad = model.eos_token_id if model.eos_token_id is not None else 0
    out = np.zeros((len(layers), len(ids), model.info.d_model))
    for s in range(0, len(ids), batch_size):
        chunk = ids[s:s + batch_size]
        T = max(len(i) for i in chunk)
        acts: dict = {}

        def leaf(x, hook):
            return x.detach().requires_grad_(True)

        def keeper(name):
            def keep(x, hook):
                acts[name] = x
                return x
            return keep

        last = torch.as_tensor([len(i) - 1 for i in chunk])
        rows = torch.arange(len(chunk))
        with torch.enable_grad(), model.hooks(fwd_hooks=[(embed, leaf)] + [(n, keeper(n)) for n in names]):
            logits = model.forward(model.tensor([i + [pad] * (T - len(i)) for i in chunk]))
            final = logits[rows, last.to(logits.device)]                                # [B vocab]
            f = final[:, target] - (final[:, versus] if versus is not None else 0)
            grads = torch.autograd.grad(f.sum(), [acts[n] for n in names])
        for li, g in enumerate(grads):
            out[li, s:s + len(chunk)] = g[rows, last.to(g.device)].double().cpu().numpy()
    return out


def t_test(a, b) -> float:
    """Two-sided p-value of the equal-variance two-sample t-test (scipy.stats.ttest_ind); 1.0
    when both samples are constant and equal (no evidence either way)."""
    from scipy import stats

    p = float(stats.ttest_ind(np.asarray(a, float), np.asarray(b, float)).pvalue)
    return 1.0 if np.isnan(p) else p


@analysis(TcavSpec, TcavResult)
def compute(spec: TcavSpec, model, progress=None) -> TcavResult:
    if sets_digest(spec.concept, spec.random, spec.classes) != spec.digest:
        raise InvalidSpec("A set file changed since this run was specified.")
    n_layers = model.info.n_layers
    bad = [x for x in spec.layers if not 0 <= x < n_layers]
    if bad:
        raise OutOfRange(f"Layers {bad} do not exist: {model.info.model_id} has blocks 0–{n_layers - 1}.")
    concept, pool, prompts = read_set(spec.concept), read_set(spec.random), read_set(spec.classes)
    for what, items in (("concept set", concept), ("class prompt set", prompts)):
        if len(items) < MIN_ITEMS:
            raise ProbeSetError(f"The {what} has {len(items)} items; it needs ≥ {MIN_ITEMS}.")
    m = min(spec.set_size, len(concept))
    need = (spec.n_random + 1) * m
    if len(pool) < need:
        raise ProbeSetError(f"{spec.n_random} random CAVs need {spec.n_random + 1} disjoint random sets of {m}: "
                            f"{need} random items; the pool has {len(pool)} (at most {len(pool) // m - 1} CAVs).")
    if set(concept) & set(pool):
        raise ProbeSetError("The concept set and the random pool share items: they must be two classes.")
    target, versus = target_ids(model, spec.target, spec.versus)
    rng = np.random.default_rng(spec.seed)
    perm = rng.permutation(len(pool))[:need]
    random_sets = perm.reshape(spec.n_random + 1, m)                       # [n_random + 1, m] pool indices
    concept_draws = [rng.choice(len(concept), m, replace=False) for _ in range(spec.n_random)]
    layers = list(spec.layers)
    texts = concept + [pool[i] for i in perm]
    ids = [model.encode(t) for t in texts]
    acts = collect(model, ids, [[-1]] * len(ids), layers, SITE, progress=progress)[:, :, 0].astype(np.float64)
    c_acts, r_acts = acts[:, :len(concept)], acts[:, len(concept):].reshape(len(layers), spec.n_random + 1, m, -1)
    if progress:
        progress("class gradients")
    grads = class_gradients(model, prompts, layers, target, versus)                 # [L n_class d]
    cscore = np.zeros((len(layers), spec.n_random))
    rscore = np.zeros_like(cscore)
    cavs = np.zeros((len(layers), model.info.d_model))
    with one_thread():
        for li in range(len(layers)):
            if progress:
                progress(f"CAVs: layer {layers[li]}")
            mean = np.zeros(model.info.d_model)
            for i in range(spec.n_random):
                cav = cav_of(c_acts[li, concept_draws[i]], r_acts[li, i + 1])
                mean += cav
                cscore[li, i] = np.mean(grads[li] @ cav > 0)
                rscore[li, i] = np.mean(grads[li] @ cav_of(r_acts[li, 0], r_acts[li, i + 1]) > 0)
            cavs[li] = mean / np.linalg.norm(mean)
    pvals = np.array([t_test(cscore[li], rscore[li]) for li in range(len(layers))])
    return TcavResult(layers=layers, target=spec.target, versus=spec.versus, m=int(m), n_class=len(prompts),
                      tcav_scores=cscore, random_scores=rscore, p_values=pvals,
                      cav=cavs[0].astype(np.float32), cavs=cavs.astype(np.float32))


# -- CLI (probe-study --study tcav) --------------------------------------------------------------
def add_options(p) -> None:
    g = p.add_argument_group("tcav")
    g.add_argument("--concept-file", default="water", help=f"shipped ({', '.join(SHIPPED)}) or a text file")
    g.add_argument("--random-file", default="random", help="the random pool (shipped: random)")
    g.add_argument("--class-file", default="sea", help="class prompts whose next token is the target")
    g.add_argument("--target", default=" sea", help="one token, e.g. ' sea'")
    g.add_argument("--versus", default="", help="explain target − this token instead (one token)")
    g.add_argument("--layer", default="15", help="a block, or a comma list (Bonferroni over them)")
    g.add_argument("--n-random", type=int, default=MIN_RANDOM, help="random CAVs in the null (≥ 20 recommended)")
    g.add_argument("--set-size", type=int, default=15, help="items per concept / random set")


def spec_from_args(a) -> TcavSpec:
    try:
        layers = tuple(int(x) for x in str(a.layer).split(",") if x.strip())
    except ValueError:
        raise InvalidSpec(f"--layer must be a block or a comma list, not {a.layer!r}.") from None
    return TcavSpec(model=a.model, concept=a.concept_file, random=a.random_file, classes=a.class_file,
                    target=a.target, versus=a.versus, layers=layers, n_random=a.n_random, set_size=a.set_size,
                    seed=a.seed)


def run_cli(a) -> dict:
    import sys

    from ...runner import run

    spec = spec_from_args(a)
    out = run(spec, progress=lambda m: print(m, file=sys.stderr))
    return {"run_key": out.run_key, "from_store": out.from_store, "model": spec.model,
            "concept": spec.concept, "random": spec.random, "classes": spec.classes,
            "compute_seconds": round(out.compute_seconds, 3), **out.result.payload()}
