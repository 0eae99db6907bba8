"""Truth probe (SAPLMA, "The Internal State of an LLM Knows When it's Lying"): does one layer's
residual stream at a statement's last token tell true statements from false ones, on a topic the
probe never saw, better than asking the model?

Protocol. A statements set (default data/probes/statements.jsonl: six topics, each fact said
true and, with another fact's object swapped in, false). For each requested layer L the
activation is resid_post of block L at the statement's last token (Hugging Face
`hidden_states[L + 1]`), collected for the whole set in batched passes (activations.py).
Leave-one-topic-out: for each topic, the probes train on the other topics and are scored on it;
`mlp_acc` / `logreg_acc` are the unweighted means over held-out topics, `per_topic` the parts.

- MLP: the paper's classifier, hidden sizes 256, 128, 64 with ReLU and a sigmoid output; torch,
  seeded; minibatch Adam (lr 1e-3, batches of 200, `epochs` passes) on log-loss with an L2
  penalty of alpha / 2 * ||W||^2 / batch (alpha 1e-4) and Glorot-uniform initial weights: the
  recipe of scikit-learn's MLPClassifier, which the tests compare against.
- Logistic probe: L2-regularised logistic regression (C = 1, unpenalised intercept) fitted to
  convergence by L-BFGS in float64: the objective of scikit-learn's LogisticRegression.
Both read features standardised with the training split's mean and standard deviation (the
massive activations of a few dimensions would otherwise swamp the rest).

Few-shot baseline: the model's own answer. Each statement follows four worked examples
("Statement: … / True or False? True"), and the model is counted right when its next-token
logit for " True" exceeds that for " False" on a true statement (and the reverse on a false
one). Logits are read for those two tokens only (final norm, then two rows of W_U); the shared
few-shot prefix runs once and its keys and values are reused by every batch when the model has
a dense forward (kernels/forward.py), else each prompt runs whole.

Directions: `derive(model, "saplma", run_key, "L<layer>")` puts layer L's logistic probe,
refitted on all topics, into the directions table (read, add, ablate): the unit normal of the
probe in activation space, pointing from false to true, scaled by the projection of the
difference of the class means on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import InvalidSpec, OutOfRange
from ...runner import analysis
from ...spec import Result, Spec
from .activations import ProbeSetError, collect

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "data" / "probes" / "statements.jsonl"
SITE = "resid_post"
MIN_PER_CLASS = 10
HIDDEN = (256, 128, 64)
LR, BATCH, ALPHA = 1e-3, 200, 1e-4
FEW_SHOT = (("The sun rises in the east.", True), ("Fish build their nests in tall trees.", False),
            ("Ice is frozen water.", True), ("A circle has four corners.", False))
FEW_SHOT_HEAD = "Decide whether each statement is true or false.\n\n"
ANSWERS = (" True", " False")


def statements_path(source: str) -> Path:
    path = SHIPPED if source in ("", "shipped") else Path(source).expanduser()
    if not path.is_file():
        raise InvalidSpec(f"No statements file at {str(path)!r}.")
    return path


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def read_statements(path: Path) -> list[dict]:
    """Rows {text, label (1 true / 0 false), topic} of a JSON-lines file; InvalidSpec on a bad line."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            text, label, topic = r["text"], int(r["label"]), r["topic"]
        except (ValueError, KeyError, TypeError):
            raise InvalidSpec(f"{path.name} line {n}: want a JSON object with text, label (0/1) and topic.") from None
        if not isinstance(text, str) or not text.strip() or label not in (0, 1) or not isinstance(topic, str):
            raise InvalidSpec(f"{path.name} line {n}: text must be non-empty, label 0 or 1, topic a string.")
        rows.append({"text": text, "label": label, "topic": topic.strip()})
    return rows


@dataclass(frozen=True)
class SaplmaSpec(Spec):
    KIND = "saplma"
    statements: str = "shipped"      # "shipped" or a JSON-lines file (text, label, topic)
    digest: str = ""                 # the file's sha256 prefix (filled on creation: edits re-key)
    topics: tuple = ()               # the topics to use (default: every topic of the file)
    layers: tuple = ()               # blocks to probe (default: all)
    max_per_topic: int = 0           # at most this many true and this many false per topic (0: all)
    seed: int = 0
    epochs: int = 30                 # MLP passes over the training split

    def validate(self):
        path = statements_path(self.statements)
        if not self.digest:
            object.__setattr__(self, "digest", file_digest(path))
        object.__setattr__(self, "topics", tuple(str(t) for t in self.topics))
        try:
            object.__setattr__(self, "layers", tuple(sorted({int(x) for x in self.layers})))
        except (TypeError, ValueError):
            raise InvalidSpec(f"Layers must be integers, not {self.layers!r}.") from None
        if self.max_per_topic < 0 or (0 < self.max_per_topic < MIN_PER_CLASS):
            raise OutOfRange(f"max_per_topic must be 0 (all) or ≥ {MIN_PER_CLASS}, not {self.max_per_topic}.")
        if not 1 <= self.epochs <= 500:
            raise OutOfRange(f"epochs must be 1–500, not {self.epochs}.")


def select(spec: SaplmaSpec) -> list[dict]:
    """The statements of the run: the spec's topics, capped per topic and class (a seeded
    choice); ProbeSetError for a topic with no statements, one class or < 10 of either."""
    path = statements_path(spec.statements)
    if file_digest(path) != spec.digest:
        raise InvalidSpec(f"{path.name} changed since this run was specified (digest {spec.digest}).")
    rows = read_statements(path)
    present = list(dict.fromkeys(r["topic"] for r in rows))
    topics = list(spec.topics) or present
    empty = [t for t in topics if t not in present]
    if empty:
        raise ProbeSetError(f"Topic(s) {empty} have no statements in {path.name} (it has {present}).")
    if len(topics) < 2:
        raise ProbeSetError("Leave-one-topic-out needs at least two topics.")
    rng = np.random.default_rng(spec.seed)
    out = []
    for t in topics:
        for label in (1, 0):
            part = [r for r in rows if r["topic"] == t and r["label"] == label]
            if len(part) < MIN_PER_CLASS:
                kind = "true" if label else "false"
                raise ProbeSetError(f"Topic {t!r} has {len(part)} {kind} statements; each topic needs ≥ "
                                    f"{MIN_PER_CLASS} true and ≥ {MIN_PER_CLASS} false.")
            if spec.max_per_topic and len(part) > spec.max_per_topic:
                keep = sorted(rng.choice(len(part), spec.max_per_topic, replace=False))
                part = [part[i] for i in keep]
            out += part
    return out


# -- classifiers (shared with tcav.py) --------------------------------------------------------
@contextlib.contextmanager
def one_thread():
    """Small classifier fits run on one torch thread: on this 2-core machine under load, a
    576 x 256 Adam step took ~450 ms on two threads (spinning threads fighting the other
    processes) and ~12 ms on one. The previous setting is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def standardize(train: np.ndarray, *others: np.ndarray):
    """(train, *others) scaled by the training rows' mean and std (float64), and (mean, std)."""
    mu = train.mean(0)
    sd = train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return [(x - mu) / sd for x in (train, *others)], (mu, sd)


def fit_logreg(X: np.ndarray, y: np.ndarray, C: float = 1.0, max_iter: int = 300) -> tuple[np.ndarray, float]:
    """(w, b) of L2 logistic regression: minimises C * sum(log-loss) + ||w||^2 / 2 (no penalty on
    b), scikit-learn's LogisticRegression objective, by L-BFGS in float64."""
    import torch

    Xt = torch.as_tensor(X, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")
    n = len(y)

    def closure():
        opt.zero_grad()
        z = Xt @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, yt, reduction="sum") / n \
            + (w @ w) / (2 * C * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().numpy(), float(b.detach())


def fit_mlp(X: np.ndarray, y: np.ndarray, seed: int, epochs: int, hidden=HIDDEN):
    """The paper's MLP trained as scikit-learn's MLPClassifier trains (see the module doc);
    returns predict(X) -> probability of class 1."""
    import torch

    g = torch.Generator().manual_seed(int(seed))
    sizes = [X.shape[1], *hidden, 1]
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        W = ((torch.rand(fan_in, fan_out, generator=g) * 2 - 1) * bound).requires_grad_()
        b = ((torch.rand(fan_out, generator=g) * 2 - 1) * bound).requires_grad_()
        params += [W, b]

    def forward(x):
        for i in range(0, len(params), 2):
            x = x @ params[i] + params[i + 1]
            if i + 2 < len(params):
                x = torch.relu(x)
        return x[:, 0]

    Xt = torch.as_tensor(X, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    opt = torch.optim.Adam(params, lr=LR, betas=(0.9, 0.999), eps=1e-8)
    n = len(y)
    bs = min(BATCH, n)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            for s in range(0, n, bs):
                idx = order[s:s + bs]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(forward(Xt[idx]), yt[idx])
                loss = loss + ALPHA * 0.5 * sum((W * W).sum() for W in params[::2]) / len(idx)
                opt.zero_grad()
                loss.backward()
                opt.step()

    def predict(Z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(forward(torch.as_tensor(Z, dtype=torch.float32))).numpy()
    return predict


def loto(acts: np.ndarray, labels: np.ndarray, topic_of: np.ndarray, topics: list[str], seed: int,
         epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-topic-out accuracies (mlp [n_topics], logreg [n_topics]) of one layer's
    activations [n d]."""
    mlp, lr = [], []
    X64 = acts.astype(np.float64)
    for k, _ in enumerate(topics):
        tr, te = topic_of != k, topic_of == k
        (Xtr, Xte), _ = standardize(X64[tr], X64[te])
        predict = fit_mlp(Xtr, labels[tr], seed, epochs)
        mlp.append(float(np.mean((predict(Xte) > 0.5) == labels[te])))
        w, b = fit_logreg(Xtr, labels[tr])
        lr.append(float(np.mean(((Xte @ w + b) > 0) == labels[te])))
    return np.array(mlp), np.array(lr)


def probe_direction(acts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The logistic probe of all rows as a direction in activation space [d]: unit normal (false →
    true) times the projection of mean(true) - mean(false) on it."""
    X64 = acts.astype(np.float64)
    (Xs,), (_, sd) = standardize(X64)
    w, _ = fit_logreg(Xs, labels)
    u = w / sd                                   # the normal in raw coordinates
    u /= np.linalg.norm(u)
    gap = X64[labels == 1].mean(0) - X64[labels == 0].mean(0)
    return (u * float(u @ gap)).astype(np.float32)


# -- the few-shot baseline --------------------------------------------------------------------
def few_shot_prompt(text: str) -> str:
    shots = "".join(f"Statement: {s}\nTrue or False?{ANSWERS[0] if t else ANSWERS[1]}\n\n" for s, t in FEW_SHOT)
    return f"{FEW_SHOT_HEAD}{shots}Statement: {text}\nTrue or False?"


def few_shot_margins(model, texts: list[str], batch_size: int = 32, progress=None) -> np.ndarray:
    """logit(" True") - logit(" False") at the end of each statement's few-shot prompt [n]."""
    import torch

    from ..token_lens import single_token_id

    yes, no = (single_token_id(model, a) for a in ANSWERS)
    W_U, b_U = model.unembed_weights()
    ids = [model.encode(few_shot_prompt(t)) for t in texts]
    head = model.encode(few_shot_prompt("X").rsplit("Statement:", 1)[0] + "Statement:")
    final = _final_resid_with_prefix(model, ids, head, batch_size, progress)
    if final is None:
        last = model.info.n_layers - 1
        final = torch.as_tensor(collect(model, ids, [[-1]] * len(ids), [last], batch_size=batch_size,
                                        progress=progress)[0, :, 0])
    with model.lock, torch.inference_mode():
        normed = model.final_norm(final.to(W_U.device, W_U.dtype))                        # [n d]
        rows = W_U[[yes, no]]                                                             # [2 d]
        logit = normed @ rows.T + (b_U[[yes, no]] if b_U is not None else 0)
    return (logit[:, 0] - logit[:, 1]).double().cpu().numpy()


def _final_resid_with_prefix(model, ids, head, batch_size, progress):
    """The last block's output at each prompt's last token, [n d], with the shared prefix `head`
    run once (its keys and values reused per batch); None without a dense forward or when a
    prompt does not start with the prefix's tokens."""
    import torch

    from kernels.forward import FINAL, KVCache, dense_model, run

    dm = dense_model(model)
    P = len(head)
    if dm is None or any(i[:P] != head or len(i) <= P for i in ids):
        return None
    out = torch.zeros(len(ids), model.info.d_model)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad = model.eos_token_id if model.eos_token_id is not None else 0
    with model.lock:
        base = KVCache()
        run(dm, model.tensor([head]), capture=[FINAL], cache=base)
        for s in range(0, len(ids), batch_size):
            batch = order[s:s + batch_size]
            tails = [ids[i][P:] for i in batch]
            T = max(len(t) for t in tails)
            cache = KVCache()
            cache.k = {j: k.expand(len(batch), -1, -1, -1) for j, k in base.k.items()}
            cache.v = {j: v.expand(len(batch), -1, -1, -1) for j, v in base.v.items()}
            got = run(dm, model.tensor([t + [pad] * (T - len(t)) for t in tails]), capture=[FINAL],
                      cache=cache, position=P)[FINAL]                                   # [B T d]
            last = torch.as_tensor([len(t) - 1 for t in tails])
            out[batch] = got[torch.arange(len(batch)), last].float().cpu()
            if progress:
                progress(f"few-shot baseline: {min(s + batch_size, len(ids))}/{len(ids)}")
    return out


# -- the analysis --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SaplmaResult(Result):
    topics: list            # held-out topics, in order
    counts: dict            # topic -> {"true": n, "false": n}
    layers: list            # probed blocks
    site: str
    mlp_acc: np.ndarray     # [n_layers n_topics] held-out-topic accuracy
    logreg_acc: np.ndarray  # [n_layers n_topics]
    few_shot: np.ndarray    # [n_topics] the model's own few-shot accuracy per topic
    few_shot_acc: float     # over all statements
    directions: np.ndarray  # [n_layers d_model] each layer's all-topics logistic probe (module doc)

    def peak(self) -> int:
        return int(self.layers[int(np.argmax(self.mlp_acc.mean(1)))]) if len(self.layers) else -1

    def payload(self) -> dict:
        rows = []
        for i, layer in enumerate(self.layers):
            rows.append({"layer": int(layer), "mlp_acc": float(self.mlp_acc[i].mean()),
                         "logreg_acc": float(self.logreg_acc[i].mean()),
                         "per_topic": {t: {"mlp_acc": float(self.mlp_acc[i, k]), "logreg_acc": float(self.logreg_acc[i, k])}
                                       for k, t in enumerate(self.topics)}})
        return {"layers": rows, "few_shot_acc": float(self.few_shot_acc),
                "few_shot_per_topic": {t: float(self.few_shot[k]) for k, t in enumerate(self.topics)},
                "topics": list(self.topics), "counts": self.counts, "site": self.site, "peak_layer": self.peak()}


@analysis(SaplmaSpec, SaplmaResult)
def compute(spec: SaplmaSpec, model, progress=None) -> SaplmaResult:
    rows = select(spec)
    n_layers = model.info.n_layers
    layers = list(spec.layers) or list(range(n_layers))
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise OutOfRange(f"Layers {bad} do not exist: {model.info.model_id} has blocks 0–{n_layers - 1}.")
    topics = list(dict.fromkeys(r["topic"] for r in rows))
    labels = np.array([r["label"] for r in rows])
    topic_of = np.array([topics.index(r["topic"]) for r in rows])
    ids = [model.encode(r["text"]) for r in rows]
    acts = collect(model, ids, [[-1]] * len(ids), layers, SITE, progress=progress)[:, :, 0]   # [L n d]
    mlp = np.zeros((len(layers), len(topics)))
    lr = np.zeros_like(mlp)
    dirs = np.zeros((len(layers), model.info.d_model), np.float32)
    for i, layer in enumerate(layers):
        if progress:
            progress(f"probes: layer {layer} ({i + 1}/{len(layers)})")
        with one_thread():
            mlp[i], lr[i] = loto(acts[i], labels, topic_of, topics, spec.seed, spec.epochs)
            dirs[i] = probe_direction(acts[i], labels)
    margins = few_shot_margins(model, [r["text"] for r in rows], progress=progress)
    right = (margins > 0) == (labels == 1)
    return SaplmaResult(
        topics=topics, counts={t: {"true": int(((topic_of == k) & (labels == 1)).sum()),
                                   "false": int(((topic_of == k) & (labels == 0)).sum())} for k, t in enumerate(topics)},
        layers=[int(x) for x in layers], site=SITE, mlp_acc=mlp, logreg_acc=lr,
        few_shot=np.array([right[topic_of == k].mean() for k in range(len(topics))]),
        few_shot_acc=float(right.mean()), directions=dirs)


def _derive(run_key: str, part: str, store):
    from ...errors import DashboardError
    from ..directions import Derived

    rec = store.get(run_key)
    if rec is None or rec["kind"] != SaplmaSpec.KIND:
        raise DashboardError(f"No stored truth-probe run {run_key!r}.")
    layers = rec["meta"]["layers"]
    try:
        layer = int(part.lstrip("L"))
        i = layers.index(layer)
    except ValueError:
        raise InvalidSpec(f"Part {part!r}: want 'L<layer>' with a probed layer ({layers}).") from None
    vec = np.asarray(rec["arrays"]["directions"][i], np.float32)
    return Derived(vector=vec, site=rec["meta"]["site"], layer=layer, shape=(vec.shape[0],),
                   made={"probe": "logistic, all topics", "norm_rule": "unit normal x projected class-mean gap",
                         "held_out_logreg_acc": float(np.mean(rec["arrays"]["logreg_acc"][i])),
                         "held_out_mlp_acc": float(np.mean(rec["arrays"]["mlp_acc"][i]))})


def _register():
    from ..directions import DERIVERS

    DERIVERS[SaplmaSpec.KIND] = _derive


_register()


def derived_spec_of(model: str, run_key: str, layer: int):
    """The DirectionSpec of layer `layer`'s probe of stored run `run_key`."""
    from ..directions import derived_spec

    return derived_spec(model, SaplmaSpec.KIND, run_key, f"L{int(layer)}")


def layer_direction(model: str, run_key: str, layer: int, store=None):
    """Layer `layer`'s probe of stored run `run_key` as a direction (Outcome; run_key = direction_key)."""
    from ...runner import run

    return run(derived_spec_of(model, run_key, layer), store=store)


# -- CLI (probe-study --study saplma) ------------------------------------------------------------
def add_options(p) -> None:
    g = p.add_argument_group("saplma (truth probe)")
    g.add_argument("--statements-file", default="shipped", help="JSON lines {text, label, topic} (default: shipped)")
    g.add_argument("--topics", default="", help="comma list of topics (default: all in the file)")
    g.add_argument("--layers", default="all", help="all, or a comma list of blocks")
    g.add_argument("--max-per-topic", type=int, default=0, help="at most N true and N false per topic (0: all)")
    g.add_argument("--epochs", type=int, default=30, help="MLP epochs")
    g.add_argument("--direction-layer", type=int, default=None,
                   help="also store this layer's probe as a direction and print its direction_key")


def parse_layers(text: str) -> tuple:
    if not text or text.strip().lower() == "all":
        return ()
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InvalidSpec(f"--layers must be 'all' or a comma list of integers, not {text!r}.") from None


def spec_from_args(a) -> SaplmaSpec:
    return SaplmaSpec(model=a.model, statements=a.statements_file, layers=parse_layers(a.layers),
                      topics=tuple(t.strip() for t in a.topics.split(",") if t.strip()),
                      max_per_topic=a.max_per_topic, seed=a.seed, epochs=a.epochs)


def run_cli(a) -> dict:
    import sys

    from ...runner import run

    spec = spec_from_args(a)
    out = run(spec, progress=lambda m: print(m, file=sys.stderr))
    payload = {"run_key": out.run_key, "from_store": out.from_store, "model": spec.model,
               "compute_seconds": round(out.compute_seconds, 3), **out.result.payload()}
    if a.direction_layer is not None:
        payload["direction_key"] = layer_direction(spec.model, out.run_key, a.direction_layer).run_key
    return payload
