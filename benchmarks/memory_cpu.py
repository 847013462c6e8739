"""Estimate vs measurement on the CPU for the embedded model's architecture (SmolLM2-135M).

Run: .venv/bin/python benchmarks/memory_cpu.py  (random fp32 weights; about a minute)

Measures (1) the bytes autograd saves for backward (unique storages, parameters excluded,
via torch.autograd.graph.saved_tensors_hooks) against the estimate's activations plus the
saved log-softmax, and (2) the peak resident memory growth over one forward+backward
against the estimate's activations + logits + gradients. Prints a markdown table.
"""

from __future__ import annotations

import gc

import torch

from finetune.memory import Setup, estimate
from finetune.memory.arch import to_hf_config
from finetune.memory.measure import PeakMemory, saved_tensors
from finetune.memory.presets import get_preset

SHAPES = ((1, 128), (4, 128), (2, 512))
METHODS = ("lora", "prefix", "prompt")


def build(method: str, setup: Setup):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        to_hf_config(get_preset("smollm2-135m")), dtype=torch.float32, attn_implementation="sdpa"
    )
    config = {
        "lora": LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, target_modules="all-linear"),
        "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20),
        "prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20),
    }[method]
    return get_peft_model(model, config).train()


def measure(method: str, batch: int, seq: int) -> tuple[Setup, int, int]:
    setup = Setup(
        method=method, dtype="float32", batch=batch, seq=seq, virtual_tokens=20, device="cpu"
    )
    model = build(method, setup)
    ids = torch.randint(0, 49152, (batch, seq))
    with saved_tensors(model) as found:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    saved = sum(found.values())
    del found
    gc.collect()
    with PeakMemory("cpu") as peak:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        peak.update()
        del out
    return setup, saved, peak.peak_bytes


def main() -> None:
    torch.set_num_threads(2)
    print(
        "| method | batch x seq | saved: estimate | saved: measured | error "
        "| RSS peak growth: estimate | measured | error |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for method in METHODS:
        for batch, seq in SHAPES:
            setup, saved, rss = measure(method, batch, seq)
            est = estimate(get_preset("smollm2-135m"), setup)
            est_saved = est.detail["saved_total"]
            est_peak = (
                est.components["activations"]
                + est.components["logits and loss"]
                + est.components["gradients"]
            )
            print(
                f"| {method} | {batch} x {seq} | {est_saved / 1e6:.1f} MB | "
                f"{saved / 1e6:.1f} MB | {100 * (est_saved - saved) / saved:+.2f}% | "
                f"{est_peak / 1e6:.0f} MB | {rss / 1e6:.0f} MB | "
                f"{100 * (est_peak - rss) / rss:+.0f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
