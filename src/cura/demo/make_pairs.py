"""Generate the DPO demo's preference pairs: a house style of terse `Answer: ...` replies over chatty ones.

Each prompt is a short note about a made-up person followed by one question about it; the chosen answer is
the fact alone in the house format (`Answer: Lisbon.`); the rejected one is, in half the pairs, the same
fact in the prose a chat model reaches for ("Sara lives in Lisbon.", "Based on the note, ..."), and in the
other half the house format with a wrong fact (`Answer: Oslo.`), so that the format alone does not win (with
prose-only rejections a 20-step DPO run learned the format and lost the facts: "Answer: a cat." for a
hamster). The preference is the same in every pair, one a 135M model can learn in a few dozen DPO steps,
and the base model prefers the prose (it is what it was tuned to write), so its held-out preference
accuracy starts low. Names and cities of the held-out
split never occur in training. Everything here is written by the cura authors; `python -m
cura.demo.make_pairs` rewrites the shipped files byte for byte.
"""

from __future__ import annotations

import random
from pathlib import Path

from cura.demo.make_data import EVAL_CITIES, EVAL_NAMES, TRAIN_CITIES, TRAIN_NAMES, write_splits

JOBS = """baker nurse pilot teacher plumber chemist painter farmer librarian dentist tailor carpenter
architect florist jeweller mechanic translator surveyor""".split()
PETS = "cat dog parrot rabbit tortoise hamster goldfish ferret".split()
NOTES = [
    "{name} is a {age}-year-old {job} who lives in {city} with a {pet}.",
    "{name} lives in {city}, works as a {job}, is {age} years old and has a {pet}.",
    "Meet {name}: {job}, {age}, from {city}, owner of a {pet}.",
    "{name}, aged {age}, moved to {city} to work as a {job}. A {pet} keeps {name} company.",
]
# (question, the fact asked for, the prose answers a chat model tends to give)
QUESTIONS = {
    "city": (
        "Where does {name} live?",
        "{city}",
        [
            "{name} lives in {city}.",
            "Based on the note, {name} lives in {city}.",
            "According to the information given, {name} lives in the city of {city}.",
        ],
    ),
    "job": (
        "What is {name}'s job?",
        "{job}",
        [
            "{name} works as a {job}.",
            "Based on the note, {name} is a {job}.",
            "According to the information given, {name}'s job is {job}.",
        ],
    ),
    "age": (
        "How old is {name}?",
        "{age}",
        [
            "{name} is {age} years old.",
            "Based on the note, {name} is {age} years old.",
            "According to the information given, {name} is {age}.",
        ],
    ),
    "pet": (
        "What pet does {name} have?",
        "a {pet}",
        [
            "{name} has a {pet}.",
            "Based on the note, {name} has a {pet} as a pet.",
            "According to the information given, {name}'s pet is a {pet}.",
        ],
    ),
}


def make_pair(rng: random.Random, names: list[str], cities: list[str]) -> dict:
    """One pair: the note and question as the prompt, the house-style answer chosen, prose rejected."""
    facts = {
        "name": rng.choice(names),
        "city": rng.choice(cities),
        "job": rng.choice(JOBS),
        "pet": rng.choice(PETS),
        "age": rng.randint(19, 78),
    }
    kind = rng.choice(sorted(QUESTIONS))
    question, fact, prose = QUESTIONS[kind]
    prompt = rng.choice(NOTES).format(**facts) + "\n" + question.format(**facts)
    if rng.random() < 0.5:
        rejected = rng.choice(prose).format(**facts)
    else:  # the house format with a wrong fact: the style alone must not win
        wrong = dict(facts, **{kind: _other(rng, kind, facts[kind], cities)})
        rejected = "Answer: " + fact.format(**wrong) + "."
    return {"prompt": prompt, "chosen": "Answer: " + fact.format(**facts) + ".", "rejected": rejected}


def _other(rng: random.Random, kind: str, value, cities: list[str]):
    """Another value of the same kind as `value` (a wrong answer that looks right)."""
    pool = {"city": cities, "job": JOBS, "pet": PETS, "age": list(range(19, 79))}[kind]
    return rng.choice([v for v in pool if v != value])


def make_split(seed: int, n: int, names: list[str], cities: list[str]) -> list[dict]:
    rng = random.Random(seed)
    return [make_pair(rng, names, cities) for _ in range(n)]


def write(folder: Path) -> None:
    splits = {
        "style_pairs_train.jsonl": make_split(11, 400, TRAIN_NAMES, TRAIN_CITIES),
        "style_pairs_eval.jsonl": make_split(12, 32, EVAL_NAMES, EVAL_CITIES),
    }
    write_splits(folder, splits)


if __name__ == "__main__":
    write(Path(__file__).parent)
