"""The closed sets of names the command line offers, in one light module (no torch): the
CLI turns them into Enums (listed in `--help`, refused before anything loads), and the
modules that act on them check the same tuples when called from Python."""

from __future__ import annotations

from enum import Enum

ADAPTER_METHODS = ("lora", "dora", "ia3", "prefix", "prompt")  # finetune.methods.METHODS
ESTIMATE_METHODS = ("full", *ADAPTER_METHODS)
QUANTS = ("none", "int8", "nf4", "fp4")
DTYPES = ("float32", "bfloat16", "float16")
# adamw: torch's default implementation for the device (foreach on CUDA, for-loop on the
# CPU, as training gets it); the others name one (finetune.memory.dryrun.adamw_options).
TRAIN_OPTIMIZERS = ("adamw", "adamw-foreach", "adamw-fused", "adamw-forloop", "adamw8bit")
OBJECTIVES = ("sft", "dpo", "orpo", "kto")
REFERENCES = ("forward", "cached")  # train.reference: the reference's log-probabilities
OPTIMIZERS = (*TRAIN_OPTIMIZERS, "sgd")  # sgd: estimates only (the states-free floor)
ATTENTIONS = ("sdpa", "eager", "flex", "flash")
SHARDINGS = ("none", "fsdp")  # fsdp: FSDP2 full shard (finetune.sharding)
ESTIMATE_FORMATS = ("table", "json", "markdown")
EXPORT_FORMATS = ("adapter", "merged", "gguf", "gguf-adapter")
GGUF_TYPES = ("f16", "f32", "q8_0")
COMBINE_METHODS = ("linear", "ties", "dare_linear", "dare_ties")


def choice_enum(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum whose members are `values` (names may hold '-', as 'gguf-adapter')."""
    return Enum(name, [(value, value) for value in values], type=str)
