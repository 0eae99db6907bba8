"""Writes clue_problems.jsonl, the CLUE verification task (run: python data/probes/clue_build.py).

Each line is {"id", "kind", "question", "answer"}: small arithmetic the way a 135 M model
half-solves it. Four kinds, interleaved so that the first N lines are balanced:
- "add": "What is 4 + 7?" (one-digit operands);
- "sub": "What is 8 - 3?" (one-digit operands, the larger first);
- "add-tens": "What is 42 + 5?" (a two-digit and a one-digit operand, no carry);
- "word-add": a one-step word problem with one-digit numbers whose answer is a sum ("… finds 6 more …").

Difficulty was chosen by measuring SmolLM2-135M-Instruct (after the study's four worked examples,
temperature 1.0, 12 problems × 3 samples per candidate kind): one-digit sums 0.83 correct, one-digit
differences 0.50, two-digit + one-digit 0.33, one-digit word sums 0.67, so the mix lands near 0.6
and both classes keep well over 25 % of the traces. Rejected: two-digit sums and differences
with carries or borrows (0.00-0.05: the first version of this set, 3.8 % correct over 288
traces), two-digit sums without carry (0.00), one-digit word differences (0.00: the model adds).
Numbers come from a fixed seed; every sentence template, name and object is written here.
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


def _word(rng: random.Random, templates: list[str], a: int, b: int) -> str:
    name, pronoun = rng.choice(NAMES)
    return rng.choice(templates).format(n=name, P=pronoun.capitalize(), a=a, b=b, x=rng.choice(THINGS))


def problems(seed: int = 26) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(N_PER_KIND):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append({"kind": "add", "question": f"What is {a} + {b}?", "answer": a + b})
        a, b = sorted(rng.sample(range(1, 10), 2), reverse=True)
        out.append({"kind": "sub", "question": f"What is {a} - {b}?", "answer": a - b})
        a, b = rng.randint(2, 9) * 10 + rng.randint(0, 4), rng.randint(1, 5)
        out.append({"kind": "add-tens", "question": f"What is {a} + {b}?", "answer": a + b})
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        out.append({"kind": "word-add", "question": _word(rng, GAIN, a, b), "answer": a + b})
    return [{"id": i, **p} for i, p in enumerate(out)]


if __name__ == "__main__":
    rows = problems()
    with open(HERE / "clue_problems.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(rows)} problems")
