"""The dry run: real training steps on the meta device, measured by `MemoryTracker`.

The model is built from its transformers config with no memory behind it, the adapter is
attached by `finetune.adapters.attach` (the code training uses), and the step is the one
`train.Loop.step` takes: `trained_positions_loss`, backward, `torch.optim.AdamW.step()`.
Nothing about any architecture is written by hand; what the step allocates is what the
estimate reports.

Decisions that differ from a real run, and why:
- Attention and mixed precision on meta tensors: see `metaops`; `attn="flash"` builds the
  model with SDPA and is measured the same way.
- bitsandbytes layers do not run on meta: `standin.StandInLinear` stores and computes what
  Linear8bitLt / Linear4bit store and compute (see its docstring).
- Gradient clipping (a norm per parameter, a few bytes) and `float(loss)` are skipped.

From a dry run comes an `Estimate` (`estimate_from_config`), and from more dry runs its
variants (`reestimate`, for the fit search) and the comparison of methods.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from finetune import adapters, chunked_loss
from finetune.errors import UserError
from finetune.memory.allocator import replay
from finetune.memory.arch import Architecture
from finetune.memory.estimate import (
    CPU_METRIC,
    CUBLAS_WORKSPACE_HOPPER,
    CUBLAS_WORKSPACE_OTHER,
    CUDA_CONTEXT_BYTES,
    MATMUL_THREADS,
    METRIC,
    SHARDING_COMPONENT,
    Estimate,
    Setup,
)
from finetune.memory.metaops import (
    KnownSizes,
    autocast_to,
    emulate_autocast,
    register_fused_sdpa,
)
from finetune.memory.standin import (
    StandInLinear,
    cast_adapter_inputs_as_bitsandbytes_layers,
    quantize,
)
from finetune.memory.tracker import MemoryTracker
from finetune.methods import (
    VIRTUAL_TOKEN_METHODS,
    adapts_modules,
    allows_gradient_checkpointing,
    input_virtual_tokens,
)
from finetune.peft_compat import cache_by_new_name
from finetune.positions import most_logit_positions, trained_positions_loss
from finetune.recipe import AdapterSection

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mixed_precision(setup: Any) -> bool:
    """Full fine-tuning with fp32 master weights under 16-bit autocast."""
    return setup.method == "full" and setup.master_weights and setup.dtype != "float32"


def autocast_dtype(setup: Any) -> torch.dtype | None:
    """What the run's autocast casts matmuls to: the 16-bit dtype of mixed-precision full
    fine-tuning, or `setup.autocast` over float32 weights; None when nothing is cast."""
    if mixed_precision(setup):
        return DTYPES[setup.dtype]
    return DTYPES[setup.autocast] if setup.autocast else None


@dataclass
class DryRun:
    """What one dry-run training step allocated.

    Attributes:
        peak_bytes: peak bytes of live tensors; `breakdown` splits it by tracker category.
        peak_phase: forward, logits, backward or optimizer.
        total_params / trainable_params: exact counts (peft's, 4-bit weights unpacked).
        events: (key, nbytes) allocation (+) and free (-) stream, for `allocator.replay`.
        quantization_scale_bytes / upcast_bytes: parts of `weights` (quantized bases).
        seconds: wall time of the build and step.
    """

    peak_bytes: int
    breakdown: dict[str, int]
    peak_phase: str
    total_params: int
    trainable_params: int
    saved_for_backward_bytes: int
    quantization_scale_bytes: int = 0
    upcast_bytes: int = 0
    seconds: float = 0.0
    events: list[tuple[int, int]] = field(default_factory=list, repr=False)


# ------------------------------------------------------------------ building


def build_config(raw: dict[str, Any], name: str = "config") -> Any:
    """A transformers config from a config.json dict.

    Raises:
        UserError: transformers does not know the model type or rejects the fields.
    """
    from transformers import CONFIG_MAPPING, AutoConfig

    fields = dict(raw)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise UserError(f"{name}: no model_type; transformers cannot tell which model this is")
    if model_type not in CONFIG_MAPPING:
        raise UserError(
            f"{name}: transformers cannot build model_type {model_type!r}: not a model type "
            "this transformers version knows"
        )
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"{name}: transformers cannot build model_type {model_type!r} ({_first_line(err)})"
        ) from None


def build_model(config: Any, setup: Any) -> Any:
    """The causal LM of `config` on the meta device, in the setup's dtype and attention.

    Raises:
        UserError: transformers cannot build a causal LM from this config.
    """
    from transformers import AutoModelForCausalLM

    attn = "eager" if setup.attn == "eager" else register_fused_sdpa()
    dtype = torch.float32 if mixed_precision(setup) else DTYPES[setup.dtype]
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    except Exception as err:  # transformers raises ValueError, KeyError, ImportError, ...
        kind = getattr(config, "model_type", "?")
        raise UserError(
            f"transformers cannot build a causal LM for model_type {kind!r}: {_first_line(err)}"
        ) from None
    return cache_by_new_name(model)


def adapter_spec(setup: Any) -> Any:
    """The recipe's adapter section for `setup` (what `adapters.attach` reads)."""
    targets = setup.targets if isinstance(setup.targets, str) else list(setup.targets)
    return AdapterSection(
        method=setup.method,
        r=setup.r,
        dropout=setup.lora_dropout,
        target_modules=targets,
        num_virtual_tokens=setup.virtual_tokens,
        prefix_projection=setup.prefix_projection,
    )


def prepare(model: Any, setup: Any) -> Any:
    """Attach the adapter as training does; full fine-tuning trains every parameter."""
    checkpointing = setup.grad_ckpt and allows_gradient_checkpointing(setup.method)
    if setup.method == "full":
        model.requires_grad_(True)
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        return model
    check_targets(model, setup)
    return adapters.attach(
        model,
        adapter_spec(setup),
        quantized=setup.quant != "none",
        gradient_checkpointing=checkpointing,
    )


def check_targets(model: Any, setup: Any) -> None:
    """Refuse target names that pick no layer, naming the model's Linear ones. The output
    head and the embeddings count: peft adapts them with LoRA and training accepts them."""
    if isinstance(setup.targets, str) or not adapts_modules(setup.method):
        return
    names = linear_names(model)
    modules = adapters.adaptable_modules(model)
    unknown = [t for t in setup.targets if not adapters.picks_a_layer(t, modules)]
    if unknown:
        raise UserError(
            f"--targets: {', '.join(unknown)} match no Linear layer of this model; its "
            f"Linear layers are {', '.join(names)} (or use all-linear)"
        )


def linear_names(model: Any) -> list[str]:
    """Deduplicated leaf names of the model's Linear layers, output head excluded."""
    return adapters.linear_module_names(model)


# ------------------------------------------------------------------ the step


def meta_batch(setup: Any, vocab: int) -> dict[str, torch.Tensor]:
    """A micro-batch shaped like the training loop's collate output, on meta.

    A masked setup carries a padding mask, which `KnownSizes` says is not all ones. A
    packed batch (position ids, no mask) makes transformers build a block-diagonal mask of
    the same shape, so one stand-in serves both.
    """
    paired = setup.objective in ("dpo", "orpo")  # chosen and rejected rows of each pair
    shape = (setup.batch * (2 if paired else 1), setup.seq)
    names = ["input_ids", "labels"]
    if setup.attention_masked or setup.objective != "sft":  # preference batches carry one
        names.append("attention_mask")
    if setup.objective == "kto":  # the mismatched sequences its KL term is estimated on
        names += [f"kl_{name}" for name in names]
    batch = {name: torch.empty(shape, dtype=torch.long, device="meta") for name in names}
    if cached_reference(setup):  # one fp32 log-probability per row, read from the cache
        batch["ref_logps"] = torch.empty(shape[0], dtype=torch.float32, device="meta")
    return batch


def cached_reference(setup: Any) -> bool:
    return getattr(setup, "reference", "forward") == "cached"


def make_optimizer(model: Any, setup: Any) -> Any:
    """The optimizer over the trainable parameters: training's (prepare.make_optimizer:
    torch's AdamW with its default implementation for the device), or the one named."""
    params = [p for p in model.parameters() if p.requires_grad]
    if setup.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    if setup.optimizer == "adamw8bit":
        import bitsandbytes  # its 8-bit states and update kernel have meta implementations

        return bitsandbytes.optim.AdamW8bit(params, lr=1e-3)
    return torch.optim.AdamW(params, lr=1e-3, **adamw_options(setup))


def adamw_options(setup: Any) -> dict[str, bool]:
    """The AdamW implementation the setup runs, as the constructor's flags.

    torch picks foreach by default when every parameter is on CUDA, for-loop on the CPU
    (torch/optim/optimizer.py, `_default_to_fused_or_foreach`); on meta tensors it would
    pick for-loop, so the dry run names the device's choice. foreach steps all tensors at
    once and allocates whole-model temporaries (`torch._foreach_sqrt` of every second
    moment, ...: measured on an H200, 13 GB more than for-loop for a 6.9B bf16 model);
    for-loop allocates one parameter's temporaries at a time; fused updates in place.
    """
    implementation = setup.optimizer.removeprefix("adamw-")
    if implementation == "adamw":
        implementation = "foreach" if setup.device == "cuda" else "forloop"
    if implementation == "fused":
        return {"fused": True}
    return {"foreach": implementation == "foreach"}


@contextlib.contextmanager
def fused_kernels_on_meta(optimizer: Any) -> Iterator[None]:
    """Let `fused=True` AdamW run its fused kernel (which has a meta implementation) on
    meta tensors: torch refuses devices outside its list before it reaches the kernel."""
    if not optimizer.defaults.get("fused"):
        yield
        return
    import torch.optim.adam as adam

    check = adam._device_dtype_check_for_fused
    adam._device_dtype_check_for_fused = lambda *args, **kwargs: None
    try:
        yield
    finally:
        adam._device_dtype_check_for_fused = check


def optimizer_note(setup: Any) -> str:
    """What implementation the optimizer's step runs (its temporaries depend on it)."""
    if setup.optimizer in ("sgd", "adamw8bit"):
        return setup.optimizer
    options = adamw_options(setup)
    if options.get("fused"):
        implementation = "fused"
    else:
        implementation = "foreach" if options["foreach"] else "for-loop"
    default = " (torch's default here)" if setup.optimizer == "adamw" else ""
    return f"AdamW, {implementation}{default}"


def cublas_workspace_bytes() -> int:
    """cuBLAS's workspace per thread (see estimate.CUBLAS_WORKSPACE_HOPPER): the
    CUBLAS_WORKSPACE_CONFIG environment variable's, else by this machine's GPU, else
    Hopper's (the larger; estimates are mostly made away from the GPU they are for)."""
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG", "")
    pairs = re.findall(r":([0-9]+):([0-9]+)", config)
    if pairs:
        return sum(int(size) * 1024 * int(count) for size, count in pairs)
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return CUBLAS_WORKSPACE_HOPPER if major in (9, 10, 12) else CUBLAS_WORKSPACE_OTHER
    return CUBLAS_WORKSPACE_HOPPER


def track_workspaces(tracker: Any, setup: Any) -> list[torch.Tensor]:
    """cuBLAS's workspaces of a CUDA step (kept alive by the caller: cuBLAS never frees
    them); none on the CPU, whose BLAS scratch is outside torch's allocator."""
    if setup.device != "cuda":
        return []
    size = cublas_workspace_bytes()
    workspaces = [
        torch.empty(size, dtype=torch.uint8, device="meta") for _ in range(MATMUL_THREADS)
    ]
    for workspace in workspaces:
        tracker.track(workspace, "library workspaces")
    return workspaces


def track_gradient_buckets(tracker: Any, model: Any, setup: Any) -> list[torch.Tensor]:
    """Data parallelism's gradient buckets (kept alive by the caller): DDP's reducer holds
    every trainable gradient once more in flat buckets, which it all-reduces and copies back
    (torch/nn/parallel/distributed.py, gradient_as_bucket_view off as accelerate leaves it;
    measured: rebuilt in the second step's forward, the adapter's size). None for one
    process or when sharded (FSDP2 reduce-scatters per layer, in the step)."""
    if not setup.data_parallel:
        return []
    buckets = [
        torch.empty(p.numel(), dtype=p.dtype, device="meta")
        for p in model.parameters()
        if p.requires_grad
    ]
    for bucket in buckets:
        tracker.track(bucket, "gradients")
    return buckets


def dry_run(config: Any, setup: Any) -> DryRun:
    """Build `config`'s model on meta, attach `setup`'s adapter, take two tracked steps.

    Args:
        config: a transformers `PretrainedConfig` of a decoder.
        setup: a `finetune.memory.estimate.Setup`.

    Raises:
        UserError: the model cannot be built, a target name is unknown, or the setup
            cannot run on meta tensors.
    """
    if setup.sharding == "none":
        return run_steps(config, setup, None)
    from finetune.memory import sharded

    if sharded.in_process_group():
        return sharded.in_child_process(dry_run, config, setup)
    with sharded.fake_world(setup.processes) as mesh:
        return run_steps(config, setup, mesh)


def run_steps(config: Any, setup: Setup, mesh: Any) -> DryRun:
    """`dry_run`, sharded over `mesh` (sharded.fake_world) when given."""
    started = time.perf_counter()
    model = build_model(config, setup)
    scales = 0
    if setup.quant != "none":
        scales, _ = quantize(model, setup, DTYPES[setup.dtype])
    model = prepare(model, setup)
    if setup.device == "cuda" and autocast_dtype(setup) is not None:
        cast_adapter_inputs_as_bitsandbytes_layers(model)
    if autocast_dtype(setup) is not None:
        emulate_autocast(model)
    model.train()
    counts = adapters.count_parameters(model)
    # 4-bit weights are packed two per byte; count them unpacked, as peft does Params4bit.
    packed = sum(
        m.in_features * m.out_features - m.weight.numel()
        for m in model.modules()
        if isinstance(m, StandInLinear)
    )
    # Positions with logits: prompt tuning's last virtual token also predicts the first label.
    most = most_logit_positions(setup.seq, virtual_tokens(setup))
    trained = min(setup.logit_positions or most, most)
    if mesh is not None:  # before the optimizer, as in training: it holds the shards
        from finetune.memory.sharded import shard_on_meta

        shard_on_meta(model, mesh)
    upcast = upcast_bytes(model) if setup.quant != "none" else 0
    optimizer = make_optimizer(model, setup)
    tracker = MemoryTracker(model)
    workspaces = track_workspaces(tracker, setup) + track_gradient_buckets(tracker, model, setup)
    with (
        autocast_to(autocast_dtype(setup), setup.device),
        fused_kernels_on_meta(optimizer),
        chunked_loss.enabled(setup.chunked_loss),
    ):
        step(model, optimizer, tracker, setup, trained, config.vocab_size)
    tracker.remove_hooks()
    del workspaces
    return DryRun(
        peak_bytes=tracker.peak_bytes,
        breakdown=dict(tracker.peak_breakdown),
        peak_phase=tracker.peak_phase,
        total_params=counts.total + packed,
        trainable_params=counts.trainable,
        saved_for_backward_bytes=tracker.peak_saved_bytes,
        quantization_scale_bytes=scales,
        upcast_bytes=upcast,
        seconds=time.perf_counter() - started,
        events=[(e.key, e.nbytes) for e in tracker.events],
    )


# Two steps, not one: AdamW creates its states lazily in the first step, so only from the
# second step on do forward and backward run with the states alive (and the allocator's
# cached blocks laid out by a previous step). For full fine-tuning that second step sets
# the peak of a whole run; one step would miss it.
STEPS = 2


def upcast_bytes(model: Any) -> int:
    """The frozen float32 parameters of a quantized base (norms, embeddings, head kept or
    upcast by prepare_model_for_kbit_training), as this process holds them (a shard of
    each when sharded)."""
    held = 0
    for param in model.parameters():
        if param.dtype == torch.float32 and not param.requires_grad:
            held += getattr(param, "_local_tensor", param).numel() * 4
    return held


def step(model: Any, optimizer: Any, tracker: Any, setup: Any, trained: int, vocab: int) -> None:
    """`STEPS` tracked training steps: forward and loss, backward, optimizer, zero_grad
    (set_to_none, as train.Loop does)."""
    with tracker, KnownSizes(trained, setup.attention_masked):
        for _ in range(STEPS):
            batch = meta_batch(setup, vocab)
            for tensor in batch.values():
                tracker.track(tensor, "activations")
            with tracker.phase("forward"):  # as train.Loop.forward_loss
                loss = step_loss(model, batch, setup, trained)
            with tracker.phase("backward"):
                loss.backward()
            del loss, batch, tensor
            with tracker.phase("optimizer"):
                optimizer.step()
            tracker.keep_optimizer_states(optimizer)
            optimizer.zero_grad(set_to_none=True)


def step_loss(model: Any, batch: dict[str, torch.Tensor], setup: Any, trained: int) -> Any:
    """The step's loss as train.Loop.forward_loss computes it for the setup's objective."""
    if setup.objective == "sft":
        return trained_positions_loss(model, batch, trained, virtual_tokens(setup))
    return preference_loss(model, batch, setup)


def preference_loss(model: Any, batch: dict[str, torch.Tensor], setup: Any) -> Any:
    """What `preference.micro_batch_loss` allocates: the policy's scores of every sequence
    (chosen then rejected rows) with gradients; for DPO and KTO the reference's without
    (the adapter disabled, in eval mode); for KTO also its KL sequences, by the policy and
    the reference, without gradients. The losses' own tensors are a few per pair (the
    data-dependent bookkeeping, rewards and accuracy, is left out)."""
    from finetune import preference

    objective = preference.Objective(setup.objective)
    logps, counts = preference.sequence_logps(model, batch)
    if objective.name == "orpo":
        n = logps.shape[0] // 2
        means = logps / counts.clamp(min=1)
        losses, _, _ = preference.orpo_ratio_losses(means[:n], means[n:], objective)
        return -logps[:n].sum() + losses.sum()
    if objective.name == "kto":
        with torch.no_grad():
            preference.sequence_logps(model, batch, "kl_")
        with reference_forward(model):
            preference.sequence_logps(model, batch, "kl_")
    ref = batch.get("ref_logps")  # train.reference cached: no reference forward here
    if ref is None:
        with reference_forward(model):
            ref, _ = preference.sequence_logps(model, batch)
    return (1 - torch.sigmoid(objective.beta * (logps - ref))).sum()


def reference_forward(model: Any) -> Any:
    """The reference policy's forward as `preference.Reference.active` runs it. Full
    fine-tuning (the method comparison) has no adapter to disable: its reference would be a
    frozen copy of the model, whose forward is the same one and whose weights are not
    counted here."""
    from finetune import preference

    if hasattr(model, "disable_adapter"):
        return preference.Reference().active(model)
    return torch.no_grad()


def virtual_tokens(setup: Setup) -> int:
    """Prompt tuning's virtual tokens in front of every sequence (0 for other methods)."""
    return input_virtual_tokens(setup.method, setup.virtual_tokens)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


# ------------------------------------------------------------------ the estimate


def estimate_from_config(config: Any, setup: Setup, name: str = "") -> Estimate:
    """`Estimate` (the shape render.py and report.py read) from one dry run of `setup`.

    Components: the tracker's breakdown at the peak; `allocated_bytes` is the dry run's
    peak; `reserved_bytes` replays its allocation stream through `allocator.replay`.
    """
    run = dry_run(config, setup)
    b = run.breakdown
    mixed = mixed_precision(setup)
    components = {
        "frozen base weights": b["weights"] - run.quantization_scale_bytes - run.upcast_bytes,
        "quantization scales": run.quantization_scale_bytes,
        "kept/upcast in higher precision": run.upcast_bytes,
        # Under mixed precision the fp32 parameters are the master weights.
        "trainable parameters": 0 if mixed else b["adapter"],
        "gradients": b["gradients"],
        "optimizer states": b["optimizer"],
        "optimizer step temporaries": b["optimizer step"],
        "master weights": b["adapter"] if mixed else 0,
        "activations": b["activations"],
        "backward temporaries": b["backward temporaries"],
        "logits and loss": b["logits"],
        "library workspaces": b["library workspaces"],
        SHARDING_COMPONENT: b["gathered weights"],
        "runtime overhead": CUDA_CONTEXT_BYTES if setup.device == "cuda" else 0,
    }
    peaks = replay(run.events)
    return Estimate(
        arch=describe(config, name),
        setup=setup,
        components=components,
        notes={
            "activations": f"alive at the peak ({run.peak_phase}); "
            f"{run.saved_for_backward_bytes:,} B saved for backward at most",
            "master weights": "fp32 parameters; AdamW steps them (16-bit copies: activations)"
            if mixed
            else "",
            "runtime overhead": "CUDA context (not in max allocated)"
            if setup.device == "cuda"
            else "",
            "optimizer step temporaries": optimizer_note(setup),
            SHARDING_COMPONENT: sharding_note(setup),
            "gradients": "with DDP's gradient buckets (the trainable gradients once more)"
            if setup.data_parallel
            else "",
            "library workspaces": f"cuBLAS, {MATMUL_THREADS} threads x "
            f"{cublas_workspace_bytes() / 2**20:g} MiB"
            if setup.device == "cuda"
            else "",
        },
        total_params=run.total_params,
        trainable_params=run.trainable_params,
        metric=METRIC if setup.device == "cuda" else CPU_METRIC,
        detail={"dry_run_seconds_x1000": int(run.seconds * 1000)},
        reserved_bytes=peaks.reserved_bytes,
        config=config,
    )


def sharding_note(setup: Setup) -> str:
    """What the sharded components are, for the estimate's table."""
    if setup.sharding == "none":
        return ""
    return (
        f"FSDP2 over {setup.processes} processes: weights, adapter, gradients and states "
        "are this process's shards; these are whole parameters gathered for compute"
    )


def describe(config: Any, name: str = "") -> Architecture:
    """An `Architecture` naming the model (descriptive only: counts come from the dry run)."""

    def get(*names: str) -> int:
        return next((int(v) for n in names if isinstance(v := getattr(config, n, None), int)), 0)

    heads = get("num_attention_heads", "n_head")
    hidden = get("hidden_size", "n_embd")
    return Architecture(
        model_type=str(getattr(config, "model_type", "")),
        hidden=hidden,
        intermediate=get("intermediate_size", "ffn_hidden_size", "n_inner"),
        layers=get("num_hidden_layers", "n_layer"),
        heads=heads,
        kv_heads=get("num_key_value_heads") or heads,
        head_dim=get("head_dim") or (hidden // heads if heads else 0),
        vocab=get("vocab_size"),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        name=name or str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "")),
    )


def reestimate(arch: Architecture, config: object, setup: Setup) -> Estimate:
    """A dry run of a variant of an estimate (another method, batch or length)."""
    return estimate_from_config(config, setup, arch.name)


# The rows of the method comparison: a label (with the dtype filled in) and the change.
COMPARISON = (
    (
        "full, pure {dt} (weights, gradients, AdamW states {dt})",
        {"method": "full", "master_weights": False, "quant": "none"},
    ),
    (
        "full, mixed precision (fp32 master weights, gradients, AdamW; {dt} autocast)",
        {"method": "full", "master_weights": True, "quant": "none"},
    ),
    ("LoRA, {dt} base", {"method": "lora", "quant": "none"}),
    ("LoRA, int8 base", {"method": "lora", "quant": "int8"}),
    ("QLoRA, nf4 base", {"method": "lora", "quant": "nf4", "double_quant": True}),
    ("prefix, {dt} base", {"method": "prefix", "quant": "none", "grad_ckpt": False}),
    ("prompt, {dt} base", {"method": "prompt", "quant": "none"}),
)
SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16"}
# Under the comparison of a sharded setup, in place of the rows it leaves out.
UNSHARDABLE_ROWS_NOTE = (
    "int8 base, prefix, prompt: not shown; train refuses to shard them (FSDP2 cannot split "
    "int8 weights; virtual tokens are not supported sharded)"
)
# Under the comparison of a preference objective, in place of the rows it leaves out.
REFUSED_ROWS_NOTE = (
    "prefix, prompt: not shown; train refuses them with a preference objective (their "
    "virtual tokens move the model away from its reference from step 0)"
)


def reference_costs(est: Estimate) -> dict[str, int] | None:
    """DPO, KTO: the estimate's total with the reference's forward pass in the step and
    with its log-probabilities cached (train.reference), from a dry run of each."""
    if est.setup.objective not in ("dpo", "kto"):
        return None
    other = "cached" if est.setup.reference == "forward" else "forward"
    totals = {
        est.setup.reference: est.total_bytes,
        other: reestimate(est.arch, est.config, replace(est.setup, reference=other)).total_bytes,
    }
    return {
        "forward_total_bytes": totals["forward"],
        "cached_total_bytes": totals["cached"],
        "reference_forward_bytes": totals["forward"] - totals["cached"],
    }


def compare_methods(arch: Architecture, setup: Setup, config: object) -> list[tuple[str, Estimate]]:
    """The same model and shape under full fine-tuning and each adapter method (dry runs
    of `config`), all in the setup's 16-bit dtype (bf16 for an fp32 setup)."""
    dtype = setup.dtype if setup.dtype in SHORT_DTYPE else "bfloat16"
    rows = []
    for label, change in COMPARISON:
        if setup.objective != "sft" and change["method"] in VIRTUAL_TOKEN_METHODS:
            continue  # train refuses them with a preference objective: no number to show
        try:
            variant = replace(setup, **change, dtype=dtype)
        except UserError:  # a method or base that cannot be sharded: train refuses it too
            continue
        rows.append((label.format(dt=SHORT_DTYPE[dtype]), reestimate(arch, config, variant)))
    return rows
