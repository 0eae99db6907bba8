"""Directions: one vector at one site (model, hook point, layer), made five ways and stored
with how it was made. It is then read, added or ablated (backend/analyses/steering.py).

Methods, as their papers define them:
- **diff-means** (the refusal direction, Arditi et al. 2024): mean activation over a positive
  set minus the mean over a negative set, at each prompt's last token or averaged over its
  post-instruction tokens (the chat template's tokens after the user's text), accumulated in
  float64. All layers come from one batched pass, so the page shows which layer separates
  the sets best; `layer` picks the stored vector.
- **caa** (Contrastive Activation Addition, Rimsky et al. 2024): each pair is one A/B question
  in the model's chat template with a matching and a non-matching answer letter as the
  assistant's first tokens, "(A" / "(B"; the activation is read at the answer letter's token
  (located in the tokenisation, never assumed at -2: SmolLM2's template puts two tokens after
  it) at the block output (resid_post by default); the vector is the mean over pairs of
  (positive − negative). Also all layers in one pass.
- **actadd** (Activation Addition, Turner et al. 2023): one prompt pair, the shorter padded
  with space tokens to the other's length; the per-position difference of their residual
  streams at one layer. Steering adds it at the first k prompt positions
  (`position_vectors`, k = the pair's length); `vector` is the last position's difference.
- **probe** (a linear probe as in Azaria & Mitchell 2023): logistic regression per layer on
  labelled prompts (last token), fitted for every layer at once (L-BFGS, float64, L2), with
  held-out accuracy per layer; the weight vector of the chosen layer, in raw activation
  units, is the direction (`layer_bias` keeps its bias for probe scores).
- **sae**: the decoder row of an SAE feature (hook_z SAEs: reshaped heads × d_head at the hook).

Vectors are stored raw (not normalised) as float32; `norm` is their L2 norm. Held-out scores
(`layer_accuracy`, `layer_separation`) use a stratified split (`test_fraction`, `seed`); the
stored vector uses every example. Prompts are tokenised as the model's own tokenizer does
(no BOS for SmolLM2) and batched right-padded: causal attention never lets a real token see
the padding after it, so the activations read equal those of each prompt run alone.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np

from .. import settings
from ..errors import DashboardError, InvalidSite, InvalidSpec, OutOfRange, SAEMismatch
from ..model import LoadedModel, trained_for
from ..runner import analysis
from ..sites import _BLOCK, _GLOBAL, Component, Site, hook_name, hook_names
from ..spec import Result, Spec

METHODS = ("diff-means", "caa", "actadd", "probe", "sae", "derived", "grains")
GRAINS_STEPS = 32       # IG steps per prompt (Gauss-Legendre; the gaps are reported in `made`)
# derived: the vector was made by another stored run (a DAS subspace, a probe study's layer probe,
# a harmfulness direction …). spec.source = "<kind>:<run_key>:<part>"; the producing module
# registers DERIVERS[kind](run_key, part, store) -> Derived and stores the direction with
# `derive(...)`. Reopening the direction reads the producing run from the store.
DERIVERS: dict = {}
POSITIONS = ("last", "post-instruction")
RESID_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")   # [batch pos d_model]
DEFAULT_SITE = {"caa": "resid_post"}   # the others: resid_pre
MAX_PROMPTS = 512
BATCH = 32
DATA = settings.DATA_DIR / "directions"


class EmptySet(DashboardError):
    """A set of prompts (or one side of a contrast) with nothing in it."""

    code = "empty_set"


class AnswerNotFound(DashboardError):
    """A CAA pair whose answer letter cannot be located in the tokenised chat."""

    code = "answer_not_found"


class UnknownDirection(DashboardError):
    code = "unknown_direction"


class DirectionMismatch(DashboardError):
    """A direction used with another model, or of the wrong width for its hook."""

    code = "direction_mismatch"


class BadDataFile(DashboardError):
    code = "bad_data_file"


@dataclass(frozen=True)
class DirectionSpec(Spec):
    KIND = "direction"
    method: str = "diff-means"
    site: str = "resid_pre"
    layer: int = 0
    position: str = "last"
    chat: bool = False                       # wrap each prompt as a user message in the chat template
    positive: tuple[str, ...] = ()           # diff-means sets; actadd: one prompt each
    negative: tuple[str, ...] = ()
    pairs: tuple[tuple[str, str, str], ...] = ()   # caa: (question, matching letter, other letter)
    texts: tuple[str, ...] = ()              # probe
    labels: tuple[int, ...] = ()             # probe: 0 / 1
    sae: str = ""                            # sae: SAE id and feature
    feature: int = -1
    test_fraction: float = 0.25
    seed: int = 0
    source: str = ""                         # where the sets came from (shown, part of the key)
    top_k: int = 3                           # grains: tokens taken per prompt on each side

    KEY_NEUTRAL: ClassVar[dict] = {"top_k": 3}

    def validate(self):
        if self.method not in METHODS:
            raise InvalidSpec(f"Unknown direction method {self.method!r}; known: {', '.join(METHODS)}.")
        if self.method == "derived":
            parts = self.source.split(":") if isinstance(self.source, str) else []
            if len(parts) != 3 or not all(parts):
                raise InvalidSpec(f"A derived direction's source is '<kind>:<run_key>:<part>', not {self.source!r}.")
            return
        if self.method == "sae":
            if not isinstance(self.sae, str) or not self.sae.strip():
                raise InvalidSpec("An SAE direction needs an SAE id (python -m backend saes lists them).")
            if self.feature < 0:
                raise OutOfRange("An SAE direction needs a feature index ≥ 0.")
            return
        if self.site not in RESID_SITES:
            raise InvalidSite(f"Directions are made at a residual-width site ({', '.join(RESID_SITES)}), "
                              f"not {self.site!r}.")
        Site(Component(self.site), self.layer)
        if self.layer < 0:
            raise InvalidSite(f"Layer {self.layer} does not exist.")
        if self.position not in POSITIONS:
            raise InvalidSpec(f"Unknown position {self.position!r}; known: {', '.join(POSITIONS)}.")
        if self.position == "post-instruction" and not self.chat:
            raise InvalidSpec("Post-instruction positions exist only in the chat template: set chat.")
        if not 0.0 < self.test_fraction < 0.9:
            raise InvalidSpec("test_fraction must be in (0, 0.9).")
        sets = {"diff-means": (self.positive, self.negative), "actadd": (self.positive, self.negative),
                "caa": (self.pairs,), "probe": (self.texts,), "grains": (self.pairs,)}[self.method]
        for s in sets:
            if not s:
                raise EmptySet(f"A {self.method} direction needs both sets: one of them is empty.")
            if len(s) > MAX_PROMPTS:
                raise InvalidSpec(f"At most {MAX_PROMPTS} prompts per set ({len(s)} given).")
        texts = [t for s in sets for item in s for t in (item if isinstance(item, tuple) else (item,))]
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise EmptySet("A prompt (or a pair's question or answer) is empty.")
        if self.method == "actadd" and (len(self.positive) != 1 or len(self.negative) != 1):
            raise InvalidSpec("ActAdd takes one positive and one negative prompt.")
        if self.method in ("caa", "grains"):
            for q, a, b in self.pairs:
                if a.strip() == b.strip():
                    raise InvalidSpec(f"A pair's two answers are the same ({a!r}).")
        if self.method == "grains" and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                        or not 1 <= self.top_k <= 16):
            raise OutOfRange(f"top_k must be 1–16 tokens per side, got {self.top_k!r}.")
        if self.method == "probe":
            if len(self.labels) != len(self.texts) or any(v not in (0, 1) for v in self.labels):
                raise InvalidSpec("A probe needs one label (0 or 1) per text.")
            if min(self.labels.count(0), self.labels.count(1)) < 2:
                raise EmptySet("A probe needs at least two examples of each label (train and held out).")

    @property
    def needs_layers(self) -> bool:
        return self.method in ("diff-means", "caa", "probe", "grains")


@dataclass(frozen=True)
class DirectionResult(Result):
    method: str
    site: str
    layer: int
    hook_name: str
    d_model: int
    shape: list[int]               # the vector's shape at its hook: [d_model] or [n_heads, d_head]
    norm: float
    made: dict                     # how it was made (counts, positions, tokens, SAE, …)
    vector: np.ndarray             # [prod(shape)] raw, float32
    position_vectors: np.ndarray   # actadd: [k d] per-position differences; else [0 d]
    layer_vectors: np.ndarray      # diff-means / caa / probe: [n_layers d] at this site; else [0 d]
    layer_accuracy: np.ndarray     # [n_layers] held-out accuracy (probe; midpoint rule for diff-means / caa)
    layer_separation: np.ndarray   # [n_layers] held-out d′ of the projections (or probe logits)
    layer_bias: np.ndarray         # probe: [n_layers] bias of the raw-unit weights; else [0]

    @property
    def unit(self) -> np.ndarray:
        return self.vector / max(self.norm, 1e-30)


# -- input files ---------------------------------------------------------------------------
def _read(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise BadDataFile(f"No such file: {path}.")
    return p.read_text(encoding="utf-8")


def _jsonl(text: str, name: str) -> list[dict]:
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadDataFile(f"{name}, line {i}: not JSON ({e.msg}).") from None
            if not isinstance(row, dict):
                raise BadDataFile(f"{name}, line {i}: expected an object.")
            rows.append(row)
    return rows


def parse_prompts(text: str, name: str = "prompts") -> list[str]:
    """One prompt per line, or JSON Lines with a "text" field."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and all(ln.lstrip().startswith("{") for ln in lines):
        rows = _jsonl(text, name)
        if any(not isinstance(r.get("text"), str) for r in rows):
            raise BadDataFile(f"{name}: every JSON line needs a \"text\" string.")
        return [r["text"] for r in rows]
    return lines


def _label(v, name: str) -> int:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "1.0"):
        return 1
    if s in ("0", "false", "no", "0.0"):
        return 0
    raise BadDataFile(f"{name}: label {v!r} is not 0/1 or true/false.")


def parse_labelled(text: str, name: str = "data") -> tuple[list[str], list[int]]:
    """CSV with columns text,label or JSON Lines {"text", "label"}."""
    if text.lstrip().startswith("{"):
        rows = _jsonl(text, name)
    else:
        rows = list(csv.DictReader(text.splitlines()))
    if any(not isinstance(r.get("text"), str) or r.get("label") is None for r in rows):
        raise BadDataFile(f"{name}: every row needs \"text\" and \"label\".")
    return [r["text"] for r in rows], [_label(r["label"], name) for r in rows]


def parse_pairs(text: str, name: str = "pairs") -> list[tuple[str, str, str]]:
    """JSON Lines {"question", "positive", "negative"}."""
    rows = _jsonl(text, name)
    if any(not all(isinstance(r.get(k), str) for k in ("question", "positive", "negative")) for r in rows):
        raise BadDataFile(f"{name}: every line needs \"question\", \"positive\" and \"negative\" strings.")
    return [(r["question"], r["positive"], r["negative"]) for r in rows]


def read_prompts(path) -> list[str]:
    return parse_prompts(_read(path), str(path))


def read_labelled(path) -> tuple[list[str], list[int]]:
    return parse_labelled(_read(path), str(path))


def read_pairs(path) -> list[tuple[str, str, str]]:
    return parse_pairs(_read(path), str(path))


# Shipped sets (data/directions/, written for this project): every 4th item is held out for
# the evaluations, the rest makes the direction.
SHIPPED = {
    "sentiment": {"method": "diff-means", "positive": "sentiment_positive.txt",
                  "negative": "sentiment_negative.txt", "label": "sentiment (positive vs negative sentences)"},
    "refusal": {"method": "diff-means", "positive": "harmful.txt", "negative": "harmless.txt", "chat": True,
                "label": "harmful- vs harmless-style instructions (mild), chat template"},
    "truefalse": {"method": "probe", "data": "truefalse.jsonl", "label": "true vs false statements"},
    "optimism": {"method": "caa", "pairs": "behaviour_ab.jsonl", "label": "A/B questions: optimistic answer"},
    "sentiment-tokens": {"method": "grains", "pairs": "grains_sentiment.jsonl",
                         "label": "sentence starts with a positive vs a negative next word (GrAInS)"},
}


def shipped(name: str, split: str = "train") -> dict:
    """A shipped set: {"positive", "negative"} | {"texts", "labels"} | {"pairs"} of one split
    ("train", "heldout" or "all")."""
    if name not in SHIPPED:
        raise InvalidSpec(f"Unknown shipped set {name!r}; known: {', '.join(SHIPPED)}.")
    s = SHIPPED[name]

    def cut(items):
        items = list(items)
        return items if split == "all" else [x for i, x in enumerate(items) if (i % 4 == 3) == (split == "heldout")]
    if "pairs" in s:
        return {"pairs": cut(read_pairs(DATA / s["pairs"]))}
    if "data" in s:
        texts, labels = read_labelled(DATA / s["data"])
        rows = cut(zip(texts, labels))
        return {"texts": [t for t, _ in rows], "labels": [y for _, y in rows]}
    return {"positive": cut(read_prompts(DATA / s["positive"])), "negative": cut(read_prompts(DATA / s["negative"]))}


def shipped_spec(model: str, name: str, site: str | None = None, layer: int = 0, **kw) -> DirectionSpec:
    s = SHIPPED[name]
    fields = shipped(name)
    if "texts" in fields:
        fields = {"texts": tuple(fields["texts"]), "labels": tuple(fields["labels"])}
    elif "pairs" in fields:
        fields = {"pairs": tuple(tuple(p) for p in fields["pairs"])}
    else:
        fields = {"positive": tuple(fields["positive"]), "negative": tuple(fields["negative"])}
    kw.setdefault("chat", bool(s.get("chat")))
    return DirectionSpec(model=model, method=s["method"], site=site or DEFAULT_SITE.get(s["method"], "resid_pre"),
                         layer=layer, source=f"shipped:{name}", **fields, **kw)


# -- tokens and activations ----------------------------------------------------------------
def user_chat(model: LoadedModel, text: str) -> list[int]:
    return model.chat_ids([{"role": "user", "content": text}], add_generation_prompt=True)


def post_instruction_length(model: LoadedModel) -> int:
    """How many template tokens follow the user's text (end of turn, assistant header)."""
    a, b = user_chat(model, "Say yes."), user_chat(model, "Name a colour, please")
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def prompt_rows(model: LoadedModel, texts, chat: bool, position: str) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt and the positions read from it."""
    rows = [user_chat(model, t) if chat else model.encode(t) for t in texts]
    limit = settings.max_tokens()
    if any(len(r) > limit for r in rows):
        from ..errors import PromptTooLong
        raise PromptTooLong(f"A prompt has more than {limit} tokens in the chat template.")
    if position == "post-instruction":
        n = post_instruction_length(model)
        return rows, [list(range(len(r) - n, len(r))) for r in rows]
    return rows, [[len(r) - 1] for r in rows]


def answer_position(model: LoadedModel, question: str, answer: str) -> tuple[list[int], int]:
    """Ids of the question with the answer begun by the assistant ("(A" for a letter), and
    the position of the token that completes the answer letter."""
    a = answer.strip()
    letter = len(a.strip("()")) == 1
    if letter:
        a = a.strip("()")
        if f"({a})" not in question:
            raise AnswerNotFound(f"The answer letter ({a}) is not an option of the question {question[:60]!r}…")
        content = f"({a}"
    else:
        content = a
    prefix = user_chat(model, question)
    ids = model.chat_ids([{"role": "user", "content": question}, {"role": "assistant", "content": content}],
                         add_generation_prompt=False)
    if ids[:len(prefix)] != prefix:
        raise AnswerNotFound("The chat template does not put the answer after the question as one more turn.")
    for j in range(len(prefix), len(ids)):
        if content in model.decode(ids[len(prefix):j + 1]):
            return ids, j
    raise AnswerNotFound(f"The answer {content!r} is not found in the tokenised chat.")


def site_activations(model: LoadedModel, rows: list[list[int]], read: list[list[int]], component: str):
    """Mean activation over each row's read positions at every layer: [n_layers N d] float64,
    from right-padded batches with one capture per batch."""
    import torch

    names = hook_names(component, model.info.n_layers)
    pad = model.eos_token_id or 0
    out = []
    for s in range(0, len(rows), BATCH):
        chunk, pos = rows[s:s + BATCH], read[s:s + BATCH]
        width = max(len(r) for r in chunk)
        ids = model.tensor([r + [pad] * (width - len(r)) for r in chunk])
        weights = torch.zeros(len(chunk), width, dtype=torch.float64, device=ids.device)   # [B P]
        for b, p in enumerate(pos):
            weights[b, p] = 1.0 / len(p)
        acts = model.capture(ids, names)                                  # {name: [B P d]}
        out.append(torch.stack([torch.einsum("bp,bpd->bd", weights, acts[n].double()) for n in names]))  # [L B d]
    return torch.cat(out, 1)


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified split (train, test) of example indices; each class keeps ≥ 1 on each side."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(max(1, int(math.ceil(test_fraction * len(idx)))), len(idx) - 1)
        test += idx[:k].tolist()
        train += idx[k:].tolist()
    return np.array(sorted(train)), np.array(sorted(test))


def contrast_scores(pos, neg, test_fraction: float, seed: int):
    """Held-out accuracy of the midpoint rule and d′ per layer; pos / neg [L n d] float64.
    Returns numpy ([L], [L], "held-out" | "in-sample")."""
    import torch

    n_p, n_n = pos.shape[1], neg.shape[1]
    if min(n_p, n_n) >= 2:
        tr_p, te_p = split_indices(np.zeros(n_p), test_fraction, seed)
        tr_n, te_n = split_indices(np.zeros(n_n), test_fraction, seed + 1)
        how = "held-out"
    else:
        tr_p = te_p = np.arange(n_p)
        tr_n = te_n = np.arange(n_n)
        how = "in-sample"
    mp, mn = pos[:, tr_p].mean(1), neg[:, tr_n].mean(1)                   # [L d]
    u = (mp - mn) / (mp - mn).norm(dim=-1, keepdim=True).clamp_min(1e-30)
    mid = ((mp + mn) / 2 * u).sum(-1, keepdim=True)                       # [L 1]
    pp = (pos[:, te_p] * u[:, None]).sum(-1) - mid                        # [L n_test_p]
    pn = (neg[:, te_n] * u[:, None]).sum(-1) - mid
    acc = ((pp > 0).double().sum(1) + (pn <= 0).double().sum(1)) / (pp.shape[1] + pn.shape[1])
    # d′ of the held-out projections over the within-class spread of every example (a held-out
    # side may hold a single example, whose own variance is 0)
    ap = (pos * u[:, None]).sum(-1)
    an = (neg * u[:, None]).sum(-1)
    var = (ap.var(1, unbiased=False) * n_p + an.var(1, unbiased=False) * n_n) / (n_p + n_n)
    sep = (pp.mean(1) - pn.mean(1)) / var.sqrt().clamp_min(1e-12)
    return acc.numpy(), sep.numpy(), how


def fit_probes(X, y, train, test, l2: float = 1e-3, steps: int = 200):
    """Logistic regression for every layer at once. X [L N d] (torch, float64), y [N] 0/1.

    Features are centred (train mean) and scaled (one scalar per layer) for conditioning; the
    returned weights and biases are in raw activation units, so score = x·w + b. Returns
    numpy (W [L d], b [L], train accuracy [L], test accuracy [L], test d′ of the logits [L]).
    """
    import torch

    X = torch.as_tensor(X, dtype=torch.float64)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    tr, te = torch.as_tensor(train), torch.as_tensor(test)
    mu = X[:, tr].mean(1, keepdim=True)                                  # [L 1 d]
    scale = (X[:, tr] - mu).pow(2).mean((1, 2)).sqrt().clamp_min(1e-12)[:, None, None]     # [L 1 1]
    Z = (X - mu) / scale                                                 # unit mean variance per dimension
    L, _, d = X.shape
    w = torch.zeros(L, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(L, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    Ztr, ytr = Z[:, tr], yt[tr]

    def closure():
        opt.zero_grad()
        logits = torch.einsum("lnd,ld->ln", Ztr, w) + b[:, None]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, ytr.expand_as(logits),
                                                                     reduction="none").mean(1).sum()
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        W = w / scale[:, 0]                                              # raw units [L d]
        B = b - (mu[:, 0] * W).sum(-1)
        logits = torch.einsum("lnd,ld->ln", X, W) + B[:, None]           # [L N]
        pred = (logits > 0).double()
        acc_tr = (pred[:, tr] == yt[tr]).double().mean(1)
        acc_te = (pred[:, te] == yt[te]).double().mean(1)
        lt, yte = logits[:, te], yt[te].bool()
        var = (lt[:, yte].var(1, unbiased=False) + lt[:, ~yte].var(1, unbiased=False)) / 2
        sep = (lt[:, yte].mean(1) - lt[:, ~yte].mean(1)) / var.sqrt().clamp_min(1e-12)
    return W.numpy(), B.numpy(), acc_tr.numpy(), acc_te.numpy(), sep.numpy()


def site_of_hook(hook: str, n_layers: int) -> Site:
    """The typed site of a hook name (e.g. an SAE's), by building every name of sites.py."""
    for comp in _GLOBAL:
        if hook_name(Site(comp)) == hook:
            return Site(comp)
    for comp in _BLOCK:
        for layer in range(n_layers):
            if hook_name(Site(comp, layer)) == hook:
                return Site(comp, layer)
    raise InvalidSite(f"Hook {hook!r} is not a site of this model.")


# -- compute -------------------------------------------------------------------------------
def _result(spec, model, vector, *, site=None, layer=None, shape=None, made=None, position_vectors=None,
            layer_vectors=None, acc=None, sep=None, bias=None) -> DirectionResult:
    d = model.info.d_model
    site = site or spec.site
    layer = spec.layer if layer is None else layer
    vec = np.asarray(vector, dtype=np.float32).reshape(-1)
    w = vec.shape[0]
    empty = np.zeros((0, w), np.float32)
    return DirectionResult(
        method=spec.method, site=site, layer=int(layer), hook_name=hook_name(Site(Component(site), layer)),
        d_model=d, shape=list(shape or [w]), norm=float(np.linalg.norm(vec.astype(np.float64))),
        made=made or {}, vector=vec,
        position_vectors=empty if position_vectors is None else np.asarray(position_vectors, np.float32),
        layer_vectors=empty if layer_vectors is None else np.asarray(layer_vectors, np.float32),
        layer_accuracy=np.zeros(0) if acc is None else np.asarray(acc, np.float64),
        layer_separation=np.zeros(0) if sep is None else np.asarray(sep, np.float64),
        layer_bias=np.zeros(0) if bias is None else np.asarray(bias, np.float64))


def _contrast(spec, model, pos_rows, pos_read, neg_rows, neg_read, made) -> DirectionResult:
    pos = site_activations(model, pos_rows, pos_read, spec.site)          # [L n d]
    neg = site_activations(model, neg_rows, neg_read, spec.site)
    diff = pos.mean(1) - neg.mean(1)                                      # [L d] float64
    acc, sep, how = contrast_scores(pos, neg, spec.test_fraction, spec.seed)
    made = {**made, "n_positive": len(pos_rows), "n_negative": len(neg_rows), "scores": how}
    return _result(spec, model, diff[spec.layer].numpy(), made=made, layer_vectors=diff.numpy(), acc=acc, sep=sep)


@analysis(DirectionSpec, DirectionResult)
def compute(spec: DirectionSpec, model: LoadedModel, progress=None, store=None) -> DirectionResult:
    info = model.info
    if spec.method == "sae":
        return _sae_direction(spec, model)
    if spec.method == "derived":
        return _derived_direction(spec, model, store)
    Site(Component(spec.site), spec.layer).check(info.n_layers, info.n_heads)
    if spec.method == "diff-means":
        pr, pp = prompt_rows(model, spec.positive, spec.chat, spec.position)
        nr, npos = prompt_rows(model, spec.negative, spec.chat, spec.position)
        return _contrast(spec, model, pr, pp, nr, npos, {"position": spec.position, "chat": spec.chat,
                                                          "read_tokens": len(pp[0])})
    if spec.method == "caa":
        pr, pp, nr, npos, letters = [], [], [], [], set()
        for q, a, b in spec.pairs:
            for ans, rows, read in ((a, pr, pp), (b, nr, npos)):
                ids, j = answer_position(model, q, ans)
                rows.append(ids)
                read.append([j])
                letters.add(model.str_tokens([ids[j]])[0])
        return _contrast(spec, model, pr, pp, nr, npos, {"position": "answer letter", "chat": True,
                                                          "letter_tokens": sorted(letters)})
    if spec.method == "grains":
        return _grains(spec, model, progress)
    if spec.method == "actadd":
        p, n = model.encode(spec.positive[0]), model.encode(spec.negative[0])
        space = model.tokenize(" ", prepend_bos=False)[-1]
        k = max(len(p), len(n))
        p, n = p + [space] * (k - len(p)), n + [space] * (k - len(n))
        name = hook_name(Site(Component(spec.site), spec.layer))
        acts = model.capture(model.tensor([p, n]), [name])[name].double()   # [2 k d]
        diff = (acts[0] - acts[1]).numpy()
        return _result(spec, model, diff[-1], position_vectors=diff,
                       made={"k": k, "positive_tokens": model.str_tokens(p), "negative_tokens": model.str_tokens(n),
                             "padding": "space tokens appended to the shorter prompt"})
    rows, read = prompt_rows(model, spec.texts, spec.chat, spec.position)   # probe
    X = site_activations(model, rows, read, spec.site)
    y = np.array(spec.labels)
    train, test = split_indices(y, spec.test_fraction, spec.seed)
    W, B, acc_tr, acc_te, sep = fit_probes(X, y, train, test)
    return _result(spec, model, W[spec.layer], layer_vectors=W, acc=acc_te, sep=sep, bias=B,
                   made={"position": spec.position, "chat": spec.chat, "n_train": len(train), "n_test": len(test),
                         "train_accuracy": [round(float(a), 4) for a in acc_tr], "l2": 1e-3,
                         "bias": float(B[spec.layer])})


def grains_tokens(scores: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """GrAInS's choice on one prompt: the k most positively and the k most negatively
    attributed positions (a side keeps only scores of its sign; ties by position)."""
    order = np.argsort(-scores, kind="stable")
    pos = [int(i) for i in order if scores[i] > 0][:k]
    neg = [int(i) for i in order[::-1] if scores[i] < 0][:k]
    return pos, neg


def _grains(spec: DirectionSpec, model: LoadedModel, progress=None) -> DirectionResult:
    """Attribution-guided steering (GrAInS): for each (prompt, preferred, dispreferred), integrated
    gradients of logit(preferred) - logit(dispreferred) over the prompt's tokens picks the top-k
    positive and negative tokens; the direction at every layer is the mean over prompts of the
    mean activation at their positive tokens minus the same over prompts at their negative tokens
    (a prompt whose scores are all of one sign adds to that side only)."""
    from .token_attribution import TokenAttributionSpec, attribute

    pos_rows, pos_read, neg_rows, neg_read, picked, gaps = [], [], [], [], [], []
    for i, (prompt, a, b) in enumerate(spec.pairs):
        r = attribute(TokenAttributionSpec(model=spec.model, text=prompt, method="integrated-gradients",
                                           contrast=(a, b), steps=GRAINS_STEPS), model)
        pos, neg = grains_tokens(r.scores, spec.top_k)
        if pos:
            pos_rows.append(list(r.token_ids))
            pos_read.append(pos)
        if neg:
            neg_rows.append(list(r.token_ids))
            neg_read.append(neg)
        picked.append({"positive": [r.tokens[j] for j in pos], "negative": [r.tokens[j] for j in neg]})
        gaps.append(round(float(r.completeness_gap_rel), 5))
        if progress:
            progress(f"GrAInS: attributed prompt {i + 1} of {len(spec.pairs)}")
    if not pos_rows or not neg_rows:
        raise EmptySet(f"No prompt has a {'positively' if not pos_rows else 'negatively'} attributed token: "
                       "GrAInS needs tokens on both sides.")
    return _contrast(spec, model, pos_rows, pos_read, neg_rows, neg_read,
                     {"top_k": spec.top_k, "ig_steps": GRAINS_STEPS, "ig_gap_rel": gaps, "tokens": picked,
                      "prompts_with_positive": len(pos_rows), "prompts_with_negative": len(neg_rows)})


def _sae_direction(spec: DirectionSpec, model: LoadedModel) -> DirectionResult:
    from ..saes import load_sae, write_hook

    sae = load_sae(spec.sae)
    trained_on = sae.cfg.metadata.model_name
    if trained_on and not trained_for(trained_on, model.info):
        raise SAEMismatch(f"SAE {spec.sae!r} was trained on {trained_on!r}, not {spec.model!r}.")
    if spec.feature >= sae.cfg.d_sae:
        raise OutOfRange(f"Feature {spec.feature} does not exist: {spec.sae} has features 0–{sae.cfg.d_sae - 1}.")
    site = site_of_hook(write_hook(sae), model.info.n_layers)     # a transcoder's row acts at the MLP's output
    shape = ([model.info.n_heads, model.info.d_head] if site.component == Component.Z else [model.info.d_model])
    width = int(sae.W_dec.shape[1])
    if int(np.prod(shape)) != width:
        raise SAEMismatch(f"SAE {spec.sae!r} has width {width}; its hook has {int(np.prod(shape))}.")
    row = sae.W_dec[spec.feature].detach().float().cpu().numpy()
    return _result(spec, model, row, site=site.component.value, layer=site.layer, shape=shape,
                   made={"sae": spec.sae, "feature": spec.feature, "d_sae": int(sae.cfg.d_sae)})


@dataclass(frozen=True)
class Derived:
    """What a producing run gives for one of its directions."""
    vector: np.ndarray          # raw values at the hook, flattened
    site: str                   # a Component value (resid_pre, mlp_post, z, …)
    layer: int
    shape: tuple[int, ...]      # the vector's shape at its hook
    made: dict                  # how it was made (shown; the producing run's key is added)


def derived_spec(model: str, kind: str, run_key: str, part: str) -> DirectionSpec:
    """The spec of direction `part` of the stored run `run_key` of analysis `kind`."""
    return DirectionSpec(model=model, method="derived", source=f"{kind}:{run_key}:{part}")


def derive(model: str, kind: str, run_key: str, part: str, store=None):
    """Put direction `part` of a stored run into the directions table (idempotent: the
    producing module's deriver builds it; a second call reads it back). Returns the Outcome;
    its run_key is the direction_key that steer / read / ablate take."""
    from ..runner import run

    return run(derived_spec(model, kind, run_key, part), store=store)


def _derived_direction(spec: DirectionSpec, model: LoadedModel, store) -> DirectionResult:
    from ..store import default_store

    kind, run_key, part = spec.source.split(":")
    if kind not in DERIVERS:
        import importlib

        from ..runner import ANALYSES

        if kind in ANALYSES:   # registered analyses register their derivers at import
            importlib.import_module(ANALYSES[kind].compute.__module__)
    if kind not in DERIVERS:
        raise UnknownDirection(f"No analysis {kind!r} makes directions (source {spec.source!r}).")
    d = DERIVERS[kind](run_key, part, store or default_store())
    return _result(spec, model, d.vector, site=d.site, layer=d.layer, shape=list(d.shape),
                   made={**d.made, "from_run": run_key, "from_kind": kind, "part": part})


def sae_spec(model: str, sae: str, feature: int) -> DirectionSpec:
    return DirectionSpec(model=model, method="sae", sae=sae, feature=int(feature), site="resid_pre", layer=0)


# -- stored directions ---------------------------------------------------------------------
def load_direction(key: str, store=None) -> tuple[DirectionSpec, DirectionResult]:
    """A stored direction by its key (no model needed); UnknownDirection if there is none."""
    from ..store import default_store

    rec = (store or default_store()).get(key) if isinstance(key, str) and key else None
    if rec is None or rec["kind"] != DirectionSpec.KIND:
        raise UnknownDirection(f"No direction with key {key!r} in the store: make one first "
                               "(python -m backend direction …).")
    return Spec.from_dict(rec["spec"]), DirectionResult.from_record(rec["meta"], rec["arrays"])


def at_layer(spec: DirectionSpec, result: DirectionResult, layer: int, store=None):
    """The same direction at another layer, from the all-layer pass already stored: the new
    spec's result is built from `layer_vectors` and stored without running the model."""
    import time

    from ..runner import Outcome, lookup
    from ..store import default_store

    if not len(result.layer_vectors):
        raise InvalidSpec(f"A {spec.method} direction has no per-layer vectors.")
    if not 0 <= layer < len(result.layer_vectors):
        raise InvalidSite(f"Layer {layer} does not exist: the model has layers 0–{len(result.layer_vectors) - 1}.")
    new = dataclasses.replace(spec, layer=layer)
    store = store or default_store()
    hit = lookup(new, store)
    if hit is not None:
        return hit
    vec = result.layer_vectors[layer]
    made = dict(result.made)
    if result.method == "probe":
        made["bias"] = float(result.layer_bias[layer])
    r = DirectionResult(**{**{f: getattr(result, f) for f in result.__dataclass_fields__},
                           "layer": layer, "hook_name": hook_name(Site(Component(result.site), layer)),
                           "vector": vec, "norm": float(np.linalg.norm(vec.astype(np.float64))), "made": made})
    t = time.perf_counter()
    meta, arrays = r.to_record()
    store.put(new.key(), new.KIND, new.model, new.to_json(), meta, arrays, 0.0)
    return Outcome(new, r, new.key(), False, time.perf_counter() - t, 0.0, 0.0)


# -- CLI -----------------------------------------------------------------------------------
def add_cli_args(p) -> None:
    from ..model import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--positive-file", help="diff-means: prompts, one per line or JSON Lines {\"text\"}")
    p.add_argument("--negative-file")
    p.add_argument("--positive", action="append", help="a prompt (repeatable; actadd: exactly one)")
    p.add_argument("--negative", action="append")
    p.add_argument("--pairs-file", help="caa: JSON Lines {\"question\", \"positive\", \"negative\"}; grains: the "
                   "same with the prompt as question and the preferred / dispreferred next token")
    p.add_argument("--top-k", type=int, default=3, help="grains: tokens per prompt on each side")
    p.add_argument("--data-file", help="probe: CSV or JSON Lines {\"text\", \"label\"}")
    p.add_argument("--shipped", choices=list(SHIPPED), help="use a shipped set (data/directions)")
    p.add_argument("--sae")
    p.add_argument("--feature", type=int, default=-1)
    p.add_argument("--site", default=None, help="resid_pre (default; caa: resid_post), resid_post, …")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--position", choices=POSITIONS, default="last")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)


def spec_from_args(a) -> DirectionSpec:
    common = dict(model=a.model, method=a.method, site=a.site or DEFAULT_SITE.get(a.method, "resid_pre"),
                  position=a.position, chat=bool(a.chat or a.position == "post-instruction"),
                  test_fraction=a.test_fraction, seed=a.seed)
    if a.method == "derived":
        raise InvalidSpec("Derived directions are made by the runs that own them (das, probe-study); "
                          "they print the direction_key.")
    if a.method == "sae":
        if not a.sae:
            raise InvalidSpec("--method sae needs --sae and --feature.")
        return sae_spec(a.model, a.sae, a.feature)
    if a.layer is None:
        raise InvalidSite("--layer is required.")
    common["layer"] = a.layer
    if a.shipped:
        s = SHIPPED[a.shipped]
        if s["method"] != a.method:
            raise InvalidSpec(f"The shipped set {a.shipped!r} is for --method {s['method']}.")
        return shipped_spec(a.model, a.shipped, **{k: v for k, v in common.items() if k not in ("model", "method")})
    if a.method in ("diff-means", "actadd"):
        pos = (read_prompts(a.positive_file) if a.positive_file else []) + list(a.positive or [])
        neg = (read_prompts(a.negative_file) if a.negative_file else []) + list(a.negative or [])
        src = f"files:{a.positive_file},{a.negative_file}" if a.positive_file or a.negative_file else "arguments"
        return DirectionSpec(**common, positive=tuple(pos), negative=tuple(neg), source=src)
    if a.method in ("caa", "grains"):
        if not a.pairs_file:
            raise InvalidSpec(f"--method {a.method} needs --pairs-file.")
        extra = {"top_k": a.top_k} if a.method == "grains" else {}
        return DirectionSpec(**common, pairs=tuple(read_pairs(a.pairs_file)), source=f"file:{a.pairs_file}", **extra)
    if not a.data_file:
        raise InvalidSpec("--method probe needs --data-file.")
    texts, labels = read_labelled(a.data_file)
    return DirectionSpec(**common, texts=tuple(texts), labels=tuple(labels), source=f"file:{a.data_file}")


def direction_payload(out) -> dict:
    r = out.result
    d = {"direction_key": out.run_key, "run_key": out.run_key, "from_store": out.from_store,
         "compute_seconds": round(out.compute_seconds, 4), "model": out.spec.model, "method": r.method,
         "site": r.site, "layer": r.layer, "hook_name": r.hook_name, "shape": r.shape, "norm": r.norm,
         "vector": [float(v) for v in r.vector], "made": r.made}
    if r.method == "actadd":
        d["position_vectors"] = r.position_vectors.tolist()
    if len(r.layer_accuracy):
        d["accuracy_by_layer"] = [float(v) for v in r.layer_accuracy]
        d["separation_by_layer"] = [float(v) for v in r.layer_separation]
    return d


def run_cli(a) -> dict:
    import sys

    from ..runner import run

    out = run(spec_from_args(a), progress=lambda m: print(m, file=sys.stderr))
    return direction_payload(out)
