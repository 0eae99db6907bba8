"""Distributed alignment search (DAS): is this causal variable encoded in this subspace?

A task is a set of (base, source, expected) triples: run the base prompt, but at one site
(an activation vector at one position) swap in the source prompt's value inside a subspace;
if the subspace encodes the causal variable, the base run now answers what the variable's
source value says (`expected`). DAS (Geiger et al. 2023) learns the subspace: an orthogonal
K-dim basis R [K w] (torch's orthogonal parametrisation) trained with cross-entropy on the
expected token under the interchange intervention x_b + R^T R (x_s - x_b) (kernels/das.py).
Boundless DAS (Wu et al. 2023) learns a full rotation and a soft mask over its coordinates,
m_i = sigmoid((b w - i) / tau), tau annealed from w/4 to 0.05, with a penalty on b; the
learned dimension is the number of coordinates whose mask ends above 1/2. Adam, the learning
rate decaying linearly to a tenth over the steps. The basis starts (init "pca", the default) at
the top principal directions of the source - base differences at the site over the training
split, or at random ("random"; on a planted variable 100 steps from random reached cosine 0.79,
from the PCA start it stays at the planted direction).

Reported on a held-out split (`test_fraction`): interchange-intervention accuracy (IIA: the
intervened base run's top token is the expected one), the same on the training split, the
logit difference LD = logit[expected] - logit[base answer] (the base run's own top token) of
the intervened runs, and `logit_diff_recovered` = mean(LD_int - LD_base) / mean(LD_source -
LD_base), where LD_source is read from the source prompt's own run (which answers `expected`).
Beside them, the same numbers for patching the whole activation vector at the site
(`iia_full`), the base runs' own IIA (`iia_baseline`, what no intervention already gets), and
the training curve. The basis is stored with the run; each row is a direction of the
directions table (`derive(model, "das", run_key, i)`), so it can be read, added and ablated.

Built-in tasks (prompts written for this project, kept when every name/country is one token):
- `ioi`: "{A} and {B} ... {S} passed the {obj} to" -> the indirect object (the name that is not
  S). The variable is the IO name; sources are the base with S2 swapped or both names swapped
  in order, so the source's IO is the base's S: under the intervention the base should answer
  its own S name. Positions align (one template).
- `country-capital`: "The capital of France is" / "The capital of Japan is" -> " Tokyo".
Examples the model gets wrong (base or source top-1 not its answer) are dropped first.
Uploaded: JSON Lines {"base", "source", "expected"} (--pairs-file).

Sites: resid_pre, mlp_post (the MLP's hidden units), attn_z (flattened over heads: one subspace
of [n_heads * d_head] at the position). Positions: `pos` >= 0 is a token index (base and source
must then have one token length); a negative pos counts from the end of each prompt (-1: last).
The layer x position sweep of IIA at K = 1 is its own spec (DASSweepSpec, `das --sweep`); each
of its cells is stored as the DAS run of that cell, so clicking a cell opens it from the store.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass

import numpy as np

from .. import settings
from ..errors import (DashboardError, EmptyDataset, InvalidSite, InvalidSpec, NotSingleToken, OutOfRange,
                      PromptLengthMismatch)
from ..model import LoadedModel
from ..runner import analysis, lookup
from ..spec import Result, Spec
from .directions import DERIVERS, Derived, derive

SITES = ("resid_pre", "mlp_post", "attn_z")
TASKS = ("ioi", "country-capital", "custom")
SITE_COMPONENT = {"resid_pre": "resid_pre", "mlp_post": "mlp_post", "attn_z": "z"}   # backend.sites values
MAX_STEPS = 5000
DATA = settings.DATA_DIR / "das"

IOI_NAMES = ["Emily", "Ryan", "Grace", "Kevin", "Olivia", "Henry", "Chloe", "Adam", "Sophie", "Lucas", "Ella",
             "Noah", "Ruby", "Sam", "Amy", "Ben", "Rose", "Luke", "Jane", "Eric", "Kate", "Tony", "Nina", "Carl"]
IOI_PLACES = ["library", "harbor", "bakery", "museum", "farm", "cinema", "hotel", "beach"]
IOI_OBJECTS = ["book", "cup", "coin", "map", "hat", "lamp", "pen", "card"]
IOI_TEMPLATE = "Later, {A} and {B} walked to the {place}. {S} passed the {obj} to"
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
            ("Egypt", "Cairo"), ("Russia", "Moscow"), ("Greece", "Athens"), ("China", "Beijing"),
            ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Norway", "Oslo"),
            ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
            ("Portugal", "Lisbon"), ("Thailand", "Bangkok"), ("Turkey", "Ankara"), ("Chile", "Santiago"),
            ("Iran", "Tehran"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"),
            ("Argentina", "Buenos"), ("Mexico", "Mexico"), ("England", "London"), ("Scotland", "Edinburgh")]
CAPITAL_TEMPLATE = "The capital of {c} is"


@dataclass(frozen=True)
class DASTask(Spec):
    """The task fields shared by a DAS run, a sweep and an illusion check (not an analysis)."""

    task: str = "ioi"
    triples: tuple = ()          # custom: ((base, source, expected), ...)
    n: int = 48                  # examples kept (built-in tasks)
    seed: int = 0
    test_fraction: float = 0.25

    def validate(self):
        self.validate_task()

    def validate_task(self):
        if self.task not in TASKS:
            raise InvalidSpec(f"Unknown DAS task {self.task!r}; known: {', '.join(TASKS)}.")
        if self.task == "custom":
            if not self.triples:
                raise EmptyDataset("A custom DAS task needs triples (--pairs-file: JSON Lines "
                                   "{\"base\", \"source\", \"expected\"}).")
            if any(not isinstance(t, tuple) or len(t) != 3 or not all(isinstance(x, str) and x for x in t)
                   for t in self.triples):
                raise InvalidSpec("triples must be a list of [base, source, expected] non-empty strings.")
        elif self.triples:
            raise InvalidSpec(f"The built-in task {self.task!r} makes its own triples: give none, or task 'custom'.")
        if not isinstance(self.n, int) or not 4 <= self.n <= 1024:
            raise OutOfRange(f"n must be 4–1024 examples, got {self.n!r}.")
        if not 0.05 <= self.test_fraction <= 0.8:
            raise InvalidSpec("test_fraction must be in [0.05, 0.8].")

    def task_fields(self) -> dict:
        return {k: getattr(self, k) for k in ("task", "triples", "n", "seed", "test_fraction")}


def _check_site(site: str, layer: int, dim: int) -> None:
    if site not in SITES:
        raise InvalidSite(f"DAS sites are {', '.join(SITES)}, not {site!r}.")
    if not isinstance(layer, int) or layer < 0:
        raise InvalidSite(f"Layer {layer!r} does not exist.")
    if not isinstance(dim, int) or dim < 1:
        raise OutOfRange(f"The subspace dimension must be >= 1, got {dim!r}.")


@dataclass(frozen=True)
class DASSpec(DASTask):
    KIND = "das"
    site: str = "resid_pre"
    layer: int = 0
    pos: int = -1                # >= 0: token index; < 0: from the end (-1: last)
    dim: int = 1
    boundless: bool = False
    steps: int = 150
    batch: int = 32
    lr: float = 0.01
    init: str = "pca"            # "pca": the top principal directions of source - base; "random"

    def validate(self):
        self.validate_task()
        _check_site(self.site, self.layer, self.dim)
        if self.init not in ("pca", "random"):
            raise InvalidSpec(f"init is 'pca' or 'random', not {self.init!r}.")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise OutOfRange(f"steps must be 1–{MAX_STEPS}, got {self.steps!r}.")
        if not isinstance(self.batch, int) or not 1 <= self.batch <= 256:
            raise OutOfRange(f"batch must be 1–256, got {self.batch!r}.")
        if not 0 < self.lr <= 1:
            raise OutOfRange(f"lr must be in (0, 1], got {self.lr!r}.")
        if not isinstance(self.boundless, bool):
            raise InvalidSpec("boundless is true or false.")


@dataclass(frozen=True)
class DASResult(Result):
    site: str
    layer: int
    pos: int                     # the spec's position
    position: int                # the base prompts' token index of the site
    hook_name: str
    width: int
    shape: list                  # the site vector's shape at its hook
    dim: int                     # K (boundless: the learned dimension)
    iia: float
    iia_train: float
    iia_full: float              # patching the whole vector at the site (held out)
    iia_baseline: float          # no intervention (held out)
    logit_diff: float            # mean LD of the intervened held-out runs
    logit_diff_base: float
    logit_diff_source: float
    logit_diff_full: float
    logit_diff_recovered: float
    n_train: int
    n_test: int
    n_dropped: int               # built-in examples the model got wrong, dropped first
    engine: str
    train_seconds: float
    steps_per_second: float
    examples: list               # held-out examples: {base, source, expected, base_answer, predicted, full}
    tokens: list                 # the first base prompt's tokens
    curve: np.ndarray            # [steps 3]: step, loss, batch accuracy
    basis: np.ndarray            # [K w] orthonormal rows
    mask: np.ndarray             # boundless: [w] final soft mask over the rotation's rows; else [0]

    def payload(self) -> dict:
        d = {k: getattr(self, k) for k in (
            "site", "layer", "pos", "position", "hook_name", "width", "shape", "dim", "iia", "iia_train", "iia_full",
            "iia_baseline", "logit_diff", "logit_diff_base", "logit_diff_source", "logit_diff_full",
            "logit_diff_recovered", "n_train", "n_test", "n_dropped", "engine", "train_seconds",
            "steps_per_second", "examples", "tokens")}
        d["basis"] = self.basis.tolist()
        d["curve"] = [{"step": int(s), "loss": float(lo), "accuracy": float(a)} for s, lo, a in self.curve]
        return d


# ---------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------
@dataclass
class Examples:
    base: list          # token ids, one length
    source: list        # token ids, one length
    expected: list      # token id per example
    base_answer: list   # the base run's top token per example
    source_logits: list  # LD_source pieces: (logit[expected] - logit[base_answer]) on the source run
    texts: list         # (base, source, expected) strings
    train: list         # indices
    test: list
    n_dropped: int


def _one_token(model: LoadedModel, text: str, role: str) -> int:
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        parts = " + ".join(repr(t) for t in model.str_tokens(ids))
        raise NotSingleToken(f"The {role} {text!r} is {len(ids)} tokens ({parts}); it must be exactly one "
                             "token (words usually need their leading space, e.g. ' Tokyo').")
    return ids[0]


def _single(model: LoadedModel, word: str) -> bool:
    return len(model.tokenizer.encode(" " + word, add_special_tokens=False)) == 1


def builtin_triples(model: LoadedModel, task: str, n: int, seed: int) -> list[tuple[str, str, str, str]]:
    """(base, source, expected, base answer) candidates of a built-in task (3n, for dropping)."""
    rng = random.Random(seed)
    out = []
    if task == "ioi":
        names = [w for w in IOI_NAMES if _single(model, w)]
        places = [w for w in IOI_PLACES if _single(model, w)]
        objs = [w for w in IOI_OBJECTS if _single(model, w)]
        for i in range(3 * n):
            io, s = rng.sample(names, 2)
            a, b = (io, s) if rng.random() < 0.5 else (s, io)
            fill = dict(place=rng.choice(places), obj=rng.choice(objs))
            base = IOI_TEMPLATE.format(A=a, B=b, S=s, **fill)
            src = (IOI_TEMPLATE.format(A=a, B=b, S=io, **fill) if i % 2 == 0      # S2 swapped
                   else IOI_TEMPLATE.format(A=b, B=a, S=io, **fill))             # both names swapped
            out.append((base, src, " " + s, " " + io))
    else:
        rows = [(c, k) for c, k in CAPITALS if _single(model, c) and _single(model, k)]
        pairs = [(x, y) for x in rows for y in rows if x != y]
        rng.shuffle(pairs)
        for (c1, k1), (c2, k2) in pairs[:3 * n]:
            out.append((CAPITAL_TEMPLATE.format(c=c1), CAPITAL_TEMPLATE.format(c=c2), " " + k2, " " + k1))
    return out


def _top_logits(model: LoadedModel, rows: list[list[int]], hooks: dict | None = None):
    """Last-position logits [N d_vocab] of equal-length rows (batched, no hooks; the dense
    forward when the model has one; `hooks`: planted dense-style hooks, tests)."""
    import torch

    from kernels.forward import FINAL, dense_model, run

    dm = dense_model(model)
    outs = []
    with torch.inference_mode():
        for i in range(0, len(rows), 64):
            ids = model.tensor(rows[i:i + 64])
            if dm is not None and dm.dtype == torch.float32:
                outs.append(dm.logits(run(dm, ids, capture=[FINAL], hooks=hooks)[FINAL][:, -1]).float().clone())
            else:
                plant = [(n, (lambda f: lambda act, hook: f(act))(f)) for n, f in (hooks or {}).items()]
                outs.append(model.run_with_hooks(ids, plant)[:, -1].float().clone())
    return torch.cat(outs)


def _show(model, ids) -> str:
    return "[" + "|".join(model.str_tokens(ids)) + "]"


def examples(model: LoadedModel, task: DASTask, hooks: dict | None = None) -> Examples:
    """The task's validated examples with a train/test split (typed errors for bad input)."""
    if task.task == "custom":
        cands = [(b, s, e, None) for b, s, e in task.triples]
    else:
        cands = builtin_triples(model, task.task, task.n, task.seed)
        if not cands:
            raise EmptyDataset(f"No example of {task.task!r} has one-token words in this model's vocabulary.")
    base = [model.encode(c[0]) for c in cands]
    source = [model.encode(c[1]) for c in cands]
    expected = [_one_token(model, c[2], "expected output") for c in cands]
    for side, rows in (("base", base), ("source", source)):
        bad = next((i for i, r in enumerate(rows) if len(r) != len(rows[0])), None)
        if bad is not None:
            raise PromptLengthMismatch(
                f"Every {side} prompt must have one token length (they are batched position by position): "
                f"{side} 0 has {len(rows[0])} tokens {_show(model, rows[0])}, {side} {bad} has {len(rows[bad])} "
                f"{_show(model, rows[bad])}.")
    lb, ls = _top_logits(model, base, hooks), _top_logits(model, source, hooks)
    base_top = lb.argmax(-1).tolist()
    keep = list(range(len(cands)))
    if task.task != "custom":          # drop what the model gets wrong, then take n
        want = [_one_token(model, c[3], "base answer") for c in cands]
        src_top = ls.argmax(-1).tolist()
        keep = [i for i in keep if base_top[i] == want[i] and src_top[i] == expected[i]][:task.n]
        if len(keep) < 4:
            raise EmptyDataset(f"The model answers too few {task.task!r} examples right ({len(keep)}) to search.")
    n_dropped = 0 if task.task == "custom" else len(cands) - len(keep)
    if len(keep) < 2:
        raise EmptyDataset("DAS needs at least two triples (one to train on, one held out).")
    rng = random.Random(task.seed)
    order = keep[:]
    rng.shuffle(order)
    n_test = max(1, int(round(task.test_fraction * len(order))))
    test, train = sorted(range(n_test)), sorted(range(n_test, len(order)))
    pick = lambda xs: [xs[i] for i in order]   # noqa: E731
    ld_src = [float(ls[i, expected[i]] - ls[i, base_top[i]]) for i in order]
    return Examples(pick(base), pick(source), pick(expected), pick(base_top), ld_src,
                    [list(cands[i][:3]) for i in order], train, test, n_dropped)


def check_pos(model: LoadedModel, ex: Examples, pos: int) -> None:
    """OutOfRange / PromptLengthMismatch unless `pos` names one token of every base and source."""
    if pos >= 0 and len(ex.base[0]) != len(ex.source[0]):
        raise PromptLengthMismatch(
            f"Position {pos} must name the same token in base and source, but the bases have {len(ex.base[0])} "
            f"tokens {_show(model, ex.base[0])} and the sources {len(ex.source[0])} {_show(model, ex.source[0])}: "
            "make them one length or count from the end (pos -1, 'last').")
    for T in {len(ex.base[0]), len(ex.source[0])}:
        if not -T <= pos < T:
            raise OutOfRange(f"Position {pos} does not exist in prompts of {T} tokens.")


# ---------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------
def make_engine(model: LoadedModel, ex: Examples, site: str, layer: int, pos: int, prefer: str = "fast",
                hooks: dict | None = None):
    from kernels.das import Batch, engine

    info = model.info
    if layer >= info.n_layers:
        raise InvalidSite(f"Layer {layer} does not exist: the model has layers 0–{info.n_layers - 1}.")
    tb, ts = len(ex.base[0]), len(ex.source[0])
    batch = Batch(model.tensor(ex.base), model.tensor(ex.source), pos % tb, pos % ts)
    return engine(model, site, layer, batch, prefer, hooks)


class Subspace:
    """The learned parameters: an orthogonal [K w] basis, or (boundless) a [w w] rotation and a
    boundary b in (0, 1) whose mask is sigmoid((b w - i) / tau)."""

    def __init__(self, width: int, dim: int, boundless: bool, seed: int, init=None):
        import torch

        torch.manual_seed(seed)
        self.width, self.boundless = width, boundless
        rows = width if boundless else dim
        self.rot = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(width, rows, bias=False))
        if init is not None:        # [k w] orthonormal rows to start from (completed to `rows` by QR)
            k = min(init.shape[0], rows)
            rest = self.rot.weight.detach()[k:].T
            Q, _ = torch.linalg.qr(torch.cat([init[:k].T.double(), rest.double()], 1))
            Q[:, :k] = init[:k].T.double()
            self.rot.weight = Q.T.float().contiguous()
        self.beta = torch.nn.Parameter(torch.tensor(math.log(max(dim, 1) / width / (1 - max(dim, 1) / width + 1e-6))))
        self.params = list(self.rot.parameters()) + ([self.beta] if boundless else [])
        self.tau = 1.0

    def mask(self, hard: bool = False):
        import torch

        if not self.boundless:
            return None
        i = torch.arange(self.width, dtype=torch.float32)
        m = torch.sigmoid((torch.sigmoid(self.beta) * self.width - i) / self.tau)
        return (m > 0.5).float() if hard else m

    def basis(self):
        """[K w] rows spanning the (hard) subspace."""
        import torch

        with torch.no_grad():
            R = self.rot.weight.detach().clone()
            if not self.boundless:
                return R
            k = max(1, int(self.mask(hard=True).sum()))
            return R[:k]


def pca_init(eng, ex: Examples, k: int):
    """The top-k principal directions (uncentred) of the source - base differences at the site
    over the training split [k w]: where the two runs differ most, DAS's starting point."""
    import torch

    xb, xs = eng.site_values()
    D = (xs[ex.train] - xb[ex.train]).double()
    _, _, Vh = torch.linalg.svd(D, full_matrices=False)
    return Vh[:k].float() if Vh.shape[0] >= k else None


def train_subspace(eng, ex: Examples, width: int, dim: int, boundless: bool, steps: int, batch: int, lr: float,
                   seed: int, progress=None, init: str = "pca"):
    """Fit the subspace on ex.train; (Subspace, curve [steps 3], seconds)."""
    import torch

    start = pca_init(eng, ex, dim) if init == "pca" else None
    sub = Subspace(width, dim, boundless, seed, start)
    opt = torch.optim.Adam(sub.params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.9 * s / max(steps - 1, 1))   # lr -> lr/10
    rng = np.random.default_rng(seed)
    target = torch.as_tensor(ex.expected)
    curve = []
    t0 = time.perf_counter()
    tau0, tau1 = width / 4, 0.05
    for step in range(steps):
        idx = rng.choice(ex.train, size=min(batch, len(ex.train)), replace=False)
        if boundless:
            sub.tau = tau0 * (tau1 / tau0) ** (step / max(steps - 1, 1))
        with torch.enable_grad():
            logits = eng.logits(idx, sub.rot.weight, sub.mask())
            loss = torch.nn.functional.cross_entropy(logits, target[idx])
            total = loss + (0.5 * torch.sigmoid(sub.beta) if boundless else 0.0)
            # gradients of the subspace's parameters only: the model's weights are parameters too,
            # and backward() would compute (and accumulate) theirs
            grads = torch.autograd.grad(total, sub.params)
        for prm, g in zip(sub.params, grads):
            prm.grad = g
        opt.step()
        sched.step()
        loss = loss.detach()
        acc = float((logits.argmax(-1) == target[idx]).float().mean())
        curve.append((step, float(loss), acc))
        if progress and (step % 25 == 0 or step == steps - 1):
            progress(f"DAS step {step + 1}/{steps}: loss {float(loss):.3f}, batch IIA {acc:.2f}")
    return sub, np.array(curve, dtype=np.float64).reshape(-1, 3), time.perf_counter() - t0


def evaluate(eng, ex: Examples, idx: list[int], R=None, replace_with: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(top token, LD) per example of idx under the interchange in span(R) (or the whole vector
    with replace_with="full", nothing with "none")."""
    import torch

    tops, lds = [], []
    xb, xs = eng.site_values()
    for i in range(0, len(idx), 64):
        j = list(idx[i:i + 64])
        with torch.no_grad():
            if replace_with == "full":
                lg = eng.logits(j, None, replace=xs[j])
            elif replace_with == "none":
                lg = eng.logits(j, None, replace=xb[j])
            else:
                lg = eng.logits(j, R)
        e = torch.as_tensor([ex.expected[k] for k in j])
        b = torch.as_tensor([ex.base_answer[k] for k in j])
        rows = torch.arange(len(j))
        tops.append(lg.argmax(-1).numpy())
        lds.append((lg[rows, e] - lg[rows, b]).double().numpy())
    return np.concatenate(tops), np.concatenate(lds)


def _iia(ex: Examples, idx, tops) -> float:
    return float(np.mean([int(t) == ex.expected[k] for k, t in zip(idx, tops)])) if len(idx) else float("nan")


def recovered(ld, ld_base, ld_source) -> float:
    denom = float(np.mean(ld_source) - np.mean(ld_base))
    return float((np.mean(ld) - np.mean(ld_base)) / denom) if abs(denom) > 1e-9 else float("nan")


def fit(model: LoadedModel, spec: DASSpec, progress=None, prefer: str = "fast", hooks: dict | None = None,
        ex: Examples | None = None) -> DASResult:
    """The DAS run of a spec (`hooks`: dense-style {point: fn(x)} planted in every forward, for tests)."""
    from kernels.das import site_hook, site_width

    info = model.info
    if spec.layer >= info.n_layers:
        raise InvalidSite(f"Layer {spec.layer} does not exist: the model has layers 0–{info.n_layers - 1}.")
    width = site_width(spec.site, info)
    if spec.dim > width:
        raise OutOfRange(f"K = {spec.dim} is larger than the site's width ({spec.site}: {width}).")
    ex = ex or examples(model, spec, hooks)
    check_pos(model, ex, spec.pos)
    eng = make_engine(model, ex, spec.site, spec.layer, spec.pos, prefer, hooks)
    sub, curve, secs = train_subspace(eng, ex, width, spec.dim, spec.boundless, spec.steps, spec.batch, spec.lr,
                                      spec.seed, progress, spec.init)
    B = sub.basis()
    t_test, ld_test = evaluate(eng, ex, ex.test, B)
    t_train, _ = evaluate(eng, ex, ex.train, B)
    t_full, ld_full = evaluate(eng, ex, ex.test, replace_with="full")
    t_none, ld_none = evaluate(eng, ex, ex.test, replace_with="none")
    ld_src = np.array([ex.source_logits[k] for k in ex.test])
    shape = [info.n_heads, info.d_head] if spec.site == "attn_z" else [width]
    shown = [{"base": ex.texts[k][0], "source": ex.texts[k][1], "expected": ex.texts[k][2],
              "base_answer": model.str_tokens([ex.base_answer[k]])[0],
              "predicted": model.str_tokens([int(t)])[0], "full": model.str_tokens([int(f)])[0]}
             for k, t, f in list(zip(ex.test, t_test, t_full))[:12]]
    return DASResult(
        site=spec.site, layer=spec.layer, pos=spec.pos, position=spec.pos % len(ex.base[0]),
        hook_name=site_hook(spec.site, spec.layer), width=width, shape=shape, dim=int(B.shape[0]),
        iia=_iia(ex, ex.test, t_test), iia_train=_iia(ex, ex.train, t_train), iia_full=_iia(ex, ex.test, t_full),
        iia_baseline=_iia(ex, ex.test, t_none), logit_diff=float(ld_test.mean()), logit_diff_base=float(ld_none.mean()),
        logit_diff_source=float(ld_src.mean()), logit_diff_full=float(ld_full.mean()),
        logit_diff_recovered=recovered(ld_test, ld_none, ld_src), n_train=len(ex.train), n_test=len(ex.test),
        n_dropped=ex.n_dropped, engine=eng.name, train_seconds=secs, steps_per_second=spec.steps / max(secs, 1e-9),
        examples=shown, tokens=model.str_tokens(ex.base[0]), curve=curve,
        basis=B.numpy().astype(np.float32),
        mask=(sub.mask().detach().numpy().astype(np.float32) if spec.boundless else np.zeros(0, np.float32)))


_EXAMPLES: dict = {}


def cached_examples(model: LoadedModel, task: DASTask) -> Examples:
    """Examples of a task (kept per process: a sweep's cells share them)."""
    key = (model.info.model_id, json.dumps(task.task_fields(), sort_keys=True))
    if key not in _EXAMPLES:
        ex = examples(model, task)
        _EXAMPLES.clear()
        _EXAMPLES[key] = ex
    return _EXAMPLES[key]


@analysis(DASSpec, DASResult)
def compute(spec: DASSpec, model: LoadedModel, progress=None) -> DASResult:
    return fit(model, spec, progress, ex=cached_examples(model, spec))


# ---------------------------------------------------------------------------------------
# The layer x position sweep (K = 1)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DASSweepSpec(DASTask):
    KIND = "das_sweep"
    site: str = "resid_pre"
    layers: tuple = ()           # () = every layer
    positions: tuple = ()        # token indices; () = every position
    steps: int = 60
    batch: int = 32
    lr: float = 0.02

    def validate(self):
        self.validate_task()
        _check_site(self.site, 0, 1)
        for name, xs in (("layers", self.layers), ("positions", self.positions)):
            if not isinstance(xs, tuple) or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in xs):
                raise InvalidSpec(f"{name} must be a list of indices >= 0.")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise OutOfRange(f"steps must be 1–{MAX_STEPS}, got {self.steps!r}.")

    def cell(self, layer: int, pos: int) -> DASSpec:
        return DASSpec(model=self.model, **self.task_fields(), site=self.site, layer=layer, pos=pos, dim=1,
                       steps=self.steps, batch=self.batch, lr=self.lr)


@dataclass(frozen=True)
class DASSweepResult(Result):
    site: str
    layers: list
    positions: list
    tokens: list                 # the first base prompt's tokens (column labels)
    run_keys: list               # [layer][pos] the cell's DAS run key
    best: list                   # top cells {layer, pos, iia, iia_train, logit_diff_recovered, run_key}
    iia: np.ndarray              # [layers positions] held out
    iia_train: np.ndarray
    recovered: np.ndarray        # logit_diff_recovered
    iia_full: np.ndarray         # whole-vector patching at the cell


@analysis(DASSweepSpec, DASSweepResult)
def compute_sweep(spec: DASSweepSpec, model: LoadedModel, progress=None, store=None) -> DASSweepResult:
    info = model.info
    layers = list(spec.layers) or list(range(info.n_layers))
    bad = [x for x in layers if x >= info.n_layers]
    if bad:
        raise InvalidSite(f"Layers {bad} do not exist: the model has layers 0–{info.n_layers - 1}.")
    ex = cached_examples(model, spec)
    T = len(ex.base[0])
    if len(ex.source[0]) != T:
        raise PromptLengthMismatch("A layer x position sweep needs base and source prompts of one token length.")
    positions = list(spec.positions) or list(range(T))
    if any(p >= T for p in positions):
        raise OutOfRange(f"Positions {[p for p in positions if p >= T]} do not exist in prompts of {T} tokens.")
    shape = (len(layers), len(positions))
    iia, iia_tr, rec, full = (np.full(shape, np.nan) for _ in range(4))
    keys = [["" for _ in positions] for _ in layers]
    for a, layer in enumerate(layers):
        for b, p in enumerate(positions):
            cell = spec.cell(layer, p)
            hit = lookup(cell, store)
            if hit is None:
                t = time.perf_counter()
                r = fit(model, cell, None, ex=ex)
                meta, arrays = r.to_record()
                store.put(cell.key(), cell.KIND, cell.model, cell.to_json(), meta, arrays, time.perf_counter() - t)
            else:
                r = hit.result
            iia[a, b], iia_tr[a, b], rec[a, b], full[a, b] = r.iia, r.iia_train, r.logit_diff_recovered, r.iia_full
            keys[a][b] = cell.key()
            if progress:
                progress(f"DAS sweep: layer {layer}, position {p}: IIA {r.iia:.2f}")
    order = sorted(((iia[a, b], iia_tr[a, b], a, b) for a in range(shape[0]) for b in range(shape[1])), reverse=True)
    best = [{"layer": layers[a], "pos": positions[b], "iia": float(v), "iia_train": float(vt),
             "logit_diff_recovered": float(rec[a, b]), "run_key": keys[a][b]} for v, vt, a, b in order[:5]]
    return DASSweepResult(site=spec.site, layers=layers, positions=positions, tokens=model.str_tokens(ex.base[0]),
                          run_keys=keys, best=best, iia=iia, iia_train=iia_tr, recovered=rec, iia_full=full)


# ---------------------------------------------------------------------------------------
# Directions: each basis row of a stored DAS run
# ---------------------------------------------------------------------------------------
def load_run(run_key: str, store=None) -> tuple[DASSpec, DASResult]:
    from ..store import default_store

    rec = (store or default_store()).get(run_key) if isinstance(run_key, str) and run_key else None
    if rec is None or rec["kind"] != DASSpec.KIND:
        raise UnknownRun(f"No DAS run with key {run_key!r} in the store.")
    return Spec.from_dict(rec["spec"]), DASResult.from_record(rec["meta"], rec["arrays"])


class UnknownRun(DashboardError):
    code = "unknown_run"


def _derive(run_key: str, part: str, store) -> Derived:
    spec, r = load_run(run_key, store)
    try:
        i = int(part)
    except ValueError:
        raise InvalidSpec(f"A DAS direction is a basis row index, not {part!r}.") from None
    if not 0 <= i < r.basis.shape[0]:
        raise OutOfRange(f"The DAS run has {r.basis.shape[0]} basis row(s); row {i} does not exist.")
    return Derived(vector=r.basis[i].astype(np.float32), site=SITE_COMPONENT[r.site], layer=r.layer,
                   shape=tuple(r.shape), made={"method": "das", "task": spec.task, "pos": spec.pos,
                                               "position": r.position, "dim": r.dim, "row": i, "iia": r.iia,
                                               "boundless": spec.boundless})


DERIVERS["das"] = _derive


# ---------------------------------------------------------------------------------------
# Command line: python -m backend das ...
# ---------------------------------------------------------------------------------------
def read_triples(path) -> tuple:
    from pathlib import Path

    from .directions import BadDataFile

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise BadDataFile(f"Cannot read {path}: {e.strerror or e}.") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError:
            raise BadDataFile(f"{path}, line {n}: not JSON.") from None
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) and d.get(k) for k in
                                                ("base", "source", "expected")):
            raise BadDataFile(f"{path}, line {n}: needs string fields \"base\", \"source\" and \"expected\".")
        out.append((d["base"], d["source"], d["expected"]))
    if not out:
        raise EmptyDataset(f"{path} has no triple.")
    return tuple(out)


def _ints(text: str | None, name: str) -> tuple:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise InvalidSpec(f"--{name} takes comma-separated integers, e.g. 0,4,8; got {text!r}.") from None


def add_cli_args(p) -> None:
    from ..model import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--task", default="ioi", help="ioi | country-capital (or give --pairs-file)")
    p.add_argument("--pairs-file", help="JSON Lines {\"base\", \"source\", \"expected\"} (task 'custom')")
    p.add_argument("--site", default="resid_pre", help="|".join(SITES))
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--pos", default="last", help="a token index, or last (= -1; negative counts from the end)")
    p.add_argument("--dim", type=int, default=1, help="K, the subspace dimension (boundless: the start)")
    p.add_argument("--boundless", action="store_true", help="learn a soft mask over a full rotation")
    p.add_argument("--n", type=int, default=48, help="examples kept (built-in tasks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps (150; sweep: 60 per cell)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--sweep", action="store_true", help="layer x position IIA sweep at K = 1 (a heatmap)")
    p.add_argument("--layers", default="", help="sweep: comma-separated layers (default: all)")
    p.add_argument("--positions", default="", help="sweep: comma-separated token indices (default: all)")


def _pos(text: str) -> int:
    if str(text).strip().lower() == "last":
        return -1
    try:
        return int(text)
    except ValueError:
        raise InvalidSpec(f"--pos takes a token index or 'last', not {text!r}.") from None


def spec_from_args(a):
    task = dict(task="custom", triples=read_triples(a.pairs_file)) if a.pairs_file else dict(task=a.task)
    common = dict(model=a.model, **task, n=a.n, seed=a.seed, site=a.site, batch=a.batch)
    if a.sweep:
        return DASSweepSpec(**common, layers=_ints(a.layers, "layers"), positions=_ints(a.positions, "positions"),
                            steps=a.steps or 60, lr=a.lr or 0.02)
    if a.layer is None:
        raise InvalidSite("--layer is required (or --sweep).")
    return DASSpec(**common, layer=a.layer, pos=_pos(a.pos), dim=a.dim, boundless=a.boundless,
                   steps=a.steps or 150, lr=a.lr or 0.01)


def direction_keys(out, store=None) -> list[str]:
    """The direction keys of a DAS run's basis rows (at most 8), made on first asking."""
    r = out.result
    return [derive(out.spec.model, "das", out.run_key, str(i), store=store).run_key
            for i in range(min(r.basis.shape[0], 8))]


def run_cli(a) -> dict:
    import sys

    from ..runner import run

    spec = spec_from_args(a)
    out = run(spec, progress=lambda m: print(m, file=sys.stderr))
    head = {"run_key": out.run_key, "from_store": out.from_store, "compute_seconds": round(out.compute_seconds, 4),
            "model": spec.model, "task": spec.task}
    r = out.result
    if isinstance(spec, DASSweepSpec):
        return {**head, "site": r.site, "layers": r.layers, "positions": r.positions, "tokens": r.tokens,
                "iia": r.iia.tolist(), "iia_train": r.iia_train.tolist(), "logit_diff_recovered": r.recovered.tolist(),
                "iia_full": r.iia_full.tolist(), "best": r.best, "run_keys": r.run_keys}
    keys = direction_keys(out)
    return {**head, "direction_key": keys[0], "direction_keys": keys, "boundless": spec.boundless, **r.payload()}
