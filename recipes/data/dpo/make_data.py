"""Make the preference data of recipes/quickstart-dpo.yaml (and -orpo, -kto) from the
quickstart dates.

Chosen: the correct ISO 8601 date. Rejected: the same date with day and month swapped
(YYYY-DD-MM), a plausible wrong answer; when the swap gives the same text (day equals month)
the year is off by one instead, so no pair has equal sides. KTO's unpaired form (kto-*.jsonl)
holds each pair's two sides as two rows, the chosen labelled true, the rejected false.

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
    write(HERE / name, pairs)
    write(HERE / f"kto-{name}", [row for pair in pairs for row in unpaired(pair)])


def unpaired(pair: dict) -> list[dict]:
    prompt = pair["prompt"]
    return [
        {"prompt": prompt, "completion": pair["chosen"], "label": True},
        {"prompt": prompt, "completion": pair["rejected"], "label": False},
    ]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    convert("train.jsonl", 160)
    convert("test.jsonl", 60)
