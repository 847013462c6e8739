"""Make the preference data of recipes/quickstart-dpo.yaml (and -orpo, -kto) from the
quickstart dates.

Chosen: the correct ISO 8601 date alone, as the prompt asks. Rejected: what the embedded
model itself answers before training (greedy, the chat template), which it prefers by
construction: typically a sentence around the date, often with the date wrong. Where its
answer is the chosen one, the same date with day and month swapped (YYYY-DD-MM) instead, or
the year off by one when day equals month, so no pair has equal sides. KTO's unpaired form
(kto-*.jsonl) holds each pair's two sides as two rows, the chosen labelled true, the
rejected false.

    .venv/bin/python recipes/data/dpo/make_data.py     # about a minute on 2 CPU cores
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "quickstart"
MODEL = "smollm2-135m-instruct"


def swapped(date: str) -> str:
    year, month, day = date.split("-")
    if day != month and int(day) <= 31:
        return f"{year}-{day}-{month}"
    return f"{int(year) + 1:04d}-{month}-{day}"


def base_answers(prompts: list[str]) -> list[str]:
    """The embedded model's greedy answers, as `finetune generate` gives them."""
    from finetune.evaluate import generate
    from finetune.inference import load
    from finetune.targets import resolve_target

    session = load(resolve_target(MODEL), device="cpu")
    rendered = [
        session.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    return [a.strip() for a in generate(session.model, session.tokenizer, rendered, 32)]


def convert(name: str, limit: int) -> None:
    rows = [json.loads(line) for line in (SOURCE / name).read_text().splitlines()][:limit]
    answers = base_answers([r["prompt"] for r in rows])
    pairs = [
        {
            "prompt": r["prompt"],
            "chosen": r["response"],
            "rejected": answer if answer and answer != r["response"] else swapped(r["response"]),
        }
        for r, answer in zip(rows, answers, strict=True)
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
