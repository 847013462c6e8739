"""Sharded training (FSDP2): the base model's frozen weights and the adapter split over the
processes, with torch's `fully_shard`, the same way on the CPU (gloo) and on GPUs.

A run is sharded when `accelerate launch` starts it with an FSDP config (it sets
ACCELERATE_USE_FSDP=true and FSDP_VERSION; the same variables set by hand work under
torchrun) and there is more than one process. finetune applies `fully_shard` itself rather
than letting accelerate do it: accelerate turns any CPU run into plain data parallelism
(its FSDP needs a GPU type), so its sharding could not be tested on the CPU, and one code
path on both devices is the one the tests check.

What leaves a sharded run is whole: the adapter and the optimizer states are gathered (every
process takes part; they are adapter-sized) before the main process writes them, in the
same format as an unsharded run's, so a checkpoint resumes with or without sharding.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from finetune import methods
from finetune.errors import UserError
from finetune.precision import on_cuda, resolve_mixed_precision, resolve_quantization

FLAG = "ACCELERATE_USE_FSDP"  # accelerate launch sets it for distributed_type: FSDP


@dataclass(frozen=True)
class Sharding:
    """How to shard, from accelerate's FSDP variables."""

    reshard_after_forward: bool
    # Classes to shard one by one (FSDP_TRANSFORMER_CLS_TO_WRAP); empty: the model's
    # `_no_split_modules`, its decoder layers, as accelerate's TRANSFORMER_BASED_WRAP does.
    layer_classes: tuple[str, ...]


def requested() -> Sharding | None:
    """The sharding asked for by the environment, or None for an unsharded run.

    Raises:
        UserError: an FSDP setting finetune does not run (FSDP1, parameter offload).
    """
    if os.environ.get(FLAG, "false").lower() != "true" or world_size() < 2:
        return None  # one process has nothing to shard over
    version = os.environ.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise UserError(
            f"FSDP_VERSION is {version}: finetune shards with "
            "FSDP2 only; set fsdp_config.fsdp_version: 2 in the accelerate config "
            "(recipes/accelerate/fsdp.yaml)"
        )
    if truth("FSDP_OFFLOAD_PARAMS", default=False):
        raise UserError(
            "fsdp_offload_params: true is not supported by finetune; set it to false in the "
            "accelerate config"
        )
    classes = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return Sharding(
        reshard_after_forward=truth("FSDP_RESHARD_AFTER_FORWARD", default=True),
        layer_classes=tuple(c.strip() for c in classes.split(",") if c.strip()),
    )


def truth(variable: str, *, default: bool) -> bool:
    """A yes/no variable, read as accelerate reads it (true/false, yes/no, 1/0, on/off).

    Raises:
        UserError: any other value (it read "0" or "no" as true).
    """
    given = os.environ.get(variable)
    if given is None:
        return default
    value = given.strip().lower()
    if value in ("y", "yes", "t", "true", "on", "1"):
        return True
    if value in ("n", "no", "f", "false", "off", "0"):
        return False
    raise UserError(f"{variable} is {given!r}; set it to true or false")


def world_size() -> int:
    """The number of processes the launcher says there are (WORLD_SIZE).

    Raises:
        UserError: WORLD_SIZE is no whole number of processes.
    """
    given = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(given)
    except ValueError:
        size = 0
    if size < 1:
        raise UserError(
            f"WORLD_SIZE is {given!r}, not a number of processes; unset it, or let "
            "accelerate launch or torchrun set it"
        )
    return size


def check_launch() -> None:
    """WORLD_SIZE above 1 without a launcher's rendezvous (MASTER_ADDR): accelerate would
    end in a ValueError traceback when the Accelerator is made, after the model loaded.

    Raises:
        UserError: WORLD_SIZE set by hand, with no accelerate launch or torchrun around it.
    """
    size = world_size()
    if size > 1 and not os.environ.get("MASTER_ADDR"):
        raise UserError(
            f"WORLD_SIZE is {size} but no launcher started this process (MASTER_ADDR is not "
            "set); start it with `accelerate launch` or `torchrun`, or unset WORLD_SIZE for "
            "one process"
        )


def check_recipe(recipe: Any, device: str) -> None:
    """Refuse, before the model loads, what cannot be sharded.

    Raises:
        UserError: see `refusal`.
    """
    if requested() is None:
        return
    problem = refusal(
        quantization=resolve_quantization(recipe.model.quantization, device),
        method=recipe.adapter.method,
        objective=recipe.train.objective,
        mixed_precision=resolve_mixed_precision(recipe.train.mixed_precision, device),
    )
    if problem:
        raise UserError(problem)


def refusal(*, quantization: str, method: str, objective: str, mixed_precision: str) -> str:
    """Why a run of these settings cannot be sharded ("" when it can): an int8 base, prefix
    or prompt tuning, a preference objective, fp16 mixed precision. One text for train and
    for `finetune estimate --sharding fsdp`."""
    if quantization == "int8":
        return (
            "model.quantization int8 cannot be sharded (bitsandbytes' int8 weights are no "
            "floating-point tensors FSDP can split); use model.quantization=nf4 (QLoRA) or "
            "none, or train with data parallelism (recipes/accelerate/ddp.yaml)"
        )
    if method in methods.VIRTUAL_TOKEN_METHODS:
        return (
            f"adapter.method {method} is not supported under FSDP sharding (LoRA, DoRA and "
            "IA3 are); train it with data parallelism (recipes/accelerate/ddp.yaml)"
        )
    if objective != "sft":
        return (
            f"train.objective {objective} is not supported under FSDP sharding "
            "yet; train it with data parallelism (recipes/accelerate/ddp.yaml)"
        )
    if mixed_precision == "fp16":
        return (
            "train.mixed_precision fp16 is not supported under FSDP sharding (its loss "
            "scaler would judge each shard's gradients apart); use bf16 or no"
        )
    return ""


@contextlib.contextmanager
def accelerate_unsharded() -> Iterator[None]:
    """Build the Accelerator as for a plain multi-process run: finetune shards the model
    itself (see the module's docstring), and accelerate's FSDP plugin would shard it again
    on GPUs when `prepare` saw it."""
    kept = os.environ.pop(FLAG, None)
    try:
        yield
    finally:
        if kept is not None:
            os.environ[FLAG] = kept


def layer_classes(inner: Any, plan: Sharding) -> tuple[str, ...]:
    """The class names sharded one by one in the transformers model `inner`: the plan's, or
    the model's decoder layers (`_no_split_modules`). Called when the model loads, before
    the run directory is written, and again by `shard`.

    Raises:
        UserError: a class of the plan names no module of the model.
    """
    layers = tuple(getattr(inner, "_no_split_modules", None) or ())
    found = {type(module).__name__ for module in inner.modules() if module is not inner}
    missing = sorted(set(plan.layer_classes) - found)
    if missing:  # accelerate's own TRANSFORMER_BASED_WRAP refuses it too
        hint = f"name the model's decoder layer ({', '.join(layers)})" if layers else "fix it"
        raise UserError(
            f"FSDP_TRANSFORMER_CLS_TO_WRAP: no module of {type(inner).__name__} is a "
            f"{', '.join(missing)}, so nothing would be sharded layer by layer; {hint}, or "
            "leave fsdp_transformer_layer_cls_to_wrap unset for the decoder layers"
        )
    return plan.layer_classes or layers


def shard(model: Any, plan: Sharding, device: str, mesh: Any = None) -> Any:
    """Shard the peft model's inner transformers model in place: each decoder layer, then
    the rest (embeddings, final norm, head). Returns the root FSDP module.

    The root is the transformers model, not the peft wrapper: generate() calls it directly,
    and FSDP's hooks run only when the module they sit on is called. `mesh`: the processes
    to shard over (default: every process of the run, on `device`; the dry run passes its
    fake one).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        mesh = init_device_mesh("cuda" if on_cuda(device) else "cpu", (dist.get_world_size(),))
    # A peft model's transformers model (a full fine-tuning dry run's model is one already).
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(layer_classes(inner, plan))
    for module in reversed(list(inner.modules())):  # children first: FSDP2 nests upwards
        if module is not inner and type(module).__name__ in names:
            fully_shard(module, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)
    return fully_shard(inner, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)


def local_share(model: Any) -> tuple[int, int]:
    """(elements this process holds, elements of the whole model)."""
    held = total = 0
    for param in model.parameters():
        local = param.to_local() if is_sharded(param) else param
        held, total = held + local.numel(), total + param.numel()
    return held, total


def is_sharded(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole(tensor: Any) -> Any:
    """A sharded tensor gathered whole (a collective: every process must call it in the same
    order), anything else as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The trainable tensors (the adapter) whole, under their names in model.state_dict(),
    for peft's save_pretrained(state_dict=...): the frozen base is never gathered."""
    return {
        name: whole(param.detach()).cpu()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def optimizer_state(optimizer: Any) -> dict[str, Any]:
    """The optimizer's state dict with every sharded state gathered whole: the format of an
    unsharded run's (states by parameter index)."""
    saved = optimizer.state_dict()
    saved["state"] = {
        index: {key: whole(value) for key, value in states.items()}
        for index, states in saved["state"].items()
    }
    return saved


def load_optimizer_state(optimizer: Any, saved: dict[str, Any]) -> None:
    """Load a whole optimizer state (optimizer_state's, or an unsharded run's) into an
    optimizer over sharded parameters: each process keeps its own slice of each state."""
    from torch.distributed.tensor import distribute_tensor

    optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not is_sharded(param):
                continue
            states = optimizer.state.get(param, {})
            for key, value in states.items():
                if torch.is_tensor(value) and not is_sharded(value) and value.shape == param.shape:
                    # src_data_rank None: every process read the same file, so each slices
                    # its own part without sending anything.
                    states[key] = distribute_tensor(
                        value, param.device_mesh, param.placements, src_data_rank=None
                    )


def clip_grad_norm(params: list[Any], max_norm: float | None) -> float:
    """The gradients' total norm over every process's shards, clipped to `max_norm` if
    given. Each process's norm of its DTensor shards is partial; `whole` reduces it."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = whole(torch.nn.utils.get_total_norm(grads))
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)
