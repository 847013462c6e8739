"""train.compile: the model's repeated blocks compiled by torch.compile.

Each decoder layer is compiled on its own (`nn.Module.compile`), not the whole model: the
layers are alike, so torch compiles one layer's graph and reuses it for all of them
(compile time of one layer, not of the model: torchtune's per-layer compile), and the
parts finetune steers step by step (the output head, which the loss reads at trained
positions only; the memory tracker's hooks) stay outside the compiled code. Shapes are
marked dynamic after the first change of length (torch's default), so micro-batches of new
lengths do not each recompile; packing keeps every sequence at data.max_length anyway.

The time torch spends compiling is reported apart from training (`compile_seconds`), but
a run's tokens per second count every step, the compiling ones included.
"""

from __future__ import annotations

import shutil
from typing import Any

import torch

from finetune.errors import UserError


def check_compiler(device: str, sharded: bool) -> None:
    """Before the model loads: train.compile is not combined with sharding (untested with
    FSDP2's hooks), and on the CPU inductor writes C++ and needs a compiler.

    Raises:
        UserError: sharded, or no C++ compiler on PATH.
    """
    if sharded:
        raise UserError(
            "train.compile is not supported with sharded training (FSDP2) yet; set "
            "train.compile=false, or train without FSDP (accelerate config distributed_type)"
        )
    if device == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise UserError(
            "train.compile: torch.compile needs a C++ compiler on the CPU and none is on PATH "
            "(g++, c++ or clang++); install one (Debian: apt install g++) or set "
            "train.compile=false"
        )


def repeated_blocks(model: Any) -> list[torch.nn.Module]:
    """The model's decoder layers: modules of the classes transformers keeps whole when it
    splits a model (`_no_split_modules`), e.g. LlamaDecoderLayer."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]


def compile_blocks(model: Any) -> int:
    """Compile each of `model`'s decoder layers in place; the number compiled.

    Raises:
        UserError: the model names no repeated block to compile.
    """
    blocks = repeated_blocks(model)
    if not blocks:
        raise UserError(
            f"train.compile: {type(model).__name__} names no decoder layer class "
            "(_no_split_modules) to compile; set train.compile=false"
        )
    for block in blocks:
        block.compile()
    return len(blocks)


def compile_seconds() -> float:
    """Seconds torch has spent compiling in this process (forward and backward graphs)."""
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))
