"""Write curate/data/demo.jsonl: the built-in demo set (OpenAI `messages`), generated, seeded, authored here.

It mixes kinds of rows on purpose so the EU plane has all four quadrants: clean step-by-step arithmetic,
trivially predictable echo/copy tasks, open-ended writing prompts, deliberately wrong or garbled answers
(noise), and multi-turn chats. Every conversation is different, and each row says where it comes from
(`source`: math, copying, writing, qa), so `curate prune --group-by source` has a mixture to keep.
Run: python scripts/make_demo_data.py
"""

import json
import random
from pathlib import Path

rng = random.Random(20260928)
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
ITEMS = [
    ("apples", "baskets"),
    ("pencils", "boxes"),
    ("stickers", "sheets"),
    ("cookies", "trays"),
    ("marbles", "bags"),
    ("books", "shelves"),
    ("eggs", "cartons"),
    ("cards", "decks"),
]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
ANIMALS = ["cat", "dog", "owl", "fox", "horse", "rabbit", "whale", "eagle"]
TOPICS = [
    "the ocean",
    "a rainy city",
    "autumn leaves",
    "a lighthouse",
    "an old library",
    "the first snow",
    "a busy market",
    "a mountain trail",
    "a quiet train station",
    "a garden at night",
]
WORDS = ["river", "window", "planet", "garden", "silver", "candle", "forest", "bridge", "cloud", "engine"]


def msgs(*turns, system=None):
    out = [{"role": "system", "content": system}] if system else []
    roles = ["user", "assistant"]
    out += [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"messages": out}


def arithmetic(wrong=False):
    name, (item, box) = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 15)
    total = a * b + c
    q = f"{name} has {a} {box} with {b} {item} in each, and {c} loose {item}. How many {item} does {name} have?"
    if wrong:
        bad = total + rng.choice([-7, -3, 5, 11, 17])
        ans = f"{a} {box} times {b} is {a + b}. Adding {c} gives {bad}. The answer is {bad * 2}."
    else:
        ans = (
            f"{a} {box} with {b} {item} each make {a} x {b} = {a * b} {item}. "
            f"Adding the {c} loose ones gives {a * b} + {c} = {total}. The answer is {total}."
        )
    return msgs(q, ans)


def echo():
    w = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
    kind = rng.choice(["Repeat exactly: ", "Copy this text: ", "Say back to me: "])
    return msgs(kind + w, w)


def counting():
    n = rng.randint(3, 12)
    return msgs(f"Count from 1 to {n}.", ", ".join(str(i) for i in range(1, n + 1)) + ".")


def writing():
    topic = rng.choice(TOPICS)
    style = rng.choice(["a haiku", "two sentences", "a short poem", "a one-paragraph story"])
    lines = {
        "a haiku": f"Over {topic} falls\nsoft light the color of {rng.choice(COLORS)}\na {rng.choice(ANIMALS)} listens",
        "two sentences": f"The air around {topic} felt heavy with {rng.choice(['salt', 'memory', 'smoke', 'rain'])}. "
        f"Somewhere a {rng.choice(ANIMALS)} waited for the day to turn {rng.choice(COLORS)}.",
        "a short poem": f"I walked to {topic} alone,\nthe {rng.choice(COLORS)} sky my only guide;\n"
        f"a {rng.choice(ANIMALS)} sang in undertone\nand time stood still on either side.",
        "a one-paragraph story": f"Nobody expected the {rng.choice(ANIMALS)} to come back to {topic}. "
        f"It had been gone for {rng.randint(2, 40)} years, and the {rng.choice(COLORS)} "
        f"ribbon around its neck had faded. {rng.choice(NAMES)} saw it first and said nothing.",
    }
    return msgs(f"Write {style} about {topic}.", lines[style])


def garbled():
    q = rng.choice(
        [f"What is the capital of {c}?" for c in ["France", "Japan", "Kenya", "Peru", "Canada"]]
        + [f"Name a {rng.choice(COLORS)} fruit.", "Explain what photosynthesis is in one sentence."]
    )
    junk = " ".join(
        "".join(rng.choice("qxzkvjwpbfgh") for _ in range(rng.randint(2, 8))) for _ in range(rng.randint(6, 14))
    )
    return msgs(q, junk)


def facts():
    pairs = [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
        ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
        ("How many days are in a week?", "There are seven days in a week."),
        ("What do bees make?", "Bees make honey."),
        (
            "What is the boiling point of water at sea level in Celsius?",
            "Water boils at 100 degrees Celsius at sea level.",
        ),
        ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
        ("What is the largest ocean on Earth?", "The Pacific is the largest ocean on Earth."),
        ("How many legs does a spider have?", "A spider has eight legs."),
        ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
        ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius."),
        ("How many continents are there?", "There are seven continents."),
        ("What is the capital of Kenya?", "The capital of Kenya is Nairobi."),
        ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
        ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
        ("How many hours are in a day?", "There are 24 hours in a day."),
        ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ]
    q, a = rng.choice(pairs)
    return msgs(q, a, system=rng.choice([None, "You are a concise assistant."]))


def multiturn():
    name, (item, _) = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(5, 40), rng.randint(2, 9)
    return msgs(
        f"{name} buys {a} {item}.",
        f"Okay, {name} has {a} {item}.",
        f"Then {name} gives away {b} of them. How many are left?",
        f"{name} had {a} and gave away {b}, so {a} - {b} = {a - b} {item} are left.",
        "Thanks!",
        "You're welcome!",
        system="You help with small counting problems.",
    )


def unit():
    km = rng.randint(1, 50)
    return msgs(f"Convert {km} kilometres to metres.", f"1 kilometre is 1000 metres, so {km} km = {km * 1000} metres.")


KINDS = [  # (make one row, how many, source)
    (arithmetic, 70, "math"),
    (lambda: arithmetic(True), 25, "math"),
    (echo, 35, "copying"),
    (counting, 10, "copying"),
    (writing, 50, "writing"),
    (garbled, 25, "qa"),
    (facts, 30, "qa"),
    (multiturn, 25, "math"),
    (unit, 30, "math"),
]


def unique_rows(make, n: int, seen: set) -> list[dict]:
    """n rows whose conversations appear nowhere else in the set (a generator draws again on a repeat)."""
    rows = []
    while len(rows) < n:
        row = make()
        key = json.dumps(row["messages"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def main() -> None:
    seen: set = set()
    rows = [{**row, "source": source} for make, n, source in KINDS for row in unique_rows(make, n, seen)]
    rng.shuffle(rows)
    for i, row in enumerate(rows):
        row["id"] = f"demo-{i:04d}"
    path = Path(__file__).resolve().parents[1] / "curate" / "data" / "demo.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
