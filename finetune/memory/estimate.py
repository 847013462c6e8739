"""The analytic memory estimate: bytes by component for one training setup.

Everything here is computed from the architecture and from what torch, transformers, peft
and bitsandbytes document and do (which tensors exist, in which dtype, which ones autograd
saves for backward). Nothing is fitted to measurements; `benchmarks/memory_cpu.py` checks
the result against tensors actually allocated and saved.

Units: bytes everywhere; GB in the rendered output means 1e9 bytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from finetune.errors import UserError
from finetune.memory.activations import activation_bytes, logits_bytes
from finetune.memory.arch import FEEDFORWARD_NAMES, Architecture, Linear

Method = Literal["full", "lora", "dora", "ia3", "prefix", "prompt"]
Quant = Literal["none", "int8", "nf4", "fp4"]
Optimizer = Literal["adamw", "adamw8bit", "sgd"]
Attention = Literal["sdpa", "eager", "flash"]

METHODS = ("full", "lora", "dora", "ia3", "prefix", "prompt")
QUANTS = ("none", "int8", "nf4", "fp4")
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
ATTENTIONS = ("sdpa", "eager", "flash")

# The metric the total stands for, on a GPU and on the CPU (where no allocator counts it).
METRIC = "peak memory allocated by tensors (torch.cuda.max_memory_allocated)"
CPU_METRIC = "peak bytes of live tensors (compare with the process's resident-memory growth)"
# CUDA context plus kernels: hundreds of MB to over 1 GB; never part of max allocated.
CUDA_CONTEXT_BYTES = 600 * 10**6
# bitsandbytes: 4-bit blocks of 64 weights; double quantization groups 256 absmax values.
BLOCK_4BIT = 64
BLOCK_NESTED = 256
# bitsandbytes' 8-bit optimizers keep tensors smaller than this in 32-bit (min_8bit_size).
MIN_8BIT_SIZE = 4096
BLOCK_8BIT_OPTIM = 256

COMPONENTS = (
    "frozen base weights",
    "quantization scales",
    "kept/upcast in higher precision",
    "trainable parameters",
    "gradients",
    "optimizer states",
    "master weights",
    "activations",
    "backward temporaries",
    "logits and loss",
    "runtime overhead",
)
# The components the "weights + gradients + optimizer" headline adds up.
STATE_COMPONENTS = COMPONENTS[:7]


@dataclass(frozen=True)
class Setup:
    """One training setup: method, precision and shape (the options of `finetune estimate`)."""

    method: Method = "lora"
    quant: Quant = "none"
    double_quant: bool = True
    dtype: str = "bfloat16"
    r: int = 8
    targets: tuple[str, ...] | str = "all-linear"
    virtual_tokens: int = 20
    prefix_projection: bool = False
    lora_dropout: float = 0.0
    batch: int = 1
    seq: int = 512
    # Positions per sequence at which logits are computed; None: all of them. finetune's own
    # loop computes them only where the next token is trained (see train.py).
    logit_positions: int | None = None
    grad_ckpt: bool = False
    optimizer: Optimizer = "adamw"
    attn: Attention = "sdpa"
    master_weights: bool = False
    device: str = "cuda"
    # Whether attention runs with an explicit mask: micro-batches with padding (rows of
    # different lengths) or packing. None: yes when batch > 1, as real data varies in
    # length. A mask costs memory: SDPA saves it per layer, and transformers expands the
    # keys and values of grouped-query attention to every head. flash-attention never
    # builds one (transformers unpads the batch), so flash is never masked.
    masked: bool | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}"),
            (self.quant in QUANTS, f"quant must be one of {', '.join(QUANTS)}"),
            (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.attn in ATTENTIONS, f"attn must be one of {', '.join(ATTENTIONS)}"),
            (self.batch > 0, f"batch must be a positive number of sequences (got {self.batch})"),
            (self.seq > 0, f"seq must be a positive number of tokens (got {self.seq})"),
            (self.r > 0, f"r must be positive (got {self.r})"),
            (self.virtual_tokens > 0, f"virtual tokens must be positive ({self.virtual_tokens})"),
            (
                not (self.method == "full" and self.quant != "none"),
                "full fine-tuning cannot train quantized weights; use --quant none",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def attention_masked(self) -> bool:
        if self.attn == "flash":
            return False
        return self.batch > 1 if self.masked is None else self.masked

    @property
    def quantized(self) -> bool:
        return self.quant != "none"

    @property
    def dtype_bytes(self) -> int:
        return DTYPES[self.dtype]

    @property
    def stream_bytes(self) -> int:
        """Bytes per activation element. prepare_model_for_kbit_training upcasts the
        embeddings to fp32, so the residual stream of a quantized model is fp32."""
        return 4 if self.quantized else self.dtype_bytes

    @property
    def trainable_bytes(self) -> int:
        """Adapters are fp32 (peft's autocast_adapter_dtype); full training uses the dtype."""
        return self.dtype_bytes if self.method == "full" else 4


@dataclass
class Estimate:
    """The estimate for one architecture and setup: bytes per component, plus counts."""

    arch: Architecture
    setup: Setup
    components: dict[str, int]
    notes: dict[str, str]
    total_params: int
    trainable_params: int
    metric: str = METRIC
    detail: dict[str, int] = field(default_factory=dict)
    # The allocator model's peak reserved bytes (dry-run estimates only), and the
    # transformers config a dry run re-estimates variants from.
    reserved_bytes: int | None = None
    config: object = None

    @property
    def total_bytes(self) -> int:
        """Every component, the runtime overhead included."""
        return sum(self.components.values())

    @property
    def allocated_bytes(self) -> int:
        """What torch's allocator holds at the peak: the total less the runtime overhead."""
        return self.total_bytes - self.components["runtime overhead"]

    @property
    def state_bytes(self) -> int:
        """Weights + gradients + optimizer states (+ master weights): no activations."""
        return sum(self.components[name] for name in STATE_COMPONENTS)

    @property
    def base_params(self) -> int:
        """The base model's parameters: adapters (trainable, outside full) excluded."""
        added = 0 if self.setup.method == "full" else self.trainable_params
        return self.total_params - added

    @property
    def full_fp16_budget_bytes(self) -> int:
        """The 12 bytes/param budget of full fp16 fine-tuning for the same model."""
        return 12 * self.total_params

    @property
    def verdict_bytes(self) -> int:
        """What the --gpu verdict compares: reserved + CUDA context when the allocator was
        modelled, else the total."""
        if self.reserved_bytes is None:
            return self.total_bytes
        return self.reserved_bytes + self.components["runtime overhead"]

    @property
    def verdict_metric(self) -> str:
        if self.reserved_bytes is None:
            return "allocated + CUDA context"
        return "reserved (caching allocator model) + CUDA context"

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.arch.name,
            "metric": self.metric,
            "total_bytes": self.total_bytes,
            "allocated_bytes": self.allocated_bytes,
            "state_bytes": self.state_bytes,
            "components": dict(self.components),
            "notes": dict(self.notes),
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "full_fp16_budget_bytes": self.full_fp16_budget_bytes,
            "reserved_bytes": self.reserved_bytes,
            "setup": asdict(self.setup),
            "architecture": self.arch.to_dict(),
        }


def full_fp16_budget_bytes(arch: Architecture) -> int:
    """The seed's budget: fp16 weights 2 + fp16 gradients 2 + fp32 Adam m and v 8 = 12 B/param."""
    return 12 * arch.total_params()


# ------------------------------------------------------------------ parameters


def targeted(arch: Architecture, setup: Setup) -> list[Linear]:
    """The projections of one layer that LoRA, DoRA or IA3 wrap.

    'all-linear' is every Linear inside the decoder layers; peft leaves the output head out.

    Raises:
        UserError: the target names match no projection of this architecture.
    """
    linears = arch.linears()
    if setup.targets == "all-linear":
        return linears
    names = set(setup.targets)
    chosen = [lin for lin in linears if lin.name in names]
    if not chosen:
        available = ", ".join(lin.name for lin in linears)
        raise UserError(
            f"targets {', '.join(sorted(names))} match no layer; this model has "
            f"{available} (or use all-linear)"
        )
    return chosen


def is_feedforward(lin: Linear) -> bool:
    """IA3 scales a feed-forward layer's input (peft's feedforward_modules) not its output."""
    return lin.name in FEEDFORWARD_NAMES


def base_tensors(arch: Architecture) -> list[int]:
    """Element counts of every base-model parameter tensor."""
    tensors = [arch.embedding_params()]
    for _ in range(arch.layers):
        tensors += [arch.hidden] * arch.norms_per_layer
        for lin in arch.linears():
            tensors.append(lin.in_features * lin.out_features)
            if lin.bias:
                tensors.append(lin.out_features)
    tensors.append(arch.hidden)
    if not arch.tie_word_embeddings:
        tensors.append(arch.lm_head_params())
    return tensors


def trainable_tensors(arch: Architecture, setup: Setup) -> list[int]:
    """Element counts of every trainable tensor, as peft creates them."""
    if setup.method == "full":
        return base_tensors(arch)
    if setup.method in ("lora", "dora"):
        per_layer = []
        for lin in targeted(arch, setup):
            per_layer += [setup.r * lin.in_features, lin.out_features * setup.r]
            if setup.method == "dora":
                per_layer.append(lin.out_features)  # magnitude vector
        return per_layer * arch.layers
    if setup.method == "ia3":
        vectors = [
            lin.in_features if is_feedforward(lin) else lin.out_features
            for lin in targeted(arch, setup)
        ]
        return vectors * arch.layers
    if setup.method == "prompt":
        return [setup.virtual_tokens * arch.hidden]
    return prefix_tensors(arch, setup)


def prefix_tensors(arch: Architecture, setup: Setup) -> list[int]:
    """peft's PrefixEncoder: token_dim is kv_heads * head_dim for grouped-query attention."""
    n, token_dim, out = setup.virtual_tokens, arch.kv_width, arch.layers * 2 * arch.kv_width
    if not setup.prefix_projection:
        return [n * out]
    hidden = token_dim  # encoder_hidden_size defaults to token_dim
    return [n * token_dim, token_dim * hidden, hidden, hidden * out, out]


def quantized_tensors(arch: Architecture) -> list[Linear]:
    """Every Linear bitsandbytes replaces: all decoder projections (not embeddings or head)."""
    return arch.linears() * arch.layers


def quantized_bytes(arch: Architecture, setup: Setup) -> tuple[int, int]:
    """(weight bytes, scale bytes) of the quantized projections."""
    weights = scales = 0
    for lin in quantized_tensors(arch):
        numel = lin.in_features * lin.out_features
        if setup.quant == "int8":
            weights += numel  # Int8Params: int8 CB
            scales += 4 * lin.out_features  # SCB: one fp32 scale per output row
        else:
            weights += math.ceil(numel / 2)  # two 4-bit codes per uint8
            scales += four_bit_scale_bytes(numel, setup.double_quant)
    return weights, scales


def four_bit_scale_bytes(numel: int, double_quant: bool) -> int:
    """bitsandbytes QuantState: fp32 absmax per 64 weights (4 B/64 = 0.5 bit/param), or
    uint8 absmax plus an fp32 absmax per 256 blocks and an fp32 offset (about 0.127 bit)."""
    blocks = math.ceil(numel / BLOCK_4BIT)
    code = 16 * 4  # the 16-value NF4/FP4 code book, fp32
    if not double_quant:
        return 4 * blocks + code
    nested = math.ceil(blocks / BLOCK_NESTED)
    return blocks + 4 * nested + 4 + 256 * 4 + code  # 256-entry dynamic map for the absmax


def parameter_components(arch: Architecture, setup: Setup) -> dict[str, int]:
    """Bytes of frozen, quantized, kept-in-fp32 and trainable parameters."""
    trainable = sum(trainable_tensors(arch, setup))
    out = dict.fromkeys(COMPONENTS[:4], 0)
    out["trainable parameters"] = trainable * setup.trainable_bytes
    if setup.method == "full":
        return out
    if not setup.quantized:
        out["frozen base weights"] = arch.total_params() * setup.dtype_bytes
        return out
    weights, scales = quantized_bytes(arch, setup)
    kept = arch.total_params() - sum(
        lin.in_features * lin.out_features for lin in quantized_tensors(arch)
    )
    out["frozen base weights"] = weights
    out["quantization scales"] = scales
    # prepare_model_for_kbit_training casts every non-quantized parameter to fp32.
    out["kept/upcast in higher precision"] = 4 * kept
    return out


def optimizer_bytes(tensors: list[int], setup: Setup) -> int:
    """State of the optimizer for the trainable tensors.

    AdamW keeps m and v. For adapters (fp32) torch allocates them like the parameter, plus a
    4-byte `step` tensor each. For full 16-bit training this follows the mixed-precision
    convention of the 12 B/param budget: m and v in fp32.
    """
    if setup.optimizer == "sgd":
        return 0  # torch SGD without momentum keeps no state
    if setup.optimizer == "adamw":
        return sum(8 * n + 4 for n in tensors)
    total = 0
    for n in tensors:  # bitsandbytes AdamW8bit: blockwise 8-bit m and v, fp32 absmax per 256
        if n < MIN_8BIT_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BLOCK_8BIT_OPTIM) + 2 * 256 * 4
    return total


# ------------------------------------------------------------------ the estimate


def estimate(arch: Architecture, setup: Setup) -> Estimate:
    """Estimate peak training memory of `arch` under `setup`, component by component."""
    tensors = trainable_tensors(arch, setup)
    trainable = sum(tensors)
    components = parameter_components(arch, setup)
    components["gradients"] = trainable * setup.trainable_bytes
    components["optimizer states"] = optimizer_bytes(tensors, setup)
    sixteen_bit_full = setup.method == "full" and setup.dtype_bytes == 2
    components["master weights"] = 4 * trainable if sixteen_bit_full and setup.master_weights else 0
    detail = activation_bytes(arch, setup)
    components["activations"] = detail["total"]
    components["backward temporaries"] = 0  # counted inside activations by this model
    components["logits and loss"] = logits_bytes(arch, setup)
    components["runtime overhead"] = CUDA_CONTEXT_BYTES if setup.device == "cuda" else 0
    return Estimate(
        arch=arch,
        setup=setup,
        components=components,
        notes=component_notes(arch, setup),
        total_params=arch.total_params(),
        trainable_params=trainable,
        detail=detail,
        metric=METRIC if setup.device == "cuda" else CPU_METRIC,
    )


def component_notes(arch: Architecture, setup: Setup) -> dict[str, str]:
    """One line per component saying what it counts."""
    dt = setup.dtype
    weights = {
        "none": f"{dt}",
        "int8": "int8, 1 B/param",
        "nf4": "nf4, 0.5 B/param",
        "fp4": "fp4, 0.5 B/param",
    }[setup.quant]
    scales = {
        "int8": "fp32 per output row",
        "nf4": "absmax per 64 weights" + (" (double quant)" if setup.double_quant else ""),
    }.get(setup.quant, "")
    if setup.quant == "fp4":
        scales = "absmax per 64 weights" + (" (double quant)" if setup.double_quant else "")
    optim = {
        "adamw": "AdamW m and v, fp32",
        "adamw8bit": "8-bit AdamW m and v",
        "sgd": "SGD without momentum: none",
    }[setup.optimizer]
    ckpt = "checkpointed: layer inputs + one layer" if setup.grad_ckpt else "all layers saved"
    return {
        "frozen base weights": "none (all trainable)" if setup.method == "full" else weights,
        "quantization scales": scales,
        "kept/upcast in higher precision": "embeddings, norms, head in fp32"
        if setup.quantized
        else "",
        "trainable parameters": f"{setup.method}, {'fp32' if setup.trainable_bytes == 4 else dt}",
        "gradients": "one per trainable parameter, same dtype",
        "optimizer states": optim,
        "master weights": "fp32 copy for mixed precision" if setup.master_weights else "",
        "activations": f"saved for backward, {setup.attn}, {ckpt}",
        "logits and loss": "b·s·V logits, fp32 log-softmax and its gradient",
        "runtime overhead": "CUDA context (not in max allocated)" if setup.device == "cuda" else "",
    }


# Each row is labelled by what the dry run does: "{dt}" is the 16-bit dtype of the setup
# (bf16 unless it is fp16). The seed's 12 B/param budget is not a row: it has no
# activations and matches neither full row; render.budget_line prints it under the table.
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


def compare_methods(
    arch: Architecture, setup: Setup, config: object = None
) -> list[tuple[str, Estimate]]:
    """The same model and shape under full fine-tuning and each adapter method (dry runs
    when `config` is given), all in the setup's 16-bit dtype (bf16 for an fp32 setup)."""
    dtype = setup.dtype if setup.dtype in SHORT_DTYPE else "bfloat16"
    rows = []
    for label, change in COMPARISON:
        variant = replace(setup, **change, dtype=dtype)
        rows.append((label.format(dt=SHORT_DTYPE[dtype]), reestimate(arch, config, variant)))
    return rows


def rule_of_thumb_bytes(params: float, setup: Setup) -> dict[str, float] | None:
    """The seed's rules of thumb at a nominal size (7B -> 84 GB full fp16, 13 GB LoRA int8)."""
    if setup.method == "full":
        return {"weights": 2 * params, "gradients": 2 * params, "Adam states": 8 * params}
    if setup.method == "lora" and setup.quant == "int8":
        scale = params / 7e9  # the seed quotes 7B: 7 + 1 + 1 + 4 GB
        return {
            "weights": params,
            "adapter": 1e9 * scale,
            "gradients": 1e9 * scale,
            "optimizer": 4e9 * scale,
        }
    return None


def reestimate(arch: Architecture, config: object, setup: Setup) -> Estimate:
    """Estimate a variant the way the original was made: a dry run when there is a config."""
    if config is None:
        return estimate(arch, setup)
    from finetune.memory.dryrun import estimate_from_config

    return estimate_from_config(config, setup, arch.name)
