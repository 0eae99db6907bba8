"""CLUE: verifying the model's own reasoning traces from the hidden states ("Non-parametric
Verification from Experience via Hidden-State Clustering").

Protocol, as the paper frames it, on a task this project ships (data/probes/clue_problems.jsonl:
one-digit sums and differences, two-digit + one-digit sums and one-digit word sums, written
here and chosen so that SmolLM2 answers about a third of the traces correctly):

1. **Traces.** Each problem is put after a few worked examples (`SHOTS`: "Question: …\\nAnswer:
   12 + 25 = 37.") and the model samples `n_samples` answers at `temperature`. Sample j of every
   problem uses seed `seed · 100003 + j`; problems whose prompts have the same length sample in
   one batch (the model interface seeds each row alike, so rows of one batch are *different*
   problems and samples of one problem come from different seeds). A trace is the sampled text up
   to its first newline (or end of text); it is correct when its last integer equals the answer.
2. **Summary.** Each trace is summarised, at every layer, by the hidden-state change
   δ = h(last token of the trace) − h(last token of the prompt), at the block output
   (resid_post). The states are recorded while sampling (an intervention that returns its input
   unchanged at every layer; generation feeds each drawn token back in), not by a second pass
   over prompt + trace: that pass (the shared collector, probes/activations.py) would cost as
   much again as sampling, whose prompt prefill dominates. Equal to run_with_cache (tested).
3. **Experience.** Problems are split (stratified by kind, `test_fraction` held out); the training
   traces give a success centroid μ⁺ and a failure centroid μ⁻ per layer.
4. **Verification** on held-out problems: a trace is judged correct when it is nearer μ⁺ than μ⁻
   (Euclidean); score = ‖δ − μ⁻‖ − ‖δ − μ⁺‖; accuracy and AUROC per layer. Baselines: the mean
   token log-probability of the trace and the probability of its final number's tokens (both at
   temperature 1, from the recorded states: the last block's output through the final norm and the
   unembedding), each with AUROC and the accuracy of a threshold fitted on the training traces.
5. **Reranking** on held-out problems: top-1 accuracy of the candidate nearest μ⁺, against
   majority vote over the parsed answers (ties: the answer that appeared first) and against the
   most confident candidate (highest mean log-probability). The layer used is chosen on the
   training problems alone (two-fold AUROC within the training split); every layer's figure is kept
   too. `random` (mean correctness) and `oracle` (some candidate is correct) frame the numbers.

Difficulty: the mix of kinds and the temperature set the fraction of correct traces
(`class_balance`). With the defaults SmolLM2-135M-Instruct lands between 25 % and 75 % (measured
figures in the README); a set where the training split has no correct or no wrong trace is a
typed error (`ProbeSetError`), nothing stored.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import settings
from ...errors import InvalidSpec, OutOfRange
from ...model import LoadedModel
from ...runner import analysis
from ...spec import Result, Spec
from .activations import ProbeSetError

DATA = settings.DATA_DIR / "probes" / "clue_problems.jsonl"
SHOTS = (("What is 12 + 25?", "12 + 25 = 37."),
         ("Ben had 48 cards. He gave away 16 of them. How many cards does Ben have left?", "48 - 16 = 32."),
         ("What is 74 - 31?", "74 - 31 = 43."),
         ("Ana has 21 shells. She finds 34 more. How many shells does Ana have now?", "21 + 34 = 55."))
SITE = "resid_post"
MIN_PROBLEMS = 4
MAX_PROBLEMS = 400
SEED_STRIDE = 100003
CHUNK = 32
_NUMBER = re.compile(r"-?\d+")


# -- the task ------------------------------------------------------------------------------
def read_problems(path: str | Path = DATA) -> list[tuple[str, str, int]]:
    """(kind, question, answer) from JSON Lines {"kind", "question", "answer"}."""
    p = Path(path)
    if not p.is_file():
        raise ProbeSetError(f"No such problems file: {path}.")
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProbeSetError(f"{path}, line {i}: not JSON ({e.msg}).") from None
        if not isinstance(r, dict) or not isinstance(r.get("question"), str) or isinstance(r.get("answer"), bool) \
                or not isinstance(r.get("answer"), int):
            raise ProbeSetError(f"{path}, line {i}: needs a \"question\" string and an integer \"answer\".")
        rows.append((str(r.get("kind", "problem")), r["question"], int(r["answer"])))
    return rows


def prompt_text(shots, question: str) -> str:
    return "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots) + f"Question: {question}\nAnswer:"


def parse_answer(text: str) -> int | None:
    """The trace's final number (its last integer), or None."""
    nums = _NUMBER.findall(text)
    return int(nums[-1]) if nums else None


@dataclass(frozen=True)
class ClueSpec(Spec):
    KIND = "probe-clue"
    problems: tuple[tuple[str, str, int], ...] = ()     # (kind, question, answer)
    shots: tuple[tuple[str, str], ...] = SHOTS          # worked examples before each question
    n_samples: int = 6
    temperature: float = 1.0
    max_new_tokens: int = 16
    test_fraction: float = 0.5
    seed: int = 0
    source: str = ""                                    # where the problems came from (shown)

    def validate(self):
        if len(self.problems) < MIN_PROBLEMS:
            raise ProbeSetError(f"CLUE needs at least {MIN_PROBLEMS} problems (training and held-out ones); "
                                f"{len(self.problems)} given.")
        if len(self.problems) > MAX_PROBLEMS:
            raise InvalidSpec(f"At most {MAX_PROBLEMS} problems ({len(self.problems)} given).")
        for p in self.problems:
            if len(p) != 3 or not isinstance(p[1], str) or not p[1].strip() or isinstance(p[2], bool) \
                    or not isinstance(p[2], int):
                raise ProbeSetError(f"A problem is (kind, question, integer answer), not {p!r}.")
        if any(len(s) != 2 or not all(isinstance(x, str) and x.strip() for x in s) for s in self.shots):
            raise InvalidSpec("Each worked example is (question, answer text).")
        if isinstance(self.n_samples, bool) or not 2 <= self.n_samples <= 32:
            raise OutOfRange(f"n_samples must be in 2–32 (a rerank needs candidates), not {self.n_samples}.")
        if not 0.05 <= self.temperature <= 2.0:
            raise OutOfRange(f"The temperature must be in 0.05–2 (sampling), not {self.temperature}.")
        if not 4 <= self.max_new_tokens <= 64:
            raise OutOfRange(f"max_new_tokens must be in 4–64, not {self.max_new_tokens}.")
        if not 0.1 <= self.test_fraction <= 0.9:
            raise OutOfRange("test_fraction must be in 0.1–0.9.")


@dataclass(frozen=True)
class ClueResult(Result):
    layers: list[int]
    accuracy: np.ndarray           # [L] held-out verification accuracy of the nearest centroid
    auroc: np.ndarray              # [L] held-out AUROC of ‖δ − μ⁻‖ − ‖δ − μ⁺‖
    cv_auroc: np.ndarray           # [L] two-fold AUROC inside the training split (picks the rerank layer)
    baselines: dict                # {"mean_logprob" | "answer_prob": {"auroc", "accuracy", "threshold"}}
    rerank: dict                   # top-1 accuracies on held-out problems (see the module doc)
    rerank_by_layer: np.ndarray    # [L] top-1 accuracy of the nearest-μ⁺ candidate at each layer
    class_balance: float           # fraction of correct traces (all problems)
    balance: dict                  # {"train", "test", "by_kind": {kind: fraction}, "n_traces"}
    problem: np.ndarray            # [N] problem index of each trace
    split: np.ndarray              # [n_problems] 0 train, 1 held out
    traces: list[str]              # [N] the trace texts
    parsed: list                   # [N] parsed final number or None
    correct: np.ndarray            # [N] 1 / 0
    trace_tokens: np.ndarray       # [N] trace length in tokens
    mean_logprob: np.ndarray       # [N]
    answer_prob: np.ndarray        # [N]
    scores: np.ndarray             # [L N] ‖δ − μ⁻‖ − ‖δ − μ⁺‖
    dist_success: np.ndarray       # [L N] ‖δ − μ⁺‖
    centroids: np.ndarray          # [2 L d_model] μ⁺, μ⁻ (float32)
    made: dict                     # site, prompt length, timings, seeds


# -- statistics (plain numpy, tested against scikit-learn) ---------------------------------
def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count ½
    (the Mann–Whitney U statistic over n⁺·n⁻). NaN when a class is missing."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):                                   # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def centroid_scores(deltas: np.ndarray, success: np.ndarray, failure: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score, ‖δ − μ⁺‖) for deltas [L n d] and centroids [L d]; score = ‖δ − μ⁻‖ − ‖δ − μ⁺‖,
    > 0: nearer the success centroid."""
    d_s = np.linalg.norm(deltas - success[:, None], axis=-1)
    d_f = np.linalg.norm(deltas - failure[:, None], axis=-1)
    return d_f - d_s, d_s


def centroids(deltas: np.ndarray, correct: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Success and failure centroids [L d] of the traces `rows`; ProbeSetError if a class is empty."""
    y = correct[rows].astype(bool)
    if y.all() or not y.any():
        raise ProbeSetError(f"The training traces are all {'correct' if y.all() else 'wrong'}: CLUE needs both "
                            "successes and failures as experience. Use more problems or samples, a higher "
                            "temperature, or harder (easier) problems.")
    x = deltas[:, rows].astype(np.float64)
    return x[:, y].mean(1), x[:, ~y].mean(1)


def fit_threshold(values: np.ndarray, labels: np.ndarray) -> float:
    """The threshold t maximising training accuracy of `value > t → correct` (midpoints)."""
    v = np.sort(np.unique(values))
    cands = np.concatenate([[v[0] - 1.0], (v[:-1] + v[1:]) / 2, [v[-1] + 1.0]]) if len(v) else np.array([0.0])
    y = labels.astype(bool)
    accs = [((values > t) == y).mean() for t in cands]
    return float(cands[int(np.argmax(accs))])


def majority(answers: list) -> int:
    """The index of the majority-vote candidate: the most frequent parsed answer (ties: the one
    that appeared first), its first occurrence; 0 when nothing parses."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0
    best = max(counts.values())
    for i, a in enumerate(answers):
        if a is not None and counts[a] == best:
            return i
    return 0


def split_problems(kinds: list[str], test_fraction: float, seed: int) -> np.ndarray:
    """0 (train) / 1 (held out) per problem, stratified by kind; each side gets ≥ 1 problem."""
    rng = np.random.default_rng(seed)
    split = np.zeros(len(kinds), np.int64)
    ks = np.array(kinds)
    for k in sorted(set(kinds)):
        idx = rng.permutation(np.flatnonzero(ks == k))
        split[idx[:int(round(test_fraction * len(idx)))]] = 1
    for side in (0, 1):                                  # tiny sets: never an empty side
        if not (split == side).any():
            split[rng.integers(len(split))] = side
    return split


# -- the model's traces and their hidden states -------------------------------------------
@dataclass
class Traces:
    """What sampling gives: per problem and sample, the trace's ids, its δ [L d] and the
    log-probabilities of its tokens."""
    ids: list                      # [problem][sample] -> list[int]
    deltas: list                   # [problem][sample] -> np.ndarray [L d] (float32)
    logp: list                     # [problem][sample] -> np.ndarray [k]


def sample_traces(model: LoadedModel, prompts: list[list[int]], n_samples: int, max_new_tokens: int,
                  temperature: float, seed: int, progress=None) -> Traces:
    """Sample each prompt `n_samples` times and read every trace's hidden states on the way.

    Rows of one generate call are problems with prompts of equal length (the call wants equal
    lengths and seeds every row alike); sample j uses seed · SEED_STRIDE + j. A recording
    intervention at every layer's block output keeps the state at the prompt's last position and
    at every generated position (generation feeds each sampled token back in, so the state at the
    trace's last token is there once one more token has been drawn: hence max_new_tokens + 1).
    The log-probabilities (temperature 1) come from the last block's recorded output through the
    final norm and the unembedding. tests/test_probes_clue.py checks both against run_with_cache.
    """
    import torch

    from ...sites import Component, Site, hook_name

    L = model.info.n_layers
    names = [hook_name(Site(Component(SITE), layer)) for layer in range(L)]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    out = Traces(*[[[None] * n_samples for _ in prompts] for _ in range(3)])
    eos = model.eos_token_id
    calls, done = sum(-(-len(m) // CHUNK) for m in groups.values()) * n_samples, 0
    for j in range(n_samples):
        for P, members in groups.items():
            for s in range(0, len(members), CHUNK):
                rows = members[s:s + CHUNK]
                rec: dict[int, dict[int, object]] = {li: {} for li in range(L)}

                def keeper(li):
                    def fn(x, pos, hook):                      # x [B p d]; keep positions ≥ P − 1
                        for k, q in enumerate(pos.tolist()):
                            if q >= P - 1:
                                rec[li][q] = x[:, k].detach().float().cpu()
                        return x
                    return fn
                gen = model.generate([prompts[i] for i in rows], max_new_tokens + 1, temperature=temperature,
                                     seed=seed * SEED_STRIDE + j, interventions=[(n, keeper(li))
                                                                                  for li, n in enumerate(names)])
                for b, (i, g) in enumerate(zip(rows, gen)):
                    t = cut_trace(model, g[:max_new_tokens], eos)
                    end = P - 1 + len(t)
                    if end not in rec[0]:                      # the last token was never fed: read it
                        t = t[:-1] or t
                        end = P - 1 + len(t)
                    if end not in rec[0]:
                        raise RuntimeError("a trace's hidden state was not recorded")
                    out.ids[i][j] = t
                    out.deltas[i][j] = torch.stack([rec[li][end][b] - rec[li][P - 1][b] for li in range(L)]).numpy()
                    fin = torch.stack([rec[L - 1][P - 1 + k][b] for k in range(len(t))]).to(settings.device())
                    with torch.inference_mode():
                        lp = model.logits_from_resid(fin).float().log_softmax(-1)
                    out.logp[i][j] = lp[torch.arange(len(t)), torch.as_tensor(t, device=lp.device)].double().cpu().numpy()
                done += 1
                if progress:
                    progress(f"CLUE: sampling {done}/{calls} batches")
    return out


def cut_trace(model: LoadedModel, ids: list[int], eos: int | None) -> list[int]:
    """Tokens before the first one holding a newline (or the end of text); at least one token."""
    keep = []
    for t in ids:
        if t == eos or "\n" in model.decode([t]):
            break
        keep.append(t)
    return keep or list(ids[:1])


def answer_tokens(model: LoadedModel, trace: list[int]) -> list[int]:
    """Indices of the trace tokens that spell its final number (empty when there is none)."""
    text = model.decode(trace)
    spans = list(_NUMBER.finditer(text))
    if not spans:
        return []
    s, e = spans[-1].span()
    idx, prev = [], 0
    for j in range(len(trace)):
        end = len(model.decode(trace[:j + 1]))
        if end > s and prev < e:
            idx.append(j)
        prev = end
    return idx


# -- compute -------------------------------------------------------------------------------
@analysis(ClueSpec, ClueResult)
def compute(spec: ClueSpec, model: LoadedModel, progress=None) -> ClueResult:
    info = model.info
    layers = list(range(info.n_layers))
    prompts = [model.encode(prompt_text(spec.shots, q)) for _, q, _ in spec.problems]
    t0 = time.perf_counter()
    sampled = sample_traces(model, prompts, spec.n_samples, spec.max_new_tokens, spec.temperature, spec.seed,
                            progress)
    t1 = time.perf_counter()
    n_p, n_s = len(prompts), spec.n_samples
    problem = np.repeat(np.arange(n_p), n_s)
    traces = [sampled.ids[p][j] for p in range(n_p) for j in range(n_s)]
    deltas = np.stack([sampled.deltas[p][j] for p in range(n_p) for j in range(n_s)], 1)     # [L N d]
    logps = [sampled.logp[p][j] for p in range(n_p) for j in range(n_s)]
    lengths = np.array([len(t) for t in traces])
    texts = [model.decode(t) for t in traces]
    parsed = [parse_answer(t) for t in texts]
    correct = np.array([a is not None and a == spec.problems[p][2] for a, p in zip(parsed, problem)], np.int64)
    mean_lp = np.array([float(lp.mean()) for lp in logps])
    ans_prob = np.array([float(np.exp(lp[answer_tokens(model, t)].sum())) if a is not None else 0.0
                         for lp, t, a in zip(logps, traces, parsed)])

    kinds = [k for k, _, _ in spec.problems]
    split = split_problems(kinds, spec.test_fraction, spec.seed)
    v = verify(deltas, correct, problem, split, parsed, mean_lp, ans_prob, spec.seed)
    train, test = v.pop("train"), v.pop("test")
    by_kind = {k: float(correct[[i for i in range(len(traces)) if kinds[problem[i]] == k]].mean())
               for k in sorted(set(kinds))}
    balance = {"train": float(correct[train].mean()), "test": float(correct[test].mean()), "by_kind": by_kind,
               "n_traces": len(traces), "n_train_traces": int(len(train)), "n_test_traces": int(len(test))}
    made = {"site": SITE, "prompt_tokens": int(np.mean([len(p) for p in prompts])),
            "sample_seconds": round(t1 - t0, 2),
            "seeds": f"sample j of every problem: seed·{SEED_STRIDE} + j", "logprob_temperature": 1.0,
            "source": spec.source}
    return ClueResult(layers=layers, class_balance=float(correct.mean()), balance=balance, problem=problem,
                      split=split, traces=texts, parsed=parsed, correct=correct, trace_tokens=lengths.astype(np.int64),
                      mean_logprob=mean_lp, answer_prob=ans_prob, made=made, **v)


def verify(deltas: np.ndarray, correct: np.ndarray, problem: np.ndarray, split: np.ndarray, parsed: list,
           mean_lp: np.ndarray, ans_prob: np.ndarray, seed: int) -> dict:
    """Steps 3–5 of the protocol on plain arrays: δ [L N d], correct [N] 0/1, problem [N] (index of
    each trace's problem), split [n_problems] (1: held out), parsed [N] answers, the two baseline
    scores [N]. Returns the ClueResult fields it makes (and the train / test trace indices)."""
    L = deltas.shape[0]
    train = np.flatnonzero(split[problem] == 0)
    test = np.flatnonzero(split[problem] == 1)
    y_test = correct[test]
    if y_test.all() or not y_test.any():
        raise ProbeSetError(f"The held-out traces are all {'correct' if y_test.all() else 'wrong'}: "
                            "accuracy and AUROC need both classes. Use more problems or samples.")
    mu_s, mu_f = centroids(deltas, correct, train)
    scores, dist_s = centroid_scores(deltas.astype(np.float64), mu_s, mu_f)
    accuracy = ((scores[:, test] > 0) == y_test.astype(bool)).mean(1)
    au = np.array([auroc(scores[li, test], y_test) for li in range(L)])
    cv = _train_cv(deltas, correct, problem, split, seed)
    rl = int(np.nanargmax(cv)) if np.isfinite(cv).any() else L - 1
    baselines = {}
    for name, val in (("mean_logprob", mean_lp), ("answer_prob", ans_prob)):
        t = fit_threshold(val[train], correct[train])
        baselines[name] = {"auroc": auroc(val[test], y_test),
                           "accuracy": float(((val[test] > t) == y_test.astype(bool)).mean()), "threshold": t}
    test_problems = np.flatnonzero(split == 1)
    by_layer, picks = _rerank(test_problems, problem, correct, parsed, mean_lp, dist_s)
    rerank = {"layer": rl, "centroid": float(by_layer[rl]), **picks, "n_problems": int(len(test_problems)),
              "n_candidates": int(np.bincount(problem).max()),
              "layer_choice": "best two-fold AUROC inside the training split"}
    return {"accuracy": accuracy, "auroc": au, "cv_auroc": cv, "baselines": baselines, "rerank": rerank,
            "rerank_by_layer": by_layer, "scores": scores, "dist_success": dist_s,
            "centroids": np.stack([mu_s, mu_f]).astype(np.float32), "train": train, "test": test}


def _train_cv(deltas, correct, problem, split, seed) -> np.ndarray:
    """Mean AUROC per layer over two folds of the training problems (centroids from one fold,
    scored on the other); NaN where a fold lacks a class."""
    tr = np.flatnonzero(split == 0)
    fold = np.zeros(len(split), np.int64)
    fold[np.random.default_rng(seed + 1).permutation(tr)[::2]] = 1
    out = []
    for f in (0, 1):
        fit = np.flatnonzero((split[problem] == 0) & (fold[problem] != f))
        held = np.flatnonzero((split[problem] == 0) & (fold[problem] == f))
        y = correct[fit].astype(bool)
        if y.all() or not y.any() or len(set(correct[held])) < 2:
            continue
        s, _ = centroid_scores(deltas[:, held].astype(np.float64), *centroids(deltas, correct, fit))
        out.append([auroc(s[li], correct[held]) for li in range(deltas.shape[0])])
    return np.nanmean(np.array(out), 0) if out else np.full(deltas.shape[0], np.nan)


def _rerank(test_problems, problem, correct, parsed, mean_lp, dist_s) -> tuple[np.ndarray, dict]:
    by_layer = np.zeros(dist_s.shape[0])
    maj = conf = rnd = orc = 0.0
    for p in test_problems:
        rows = np.flatnonzero(problem == p)
        by_layer += correct[rows[np.argmin(dist_s[:, rows], axis=1)]]
        maj += correct[rows[majority([parsed[i] for i in rows])]]
        conf += correct[rows[int(np.argmax(mean_lp[rows]))]]
        rnd += correct[rows].mean()
        orc += correct[rows].any()
    n = max(len(test_problems), 1)
    return by_layer / n, {"majority": maj / n, "confidence": conf / n, "random": rnd / n, "oracle": orc / n}


# -- study entry points ---------------------------------------------------------------------
def spec_of(model: str, n_problems: int = 48, n_samples: int = 6, temperature: float = 1.0,
            max_new_tokens: int = 16, test_fraction: float = 0.5, seed: int = 0, path: str | None = None) -> ClueSpec:
    """The spec of a study on the first `n_problems` of the shipped task (or of a file)."""
    rows = read_problems(path or DATA)
    if n_problems < 1:
        raise OutOfRange("--clue-problems must be ≥ 1.")
    return ClueSpec(model=model, problems=tuple(rows[:n_problems]), n_samples=n_samples, temperature=temperature,
                    max_new_tokens=max_new_tokens, test_fraction=test_fraction, seed=seed,
                    source=f"file:{path}" if path else "shipped:clue_problems")


def payload(out) -> dict:
    r = out.result
    fin = lambda v: None if v is None or not np.isfinite(v) else round(float(v), 4)   # noqa: E731
    return {"run_key": out.run_key, "from_store": out.from_store, "model": out.spec.model,
            "layers": [{"layer": int(li), "accuracy": fin(a), "auroc": fin(u)}
                       for li, a, u in zip(r.layers, r.accuracy, r.auroc)],
            "baselines": {k: {kk: fin(vv) for kk, vv in v.items()} for k, v in r.baselines.items()},
            "rerank": {k: (fin(v) if isinstance(v, float) else v) for k, v in r.rerank.items()},
            "class_balance": fin(r.class_balance), "balance": r.balance,
            "n_problems": int(len(r.split)), "n_samples": out.spec.n_samples, "temperature": out.spec.temperature,
            "compute_seconds": round(out.compute_seconds, 2), "made": r.made}


def add_options(p) -> None:
    p.add_argument("--clue-problems", type=int, default=48, help="clue: the first N shipped problems (default 48)")
    p.add_argument("--clue-samples", type=int, default=6, help="clue: sampled traces per problem (default 6)")
    p.add_argument("--clue-temperature", type=float, default=1.0)
    p.add_argument("--clue-max-new-tokens", type=int, default=16)
    p.add_argument("--clue-test-fraction", type=float, default=0.5)
    p.add_argument("--clue-file", default=None, help="clue: JSON Lines {\"kind\", \"question\", \"answer\"}")


def run_cli(a) -> dict:
    import sys

    from ...runner import run

    spec = spec_of(a.model, a.clue_problems, a.clue_samples, a.clue_temperature, a.clue_max_new_tokens,
                   a.clue_test_fraction, a.seed, a.clue_file)
    return payload(run(spec, progress=lambda m: print(m, file=sys.stderr)))
