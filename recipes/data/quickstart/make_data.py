"""Regenerate the quickstart dataset: dates written out in words, to convert to ISO 8601.

SmolLM2-135M-Instruct gets these wrong out of the box (it rarely answers with a bare
YYYY-MM-DD); a few minutes of LoRA on 2 CPU cores teaches it.

    python recipes/data/quickstart/make_data.py
"""

import calendar
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
MONTHS = list(calendar.month_name)[1:]
STYLES = (
    lambda d, m, y: f"{d} {MONTHS[m - 1]} {y}",
    lambda d, m, y: f"{MONTHS[m - 1]} {d}, {y}",
    lambda d, m, y: f"the {ordinal(d)} of {MONTHS[m - 1]} {y}",
    lambda d, m, y: f"{MONTHS[m - 1][:3]} {d} {y}",
)


def ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def example(rng: random.Random) -> dict[str, str]:
    year = rng.randint(1950, 2049)
    month = rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    written = rng.choice(STYLES)(day, month, year)
    return {
        "prompt": f"Convert {written} to ISO 8601 (YYYY-MM-DD). Answer with the date only.",
        "response": f"{year:04d}-{month:02d}-{day:02d}",
    }


def main() -> None:
    rng = random.Random(2024)
    seen: set[str] = set()
    rows = []
    while len(rows) < 560:
        row = example(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    for name, part in (("train", rows[:500]), ("test", rows[500:])):
        with (HERE / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)


if __name__ == "__main__":
    main()
