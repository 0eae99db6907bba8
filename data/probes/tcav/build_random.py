"""Write data/probes/tcav/random.txt: the random pool of TCAV (400 everyday sentences, no water,
sea or cooking words), from small word lists written for this project, combined by a seeded
generator so every sentence is different.

    python data/probes/tcav/build_random.py
"""

from __future__ import annotations

import random
from pathlib import Path

PEOPLE = ["My neighbour", "The teacher", "A young student", "The old farmer", "Her brother", "The manager",
          "A tired nurse", "The mechanic", "Our landlord", "The librarian", "A quiet boy", "The pilot",
          "My aunt", "The new clerk", "A famous singer", "The carpenter", "His grandmother", "The doctor",
          "A taxi driver", "The gardener"]
ACTS = ["fixed the broken", "painted the", "borrowed a", "carried the", "lost the", "found an old",
        "sold the", "cleaned the", "repaired a", "wrapped the", "counted the", "signed the", "opened the",
        "locked the", "moved the", "polished the", "measured the", "dropped the", "folded the", "checked the"]
THINGS = ["bicycle", "fence", "ladder", "letter", "lamp", "chair", "guitar", "window", "clock", "box",
          "ticket", "map", "jacket", "tractor", "notebook", "suitcase", "blanket", "mirror", "printer", "desk"]
WHEN = ["on Monday", "last night", "before lunch", "in the spring", "after school", "at dawn", "yesterday",
        "during the meeting", "on the weekend", "in October"]
WHERE = ["in the garage", "near the station", "at the office", "in the attic", "behind the library",
         "in the village", "at the market", "in the hallway", "next to the church", "in the park"]
OTHER = ["The train was twenty minutes late this morning.", "A red kite flew high above the hill.",
         "The museum opens at nine on weekdays.", "Snow covered the mountain road overnight.",
         "The shop on the corner sells old records.", "Two dogs chased each other across the field.",
         "The election results were announced at midnight.", "The printer ran out of paper again.",
         "A loud bell rang at the end of the lesson.", "The bridge was closed for repairs.",
         "She finished the crossword in ten minutes.", "The concert hall was almost empty.",
         "Leaves turned orange and fell from the trees.", "The software update took an hour.",
         "He practised the piano every evening.", "The desert road was long and dusty.",
         "The children played chess in the library.", "A new bakery opened on the high street.",
         "The football match ended in a draw.", "The candle flickered in the draught."]


def sentences(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(OTHER)
    seen = set(out)
    while len(out) < n:
        s = f"{rng.choice(PEOPLE)} {rng.choice(ACTS)} {rng.choice(THINGS)} {rng.choice(WHERE)} {rng.choice(WHEN)}."
        if s not in seen:
            seen.add(s)
            out.append(s)
    rng.shuffle(out)
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("random.txt")
    path.write_text("\n".join(sentences()) + "\n")
    print(path)
