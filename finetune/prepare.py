"""Everything a run needs, built and checked before anything is written: the data (with
its checks), the model with its adapter, the number of steps, the optimizer."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune import adapters, compiling, data, doctor, methods, models, sharding, tracking
from finetune.recipe import Recipe


@dataclass
class Prepared:
    """Everything a run needs, built and validated before anything is written."""

    recipe: Recipe
    loaded: models.LoadedModel
    model: Any
    splits: data.Splits
    params: adapters.ParameterCount
    gradient_checkpointing: bool
    notes: list[str] = field(default_factory=list)
    sharding: sharding.Sharding | None = None  # FSDP2 over the processes, or None

    def plan(self, sequences: int, steps: int, processes: int) -> list[str]:
        """What is about to run: parameter counts, the choices made for the user, the steps."""
        t = self.recipe.train
        return [
            f"{self.recipe.adapter.method}: {self.params}",
            *(f"note: {note}" for note in self.notes),
            f"{len(self.splits.train)} examples in {sequences} sequences; {steps} steps of "
            f"{t.micro_batch_size} x {t.grad_accum} x {processes} process(es)",
        ]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare(
    recipe: Recipe,
    device: str | None = None,
    strict: bool = False,
    force: bool = False,
    gpu_free_bytes: int | None = None,
) -> Prepared:
    """Load model, attach the adapter and tokenize the data; raise on any bad input.

    Every input check runs before the model loads, and before the CUDA fit check, so a bad
    input gets the same line on every device: the model folder, the data with its checks
    (finetune.doctor: an error, or with `strict` a warning, stops the run; other warnings
    become notes), the target modules. Then, on CUDA, whether the run fits the free memory
    (`force` skips it; `gpu_free_bytes` stands in for the device's free memory, for tests).
    """
    from finetune.memory.fit import check_recipe_fits_device

    device = device or models.default_device()
    seed_everything(recipe.train.seed)
    tracking.check_available(recipe.train.report_to)
    shards = sharding.requested()
    sharding.check_recipe(recipe, device)
    models.check_attention(recipe.model.attn_implementation, device)
    if recipe.train.compile:
        compiling.check_compiler(
            device, sharded=shards is not None, checkpointing=checkpoints(recipe)
        )
    source = models.resolve_source(recipe.model.path)
    if isinstance(source, Path):  # raises now; its note comes with the loaded model
        models.needs_remote_code(source, recipe.model.trust_remote_code)
    tokenizer = models.load_tokenizer(source, recipe.model.trust_remote_code)
    splits = data.prepare(recipe.data, tokenizer, recipe.train.seed)
    diagnosis = doctor.diagnose(recipe, tokenizer, splits)
    doctor.refuse(diagnosis, strict)
    unchecked = check_recipe_fits_device(recipe, device, force=force, free_bytes=gpu_free_bytes)
    loaded = models.load_model(
        recipe.model, device, tokenizer=tokenizer, sharded=bool(shards), training=True
    )
    notes = list(loaded.notes) + recipe.method_default_notes() + diagnosis.warning_lines()
    notes += [unchecked] if unchecked else []
    if recipe.eval.max_examples == 0 and splits.eval_rows and recipe.data.format != "text":
        notes.append("eval.max_examples is 0: exact-match generation skipped")
    checkpointing = recipe.train.gradient_checkpointing
    method = methods.METHODS[recipe.adapter.method]
    if checkpointing and not checkpoints(recipe):
        checkpointing = False
        notes.append(method.no_checkpointing)
    spec = adapters.with_init_text(
        recipe.adapter, data.first_prompt(recipe.data, splits.train_rows)
    )
    notes += adapters.init_notes(recipe.adapter, spec)
    model = adapters.attach(
        loaded.model,
        spec,
        quantized=loaded.quantization != "none",
        gradient_checkpointing=checkpointing,
        tokenizer_path=loaded.folder,
        tokenizer=tokenizer,
    )
    if shards is not None:  # before the run directory is written
        sharding.layer_classes(model.get_base_model(), shards)
    if recipe.train.compile:
        blocks = compiling.compile_blocks(model)
        notes.append(f"train.compile: {blocks} decoder layers compiled by torch.compile")
    params = adapters.count_parameters(model)
    return Prepared(recipe, loaded, model, splits, params, checkpointing, notes, shards)


def checkpoints(recipe: Recipe) -> bool:
    """Whether the run checkpoints activations: asked for, and the method allows it
    (prefix tuning does not; the run turns it off with a note)."""
    return recipe.train.gradient_checkpointing and methods.allows_gradient_checkpointing(
        recipe.adapter.method
    )


def total_steps(recipe: Recipe, n_items: int, world_size: int = 1) -> int:
    """Optimizer steps: max_steps, or enough for `epochs` passes over the items (examples or
    packed sequences), counting whole micro-batches as batching.micro_batches draws them."""
    if recipe.train.max_steps:
        return recipe.train.max_steps
    per_epoch = max(1, n_items // (recipe.train.micro_batch_size * world_size))
    return max(1, math.ceil(recipe.train.epochs * per_epoch / recipe.train.grad_accum))


def adamw(params: list[Any], name: str, lr: float, weight_decay: float) -> Any:
    """`train.optimizer`'s AdamW: torch's with the implementation named (none named:
    torch's default for the device), or bitsandbytes' 8-bit one."""
    if name == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    implementation = {
        "adamw": {},
        "adamw-foreach": {"foreach": True},
        "adamw-forloop": {"foreach": False},
        "adamw-fused": {"fused": True},
    }[name]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **implementation)


def make_optimizer(model: Any, recipe: Recipe, steps: int) -> tuple[Any, Any]:
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, recipe.train.optimizer, recipe.train.lr, recipe.train.weight_decay)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    scheduler = get_scheduler(
        name[recipe.train.schedule],
        optimizer,
        num_warmup_steps=min(recipe.train.warmup_steps, steps),
        num_training_steps=steps,
    )
    return optimizer, scheduler
