"""Estimate (dry run) against the measured live-tensor peak of real CPU training.

Run: PYTHONPATH=. .venv/bin/python benchmarks/memory_cpu.py [--quick]  (about 8 minutes
on 2 cores; --quick: llama only)

Each case trains a tiny random model (2 layers, hidden 64, saved as a model folder with a
tokenizer, as tests/helpers.py does) for one epoch through finetune's own loop
(`train.train`), which measures the peak bytes of live tensors with `MemoryTracker`
(train.py, `LiveTensorPeak`); the estimate is the report's own (`runmemory.largest_setup_estimate`:
a dry run of the run's exact setup). Same tracker both sides, so a difference is a
difference between the dry run's model of the run and the run.

Cases: lora, dora, ia3, prefix, prompt x llama, qwen2, gemma, phi, gpt_neox x gradient
checkpointing on/off x packing on/off x two batch shapes (packing is refused for prefix
and prompt; peft refuses checkpointing for prefix), plus the embedded SmolLM2-135M (lora).
Prints a markdown table, then the median and worst absolute relative error.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

ARCHS = {
    "llama": dict(intermediate_size=160, num_key_value_heads=2),
    "qwen2": dict(intermediate_size=160, num_key_value_heads=2),
    "gemma": dict(intermediate_size=160, num_key_value_heads=2, head_dim=16),
    "phi": dict(intermediate_size=160),
    "gpt_neox": dict(intermediate_size=160),
}
METHODS = {
    "lora": {"method": "lora", "r": 4, "alpha": 8},
    "dora": {"method": "dora", "r": 4, "alpha": 8},
    "ia3": {"method": "ia3"},
    "prefix": {"method": "prefix", "num_virtual_tokens": 4},
    "prompt": {"method": "prompt", "num_virtual_tokens": 4},
}
SHAPES = ((2, 96), (4, 192))  # micro-batch size, data.max_length


def save_model(kind: str, folder: Path) -> Path:
    """A tiny random `kind` model and the tests' tokenizer, saved as a model folder."""
    import torch
    from helpers import build_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(
        kind,
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **ARCHS[kind],
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / kind)
    tokenizer.save_pretrained(folder / kind)
    return folder / kind


def rows(n: int = 24) -> list[dict[str, str]]:
    """Instruction rows of varied length, so micro-batches are padded and packing packs."""
    from helpers import date_rows

    out = date_rows(n)
    for i, row in enumerate(out):
        row["prompt"] += " ISO" * (2 * (i % 6))
    return out


def case(
    model: Path,
    data: Path,
    out: Path,
    method: str,
    ckpt: bool,
    packing: bool,
    shape: tuple[int, int],
    max_steps: int | None = None,
) -> tuple[int, int]:
    """Train one case; return (estimated, measured) peak bytes of live tensors."""
    from finetune.memory.runmemory import largest_setup_estimate
    from finetune.recipe import load_recipe
    from finetune.report import run_setups
    from finetune.train import train

    recipe = {
        "model": {"path": str(model)},
        "adapter": METHODS[method],
        "data": {
            "path": str(data),
            "format": "instruction",
            "max_length": shape[1],
            "packing": packing,
        },
        "train": {
            "max_steps": max_steps,  # None: one epoch, every micro-batch the estimate covers
            "lr": 1e-3,
            "micro_batch_size": shape[0],
            "seed": 0,
            "epochs": 1,
            "gradient_checkpointing": ckpt,
        },
        "output": {"dir": str(out), "overwrite": True},
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe))
    result = train(load_recipe(path))
    config = result.prepared.loaded.model.config  # the report's own estimate of the run
    estimated = largest_setup_estimate(config, run_setups(result)).allocated_bytes
    measured = result.memory["measured"]["peak_bytes"]
    del result
    gc.collect()
    return estimated, measured


def cases(kinds: list[str]) -> list[tuple[str, str, bool, bool, tuple[int, int]]]:
    """(arch, method, checkpointing, packing, shape) for every allowed combination."""
    out = []
    for kind in kinds:
        for method in METHODS:
            for ckpt in (False, True):
                for packing in (False, True):
                    if packing and method in ("prefix", "prompt"):
                        continue  # refused by the recipe: virtual tokens per packed example
                    if ckpt and method == "prefix":
                        continue  # peft refuses checkpointing with prefix tuning
                    out += [(kind, method, ckpt, packing, shape) for shape in SHAPES]
    return out


def main(quick: bool = False) -> None:
    from helpers import write_jsonl

    kinds = ["llama"] if quick else list(ARCHS)
    errors: list[float] = []
    print("| model | method | ckpt | packing | batch x max_length | estimate | measured | error |")
    print("|---|---|---|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = write_jsonl(folder / "train.jsonl", rows())
        models = {kind: save_model(kind, folder) for kind in kinds}
        for i, (kind, method, ckpt, packing, shape) in enumerate(cases(kinds)):
            est, real = case(models[kind], data, folder / f"run{i}", method, ckpt, packing, shape)
            errors.append(report_row(kind, method, ckpt, packing, shape, est, real))
        embedded = ROOT / "recipes" / "quickstart.yaml"
        recipe = yaml.safe_load(embedded.read_text())
        est, real = case(
            Path(recipe["model"]["path"]),
            ROOT / "recipes" / "data" / "quickstart" / "train.jsonl",
            folder / "embedded",
            "lora",
            False,
            False,
            (8, 128),
            max_steps=3,
        )
        errors.append(report_row("smollm2-135m", "lora r4", False, False, (8, 128), est, real))
    absolute = [abs(e) for e in errors]
    print(
        f"\n{len(errors)} cases; |error| median {statistics.median(absolute):.2%}, "
        f"worst {max(absolute):.2%}; within 5%: {sum(a <= 0.05 for a in absolute)}"
    )


def report_row(
    kind: str, method: str, ckpt: bool, packing: bool, shape: tuple[int, int], est: int, real: int
) -> float:
    error = (est - real) / real
    print(
        f"| {kind} | {method} | {'on' if ckpt else 'off'} | {'on' if packing else 'off'} | "
        f"{shape[0]} x {shape[1]} | {est / 1e6:.3f} MB | {real / 1e6:.3f} MB | "
        f"{error:+.2%} |",
        flush=True,
    )
    return error


if __name__ == "__main__":
    main("--quick" in sys.argv)
