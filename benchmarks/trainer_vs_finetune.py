"""finetune against the best-configured Hugging Face alternatives, interleaved, on two datasets.

The same LoRA training (r=16, alpha=32, every linear layer, lr 5e-4, 3 warmup steps, cosine,
8 examples per optimizer step, seed 0, max_length 256) of the embedded SmolLM2-135M-Instruct
for one epoch over the same examples, through:

    trainer        transformers.Trainer + peft as the documentation's first example writes it
                   (random batches, DataCollatorForSeq2Seq padding each one)
    trainer-group  the same with train_sampling_strategy="group_by_length" (the tuned Trainer)
    trainer-group-bf16  and with bf16=True (CPU autocast), as finetune's default is here
    trl-packed     trl's SFTTrainer, packing="bfd" with padding-free batches
    trl-packed-bf16  and with bf16=True (CPU autocast)
    finetune-pack  finetune with data.packing: true
    finetune       finetune with its recipe defaults (nothing about speed set)
    finetune-compile   and with train.compile: true (compile time counted in the wall time)
    finetune-nochunk   without the chunked cross-entropy (the head's whole logits)
    finetune-notrack   without the live-tensor memory measurement (the cost of one
                       tracked step, and of any later step wider than it)
    finetune-fp32  and with train.mixed_precision: "no" (to set beside trainer-group)
    finetune-nogroup-fp32  and data.group_by_length: false too (to set beside trainer)

Packed runs count packed sequences per step; they get as many per step as keeps about 8
examples per step, so every run takes about the same number of optimizer steps per epoch.

Each run is a fresh process (no heap or thread state carried between runs); runs are
interleaved (A B C D E A B C D E ...) and every figure is the median over the repeats.
Measured the same way for all: wall time of the training loop (model loading, evaluation and
saving excluded), trained (unmasked) tokens per second, the fraction of computed positions
that are padding, the held-out loss of the trained adapter on the same held-out pairs,
scored by the same code (finetune.evaluate), and the model FLOPs utilisation: the matmul
FLOPs the epoch needs (`model_flops`, the same for every run) per second, over this CPU's
sustained matmul rate in the run's precision (`matmul_peak.py`, measured at the start).

    .venv/bin/python benchmarks/trainer_vs_finetune.py [--repeats 2] [--runs trainer,...]

Datasets: `docstrings`, instruction pairs whose answers are Python standard-library
docstrings (a line to a page: a long tail, much of it truncated at 256), `summaries`,
the same questions answered by the docstring's first sentence (short and uniform), and
`sources`, a short run (10 optimizer steps of 8) whose answers are the Python sources of
standard-library functions (a few lines to hundreds, max_length 512): what a new user's
first try looks like, where any fixed cost per run shows.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import itertools
import json
import pydoc
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODULES = (  # noqa: SIM905 (a word list reads better as text)
    "os os.path json re collections itertools functools string textwrap math random statistics "
    "datetime pathlib shutil subprocess heapq bisect difflib csv zipfile tarfile hashlib base64 "
    "struct fractions decimal operator copy pprint enum typing contextlib argparse logging "
    "socket threading queue tempfile glob fnmatch"
).split()
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LR, WARMUP, EXAMPLES_PER_STEP, MAX_LENGTH = 5e-4, 3, 8, 256
DATA_SEED = 0  # which pairs train and which are held out: the same for every run and seed
SEED = 0  # the training seed (initialisation, order); one_run sets it from --seeds
RUNS = (
    "trainer",
    "trainer-group",
    "trainer-group-bf16",
    "trl-packed",
    "trl-packed-bf16",
    "finetune-pack",
    "finetune",
    "finetune-compile",
    "finetune-nochunk",
    "finetune-notrack",
    "finetune-fp32",
    "finetune-nogroup-fp32",
)
DATASETS = {"docstrings": 64, "summaries": 128, "sources": 80}  # 8, 16 and 10 steps
MAX_LENGTHS = {"docstrings": 256, "summaries": 256, "sources": 512}
HELD_OUT = 64


# ---------------------------------------------------------------------------- data


def use_dataset(kind: str) -> None:
    """Set the sequence length of dataset `kind` for every function below."""
    global MAX_LENGTH
    MAX_LENGTH = MAX_LENGTHS[kind]


def docstring_pairs(kind: str) -> tuple[list[dict], list[dict]]:
    """(train, held out) instruction pairs about the standard library, answers of `kind`."""
    if kind == "sources":
        return source_pairs()
    pairs = []
    for name in MODULES:
        module = pydoc.locate(name)
        for attr, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if not attr.startswith("_") else None
            if not doc or not (callable(obj) or inspect.isclass(obj)) or len(doc) < 40:
                continue
            answer = doc if kind == "docstrings" else doc.split("\n\n")[0].split(". ")[0]
            pairs.append({"prompt": f"What does {name}.{attr} do in Python?", "response": answer})
    unique = list({p["prompt"]: p for p in pairs}.values())
    random.Random(DATA_SEED).shuffle(unique)
    return unique[HELD_OUT : HELD_OUT + DATASETS[kind]], unique[:HELD_OUT]


def source_pairs() -> tuple[list[dict], list[dict]]:
    """(train, held out) pairs asking for a standard-library function's source: answers from
    a few lines to hundreds, many cut at max_length."""
    pairs = []
    for name in MODULES:
        module = pydoc.locate(name)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not inspect.isfunction(obj):
                continue
            if obj.__module__ != module.__name__:
                continue
            try:
                source = inspect.getsource(obj)
            except (OSError, TypeError):
                continue
            pairs.append({"prompt": f"Show the source of {name}.{attr}.", "response": source})
    unique = list({p["prompt"]: p for p in pairs}.values())
    random.Random(DATA_SEED).shuffle(unique)
    return unique[HELD_OUT : HELD_OUT + DATASETS["sources"]], unique[:HELD_OUT]


def tokenized(rows: list[dict], tokenizer) -> list:
    """finetune's own tokenization (chat template, prompt masked), used by every run."""
    from finetune.data import tokenize_rows
    from finetune.recipe import DataSection

    spec = DataSection(path="bench", template="chat", max_length=MAX_LENGTH)
    numbered = [{**r, "_row": i} for i, r in enumerate(rows, start=1)]
    return tokenize_rows(numbered, spec, tokenizer, "bench").examples


def packed_count(examples: list) -> int:
    """Sequences of MAX_LENGTH that finetune's packing fills with `examples`."""
    from finetune.batching import pack

    return len(pack(examples, MAX_LENGTH, SEED))


def packed_per_step(examples: list) -> int:
    """Packed sequences per step that keep about EXAMPLES_PER_STEP examples per step."""
    return max(1, round(EXAMPLES_PER_STEP * packed_count(examples) / len(examples)))


def model_flops(examples: list, config, lora_r: int) -> float:
    """The matmul FLOPs one epoch over `examples` needs: per real token, the frozen linear
    layers' forward and input gradient (4 x their weights), the LoRA matrices' forward,
    input and weight gradients (6 x theirs); causal attention (forward 2 n^2 d per layer,
    backward twice that); the vocabulary projection where a token is trained (forward and
    input gradient). Padding and logits at untrained positions are not needed: the FLOPs a
    run spends on them lower its utilisation."""
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    head = config.head_dim if getattr(config, "head_dim", None) else d // config.num_attention_heads
    q_width, kv_width = config.num_attention_heads * head, config.num_key_value_heads * head
    shapes = [(d, q_width), (d, kv_width), (d, kv_width), (q_width, d)]
    shapes += [(d, config.intermediate_size)] * 2 + [(config.intermediate_size, d)]
    frozen = layers * sum(i * o for i, o in shapes)
    lora = layers * sum(lora_r * (i + o) for i, o in shapes)
    total = 0.0
    for e in examples:
        n, trained = len(e.input_ids), sum(x != -100 for x in e.labels[1:])
        total += n * (4 * frozen + 6 * lora) + layers * 6 * n * n * q_width
        total += trained * 4 * d * vocab
    return total


# ---------------------------------------------------------------------------- one run


class Counting:
    """Wraps a collator to count, per batch, trained tokens and computed (padded) positions."""

    def __init__(self, collator) -> None:
        self.collator = collator
        self.trained = self.positions = self.real = 0

    def __call__(self, *args, **kwargs):
        batch = self.collator(*args, **kwargs)
        labels = batch["labels"]
        self.trained += int((labels[:, 1:] != -100).sum())
        self.positions += labels.numel()
        mask = batch.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else labels.numel()
        return batch


def hf_model(folder: str, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def hf_args(cls, workdir: Path, batch: int, steps: int, **extra):
    return cls(
        output_dir=str(workdir / "hf"),
        per_device_train_batch_size=batch,
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
        **extra,
    )


def run_trainer(run: str, train_rows, workdir: Path, tokenizer, folder: str) -> dict:
    """The documented way: a tokenized Dataset, DataCollatorForSeq2Seq, Trainer.train()."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    examples = tokenized(train_rows, tokenizer)
    dataset = trainer_dataset(examples)
    extra = {}
    if run.startswith("trainer-group"):
        extra["train_sampling_strategy"] = "group_by_length"
    if run.endswith("bf16"):
        extra["bf16"] = True
    steps = len(examples) // EXAMPLES_PER_STEP
    precision = "bf16" if extra.get("bf16") else "fp32"
    args = hf_args(TrainingArguments, workdir, EXAMPLES_PER_STEP, steps, **extra)
    model = hf_model(folder)
    collator = Counting(DataCollatorForSeq2Seq(tokenizer, padding=True))
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    started = time.perf_counter()
    trainer.train()
    return finished(trainer, model, collator, time.perf_counter() - started, precision)


def trainer_dataset(examples: list):
    """The Trainer's training set: finetune's tokens and labels as a `datasets.Dataset`."""
    from datasets import Dataset

    columns = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
        for e in examples
    ]
    return Dataset.from_list(columns)


def run_trl(run: str, train_rows, workdir: Path, tokenizer, folder: str) -> dict:
    """trl's SFTTrainer with best-fit-decreasing packing and padding-free batches."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    examples = tokenized(train_rows, tokenizer)
    # Pre-tokenized with finetune's masking, so every run trains on the same tokens.
    dataset = Dataset.from_list(
        [
            {"input_ids": e.input_ids, "completion_mask": [int(x != -100) for x in e.labels]}
            for e in examples
        ]
    )
    per_step = packed_per_step(examples)
    steps = -(-packed_count(examples) // per_step)
    args = hf_args(
        SFTConfig,
        workdir,
        per_step,
        steps,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        max_length=MAX_LENGTH,
        completion_only_loss=True,
        bf16=run.endswith("bf16"),
    )
    model = hf_model(folder)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    collator = Counting(trainer.data_collator)
    trainer.data_collator = collator
    started = time.perf_counter()
    trainer.train()
    precision = "bf16" if run.endswith("bf16") else "fp32"
    return finished(trainer, model, collator, time.perf_counter() - started, precision)


def finished(trainer, model, collator: Counting, seconds: float, precision: str) -> dict:
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "train_s": seconds,
        "steps": trainer.state.global_step,
        "trained_tokens": collator.trained,
        "positions": collator.positions,
        "real_positions": collator.real,
        "last_loss": losses[-1],
        "model": model,
        "precision": precision,
    }


def run_finetune(run: str, train_rows, workdir: Path) -> dict:
    """finetune through its public API, as `finetune train` runs it."""
    from finetune import chunked_loss
    from finetune import train as train_module
    from finetune.models import load_tokenizer, resolve_source
    from finetune.precision import resolve_mixed_precision
    from finetune.recipe import load_recipe

    data = {"path": str(write_jsonl(workdir / "train.jsonl", train_rows)), "template": "chat"}
    data["max_length"] = MAX_LENGTH
    micro = EXAMPLES_PER_STEP
    precision = resolve_mixed_precision("auto", "cpu")
    if run.endswith("-fp32"):
        precision = "no"
    if run == "finetune-nogroup-fp32":
        data["group_by_length"] = False
    train_extra = {"compile": True} if run == "finetune-compile" else {}
    if run == "finetune-pack":
        data["packing"] = True
        tokenizer = load_tokenizer(resolve_source("smollm2-135m-instruct"))
        micro = packed_per_step(tokenized(train_rows, tokenizer))
    recipe = workdir / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "model": {"path": "smollm2-135m-instruct"},
                "adapter": {"method": "lora", **LORA},
                "data": data,
                "train": {
                    "epochs": 1,
                    "lr": LR,
                    "micro_batch_size": micro,
                    "warmup_steps": WARMUP,
                    "seed": SEED,
                    "schedule": "cosine",
                    "mixed_precision": precision,
                    **train_extra,
                },
                "output": {"dir": str(workdir / "run")},
                "eval": {"max_examples": 0},
            }
        )
    )
    loop_s = []
    original = train_module.Loop.train_steps

    def timed(self, stop):  # the training loop's wall time, progress and metrics included
        started = time.perf_counter()
        try:
            return original(self, stop)
        finally:
            loop_s.append(time.perf_counter() - started)

    train_module.Loop.train_steps = timed
    counted = train_module.batching.collate = Counting(train_module.batching.collate)
    if run == "finetune-notrack":
        train_module.LiveTensorPeak = functools.partial(train_module.LiveTensorPeak, enabled=False)
    with chunked_loss.enabled(run != "finetune-nochunk"):
        result = train_module.train(load_recipe(recipe))
    return {
        "train_s": loop_s[0],
        "steps": result.state.step,
        "trained_tokens": result.state.trained_tokens,
        "positions": counted.positions,
        "real_positions": result.state.tokens,
        "last_loss": result.history[-1]["loss"],
        "model": result.prepared.model,
        "precision": "bf16" if precision == "bf16" else "fp32",
        "compile_s": result.state.compile_s,
    }


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def held_out_loss(model, tokenizer, eval_rows: list[dict]) -> float:
    """finetune's own evaluator on every run's model, so all are scored the same way."""
    from finetune.data import tokenize_rows
    from finetune.evaluate import evaluate_loss
    from finetune.recipe import DataSection

    spec = DataSection(path="eval", template="chat", max_length=MAX_LENGTH)
    rows = [{**r, "_row": i} for i, r in enumerate(eval_rows, start=1)]
    data = tokenize_rows(rows, spec, tokenizer, "eval")
    return evaluate_loss(model, data, tokenizer.pad_token_id, EXAMPLES_PER_STEP).loss


def one_run(run: str, dataset: str, out: Path, seed: int) -> None:
    """Child process: one training run, its figures written to `out` as JSON."""
    from transformers import AutoTokenizer

    global SEED
    SEED = seed
    use_dataset(dataset)
    from finetune.models import resolve_source
    from finetune.noise import silence_third_party

    silence_third_party()
    folder = str(resolve_source("smollm2-135m-instruct"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train_rows, eval_rows = docstring_pairs(dataset)
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    if run.startswith("trainer"):
        result = run_trainer(run, train_rows, workdir, tokenizer, folder)
    elif run.startswith("trl-packed"):
        result = run_trl(run, train_rows, workdir, tokenizer, folder)
    else:
        result = run_finetune(run, train_rows, workdir)
    model = result.pop("model")
    result["eval_loss"] = held_out_loss(model, tokenizer, eval_rows)
    out.write_text(json.dumps(result))


# ---------------------------------------------------------------------------- the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each seed")
    parser.add_argument(
        "--seeds", default="0", help="training seeds, comma-separated: each is a repeat too"
    )
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated, in order")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    one = ("RUN", "DATASET", "OUT", "SEED")
    parser.add_argument("--one", nargs=4, metavar=one, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one_run(args.one[0], args.one[1], Path(args.one[2]), int(args.one[3]))
        return
    runs, datasets = args.runs.split(","), args.datasets.split(",")
    unknown = set(runs) - set(RUNS) | set(datasets) - set(DATASETS)
    if unknown:
        parser.error(f"unknown run or dataset: {', '.join(sorted(unknown))}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; runs {runs}")
    from matmul_peak import peak_gflops

    peaks = {dtype: peak_gflops(dtype) for dtype in ("fp32", "bf16")}
    print("sustained matmul peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    flops = {dataset: dataset_flops(dataset) for dataset in datasets}
    results: dict[tuple[str, str], list[dict]] = {}
    scratch = Path(tempfile.mkdtemp(prefix="bench-results-"))
    seeds = [int(seed) for seed in args.seeds.split(",")]
    for repeat, seed, dataset, run in itertools.product(
        range(args.repeats), seeds, datasets, runs
    ):  # interleaved: every run once per repeat and seed
        out = scratch / f"{dataset}-{run}-{seed}-{repeat}.json"
        cmd = [sys.executable, __file__, "--one", run, dataset, str(out), str(seed)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        figures = {**json.loads(out.read_text()), "seed": seed}
        results.setdefault((dataset, run), []).append(figures)
        tps = figures["trained_tokens"] / figures["train_s"]
        compiled = f", {figures['compile_s']:.1f} s compiling" if figures.get("compile_s") else ""
        print(
            f"  {dataset:10} {run:18} seed {seed} repeat {repeat + 1}: {tps:6.1f} trained "
            f"tok/s, held-out {figures['eval_loss']:.4f}{compiled}",
            flush=True,
        )
    print_table(results, runs, datasets, flops, peaks)
    print_losses(results, runs, datasets, seeds)


def dataset_flops(dataset: str) -> float:
    """Model FLOPs of one epoch of `dataset` (`model_flops`), the same for every run."""
    from transformers import AutoConfig, AutoTokenizer

    from finetune.models import resolve_source

    use_dataset(dataset)
    folder = str(resolve_source("smollm2-135m-instruct"))
    examples = tokenized(docstring_pairs(dataset)[0], AutoTokenizer.from_pretrained(folder))
    return model_flops(examples, AutoConfig.from_pretrained(folder), LORA["r"])


def median(values: list[dict], key) -> float:
    return statistics.median(key(v) for v in values)


def print_table(results, runs: list[str], datasets: list[str], flops, peaks) -> None:
    """The medians of every run, set against trainer-group and against the fastest
    competitor (every run that is not finetune) measured in this invocation."""
    head = (
        "| dataset | run | matmuls | steps | trained tokens | padding | wall s | trained tok/s | "
        "vs trainer-group | vs fastest other | MFU | held-out loss | vs trainer-group | "
        "vs fastest other |"
    )
    print("\n" + head + "\n|" + "---|" * head.count(" | ") + "---|")
    for dataset in datasets:
        medians = {
            run: (
                median(results[(dataset, run)], lambda r: r["trained_tokens"] / r["train_s"]),
                median(results[(dataset, run)], lambda r: r["eval_loss"]),
            )
            for run in runs
        }
        base = medians.get("trainer-group")
        others = [run for run in runs if not run.startswith("finetune")]
        fastest = max(others, key=lambda run: medians[run][0]) if others else None
        for run in runs:
            rs = results[(dataset, run)]
            tps, loss = medians[run]
            padding = median(rs, lambda r: 1 - r["real_positions"] / r["positions"])
            seconds = median(rs, lambda r: r["train_s"])
            mfu = flops[dataset] / seconds / (peaks[rs[0]["precision"]] * 1e9)
            print(
                f"| {dataset} | {run} | {rs[0]['precision']} | {rs[0]['steps']} | "
                f"{rs[0]['trained_tokens']:,} | {100 * padding:.0f}% | {seconds:.1f} | {tps:.0f} | "
                + ratio(tps, base)
                + ratio(tps, fastest and medians[fastest], fastest)
                + f"{100 * mfu:.1f}% | {loss:.4f} | "
                + loss_gap(loss, base)
                + loss_gap(loss, fastest and medians[fastest])
            )


def ratio(tps: float, against, name: str | None = None) -> str:
    if not against:
        return "- | "
    return f"{tps / against[0]:.2f}x" + (f" ({name})" if name else "") + " | "


def loss_gap(loss: float, against) -> str:
    return f" {100 * (loss / against[1] - 1):+.2f}% |" if against else " - |"


def print_losses(results, runs: list[str], datasets: list[str], seeds: list[int]) -> None:
    """Held-out loss by training seed: how far apart seeds of one run are, beside the gap
    between runs (a run is deterministic at a seed; repeats only time it)."""
    print("\n| dataset | run | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | range |")
    print("|" + "---|" * (len(seeds) + 4))
    for dataset, run in itertools.product(datasets, runs):
        by_seed = {r["seed"]: r["eval_loss"] for r in results[(dataset, run)]}
        losses = [by_seed[s] for s in seeds]
        print(
            f"| {dataset} | {run} | "
            + " | ".join(f"{loss:.4f}" for loss in losses)
            + f" | {statistics.mean(losses):.4f} | {max(losses) - min(losses):.4f} |"
        )


if __name__ == "__main__":
    main()
