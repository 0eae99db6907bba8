"""Prompt-pair tasks for activation patching: IOI, induction, factual recall, or your own.

A pair is a clean prompt, a corrupted prompt of the same token length, the answer the
clean prompt should get and a wrong answer (the one the corruption points to). Patching
measures how much of the clean behaviour an activation carries.

- IOI (indirect object identification, Wang et al. 2022): "When Mary and John went to the
  store, John gave a drink to" -> " Mary" (not " John"). Corruption "s2" (the default, as
  in TransformerLens's demo) swaps the second mention of the subject for the other name, so
  the prompts differ at one token and the answer flips; "swap" swaps every name.
- Induction: random words r, then r again up to position m: the next word is r[m]. The
  corrupted copy of r has another word at position m, so induction predicts that word.
- Factual recall: "The capital of France is" -> " Paris", corrupted with another country.

Generators need the model's tokenizer (names and words are kept only when they are one
token). `encode_pairs` validates a dataset and raises typed errors that show the tokens.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass

from .errors import (EmptyDataset, EmptyPrompt, IdenticalAnswers, InvalidSpec, NotSingleToken,
                     PromptLengthMismatch)
from .spec import Spec


@dataclass(frozen=True)
class PromptPair:
    clean: str
    corrupt: str
    answer: str     # the clean prompt's answer, e.g. " Mary" (leading space included)
    wrong: str      # the corrupted prompt's answer, e.g. " John"

    def as_tuple(self) -> tuple[str, str, str, str]:
        return (self.clean, self.corrupt, self.answer, self.wrong)


@dataclass(frozen=True)
class PairTaskSpec(Spec):
    """The base of every spec over clean/corrupted prompt pairs (patch, AtP, AtP*, circuits,
    clicked patches): the pair fields, their checks, the dataset constructor and the copy into
    another task spec, written once. Fields are keyed by name, so run keys do not depend on it."""

    clean: str = ""
    corrupt: str = ""
    answer: str = ""
    wrong: str = ""
    dataset: tuple = ()          # more pairs: ((clean, corrupt, answer, wrong), ...), averaged

    def validate(self):
        self.validate_pairs()

    def validate_pairs(self) -> None:
        if not isinstance(self.dataset, tuple) or any(
                not isinstance(p, tuple) or len(p) != 4 or not all(isinstance(x, str) for x in p)
                for p in self.dataset):
            raise InvalidSpec("dataset must be a list of [clean, corrupt, answer, wrong] string lists.")
        if not self.pairs():
            raise EmptyDataset("The task has no prompt pair: give a clean and a corrupted prompt, "
                               "or a dataset of pairs.")

    def pairs(self) -> list[PromptPair]:
        first = [PromptPair(self.clean, self.corrupt, self.answer, self.wrong)] \
            if (self.clean or self.corrupt or self.answer or self.wrong) else []
        return first + [PromptPair(*p) for p in self.dataset]

    @classmethod
    def from_pairs(cls, model: str, pairs, **kw):
        """A spec over a dataset (e.g. from backend.tasks.generate)."""
        rows = tuple(p.as_tuple() if isinstance(p, PromptPair) else tuple(p) for p in pairs)
        if not rows:
            raise EmptyDataset("The task has no prompt pair.")
        c, k, a, w = rows[0]
        return cls(model=model, clean=c, corrupt=k, answer=a, wrong=w, dataset=rows[1:], **kw)

    def as_task(self, cls, **kw):
        """The `cls` spec asking about the same pairs: every field both have is copied."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in self.fields().items() if k in names}, **kw})


@dataclass(frozen=True)
class EncodedPair:
    clean_ids: list[int]
    corrupt_ids: list[int]
    answer_id: int
    wrong_id: int


def _single_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _is_single(tokenizer, text: str) -> bool:
    return len(_single_ids(tokenizer, text)) == 1


def _show(model, ids: list[int]) -> str:
    return "[" + "|".join(model.str_tokens(ids)) + "]"


def answer_id(model, text: str, role: str = "answer") -> int:
    """The one token of an answer; NotSingleToken otherwise (the message shows the split)."""
    if not isinstance(text, str) or text == "":
        raise NotSingleToken(f"The {role} is empty: give one token, e.g. ' Mary' (with its leading space).")
    ids = _single_ids(model.tokenizer, text)
    if len(ids) != 1:
        parts = " + ".join(repr(t) for t in model.str_tokens(ids))
        raise NotSingleToken(f"The {role} {text!r} is {len(ids)} tokens ({parts}); it must be exactly "
                             "one token. Words usually need their leading space, e.g. ' Mary'.")
    return ids[0]


def encode_pair(model, pair: PromptPair | tuple) -> EncodedPair:
    """Token ids of one pair, validated: same length, single-token answers that differ."""
    pair = pair if isinstance(pair, PromptPair) else PromptPair(*pair)
    for role, text in (("clean", pair.clean), ("corrupted", pair.corrupt)):
        if not isinstance(text, str) or not text.strip():
            raise EmptyPrompt(f"The {role} prompt is empty.")
    clean, corrupt = model.encode(pair.clean), model.encode(pair.corrupt)
    if len(clean) != len(corrupt):
        first = next((i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b), min(len(clean), len(corrupt)))
        raise PromptLengthMismatch(
            f"The clean and corrupted prompts must have the same number of tokens. Clean has "
            f"{len(clean)}: {_show(model, clean)}; corrupted has {len(corrupt)}: {_show(model, corrupt)}. "
            f"They first differ at token {first}"
            + (f" ({model.str_tokens([clean[first]])[0]!r} vs {model.str_tokens([corrupt[first]])[0]!r})."
               if first < min(len(clean), len(corrupt)) else "."))
    a, w = answer_id(model, pair.answer, "answer"), answer_id(model, pair.wrong, "wrong answer")
    if a == w:
        raise IdenticalAnswers(f"The answer and the wrong answer are the same token ({pair.answer!r}): "
                               "the logit difference between them is always 0.")
    return EncodedPair(clean, corrupt, a, w)


def encode_pairs(model, pairs) -> list[EncodedPair]:
    """Validate a dataset: at least one pair, every pair valid, all of one token length."""
    pairs = list(pairs)
    if not pairs:
        raise EmptyDataset("The task has no prompt pair: give a clean and a corrupted prompt, or "
                           "generate a dataset (IOI, induction, facts).")
    out = [encode_pair(model, p) for p in pairs]
    n = len(out[0].clean_ids)
    for i, e in enumerate(out[1:], 1):
        if len(e.clean_ids) != n:
            raise PromptLengthMismatch(
                f"Every pair of a dataset must have the same token length (the heatmap averages "
                f"position by position): pair 0 has {n} tokens {_show(model, out[0].clean_ids)}, pair "
                f"{i} has {len(e.clean_ids)} {_show(model, e.clean_ids)}.")
    return out


# ---------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------
NAMES = ["Mary", "John", "Tom", "James", "Anna", "Paul", "Sarah", "David", "Emma", "Mike", "Lisa",
         "Mark", "Kate", "Peter", "Alice", "Bob", "Jack", "Laura", "Dan", "Susan", "George", "Linda"]
PLACES = ["store", "park", "school", "office", "beach", "garden", "market", "station"]
OBJECTS = ["drink", "book", "ball", "key", "gift", "letter", "ring", "bag"]
IOI_TEMPLATES = [
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "Then, {A} and {B} had a long talk at the {place}. {S} gave a {object} to",
]


def _single_words(model, words: list[str]) -> list[str]:
    return [w for w in words if _is_single(model.tokenizer, " " + w)]


def ioi_pairs(model, n: int = 8, seed: int = 0, template: int = 0, corruption: str = "s2") -> list[PromptPair]:
    """IOI pairs from one template (so every pair has one token length)."""
    if corruption not in ("s2", "swap"):
        raise InvalidSpec("corruption must be 's2' or 'swap'")
    rng = random.Random(seed)
    names, places, objects = (_single_words(model, ws) for ws in (NAMES, PLACES, OBJECTS))
    tpl = IOI_TEMPLATES[template % len(IOI_TEMPLATES)]
    out = []
    for _ in range(n):
        io, s = rng.sample(names, 2)
        first, second = (io, s) if rng.random() < 0.5 else (s, io)
        fill = dict(place=rng.choice(places), object=rng.choice(objects))
        clean = tpl.format(A=first, B=second, S=s, **fill)
        if corruption == "s2":
            corrupt = tpl.format(A=first, B=second, S=io, **fill)
        else:
            swap = {io: s, s: io}
            corrupt = tpl.format(A=swap[first], B=swap[second], S=io, **fill)
        out.append(PromptPair(clean, corrupt, " " + io, " " + s))
    return out


def induction_pairs(model, n: int = 8, seed: int = 0, seq_len: int = 8, repeat: int = 5) -> list[PromptPair]:
    """Random words r (seq_len), then r[:repeat]; the clean answer is r[repeat].

    The corrupted prompt has another word x at position `repeat` of the first copy, so the
    prompts differ at one token and induction in the corrupted run predicts x (the wrong answer).
    """
    if not 1 <= repeat < seq_len:
        raise InvalidSpec("repeat must be in 1..seq_len-1")
    rng = random.Random(seed)
    tok = model.tokenizer
    word = re.compile(r"^ [a-z]{4,9}$")
    special = set(tok.all_special_ids)
    pool = [i for i in range(min(len(tok), 20000)) if i not in special and word.match(tok.decode([i]))]
    out = []
    while len(out) < n:
        ids = rng.sample(pool, seq_len + 1)
        r, x = ids[:seq_len], ids[seq_len]
        r_bad = r[:repeat] + [x] + r[repeat + 1:]
        clean = tok.decode(r + r[:repeat])
        corrupt = tok.decode(r_bad + r[:repeat])
        if _single_ids(tok, clean) == r + r[:repeat] and _single_ids(tok, corrupt) == r_bad + r[:repeat]:
            out.append(PromptPair(clean, corrupt, tok.decode([r[repeat]]), tok.decode([x])))
    return out


FACTS = [("France", "Paris", "French"), ("Italy", "Rome", "Italian"), ("Germany", "Berlin", "German"),
         ("Spain", "Madrid", "Spanish"), ("Japan", "Tokyo", "Japanese"), ("Russia", "Moscow", "Russian"),
         ("Egypt", "Cairo", "Arabic"), ("Greece", "Athens", "Greek"), ("China", "Beijing", "Chinese"),
         ("England", "London", "English"), ("Poland", "Warsaw", "Polish"), ("Portugal", "Lisbon", "Portuguese"),
         ("Austria", "Vienna", "German"), ("Ireland", "Dublin", "English")]
FACT_TEMPLATES = [("The capital of {c} is", 1), ("The official language of {c} is", 2)]


def fact_pairs(model, n: int = 8, seed: int = 0, template: int = 0) -> list[PromptPair]:
    """Factual recall: the clean country's fact against another country's, same template."""
    rng = random.Random(seed)
    tpl, col = FACT_TEMPLATES[template % len(FACT_TEMPLATES)]
    rows = [f for f in FACTS if _is_single(model.tokenizer, " " + f[0]) and _is_single(model.tokenizer, " " + f[col])]
    out = []
    for _ in range(200 * n):
        if len(out) == n:
            break
        a, b = rng.sample(rows, 2)
        if a[col] != b[col]:
            out.append(PromptPair(tpl.format(c=a[0]), tpl.format(c=b[0]), " " + a[col], " " + b[col]))
    return out


GENERATORS = {"ioi": ioi_pairs, "induction": induction_pairs, "facts": fact_pairs}


def generate(model, task: str, n: int = 8, seed: int = 0, **kw) -> list[PromptPair]:
    """Pairs of a built-in task by name ('ioi', 'induction', 'facts')."""
    if task not in GENERATORS:
        raise InvalidSpec(f"unknown task {task!r}; known: {', '.join(GENERATORS)}")
    return GENERATORS[task](model, n=n, seed=seed, **kw)


# -- pairs of a task, remembered ------------------------------------------------------------
# A page link names a task ("ioi", 8 pairs) rather than its prompts; the pairs depend on the
# model's tokenizer, so making them needs the model. They are kept in the store the first time,
# and a link reopened later rebuilds its spec from there without loading the model (or torch).
PAIRS_SCHEMA = """CREATE TABLE IF NOT EXISTS task_pairs(model VARCHAR NOT NULL, task VARCHAR NOT NULL,
    n INTEGER NOT NULL, seed INTEGER NOT NULL, pairs JSON NOT NULL, created TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (model, task, n, seed))"""


def stored_pairs(store, model_id: str, task: str, n: int = 8, seed: int = 0, load=None) -> list[PromptPair]:
    """The task's pairs for the model: from the store, else generated (load(model_id) gives the
    model; default backend.model.load_model) and stored."""
    import json

    if task not in GENERATORS:
        raise InvalidSpec(f"unknown task {task!r}; known: {', '.join(GENERATORS)}")
    cur = store.cursor()
    if not getattr(store, "_task_pairs_table", False):      # once per store, not on every page render
        with store.locked():
            cur.execute(PAIRS_SCHEMA)
        store._task_pairs_table = True
    rows = cur.execute("SELECT pairs FROM task_pairs WHERE model = ? AND task = ? AND n = ? AND seed = ?",
                       [model_id, task, int(n), int(seed)]).fetchall()
    if rows:
        try:
            return [PromptPair(*p) for p in json.loads(rows[0][0])]
        except (TypeError, ValueError):
            pass                                   # a damaged row: made again below
    if load is None:
        from .model import load_model as load
    pairs = generate(load(model_id), task, n=n, seed=seed)
    with store.locked():
        cur.execute("INSERT OR REPLACE INTO task_pairs(model, task, n, seed, pairs) VALUES (?, ?, ?, ?, ?)",
                    [model_id, task, int(n), int(seed), json.dumps([list(p.as_tuple()) for p in pairs])])
    return pairs
