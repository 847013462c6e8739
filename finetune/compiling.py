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

import contextlib
import shutil
from typing import Any

import torch

from finetune.errors import UserError


def check_compiler(device: str, sharded: bool, checkpointing: bool = False) -> None:
    """Before the model loads: train.compile is not combined with sharding (untested with
    FSDP2's hooks) or gradient checkpointing (torch stops tracing at transformers' checkpoint
    call, a graph break, and the layers run uncompiled: 0.6 s of compiling, eager losses),
    and on the CPU inductor writes C++ and needs a compiler.

    Raises:
        UserError: sharded, checkpointing, or no C++ compiler on PATH.
    """
    if checkpointing:
        raise UserError(
            "train.compile with train.gradient_checkpointing: torch.compile stops at the "
            "checkpoint call and the layers would run uncompiled; set "
            "train.gradient_checkpointing=false (or train.compile=false)"
        )
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


# Compiles of one piece of code before torch gives up and runs it uncompiled (torch's
# default is 8). peft's adapter layers share one forward for modules of every shape, and
# torch guards on parameter shapes and on whether an input requires grad (the first
# layer's does not, later ones' do): DoRA on a two-layer Llama needs more than 8.
RECOMPILE_LIMIT = 64


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
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile()
    return len(blocks)


def recompile_limit_hit() -> bool:
    """Whether torch gave up recompiling some code in this process (dynamo's
    recompile_limit): those calls then run uncompiled, which torch only logs."""
    from torch._dynamo.utils import counters

    # Each reason torch stopped tracing, keyed by its message, whose first line names it.
    return any(m.startswith("Dynamo recompile limit exceeded") for m in counters["unimplemented"])


RECOMPILE_LIMIT_NOTE = (
    "train.compile: torch reached its recompile limit (torch._dynamo.config.recompile_limit) "
    "and ran some decoder layer calls uncompiled; TORCH_LOGS=recompiles names what changed"
)


def compile_seconds() -> float:
    """Seconds torch has spent compiling in this process (forward and backward graphs)."""
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))


def eager(compiled: bool) -> Any:
    """Compiled layers run eagerly inside (torch.compile's force_eager stance): for every
    forward but the training step's (evaluation, generation, reference log-probabilities,
    tracked steps). Each of those differs from the step in what torch guards on (grad
    mode, the KV cache, the layer index generation passes), so compiling them would spend
    the layers' recompile limit (RECOMPILE_LIMIT) before training and leave its steps
    uncompiled."""
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()
