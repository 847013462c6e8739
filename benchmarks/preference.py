"""Preference tuning on the embedded model, from the shipped recipes: one table per task.

Run: .venv/bin/python benchmarks/preference.py [--task quickstart|orders] [--only "dpo;kto"]

Trains `recipes/<task>-<objective>.yaml` for DPO, ORPO and KTO in turn (`finetune train`, a
subprocess each), reads the run's report.json (held-out preference accuracy at step 0 and at
the end, seconds of the training loop alone) and then measures the behaviour the preference
is about on greedy generations of the held-out prompts, with `finetune eval --base`: the share
of answers equal to the chosen response, and the share equal to the rejected one, for the base
model and for the trained adapter.
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
OBJECTIVES = ("dpo", "orpo", "kto")
# The held-out pairs of each task: their prompts are generated from, their two sides scored.
HELD_OUT = {
    "quickstart": ROOT / "recipes" / "data" / "dpo" / "test.jsonl",
    "orders": ROOT / "recipes" / "data" / "orders" / "pairs-test.jsonl",
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def finetune(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "finetune", *args], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"finetune {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def demonstrations(pairs: Path, side: str, out: Path) -> Path:
    """The held-out prompts as instruction rows whose response is the pair's `side`."""
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    out.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r[side]}) + "\n"
                           for r in rows))  # fmt: skip
    return out


def answers(run: Path, data: Path) -> tuple[float, float]:
    """Greedy exact match against `data`'s responses: (base model, adapter)."""
    args = ["eval", str(run), "--data", str(data), "--format", "instruction", "--base", "--json"]
    result = json.loads(finetune(*args, "--max-new-tokens", "16"))
    return (result["base"]["exact_match"]["accuracy"], result["adapter"]["exact_match"]["accuracy"])


def share(record: dict, key: str = "eval_preference_accuracy") -> str:
    """A held-out share, or a dash where there is none (KTO's rows are unpaired)."""
    return f"{record[key]:.1%}" if key in record else "-"


def row(objective: str, report: dict, chosen: tuple, rejected: tuple) -> str:
    start, end, t = report["eval_start"], report["eval"], report["training"]
    return (
        f"| {objective} | {t['steps']} | {t['train_time_s']:.0f} | {share(start)} "
        f"| **{share(end)}** | {chosen[0]:.1%} | **{chosen[1]:.1%}** | {rejected[0]:.1%} "
        f"| {rejected[1]:.1%} |"
    )


def refuse(message: str) -> None:
    """One line on stderr and exit status 2, as finetune answers bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def objectives(only: str | None) -> list[str]:
    """--only's objectives in order, each once; an empty or unknown name is refused (an
    empty --only ran all three, minutes of training each)."""
    if only is None:
        return list(OBJECTIVES)
    names = [name.strip() for name in only.split(";")]
    unknown = [repr(name) for name in names if name not in OBJECTIVES]
    if unknown:
        refuse(f"--only {only!r}: {', '.join(unknown)} unknown; give objectives from "
               f"{', '.join(OBJECTIVES)} separated by ';' (e.g. --only 'dpo;kto')")  # fmt: skip
    return list(dict.fromkeys(names))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=list(HELD_OUT), default="quickstart")
    parser.add_argument("--only", help="objectives separated by ';' (default: dpo;orpo;kto)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "preference")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    args = parser.parse_args()
    chosen_objectives = objectives(args.only)
    owned = [o for o in args.overrides if o.split("=", 1)[0].strip().startswith("output.")]
    if owned:
        refuse(f"{', '.join(owned)}: the benchmark sets output.dir and output.overwrite "
               "itself; choose the folder with --out")  # fmt: skip
    folder = args.out / args.task
    folder.mkdir(parents=True, exist_ok=True)
    sides = {s: demonstrations(HELD_OUT[args.task], s, folder / f"{s}.jsonl")
             for s in ("chosen", "rejected")}  # fmt: skip
    print(f"{args.task}, {datetime.date.today()}: {sys.argv[0]} {' '.join(sys.argv[1:])}\n")
    print(
        "| objective | steps | train s | preference accuracy, step 0 | after "
        "| answers chosen, base | after | answers rejected, base | after |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for objective in chosen_objectives:
        run = folder / objective
        recipe = ROOT / "recipes" / f"{args.task}-{objective}.yaml"
        finetune("train", str(recipe), f"output.dir={run}", "output.overwrite=true",
                 "train.save_every=0", *args.overrides)  # fmt: skip
        report = json.loads((run / "report.json").read_text())
        print(row(objective, report, answers(run, sides["chosen"]),
                  answers(run, sides["rejected"])), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
