"""Massive activations (Sun et al. 2024): where they sit, what attends to them, what they do.

A massive activation is a scalar of the residual stream leaving a block (hook_resid_post)
with |value| ≥ abs_threshold and ≥ ratio_threshold × the median |value| of that layer
(the paper's criterion: 100 and 1000). Both are parameters, since small models have small
spikes; the per-layer ratios of the top values to the median are kept whatever they are.

MassiveSpec → MassiveResult, one prompt, one forward (kernels.massive.scan reduces every
layer on the fly). What is stored, per layer l (L layers, P positions, N = n_dims):
    top_values/positions/dims [L k]  the k largest |values|, signed (the paper's plot of the
                                     top-3 against the median)
    median [L]                       median |value| of the layer (lower middle for even counts)
    pos_max [L P]                    max |value| over dims: the layer × token heatmap
    dims [L N], dim_values [L N P]   the N dims with the largest |value| anywhere in the layer,
                                     and their signed value at every token
    rest_max [L P]                   max |value| of the other d_model − N dims at each token
The full token × dimension tensor of every layer (L × P × d_model floats, 17 MB at 256
tokens) is not kept: a spike is by definition in a few dims, so the N largest dims plus the
max of the rest show the "few spikes on a flat floor" picture for any layer; the other
dims are bounded by rest_max.
    massive                          the table: layer, position, token, dim, value, ratio
    attn_received [L H P]            attention each key position receives, per head, averaged
                                     over queries q ≥ 1 (query 0 can only attend to itself)
    sink_positions, sink_share [L H] positions carrying a massive activation at any layer, and
                                     the share of attention (same average) going to them

MassiveAblationSpec → MassiveAblationResult, the paper's intervention over several texts:
at the layer where massive activations first appear (over the texts, or a given layer),
every massive entry (position, dim) of each text is set to zero, and separately to the
mean of that dim's massive values over the texts; the next-token loss (token-weighted mean
cross-entropy over all texts) and perplexity are reported next to the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import EmptyPrompt, InvalidSpec, NoMassiveActivations
from ..model import LoadedModel
from ..runner import analysis
from ..sites import Component, Site, hook_name
from ..spec import Result, Spec, check_text

MAX_TABLE_ROWS = 2000
MAX_TEXTS = 256


def _check_thresholds(abs_threshold: float, ratio_threshold: float) -> None:
    for name, v in (("abs_threshold", abs_threshold), ("ratio_threshold", ratio_threshold)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise InvalidSpec(f"{name} must be a finite number ≥ 0, got {v!r}.")


@dataclass(frozen=True)
class MassiveSpec(Spec):
    KIND = "massive"
    text: str = ""
    top_k: int = 3
    abs_threshold: float = 100.0
    ratio_threshold: float = 1000.0
    n_dims: int = 8

    def validate(self):
        check_text(self.text)
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= 20:
            raise InvalidSpec(f"top_k must be an integer in 1–20, got {self.top_k!r}.")
        if not isinstance(self.n_dims, int) or not 1 <= self.n_dims <= 64:
            raise InvalidSpec(f"n_dims must be an integer in 1–64, got {self.n_dims!r}.")
        _check_thresholds(self.abs_threshold, self.ratio_threshold)


@dataclass(frozen=True)
class MassiveResult(Result):
    tokens: list[str]             # [P]
    token_ids: list[int]          # [P]
    abs_threshold: float
    ratio_threshold: float
    top_values: np.ndarray        # [L k] float32 signed, by |value| descending
    top_positions: np.ndarray     # [L k] int
    top_dims: np.ndarray          # [L k] int
    median: np.ndarray            # [L] float32
    pos_max: np.ndarray           # [L P] float32
    dims: np.ndarray              # [L N] int
    dim_values: np.ndarray        # [L N P] float32 signed
    rest_max: np.ndarray          # [L P] float32
    massive: list[dict]           # rows: layer, position, token, dim, value, ratio
    massive_truncated: bool       # more rows than MAX_TABLE_ROWS (largest kept)
    first_layer: int | None       # first layer with a massive activation
    massive_dims: list[int]       # dims carrying one, by count
    sink_positions: list[int]     # positions carrying one at any layer
    attn_received: np.ndarray     # [L H P] float32
    sink_share: np.ndarray        # [L H] float32

    def top_ratios(self) -> np.ndarray:
        """|top value| / layer median, [L k]."""
        return np.abs(self.top_values) / np.maximum(self.median, 1e-30)[:, None]


def summarise(scan, tokens: list[str], token_ids: list[int], batch: int = 0) -> MassiveResult:
    """A MassiveResult from one sequence of a kernels.massive.ResidScan."""
    b = batch
    rows = scan.massive[scan.massive[:, 0] == b]
    vals = scan.massive_values[scan.massive[:, 0] == b]
    median = scan.median[b]
    table = [{"layer": int(layer), "position": int(pos), "token": tokens[pos], "dim": int(dim),
              "value": float(v), "ratio": float(abs(v) / max(float(median[layer]), 1e-30))}
             for (_, layer, pos, dim), v in zip(rows, vals)]
    truncated = scan.massive_truncated or len(table) > MAX_TABLE_ROWS
    if len(table) > MAX_TABLE_ROWS:
        table = sorted(sorted(table, key=lambda r: -abs(r["value"]))[:MAX_TABLE_ROWS],
                       key=lambda r: (r["layer"], r["position"], r["dim"]))
    dims, counts = np.unique(rows[:, 3], return_counts=True)
    sink = sorted({int(p) for p in rows[:, 2]})
    attn = scan.attn_received[b]                                  # [L H P]
    share = attn[:, :, sink].sum(axis=2) if sink else np.zeros(attn.shape[:2], np.float32)
    return MassiveResult(
        tokens=list(tokens), token_ids=[int(i) for i in token_ids],
        abs_threshold=scan.abs_threshold, ratio_threshold=scan.ratio_threshold,
        top_values=scan.top_values[b], top_positions=scan.top_positions[b],
        top_dims=scan.top_dims[b], median=scan.median[b], pos_max=scan.pos_max[b],
        dims=scan.dims[b], dim_values=scan.dim_values[b], rest_max=scan.rest_max[b],
        massive=table, massive_truncated=bool(truncated),
        first_layer=int(rows[:, 1].min()) if len(rows) else None,
        massive_dims=[int(d) for d in dims[np.argsort(-counts, kind="stable")]],
        sink_positions=sink, attn_received=attn.astype(np.float32),
        sink_share=share.astype(np.float32))


@analysis(MassiveSpec, MassiveResult)
def compute(spec: MassiveSpec, model: LoadedModel, progress=None) -> MassiveResult:
    from kernels.massive import scan

    if spec.n_dims > model.info.d_model:
        raise InvalidSpec(f"n_dims must be ≤ d_model ({model.info.d_model}).")
    ids = model.encode(spec.text)
    result, _ = scan(model, model.tensor(ids), top_k=spec.top_k, n_dims=spec.n_dims,
                     abs_threshold=spec.abs_threshold, ratio_threshold=spec.ratio_threshold,
                     attention=True)
    return summarise(result, model.str_tokens(ids), ids)


# ----------------------------------------------------------------------------------------
# The intervention experiment


@dataclass(frozen=True)
class MassiveAblationSpec(Spec):
    KIND = "massive_ablation"
    texts: tuple[str, ...] = ()
    abs_threshold: float = 100.0
    ratio_threshold: float = 1000.0
    layer: int | None = None      # None: the first layer where any text has one

    def validate(self):
        if isinstance(self.texts, list):
            object.__setattr__(self, "texts", tuple(self.texts))
        if not isinstance(self.texts, tuple) or not self.texts:
            raise InvalidSpec("texts must be a non-empty list of texts.")
        if len(self.texts) > MAX_TEXTS:
            raise InvalidSpec(f"At most {MAX_TEXTS} texts, got {len(self.texts)}.")
        for t in self.texts:
            check_text(t)
        _check_thresholds(self.abs_threshold, self.ratio_threshold)
        if self.layer is not None and (not isinstance(self.layer, int) or isinstance(self.layer, bool)
                                       or self.layer < 0):
            raise InvalidSpec(f"layer must be an integer ≥ 0 or empty, got {self.layer!r}.")


@dataclass(frozen=True)
class MassiveAblationResult(Result):
    layer: int                    # where the intervention happens (hook_resid_post)
    layer_chosen: str             # "first appearance" or "given"
    abs_threshold: float
    ratio_threshold: float
    dims: list[int]               # dims of the ablated entries
    mean_values: list[dict]       # per dim: dim, mean, std, count (over the texts' entries)
    entries: list[dict]           # ablated: text, position, token, dim, value
    n_texts: int
    n_tokens: int                 # predicted tokens (Σ over texts of len − 1)
    loss_original: float          # mean next-token cross-entropy, nats
    loss_zero: float
    loss_mean: float
    ppl_original: float
    ppl_zero: float
    ppl_mean: float
    text_losses: np.ndarray       # [n_texts 3] float64: original, zero, mean
    text_tokens: np.ndarray       # [n_texts] int: predicted tokens per text
    text_entries: np.ndarray      # [n_texts] int: entries ablated per text


def _nll_sum(logits, ids) -> float:
    """Σ over positions of −log p(next token): logits [P V], ids [P]."""
    import torch

    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    target = torch.as_tensor(ids[1:], device=logits.device)
    return float(-logp.gather(1, target[:, None]).sum())


@analysis(MassiveAblationSpec, MassiveAblationResult)
def compute_ablation(spec: MassiveAblationSpec, model: LoadedModel, progress=None) -> MassiveAblationResult:
    import torch

    from kernels.massive import scan

    n_layers = model.info.n_layers
    if spec.layer is not None:
        Site(Component.RESID_POST, spec.layer).check(n_layers, model.info.n_heads)
    all_ids = [model.encode(t) for t in spec.texts]
    for k, ids in enumerate(all_ids):
        if len(ids) < 2:
            raise EmptyPrompt(f"Text {k + 1} has {len(ids)} token; each text needs at least two "
                              "(the loss predicts each token from the ones before).")
    # Pass 1: the original loss and the massive entries of every layer, in one forward each.
    nll_orig, found = [], []
    for k, ids in enumerate(all_ids):
        if progress:
            progress(f"original pass: text {k + 1}/{len(all_ids)}")
        s, logits = scan(model, model.tensor(ids), abs_threshold=spec.abs_threshold,
                         ratio_threshold=spec.ratio_threshold, keep_logits=True)
        nll_orig.append(_nll_sum(logits[0], ids))
        found.append((s.massive[:, 1:], s.massive_values))       # (layer, pos, dim), value
    if spec.layer is None:
        layers = [int(m[:, 0].min()) for m, _ in found if len(m)]
        if not layers:
            raise NoMassiveActivations(
                f"No activation meets the criterion (|value| ≥ {spec.abs_threshold:g} and ≥ "
                f"{spec.ratio_threshold:g} × the layer median) on these texts: lower the thresholds.")
        layer = min(layers)
    else:
        layer = spec.layer
    per_text = [(m[m[:, 0] == layer][:, 1:], v[m[:, 0] == layer]) for m, v in found]
    if not any(len(e) for e, _ in per_text):
        raise NoMassiveActivations(f"No activation meets the criterion at layer {layer} on these texts.")
    all_entries = np.concatenate([e for e, _ in per_text])
    all_values = np.concatenate([v for _, v in per_text]).astype(np.float64)
    dims = sorted({int(d) for d in all_entries[:, 1]})
    means = {d: float(all_values[all_entries[:, 1] == d].mean()) for d in dims}
    mean_table = [{"dim": d, "mean": means[d], "std": float(all_values[all_entries[:, 1] == d].std()),
                   "count": int((all_entries[:, 1] == d).sum())} for d in dims]
    # Pass 2: a batch of two per text: row 0 zeroed, row 1 set to the means.
    site = hook_name(Site(Component.RESID_POST, layer))
    nll_zero, nll_mean = [], []
    for k, (ids, (entries, _)) in enumerate(zip(all_ids, per_text)):
        if not len(entries):  # nothing to ablate: the run is the original one
            nll_zero.append(nll_orig[k])
            nll_mean.append(nll_orig[k])
            continue
        if progress:
            progress(f"ablated passes: text {k + 1}/{len(all_ids)}")
        pos = torch.as_tensor(entries[:, 0])
        dim = torch.as_tensor(entries[:, 1])
        fill = torch.tensor([means[int(d)] for d in entries[:, 1]])
        fired = []

        def ablate(x, hook, pos=pos, dim=dim, fill=fill):  # x: [2 P D]
            x = x.clone()
            x[0, pos, dim] = 0.0
            x[1, pos, dim] = fill.to(x.dtype)
            fired.append(True)
            return x

        with model.lock, torch.inference_mode():
            logits = model.run_with_hooks([ids, ids], fwd_hooks=[(site, ablate)],
                                                 return_type="logits")
        if not fired:
            raise RuntimeError(f"the ablation hook at {site} did not fire")
        nll_zero.append(_nll_sum(logits[0], ids))
        nll_mean.append(_nll_sum(logits[1], ids))
    n_tok = np.array([len(ids) - 1 for ids in all_ids])
    total = int(n_tok.sum())
    loss = [sum(x) / total for x in (nll_orig, nll_zero, nll_mean)]
    table = []
    for k, (ids, (entries, values)) in enumerate(zip(all_ids, per_text)):
        for (p, d), v in zip(entries, values):
            table.append({"text": k, "position": int(p), "token": model.tokenizer.decode([ids[p]]),
                          "dim": int(d), "value": float(v)})
    return MassiveAblationResult(
        layer=layer, layer_chosen="given" if spec.layer is not None else "first appearance",
        abs_threshold=spec.abs_threshold, ratio_threshold=spec.ratio_threshold,
        dims=dims, mean_values=mean_table, entries=table[:MAX_TABLE_ROWS],
        n_texts=len(all_ids), n_tokens=total,
        loss_original=loss[0], loss_zero=loss[1], loss_mean=loss[2],
        ppl_original=math.exp(loss[0]), ppl_zero=_safe_exp(loss[1]), ppl_mean=_safe_exp(loss[2]),
        text_losses=np.stack([np.array(nll_orig), np.array(nll_zero), np.array(nll_mean)], axis=1)
        / n_tok[:, None],
        text_tokens=n_tok.astype(np.int64),
        text_entries=np.array([len(e) for e, _ in per_text], dtype=np.int64))


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


# ----------------------------------------------------------------------------------------
# Command line: python -m backend massive / massive-ablation


def add_cli_args(p) -> None:
    from ..model import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--text", required=True)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--abs-threshold", "--threshold", type=float, default=100.0,
                   help="smallest |value| counted as massive (default 100)")
    p.add_argument("--ratio-threshold", type=float, default=1000.0,
                   help="smallest |value| / layer median counted as massive (default 1000)")
    p.add_argument("--n-dims", type=int, default=8)


def run_cli(a) -> dict:
    from ..runner import run

    out = run(MassiveSpec(model=a.model, text=a.text, top_k=a.top_k, abs_threshold=a.abs_threshold,
                          ratio_threshold=a.ratio_threshold, n_dims=a.n_dims))
    r = out.result
    ratios = r.top_ratios()
    layers = []
    for layer in range(len(r.median)):
        layers.append({
            "layer": layer, "site": "resid_post", "median": float(r.median[layer]),
            "top": [{"value": float(v), "position": int(p), "dim": int(d), "token": r.tokens[int(p)],
                     "ratio": float(q)}
                    for v, p, d, q in zip(r.top_values[layer], r.top_positions[layer],
                                          r.top_dims[layer], ratios[layer])],
            "n_massive": sum(1 for row in r.massive if row["layer"] == layer)})
    return {"run_key": out.run_key, "from_store": out.from_store,
            "compute_seconds": round(out.compute_seconds, 4), "read_seconds": round(out.read_seconds, 4),
            "model": a.model, "text": a.text, "tokens": r.tokens, "token_ids": r.token_ids,
            "criterion": {"abs_threshold": r.abs_threshold, "ratio_threshold": r.ratio_threshold},
            "first_layer": r.first_layer, "massive_dims": r.massive_dims, "layers": layers,
            "massive": r.massive, "massive_truncated": r.massive_truncated,
            "sink": {"positions": r.sink_positions,
                     "share": [[round(float(x), 6) for x in row] for row in r.sink_share]}}


def add_ablation_cli_args(p) -> None:
    from ..model import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--text", action="append", default=[], help="a held-out text (repeatable)")
    p.add_argument("--texts-file", help="a UTF-8 file of texts separated by blank lines")
    p.add_argument("--abs-threshold", "--threshold", type=float, default=100.0)
    p.add_argument("--ratio-threshold", type=float, default=1000.0)
    p.add_argument("--layer", type=int, default=None, help="default: where they first appear")


def run_ablation_cli(a) -> dict:
    from ..runner import run

    texts = list(a.text)
    if a.texts_file:
        try:
            with open(a.texts_file, encoding="utf-8") as fh:
                texts += [t.strip() for t in fh.read().split("\n\n") if t.strip()]
        except OSError as e:
            raise InvalidSpec(f"Cannot read {a.texts_file!r}: {e.strerror}.") from None
    out = run(MassiveAblationSpec(model=a.model, texts=tuple(texts), abs_threshold=a.abs_threshold,
                                  ratio_threshold=a.ratio_threshold, layer=a.layer))
    r = out.result
    return {"run_key": out.run_key, "from_store": out.from_store,
            "compute_seconds": round(out.compute_seconds, 4), "model": a.model,
            "layer": r.layer, "layer_chosen": r.layer_chosen, "dims": r.dims,
            "mean_values": r.mean_values, "n_texts": r.n_texts, "n_tokens": r.n_tokens,
            "loss": {"original": r.loss_original, "zero": r.loss_zero, "mean": r.loss_mean},
            "perplexity": {"original": r.ppl_original, "zero": r.ppl_zero, "mean": r.ppl_mean},
            "entries": r.entries}
