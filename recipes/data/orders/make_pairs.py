"""Make the preference data of recipes/orders-dpo.yaml (and -orpo, -kto) from the orders CSVs.

Chosen: the stock code (ITEM-COLOUR-SIZE-QUANTITY). Rejected: the same fields in the order
the request usually says them (ITEM-SIZE-COLOUR-QUANTITY: "two large blue hoodies"), the
mistake a model that has not learnt the convention makes. The base model guesses neither.
KTO's unpaired form (kto-pairs-*.jsonl) holds each pair's sides as two rows, chosen true.

    python recipes/data/orders/make_pairs.py
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def misordered(code: str) -> str:
    item, colour, size, quantity = code.split("-")
    return f"{item}-{size}-{colour}-{quantity}"


def convert(source: str, name: str, limit: int) -> None:
    with (HERE / source).open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))[:limit]
    pairs = [
        {"prompt": r["request"], "chosen": r["code"], "rejected": misordered(r["code"])}
        for r in rows
    ]
    write(HERE / f"pairs-{name}", pairs)
    unpaired = [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in pairs
        for side in ("chosen", "rejected")
    ]
    write(HERE / f"kto-pairs-{name}", unpaired)


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    convert("train.csv", "train.jsonl", 160)
    convert("test.csv", "test.jsonl", 60)
