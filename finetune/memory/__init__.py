"""Memory: what a training run needs before it starts, and what it used.

`dryrun` (real training steps on the meta device, measured by `tracker`: the estimate),
`presets` (configs of well-known models, so estimates work offline), `measure` (the peak
during a run), `allocator` (the CUDA caching allocator's reserved bytes), `fit`, `render`
(table, JSON, markdown, plot). See docs/memory.md.
"""

from __future__ import annotations

from typing import Any

from finetune.memory.arch import Architecture, from_config
from finetune.memory.estimate import Estimate, Setup

__all__ = [
    "Architecture",
    "Estimate",
    "Setup",
    "from_config",
    "setup_from_recipe",
]


def setup_from_recipe(recipe: Any, device: str | None = None) -> Setup:
    """The estimator's `Setup` for a `finetune.recipe.Recipe` (auto values resolved as
    models.py resolves them: int8 and bf16 on CUDA, none and fp32 on the CPU)."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, adapter, train = recipe.model, recipe.adapter, recipe.train
    quant = model.quantization
    if quant == "auto":
        quant = "int8" if device == "cuda" else "none"
    dtype = model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    targets = adapter.target_modules
    return Setup(
        method=adapter.method,
        quant=quant,
        double_quant=model.double_quant,
        dtype=dtype,
        r=adapter.r,
        targets=targets if isinstance(targets, str) else tuple(targets),
        virtual_tokens=adapter.num_virtual_tokens,
        prefix_projection=adapter.prefix_projection,
        lora_dropout=adapter.dropout,
        batch=train.micro_batch_size,
        seq=recipe.data.max_length,
        # peft refuses prefix tuning with gradient checkpointing; the run turns it off
        grad_ckpt=train.gradient_checkpointing and adapter.method != "prefix",
        optimizer="adamw",
        attn=model.attn_implementation,
        device="cuda" if device.startswith("cuda") else "cpu",
        # Packing always masks; otherwise the default (padding when batch > 1) holds.
        masked=True if recipe.data.packing else None,
    )
