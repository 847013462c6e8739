"""Make the toy preference data of recipes/dpo.yaml from the quickstart dates.

Chosen: the correct ISO 8601 date. Rejected: the same date with day and month swapped
(YYYY-DD-MM), a plausible wrong answer; when the swap gives the same text (day equals month)
the year is off by one instead, so no pair has equal sides.

    python recipes/data/dpo/make_data.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "quickstart"


def wrong(date: str) -> str:
    year, month, day = date.split("-")
    if day != month and int(day) <= 31:
        return f"{year}-{day}-{month}"
    return f"{int(year) + 1:04d}-{month}-{day}"


def convert(name: str, limit: int) -> None:
    rows = [json.loads(line) for line in (SOURCE / name).read_text().splitlines()][:limit]
    pairs = [
        {"prompt": r["prompt"], "chosen": r["response"], "rejected": wrong(r["response"])}
        for r in rows
    ]
    (HERE / name).write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")


if __name__ == "__main__":
    convert("train.jsonl", 160)
    convert("test.jsonl", 60)
