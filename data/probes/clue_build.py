"""Writes clue_problems.jsonl, the CLUE verification task (run: python data/probes/clue_build.py).

Each line is {"id", "kind", "question", "answer"}: two-digit arithmetic the way a small model
half-solves it. Four kinds, interleaved so that the first N lines are balanced:
- "add": "What is 47 + 38?" (two-digit operands, carries allowed);
- "sub": "What is 83 - 29?" (the larger operand first, borrows allowed);
- "word-add": a one-step word problem whose answer is a sum ("… finds 15 more …");
- "word-sub": a one-step word problem whose answer is a difference ("… gives away 17 …").
The word problems make the model choose the operation as well as compute it. Numbers come from
a fixed seed; every sentence template, name and object is written here.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_PER_KIND = 60

NAMES = [("Tom", "he"), ("Sam", "he"), ("Ben", "he"), ("Leo", "he"), ("Max", "he"),
         ("Ann", "she"), ("Mia", "she"), ("Eva", "she"), ("Amy", "she"), ("Kim", "she")]
THINGS = ["apples", "cards", "stamps", "shells", "books", "coins", "marbles", "stickers", "pencils", "cookies"]
# One template shape per kind (a one-word verb, one-token names and objects), so the questions of
# a kind have one length in tokens and sample in one batch.
GAIN = ["{n} has {a} {x}. {P} finds {b} more. How many {x} does {n} have now?",
        "{n} has {a} {x}. {P} buys {b} more. How many {x} does {n} have now?",
        "{n} has {a} {x}. {P} gets {b} more. How many {x} does {n} have now?"]
LOSS = ["{n} had {a} {x}. {P} lost {b} of them. How many {x} does {n} have left?",
        "{n} had {a} {x}. {P} sold {b} of them. How many {x} does {n} have left?",
        "{n} had {a} {x}. {P} used {b} of them. How many {x} does {n} have left?"]


def _word(rng: random.Random, templates: list[str], a: int, b: int) -> str:
    name, pronoun = rng.choice(NAMES)
    return rng.choice(templates).format(n=name, P=pronoun.capitalize(), a=a, b=b, x=rng.choice(THINGS))


def problems(seed: int = 26) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(N_PER_KIND):
        a, b = rng.randint(10, 89), rng.randint(10, 89)
        out.append({"kind": "add", "question": f"What is {a} + {b}?", "answer": a + b})
        a, b = sorted(rng.sample(range(10, 100), 2), reverse=True)
        out.append({"kind": "sub", "question": f"What is {a} - {b}?", "answer": a - b})
        a, b = rng.randint(10, 60), rng.randint(10, 39)
        out.append({"kind": "word-add", "question": _word(rng, GAIN, a, b), "answer": a + b})
        a, b = rng.randint(40, 99), rng.randint(10, 39)
        out.append({"kind": "word-sub", "question": _word(rng, LOSS, a, b), "answer": a - b})
    return [{"id": i, **p} for i, p in enumerate(out)]


if __name__ == "__main__":
    rows = problems()
    with open(HERE / "clue_problems.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(rows)} problems")
