"""Where the time goes: finetune and the tuned transformers.Trainer profiled on the same batches.

Both train the same LoRA (trainer_vs_finetune.py's settings) for 5 optimizer steps over the
same 40 docstring examples in the same order: 5 micro-batches of 8 examples of similar
length, padded to their longest (finetune's length-grouped order, given to both in
sequence), so both compute on the same padded batches. torch.profiler records every op; the
table splits each run's wall time into matmuls, attention, dtype casts, other torch ops, the
optimizer, and time outside torch ops (Python: model code, loop, collation, logging),
and times collation, metrics writes and progress directly.

    .venv/bin/python benchmarks/profile_vs_trainer.py

Runs: trainer-group (fp32), trainer-group-bf16 (bf16=True), finetune with its defaults,
and finetune again without its two measurement aids (the 200 Hz resident-memory sampling
thread and the live-tensor tracker), to show what they cost.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import trainer_vs_finetune as bench

STEPS = 5
RUNS = ("trainer-group", "trainer-group-bf16", "finetune", "finetune-unmeasured")


class Timed:
    """Wraps a callable and sums the wall time spent in it."""

    def __init__(self, func) -> None:
        self.func, self.seconds = func, 0.0

    def __get__(self, obj, owner=None):  # set on a class, it wraps a method
        return self if obj is None else functools.partial(self, obj)

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.func(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


def same_batches(tokenizer) -> list[dict]:
    """STEPS x 8 docstring pairs in finetune's length-grouped order: the rows both train on."""
    from finetune.batching import epoch_order

    rows, _ = bench.docstring_pairs("docstrings")
    examples = bench.tokenized(rows, tokenizer)
    order = epoch_order([len(e.input_ids) for e in examples], 8, bench.SEED, 0, True, True)
    return [rows[i] for i in order[: STEPS * bench.EXAMPLES_PER_STEP]]


def trainer_run(rows, tokenizer, folder: str, bf16: bool, workdir: Path) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    dataset = bench.trainer_dataset(bench.tokenized(rows, tokenizer))
    args = bench.hf_args(
        TrainingArguments,
        workdir,
        bench.EXAMPLES_PER_STEP,
        STEPS,
        train_sampling_strategy="sequential",
        bf16=bf16,
    )
    model = bench.hf_model(folder)
    collate = Timed(bench.Counting(DataCollatorForSeq2Seq(tokenizer, padding=True)))
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    trainer.log = Timed(trainer.log)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    return breakdown(prof, wall, collate.func, collate.seconds, trainer.log.seconds, 0.0)


def finetune_run(rows, workdir: Path, measured: bool) -> dict:
    from finetune import progress, runs
    from finetune import train as train_module
    from finetune.memory import measure
    from finetune.recipe import load_recipe

    if not measured:  # no sampling thread, no live-tensor tracking
        measure.PeakMemory._sample = lambda self: None
        init = measure.LiveTensorPeak.__init__
        train_module.LiveTensorPeak.__init__ = lambda self, model, enabled=True: init(
            self, model, False
        )
    data = {"path": str(bench.write_jsonl(workdir / "train.jsonl", rows)), "template": "chat"}
    recipe = workdir / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "model": {"path": "smollm2-135m-instruct"},
                "adapter": {"method": "lora", **bench.LORA},
                "data": {**data, "max_length": bench.MAX_LENGTH, "shuffle": False},
                "train": {
                    "max_steps": STEPS,
                    "lr": bench.LR,
                    "micro_batch_size": bench.EXAMPLES_PER_STEP,
                    "warmup_steps": bench.WARMUP,
                    "seed": bench.SEED,
                },
                "output": {"dir": str(workdir / "run")},
                "eval": {"max_examples": 0},
            }
        )
    )
    collate = Timed(bench.Counting(train_module.batching.collate))
    train_module.batching.collate = collate
    write = runs.MetricsWriter.write = Timed(runs.MetricsWriter.write)
    bar = progress.TrainProgress.update = Timed(progress.TrainProgress.update)
    original, seen = train_module.Loop.train_steps, {}

    def profiled(self, stop):  # only the training loop: not the model loading before it
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            stopped = original(self, stop)
            seen["wall"] = time.perf_counter() - started
        seen["prof"] = prof
        return stopped

    train_module.Loop.train_steps = profiled
    train_module.train(load_recipe(recipe))
    return breakdown(
        seen["prof"], seen["wall"], collate.func, collate.seconds, write.seconds, bar.seconds
    )


CATEGORIES = {
    "matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product", "aten::_flash_attention"),
    "dtype casts": ("aten::copy_", "aten::_to_copy"),
}


def breakdown(prof, wall, counted, collate_s, log_s, bar_s) -> dict:
    """The run's wall time split by what ran (seconds), and the batches' padding."""
    events = prof.key_averages()
    seconds = defaultdict(float)
    for e in events:
        self_s = e.self_cpu_time_total / 1e6
        if e.key.startswith("Optimizer.step"):
            seconds["optimizer (total)"] += e.cpu_time_total / 1e6
        if not e.key.startswith(("aten::", "autograd::")):
            continue
        kind = next((k for k, names in CATEGORIES.items() if e.key.startswith(names)), "other")
        seconds[kind if kind != "other" else "other torch ops"] += self_s
    torch_ops = sum(v for k, v in seconds.items() if k != "optimizer (total)")
    seconds["outside torch ops"] = max(0.0, wall - torch_ops)
    return {
        "wall": wall,
        "trained": counted.trained,
        "padding": 1 - counted.real / counted.positions,
        "collation": collate_s,
        "metrics and logging": log_s,
        "progress bar": bar_s,
        **seconds,
    }


def main() -> None:
    from transformers import AutoTokenizer

    from finetune.models import resolve_source
    from finetune.noise import silence_third_party

    if len(sys.argv) == 3:  # child: one run
        silence_third_party()
        folder = str(resolve_source("smollm2-135m-instruct"))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        rows, workdir = same_batches(tokenizer), Path(tempfile.mkdtemp(prefix="profile-"))
        run = sys.argv[1]
        if run.startswith("trainer"):
            figures = trainer_run(rows, tokenizer, folder, run.endswith("bf16"), workdir)
        else:
            figures = finetune_run(rows, workdir, measured=run == "finetune")
        Path(sys.argv[2]).write_text(json.dumps(figures))
        return
    import subprocess

    results = {}
    for run in RUNS:
        out = Path(tempfile.mkdtemp()) / "figures.json"
        subprocess.run([sys.executable, __file__, run, str(out)], check=True)
        results[run] = json.loads(out.read_text())
    print_table(results)


def print_table(results: dict) -> None:
    rows = [
        "wall",
        "matmuls",
        "attention",
        "dtype casts",
        "other torch ops",
        "outside torch ops",
        "optimizer (total)",
        "collation",
        "metrics and logging",
        "progress bar",
    ]
    print(f"\n{STEPS} steps on the same batches; seconds (ms per 1,000 trained tokens)")
    print("| | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    for row in rows:
        cells = [
            f"{r.get(row, 0.0):.2f} ({1000 * r.get(row, 0.0) / r['trained'] * 1000:.0f})"
            for r in results.values()
        ]
        print(f"| {row} | " + " | ".join(cells) + " |")
    print("| trained tokens | " + " | ".join(str(r["trained"]) for r in results.values()) + " |")
    print("| padding | " + " | ".join(f"{r['padding']:.1%}" for r in results.values()) + " |")
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
