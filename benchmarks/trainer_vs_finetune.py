"""The same LoRA training through `finetune` and through a plain transformers.Trainer + peft
baseline, in one invocation, on the embedded SmolLM2-135M-Instruct; prints a table.

Same data (instruction pairs with realistic length variety: Python standard-library
docstrings as answers), same tokenization and prompt masking, same LoRA config, learning
rate, schedule, effective batch (8 examples per optimizer step), number of steps and seed.
The baseline is written the way the transformers/peft documentation shows it: a tokenized
`datasets.Dataset`, `DataCollatorForSeq2Seq` padding each batch, `Trainer.train()`.

    .venv/bin/python benchmarks/trainer_vs_finetune.py [--steps 30]

Both runs are measured the same way: wall time of the training call, trained (unmasked)
tokens per second, peak process resident memory above the level before training started
(the CPU has no allocator statistics), training loss averaged over the last 5 steps, and
the held-out loss of the trained adapter on the same 64 held-out examples.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import pydoc
import random
import tempfile
import time
from pathlib import Path

import torch

MODULES = [
    "os",
    "os.path",
    "json",
    "re",
    "collections",
    "itertools",
    "functools",
    "string",
    "textwrap",
    "math",
    "random",
    "statistics",
    "datetime",
    "pathlib",
    "shutil",
    "subprocess",
    "heapq",
    "bisect",
    "difflib",
    "csv",
    "zipfile",
    "tarfile",
    "hashlib",
    "base64",
    "struct",
    "fractions",
    "decimal",
    "operator",
    "copy",
    "pprint",
    "enum",
    "typing",
    "contextlib",
    "argparse",
    "logging",
    "socket",
    "threading",
    "queue",
    "tempfile",
    "glob",
    "fnmatch",
]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LR, WARMUP, SEED, MICRO, MAX_LENGTH = 5e-4, 3, 0, 8, 256


def docstring_pairs(n_eval: int = 64) -> tuple[list[dict], list[dict]]:
    """Instruction pairs whose answers are real docstrings: lengths from a line to a page."""
    pairs = []
    for name in MODULES:
        module = pydoc.locate(name)
        for attr, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if not attr.startswith("_") else None
            if not doc or not (callable(obj) or inspect.isclass(obj)) or len(doc) < 40:
                continue
            pairs.append({"prompt": f"What does {name}.{attr} do in Python?", "response": doc})
    unique = list({p["prompt"]: p for p in pairs}.values())
    random.Random(SEED).shuffle(unique)
    return unique[n_eval:], unique[:n_eval]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_finetune(workdir: Path, train_file: Path, eval_file: Path, steps: int, packing: bool):
    from finetune.recipe import load_recipe
    from finetune.train import train

    recipe = workdir / f"recipe-{packing}.yaml"
    recipe.write_text(
        json.dumps(
            {
                "model": {"path": "smollm2-135m-instruct"},
                "adapter": {"method": "lora", **LORA},
                "data": {
                    "path": str(train_file),
                    "eval_path": str(eval_file),
                    "template": "chat",
                    "max_length": MAX_LENGTH,
                    "packing": packing,
                    "group_by_length": True,
                },
                "train": {
                    "max_steps": steps,
                    "lr": LR,
                    "micro_batch_size": MICRO if not packing else 2,
                    "warmup_steps": WARMUP,
                    "seed": SEED,
                    "schedule": "cosine",
                },
                "output": {"dir": str(workdir / f"finetune-{packing}"), "overwrite": True},
                "eval": {"max_examples": 1, "max_new_tokens": 1},
            }
        )
    )
    result = train(load_recipe(recipe))
    history = result.history
    return {
        "train_s": result.state.elapsed,
        "trained_tokens": result.state.trained_tokens,
        "tokens_seen": result.state.tokens,
        "final_loss": sum(r["loss"] for r in history[-5:]) / len(history[-5:]),
        "eval_loss": result.evals[-1]["eval_loss"],
        "peak_bytes": result.memory["peak_bytes"],
        "steps": result.state.step,
    }


def run_trainer(workdir: Path, rows: list[dict], eval_rows: list[dict], steps: int):
    """The documented way: tokenize into a Dataset, DataCollatorForSeq2Seq, Trainer.train()."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from finetune.memory.measure import PeakMemory
    from finetune.models import resolve_source

    folder = resolve_source("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def tokenize(row: dict) -> dict:
        # The same rendering and masking as finetune: prompt through the chat template with
        # the generation prompt, the answer and end-of-turn trained.
        messages = [{"role": "user", "content": row["prompt"]}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": row["response"]}], tokenize=False
        )
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        ids = (p + r)[:MAX_LENGTH]
        labels = ([-100] * len(p) + r)[:MAX_LENGTH]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    train_ds = Dataset.from_list(rows).map(tokenize, remove_columns=["prompt", "response"])
    torch.manual_seed(SEED)
    peak = PeakMemory(device="cpu").start()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        max_steps=steps,
        warmup_steps=WARMUP,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=SEED,
        use_cpu=True,
        disable_tqdm=True,
    )
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True))
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator)
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    peak.stop()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    trained = sum(collator.trained[:steps])
    return {
        "train_s": train_s,
        "trained_tokens": trained,
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "eval_loss": held_out_loss(model, tokenizer, eval_rows),
        "peak_bytes": peak.peak_bytes,
        "steps": trainer.state.global_step,
    }


class CountingCollator:
    """Wraps the baseline's collator only to count the trained tokens of each batch drawn."""

    def __init__(self, collator) -> None:
        self.collator = collator
        self.trained: list[int] = []

    def __call__(self, features):
        batch = self.collator(features)
        self.trained.append(int((batch["labels"][:, 1:] != -100).sum()))
        return batch


def held_out_loss(model, tokenizer, eval_rows: list[dict]) -> float:
    """finetune's own evaluator on the baseline's model, so both are scored the same way."""
    from finetune.data import tokenize_rows
    from finetune.evaluate import evaluate_loss
    from finetune.recipe import DataSection

    spec = DataSection(path="eval", template="chat", max_length=MAX_LENGTH)
    rows = [{**r, "_row": i} for i, r in enumerate(eval_rows, start=1)]
    data = tokenize_rows(rows, spec, tokenizer, "eval")
    return evaluate_loss(model, data, tokenizer.pad_token_id, MICRO).loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    train_rows, eval_rows = docstring_pairs()
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    train_file = write_jsonl(workdir / "train.jsonl", train_rows)
    eval_file = write_jsonl(workdir / "eval.jsonl", eval_rows)
    print(
        f"{len(train_rows)} training pairs, {len(eval_rows)} held out; {args.steps} steps of "
        f"{MICRO} examples; threads {torch.get_num_threads()}"
    )
    results = {
        "transformers.Trainer + peft": run_trainer(workdir, train_rows, eval_rows, args.steps),
        "finetune (length-grouped)": run_finetune(
            workdir, train_file, eval_file, args.steps, packing=False
        ),
    }
    print_table(results)


def print_table(results: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    base = results["transformers.Trainer + peft"]
    base_tps = base["trained_tokens"] / base["train_s"]
    table = Table(title="LoRA r16 on SmolLM2-135M-Instruct, CPU fp32")
    for column in (
        "run",
        "steps",
        "trained tokens",
        "wall s",
        "trained tok/s",
        "speed-up",
        "peak RSS MB",
        "final loss (last 5)",
        "held-out loss",
        "loss vs base",
    ):
        table.add_column(column, justify="right")
    for name, r in results.items():
        tps = r["trained_tokens"] / r["train_s"]
        table.add_row(
            name,
            str(r["steps"]),
            f"{r['trained_tokens']:,}",
            f"{r['train_s']:.1f}",
            f"{tps:.0f}",
            f"{tps / base_tps:.2f}x",
            f"{r['peak_bytes'] / 1e6:.0f}",
            f"{r['final_loss']:.4f}",
            f"{r['eval_loss']:.4f}",
            f"{100 * (r['eval_loss'] / base['eval_loss'] - 1):+.2f}%",
        )
    Console(width=200).print(table)
    print("\nmarkdown:\n| " + " | ".join(c.header for c in table.columns) + " |")
    print("|" + "---|" * len(table.columns))
    for row in zip(*(c._cells for c in table.columns), strict=True):
        print("| " + " | ".join(row) + " |")
    assert all(math.isfinite(r["eval_loss"]) for r in results.values())


if __name__ == "__main__":
    main()
