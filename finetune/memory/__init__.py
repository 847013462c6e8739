"""Memory: what a training run needs before it starts, and what it used.

`dryrun` (real training steps on the meta device, measured by `tracker`: the estimate;
`standin` and `metaops` make meta tensors allocate what the real step allocates),
`presets` (configs of well-known models, so estimates work offline), `measure` (the peak
during a run), `allocator` (the CUDA caching allocator's reserved bytes), `fit`, `render`
(table, JSON, markdown, plot). See docs/memory.md.
"""

from __future__ import annotations

from typing import Any

from finetune.memory.arch import Architecture, from_config
from finetune.memory.estimate import Estimate, Setup
from finetune.methods import allows_gradient_checkpointing
from finetune.precision import (
    autocast_dtype,
    default_device,
    on_cuda,
    resolve_dtype,
    resolve_mixed_precision,
    resolve_quantization,
)

__all__ = [
    "Architecture",
    "Estimate",
    "Setup",
    "from_config",
    "setup_from_recipe",
]


def setup_from_recipe(recipe: Any, device: str | None = None) -> Setup:
    """The estimator's `Setup` for a `finetune.recipe.Recipe` on `device` (default: this
    machine's), its auto values resolved as loading the model resolves them."""
    from finetune import sharding

    device = device or default_device()
    model, adapter, train = recipe.model, recipe.adapter, recipe.train
    processes = sharding.world_size()  # WORLD_SIZE, as the launcher started this process
    targets = adapter.target_modules
    dtype = resolve_dtype(model.dtype, device)
    return Setup(
        method=adapter.method,
        quant=resolve_quantization(model.quantization, device),
        double_quant=model.double_quant,
        dtype=dtype,
        autocast=autocast_dtype(resolve_mixed_precision(train.mixed_precision, device)),
        r=adapter.r,
        targets=targets if isinstance(targets, str) else tuple(targets),
        virtual_tokens=adapter.num_virtual_tokens,
        prefix_projection=adapter.prefix_projection,
        lora_dropout=adapter.dropout,
        batch=train.micro_batch_size,
        seq=recipe.data.max_length,
        # The run turns checkpointing off where the method cannot have it (prefix tuning).
        grad_ckpt=train.gradient_checkpointing and allows_gradient_checkpointing(adapter.method),
        optimizer=train.optimizer,
        objective=train.objective,
        reference=train.reference,
        attn=model.attn_implementation,
        device="cuda" if on_cuda(device) else "cpu",
        # Packing always masks; otherwise the default (padding when batch > 1) holds.
        masked=True if recipe.data.packing else None,
        processes=processes,
        sharding="fsdp" if sharding.requested() is not None else "none",
    )
