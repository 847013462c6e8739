"""Regenerate the orders dataset: shop orders in everyday words, to write as stock codes.

A second small task with other data than the quickstart's: a CSV file, other column names
(`request`, `code`), and answers the base model cannot guess (the codes are this file's own
convention: ITEM-COLOUR-SIZE-QUANTITY, e.g. "Two large blue hoodies, please." -> HOODIE-BLU-L-2).

    python recipes/data/orders/make_data.py
"""

import csv
import random
from pathlib import Path

HERE = Path(__file__).parent
ITEMS = {
    "hoodie": "HOODIE",
    "t-shirt": "TEE",
    "cap": "CAP",
    "scarf": "SCARF",
    "jacket": "JACKET",
    "sock pair": "SOCKS",
    "sweater": "SWEATER",
    "backpack": "BAG",
}
COLOURS = {
    "red": "RED",
    "blue": "BLU",
    "green": "GRN",
    "black": "BLK",
    "white": "WHT",
    "yellow": "YEL",
    "grey": "GRY",
}
SIZES = {"small": "S", "medium": "M", "large": "L", "extra large": "XL"}
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STYLES = (
    lambda q, s, c, i: f"{q.capitalize()} {s} {c} {i}s, please.",
    lambda q, s, c, i: f"I'd like {q} {c} {i}s in {s}.",
    lambda q, s, c, i: f"Order: {q} x {s} {c} {i}",
    lambda q, s, c, i: f"Could you send {q} {i}s, {c}, size {s}?",
    lambda q, s, c, i: f"Please ship {q} {s} {i}s in {c}.",
)


def example(rng: random.Random) -> dict[str, str]:
    item, colour, size = rng.choice(list(ITEMS)), rng.choice(list(COLOURS)), rng.choice(list(SIZES))
    n = rng.randint(1, 9)
    quantity = NUMBERS[n - 1] if rng.random() < 0.6 else str(n)
    request = rng.choice(STYLES)(quantity, size, colour, item)
    return {
        "request": request,
        "code": f"{ITEMS[item]}-{COLOURS[colour]}-{SIZES[size]}-{n}",
    }


def write(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["request", "code"])
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    rng = random.Random(7)
    rows, seen = [], set()
    while len(rows) < 560:
        row = example(rng)
        if row["request"] not in seen:
            seen.add(row["request"])
            rows.append(row)
    write(HERE / "train.csv", rows[:500])
    write(HERE / "test.csv", rows[500:])


if __name__ == "__main__":
    main()
