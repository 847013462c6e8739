"""Every adapter method on one task, from the shipped recipes: one table.

Run: .venv/bin/python benchmarks/methods.py [--task quickstart|orders] [--only "lora;prefix"]

Trains each recipe of the task in turn with `finetune train` (a subprocess each, nothing else
running), then reads its report.json and prints one markdown row per method: optimizer
steps, training seconds (the loop alone, model loading and evaluation excluded), trained
tokens per second, the held-out loss of the base model, of the adapter as it starts (step 0)
and at the end, and greedy exact match on the held-out set before (base model) and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "quickstart": {
        "lora": "quickstart.yaml",
        "dora": "quickstart-dora.yaml",
        "ia3": "quickstart-ia3.yaml",
        "prefix": "quickstart-prefix.yaml",
        "prompt": "quickstart-prompt.yaml",
        "lora, int8 base": "quickstart-int8.yaml",
        # Not run by default: the prefix recipe with the paper's MLP reparametrisation.
        "prefix, projection": "quickstart-prefix.yaml adapter.prefix_projection=true",
    },
    "orders": {
        "lora": "orders.yaml",
        "prefix": "orders-prefix.yaml",
        "prompt": "orders-prompt.yaml",
    },
}


def train(recipe: Path, out: Path, overrides: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "finetune", "train", str(recipe), f"output.dir={out}"]
    done = subprocess.run(
        [*command, "output.overwrite=true", "train.save_every=0", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"{recipe.name} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "report.json").read_text())


def row(label: str, report: dict) -> str:
    t, start, end, em = (report[k] for k in ("training", "eval_start", "eval", "exact_match"))
    base = start.get("base_eval_loss", start["eval_loss"])
    return (
        f"| {label} | {t['steps']} | {t['train_time_s']:.0f} | {t['trained_tokens_per_s']:.0f} "
        f"| {base:.3f} | {start['eval_loss']:.3f} | {end['eval_loss']:.3f} "
        f"| {em['before']:.1%} | **{em['after']:.1%}** |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=list(RECIPES), default="quickstart")
    parser.add_argument(
        "--only", help="methods of the task, separated by ';' (default: all but the projection)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "methods")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    args = parser.parse_args()
    recipes = RECIPES[args.task]
    default = [label for label in recipes if label != "prefix, projection"]
    chosen = args.only.split(";") if args.only else default
    unknown = [label for label in chosen if label not in recipes]
    if unknown:
        sys.exit(f"--only: {', '.join(unknown)} not in {args.task}; choose from {list(recipes)}")
    print(f"{args.task}, {datetime.date.today()}: {sys.argv[0]} {' '.join(sys.argv[1:])}")
    print()
    print(
        "| method | steps | train s | trained tok/s | held-out loss, base | at step 0 | after "
        "| exact match before | after |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label in chosen:
        recipe, *extra = recipes[label].split()
        slug = label.replace(", ", "-").replace(" ", "-")
        report = train(
            ROOT / "recipes" / recipe, args.out / args.task / slug, extra + args.overrides
        )
        print(row(label, report), flush=True)


if __name__ == "__main__":
    main()
