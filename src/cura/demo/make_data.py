"""Generate the demo's data set: free-text orders -> one fixed JSON answer format.

The task is chosen so that improvement is unmistakable and measurable: the base model answers in prose or in
JSON of its own invention; after a few minutes of QLoRA it answers with exactly
`{"name": ..., "item": ..., "quantity": ..., "city": ...}`. The held-out split uses names and cities that
never occur in training, so exact match there measures learning, not recall. Everything here is written by
the cura authors; `python -m cura.demo.make_data` rewrites the shipped files byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

INSTRUCTION = "Convert this order to JSON."

TRAIN_NAMES = """Priya Tomas Amara Lukas Mei Santiago Fatima Jonas Aiko Mateo Zainab Erik Lucia Omar Hana Felix
Ingrid Rafael Nadia Kofi Elena Viktor Sofia Tariq Yuki Pablo Leila Anders Chloe Ravi Ines Dmitri Grace Hugo Noor
Marek Julia Kenji Carmen Idris Freya Arjun Olga Diego Aisha Nils Clara Emeka Rosa Samir Astrid Bruno Mina Teodor
Lina Joaquin Ayesha Henrik Paula Musa""".split()
EVAL_NAMES = """Beatriz Oskar Keiko Lorenzo Adaeze Mikkel Valentina Farid Sunita Gustavo Ewa Haruto Marisol
Thabo Annika Rashid Lucienne Jakub Imani Soren""".split()
TRAIN_CITIES = """Oslo Lisbon Nairobi Osaka Lima Krakow Dublin Austin Hanoi Porto Accra Leeds Bergen Quito Seville
Pune Tallinn Lyon Perth Cusco Ghent Denver Tunis Malmo Turin Busan Cork Dakar Halifax Utrecht Graz Mombasa Bilbao
Cebu Aarhus Fresno Split Kyoto""".split()
EVAL_CITIES = """Valencia Lagos Sapporo Salzburg Tucson Gdansk Bordeaux Recife Adelaide Zagreb Kampala Brno
Nantes Leipzig Oaxaca""".split()
ITEMS = [
    ("lamp", "lamps"),
    ("notebook", "notebooks"),
    ("kettle", "kettles"),
    ("backpack", "backpacks"),
    ("chair", "chairs"),
    ("umbrella", "umbrellas"),
    ("candle", "candles"),
    ("towel", "towels"),
    ("mug", "mugs"),
    ("pillow", "pillows"),
    ("bicycle", "bicycles"),
    ("helmet", "helmets"),
    ("blanket", "blankets"),
    ("teapot", "teapots"),
    ("scarf", "scarves"),
    ("battery", "batteries"),
    ("box", "boxes"),
    ("knife", "knives"),
    ("shelf", "shelves"),
    ("glass", "glasses"),
]
TEMPLATES = [
    "{name} ordered {qty} {items} for delivery to {city}.",
    "Please send {qty} {items} to {city}. The order is for {name}.",
    "Order from {name}: {qty} {items}, ship to {city}.",
    "Hi, this is {name} from {city}. I'd like {qty} {items}, please.",
    "{city} customer {name} wants {qty} {items}.",
    "Can you deliver {qty} {items} to {name} in {city}?",
    "New order - {qty} {items} - customer: {name} - destination: {city}",
    "{name} needs {qty} {items} shipped to {city} by Friday.",
    "We received a request for {qty} {items} from {name} ({city}).",
    "Ship to {city}: {qty} {items} for {name}.",
    "{name} in {city} would like to buy {qty} {items}.",
    "Deliver {qty} {items} to {city}, attention {name}.",
]


def make_row(rng: random.Random, names: list[str], cities: list[str]) -> dict:
    name, city = rng.choice(names), rng.choice(cities)
    singular, plural = rng.choice(ITEMS)
    qty = rng.choice([1, 1, 2, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 24, 30, 50])
    sentence = rng.choice(TEMPLATES).format(
        name=name, city=city, qty=qty, items=singular if qty == 1 else plural
    )
    answer = json.dumps({"name": name, "item": singular, "quantity": qty, "city": city})
    return {
        "messages": [
            {"role": "user", "content": f"{INSTRUCTION}\n{sentence}"},
            {"role": "assistant", "content": answer},
        ]
    }


def make_split(seed: int, n: int, names: list[str], cities: list[str]) -> list[dict]:
    rng = random.Random(seed)
    return [make_row(rng, names, cities) for _ in range(n)]


def write(folder: Path) -> None:
    splits = {
        "orders_train.jsonl": make_split(1, 800, TRAIN_NAMES, TRAIN_CITIES),
        "orders_eval.jsonl": make_split(2, 64, EVAL_NAMES, EVAL_CITIES),
    }
    write_splits(folder, splits)


def write_splits(folder: Path, splits: dict[str, list[dict]]) -> None:
    """Each split as a JSON-lines file in `folder` (UTF-8, one row per line): the files the package ships."""
    for filename, rows in splits.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (folder / filename).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    write(Path(__file__).parent)
