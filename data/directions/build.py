"""Writes the templated sets of this folder (run: python data/directions/build.py).

truefalse.jsonl: {"text", "label"} statements built from the facts below (label 1: true,
0: false, the false one pairs a subject with another row's object). behaviour_ab.jsonl:
{"question", "positive", "negative"} A/B questions where the matching (positive) answer is
the optimistic one; the letter of the optimistic option alternates. All text written here.
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
            ("Norway", "Oslo"), ("Greece", "Athens"), ("Poland", "Warsaw"), ("Cuba", "Havana")]
SOUNDS = [("dog", "barks"), ("cat", "meows"), ("cow", "moos"), ("duck", "quacks"), ("lion", "roars"),
          ("sheep", "bleats"), ("owl", "hoots"), ("snake", "hisses")]
COLOURS = [("grass", "green"), ("snow", "white"), ("the sky on a clear day", "blue"), ("coal", "black"),
           ("a ripe banana", "yellow"), ("a ripe tomato", "red")]
TEMPLATES = [(CAPITALS, "The capital of {} is {}."), (SOUNDS, "A {} usually {}."),
             (COLOURS, "The colour of {} is {}.")]

OPTIMISM = [
    ("Your friend failed a driving test. What do you tell them?",
     "You will pass next time; lots of people do.", "You will probably never learn to drive."),
    ("It is raining on the day of your picnic. What do you think?",
     "We can have the picnic indoors and still enjoy it.", "The whole day is ruined."),
    ("A new shop opened on your street. What do you expect?",
     "It will probably bring nice things to the area.", "It will probably close within a month."),
    ("You start learning the piano at forty. How will it go?",
     "With practice I can become good at it.", "It is far too late to learn anything."),
    ("Your team is behind at half time. What do you say?",
     "We can still turn this game around.", "We have already lost."),
    ("A colleague offers to help with your project. How do you feel?",
     "Glad, the project will go better with help.", "Suspicious, they surely want something."),
    ("You planted seeds that have not sprouted yet. What do you think?",
     "They need a little more time to grow.", "Nothing will ever grow in this garden."),
    ("The train is ten minutes late. What is your reaction?",
     "A few minutes to read my book.", "This always happens and my day is wasted."),
    ("Your first cake came out a bit flat. What now?",
     "The next one will rise better.", "I am hopeless at baking."),
    ("A friend moves to another city. What happens to the friendship?",
     "We can stay close by calling and visiting.", "The friendship is over."),
    ("You got a low mark on a practice quiz. What does it mean?",
     "It shows what to study before the real exam.", "I am going to fail the course."),
    ("It is your first day at a new job. How will it go?",
     "I will learn quickly and meet nice people.", "Everyone will dislike me."),
]


def truefalse() -> list[dict]:
    rows = []
    for facts, template in TEMPLATES:
        for i, (subject, obj) in enumerate(facts):
            rows.append({"text": template.format(subject, obj), "label": 1})
            rows.append({"text": template.format(subject, facts[(i + 3) % len(facts)][1]), "label": 0})
    return rows


def behaviour() -> list[dict]:
    rows = []
    for i, (q, good, bad) in enumerate(OPTIMISM):
        a, b = (good, bad) if i % 2 == 0 else (bad, good)
        rows.append({"question": f"{q}\n(A) {a}\n(B) {b}", "positive": "A" if i % 2 == 0 else "B",
                     "negative": "B" if i % 2 == 0 else "A"})
    return rows


if __name__ == "__main__":
    for name, rows in [("truefalse.jsonl", truefalse()), ("behaviour_ab.jsonl", behaviour())]:
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(name, len(rows))
