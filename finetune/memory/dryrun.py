"""The dry run: real training steps on the meta device, measured by `MemoryTracker`.

The model is built from its transformers config with no memory behind it, the adapter is
attached by `finetune.adapters.attach` (the code training uses), and the step is the one
`train.Loop.step` takes: `trained_positions_loss`, backward, `torch.optim.AdamW.step()`.
Nothing about any architecture is written by hand; what the step allocates is what the
estimate reports.

Decisions that differ from a real run, and why:
- SDPA on meta tensors would fall back to the math kernel, which stores the s x s score
  matrix that no fused kernel stores; it is routed to the fused CPU flash kernel, which
  saves what CUDA's flash kernel saves (output and a fp32 logsumexp per head and row).
  `attn="flash"` builds the model with SDPA and is measured the same way.
- bitsandbytes layers do not run on meta: `StandInLinear` stores and computes what
  Linear8bitLt / Linear4bit store and compute (see its docstring).
- Gradient clipping (a norm per parameter, a few bytes) and `float(loss)` are skipped.
- Mixed precision (full fine-tuning with `master_weights`): torch.autocast does not act on
  meta tensors, so the dry run does what autocast does by hand: parameters are fp32 (the
  master weights, so gradients and AdamW states are fp32 too), and every Linear casts its
  input, weight and bias to the 16-bit dtype before the matmul, as autocast's
  lower-precision op list does; autograd records the casts, so the 16-bit weight copies
  stay saved for backward and gradients come back to fp32, as under real autocast. SDPA
  casts q, k, v the same way. Other ops follow torch's type promotion, as under autocast
  (RMSNorm's fp32 math, the fp32 residual stream, the fp32 loss). Not emulated: eager
  attention's matmuls (left fp32, an overcount) and autocast's weight-cast cache (each
  Linear runs once per forward, so it would hit only for tied weights).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.errors import UserError
from finetune.memory.tracker import MemoryTracker

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# The 16-bit dtype the by-hand autocast casts to during a mixed-precision dry run, else
# None. A plain global, not a mode: backward (checkpoint recomputation) must see it too.
_autocast_dtype: torch.dtype | None = None


def mixed_precision(setup: Any) -> bool:
    """Full fine-tuning with fp32 master weights under 16-bit autocast."""
    return setup.method == "full" and setup.master_weights and setup.dtype != "float32"


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
    return model


class StandInLinear(torch.nn.Linear):
    """What bitsandbytes' Linear8bitLt / Linear4bit hold and compute, on any device.

    Measured against the real layers on the CPU with the same tracker (tests/test_dryrun.py,
    `test_real_bitsandbytes_step_equals_dry_run`): int8 equal to the byte in every
    category, nf4 with double quantization equal to the byte.

    From bitsandbytes 0.50 (autograd/_functions.py, nn/modules.py):
    - int8: weight `CB` int8 [out, in] plus `SCB`, one fp32 scale per output row.
      CUDA training (MatMul8bitLt): the input is cast to fp16 and quantized to int8 (CA)
      as temporaries; autograd keeps the input A (already alive). Backward dequantizes CB
      into A's dtype, a temporary of out x in.
      CPU training (MatMul8bitFp): CB is dequantized into A's dtype for the matmul (a
      temporary of out x in); A is kept; backward dequantizes again.
    - nf4/fp4: weight packed two codes per uint8, ceil(out*in/2) bytes, plus the
      QuantState: fp32 absmax per 64 weights and a 16-entry fp32 code, or with double
      quantization uint8 absmax plus an fp32 absmax per 256 blocks, the 256-entry fp32
      code and an fp32 offset (not shared between layers). MatMul4Bit keeps
      only the packed weight (not the input); forward and backward dequantize it into the
      compute dtype, a temporary of out x in.
    """

    def __init__(self, linear: torch.nn.Linear, quant: str, double_quant: bool, device: str):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant, self.device_kind = quant, device
        meta = torch.device("meta")
        numel = self.in_features * self.out_features
        if quant == "int8":
            weight = torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=meta)
            scales = [torch.empty(self.out_features, dtype=torch.float32, device=meta)]
        else:
            weight = torch.empty((numel + 1) // 2, 1, dtype=torch.uint8, device=meta)
            blocks = -(-numel // 64)
            code = torch.empty(16, dtype=torch.float32, device=meta)  # the nf4/fp4 code table
            if double_quant:  # absmax quantized again: uint8 codes, their absmax, code, offset
                scales = [
                    torch.empty(blocks, dtype=torch.uint8, device=meta),
                    torch.empty(-(-blocks // 256), dtype=torch.float32, device=meta),
                    torch.empty(256, dtype=torch.float32, device=meta),
                    torch.empty((), dtype=torch.float32, device=meta),
                    code,
                ]
            else:
                scales = [torch.empty(blocks, dtype=torch.float32, device=meta), code]
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        for i, scale in enumerate(scales):
            self.register_buffer(f"scale{i}", scale)
        self.bias = linear.bias

    def scale_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return _QuantMatmul.apply(x, self.weight, bias, self)


class _QuantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any, bias: Any, layer: StandInLinear) -> Any:
        ctx.layer = layer
        if layer.quant == "int8" and layer.device_kind == "cuda":
            _ = x.to(torch.float16).to(torch.int8)  # CA: the quantized input, a temporary
            out = torch.empty(*x.shape[:-1], layer.out_features, dtype=x.dtype, device=x.device)
            if bias is not None:
                out = out + bias
        else:
            dequantized = torch.empty(
                layer.out_features, layer.in_features, dtype=x.dtype, device=x.device
            )
            out = torch.nn.functional.linear(x, dequantized, bias)
        if layer.quant == "int8":
            ctx.save_for_backward(x)  # A is kept; 4-bit keeps only the packed weight
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        layer = ctx.layer
        dequantized = torch.empty(
            layer.out_features, layer.in_features, dtype=grad.dtype, device=grad.device
        )
        return grad @ dequantized, None, None, None


def quantize(model: Any, setup: Any) -> tuple[int, int]:
    """Swap the Linear layers bitsandbytes would quantize for `StandInLinear`.

    transformers keeps the output head (and what it ties to) unquantized. Returns the
    scale bytes the stand-ins hold and sets the flags `prepare_model_for_kbit_training`
    reads.
    """
    head = model.get_output_embeddings()
    scales = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                stand_in = StandInLinear(child, setup.quant, setup.double_quant, setup.device)
                setattr(module, child_name, stand_in)
                scales += stand_in.scale_bytes()
    flag = "is_loaded_in_8bit" if setup.quant == "int8" else "is_loaded_in_4bit"
    setattr(model, flag, True)
    return scales, 0


def adapter_spec(setup: Any) -> Any:
    """The recipe's adapter section for `setup` (what `adapters.attach` reads)."""
    from finetune.recipe import AdapterSection

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
    from finetune import adapters

    checkpointing = setup.grad_ckpt and adapters.gradient_checkpointing_allowed(setup.method)[0]
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
    """Refuse target names that match no Linear module, naming the model's real ones."""
    if isinstance(setup.targets, str) or setup.method not in ("lora", "dora", "ia3"):
        return
    names = linear_names(model)
    unknown = [t for t in setup.targets if t not in names]
    if unknown:
        raise UserError(
            f"--targets: {', '.join(unknown)} match no Linear layer of this model; its "
            f"Linear layers are {', '.join(names)} (or use all-linear)"
        )


def linear_names(model: Any) -> list[str]:
    """Deduplicated leaf names of the model's Linear layers, output head excluded."""
    from finetune.adapters import linear_module_names

    return linear_module_names(model)


# ------------------------------------------------------------------ the step


class _FusedAttention(TorchFunctionMode):
    """Route F.scaled_dot_product_attention on meta tensors to the fused flash kernel."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and args[0].is_meta:
            q, k, v = (_autocast(t) for t in args[:3])
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            if mask is not None and mask.dtype == torch.bool:
                # What SDPA's front end does (convert_boolean_attn_mask) before any kernel:
                # an additive mask in the query's dtype, which the kernel saves for backward.
                mask = torch.where(mask.logical_not(), -torch.inf, torch.zeros((), dtype=q.dtype))
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q,
                k,
                v,
                kwargs.get("dropout_p", 0.0),
                kwargs.get("is_causal", False),
                attn_mask=mask,
                scale=kwargs.get("scale"),
            )[0]
        return func(*args, **kwargs)


def _autocast(tensor: Any) -> Any:
    """What autocast's lower-precision ops do to a floating input: cast it to 16 bits."""
    if _autocast_dtype is None or tensor is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(_autocast_dtype)


def _autocast_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(
        _autocast(x), _autocast(module.weight), _autocast(module.bias)
    )


def emulate_autocast(model: Any) -> None:
    """Make every Linear of `model` (the head included) cast as autocast would."""
    import functools

    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = functools.partial(_autocast_linear, module)


FUSED_SDPA = "finetune_meta_sdpa"


def register_fused_sdpa() -> str:
    """Register transformers' own SDPA attention under a name whose calls on meta tensors
    reach the fused kernel (entered inside the call, so checkpoint recomputes too)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def fused_sdpa(*args: Any, **kwargs: Any) -> Any:
        with _FusedAttention():
            return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register(FUSED_SDPA, fused_sdpa)
    AttentionMaskInterface.register(FUSED_SDPA, sdpa_mask)
    return FUSED_SDPA


class _KnownSizes(TorchDispatchMode):
    """Answer the data-dependent questions meta tensors cannot: `nonzero` gets the number of
    trained positions; a boolean `.item()` (transformers' "is every position attended?"
    check on the attention mask) gets True for an unmasked micro-batch, False for a padded
    or packed one, so transformers builds the 4D mask the real step builds."""

    def __init__(self, rows: int, masked: bool) -> None:
        super().__init__()
        self.rows, self.unmasked = rows, not masked

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten.nonzero.default and args[0].is_meta:
            return torch.empty(self.rows, args[0].dim(), dtype=torch.long, device="meta")
        is_item = func is torch.ops.aten._local_scalar_dense.default
        if is_item and args[0].is_meta and args[0].dtype == torch.bool:
            return self.unmasked
        return func(*args, **(kwargs or {}))


def meta_batch(setup: Any, vocab: int) -> dict[str, torch.Tensor]:
    """A micro-batch shaped like the training loop's collate output, on meta.

    A masked setup carries a padding mask, which `_KnownSizes` says is not all ones. A
    packed batch (position ids, no mask) makes transformers build a block-diagonal mask of
    the same shape, so one stand-in serves both.
    """
    shape = (setup.batch, setup.seq)
    batch = {
        "input_ids": torch.empty(shape, dtype=torch.long, device="meta"),
        "labels": torch.empty(shape, dtype=torch.long, device="meta"),
    }
    if setup.attention_masked:
        batch["attention_mask"] = torch.empty(shape, dtype=torch.long, device="meta")
    return batch


def make_optimizer(model: Any, setup: Any) -> Any:
    """The optimizer training uses (prepare.make_optimizer: AdamW over trainable params).

    Raises:
        UserError: adamw8bit (bitsandbytes kernels do not run on meta tensors).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if setup.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    if setup.optimizer == "adamw8bit":
        raise UserError(
            "--optimizer adamw8bit: bitsandbytes' 8-bit optimizer cannot run in the dry run "
            "(no meta-device kernels); use adamw or sgd"
        )
    return torch.optim.AdamW(params, lr=1e-3)


def dry_run(config: Any, setup: Any) -> DryRun:
    """Build `config`'s model on meta, attach `setup`'s adapter, take two tracked steps.

    Args:
        config: a transformers `PretrainedConfig` of a decoder.
        setup: a `finetune.memory.estimate.Setup`.

    Raises:
        UserError: the model cannot be built, a target name is unknown, or the setup
            cannot run on meta tensors.
    """
    from finetune.adapters import count_parameters

    started = time.perf_counter()
    model = build_model(config, setup)
    scales = upcast = 0
    if setup.quant != "none":
        scales, _ = quantize(model, setup)
    model = prepare(model, setup)
    if mixed_precision(setup):
        emulate_autocast(model)
    if setup.quant != "none":
        upcast = sum(
            p.numel() * 4
            for p in model.parameters()
            if p.dtype == torch.float32 and not p.requires_grad
        )
    model.train()
    counts = count_parameters(model)
    # 4-bit weights are packed two per byte; count them unpacked, as peft does Params4bit.
    packed = sum(
        m.in_features * m.out_features - m.weight.numel()
        for m in model.modules()
        if isinstance(m, StandInLinear)
    )
    # Positions with logits: prompt tuning's last virtual token also predicts the first label.
    most = setup.seq if setup.method == "prompt" else setup.seq - 1
    trained = min(setup.logit_positions or most, most)
    optimizer = make_optimizer(model, setup)
    tracker = MemoryTracker(model)
    global _autocast_dtype
    _autocast_dtype = DTYPES[setup.dtype] if mixed_precision(setup) else None
    try:
        step(model, optimizer, tracker, setup, trained, config.vocab_size)
    finally:
        _autocast_dtype = None
    tracker.remove_hooks()
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


def step(model: Any, optimizer: Any, tracker: Any, setup: Any, trained: int, vocab: int) -> None:
    """`STEPS` tracked training steps: forward and loss, backward, optimizer, zero_grad
    (set_to_none, as train.Loop does)."""
    from finetune.loss import trained_positions_loss

    with tracker, _KnownSizes(trained, setup.attention_masked):
        for _ in range(STEPS):
            batch = meta_batch(setup, vocab)
            for tensor in batch.values():
                tracker.track(tensor, "activations")
            with tracker.phase("forward"):  # as train.Loop.forward_loss
                shift = setup.virtual_tokens if setup.method == "prompt" else 0
                loss = trained_positions_loss(model, batch, trained, shift)
            with tracker.phase("backward"):
                loss.backward()
            del loss, batch, tensor
            with tracker.phase("optimizer"):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


# ------------------------------------------------------------------ the estimate


def estimate_from_config(config: Any, setup: Any, name: str = "") -> Any:
    """`Estimate` (the shape render.py and report.py read) from one dry run of `setup`.

    Components: the tracker's breakdown at the peak; `allocated_bytes` is the dry run's
    peak; `reserved_bytes` replays its allocation stream through `allocator.replay`.
    """
    from finetune.memory.allocator import replay
    from finetune.memory.estimate import CPU_METRIC, CUDA_CONTEXT_BYTES, METRIC, Estimate

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
        "master weights": b["adapter"] if mixed else 0,
        "activations": b["activations"],
        "backward temporaries": b["backward temporaries"],
        "logits and loss": b["logits"],
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
        },
        total_params=run.total_params,
        trainable_params=run.trainable_params,
        metric=METRIC if setup.device == "cuda" else CPU_METRIC,
        detail={"dry_run_seconds_x1000": int(run.seconds * 1000)},
        reserved_bytes=peaks.reserved_bytes,
        config=config,
    )


def describe(config: Any, name: str = "") -> Any:
    """An `Architecture` naming the model (descriptive only: counts come from the dry run)."""
    from finetune.memory.arch import Architecture

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
