"""What an estimate is about and what it holds: `Setup` (one training setup: method,
precision, shape) and `Estimate` (bytes by component, counts, the metric), plus the
seed's rules of thumb.

Every figure comes from the dry run (dryrun.py, which also re-estimates variants and
compares methods): real training steps on the meta device, measured by the tracker that
also measures real CPU training. An analytic model (a
hand-written Llama-family layout, op by op) came first; it was right only for that family
and was removed once the dry run matched real steps for every architecture.

Units: bytes everywhere; GB in the rendered output means 1e9 bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from finetune.choices import (
    ATTENTIONS,
    ESTIMATE_METHODS,
    OBJECTIVES,
    OPTIMIZERS,
    QUANTS,
    REFERENCES,
    SHARDINGS,
)
from finetune.errors import UserError
from finetune.memory.arch import Architecture

Method = Literal["full", "lora", "dora", "ia3", "prefix", "prompt"]
Quant = Literal["none", "int8", "nf4", "fp4"]
Optimizer = Literal["adamw", "adamw-foreach", "adamw-fused", "adamw-forloop", "adamw8bit", "sgd"]
Attention = Literal["sdpa", "eager", "flex", "flash"]

METHODS = ESTIMATE_METHODS
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per element, for choices.DTYPES

# The metric the total stands for, on a GPU and on the CPU (where no allocator counts it).
METRIC = "peak memory allocated by tensors (torch.cuda.max_memory_allocated)"
CPU_METRIC = "peak bytes of live tensors (compare with the process's resident-memory growth)"
# CUDA context plus kernels: hundreds of MB to over 1 GB; never part of max allocated.
CUDA_CONTEXT_BYTES = 600 * 10**6
# cuBLAS's workspace, one per thread that runs matmuls and stream, taken from torch's
# caching allocator (so it is part of max allocated): 32 MiB on compute capability 9, 10
# and 12 (Hopper, Blackwell), else 4096 KiB x 2 + 16 KiB x 8 (torch
# aten/src/ATen/cuda/CublasHandlePool.cpp, `parseChosenWorkspaceSize`; the
# CUBLAS_WORKSPACE_CONFIG environment variable overrides it). A training step runs
# matmuls on two threads: the forward on the caller's, the backward on autograd's device
# thread (measured on an H200: two 32 MiB blocks, the first at the first forward matmul,
# the second with no Python frame, in backward).
CUBLAS_WORKSPACE_HOPPER = 4096 * 8 * 1024
CUBLAS_WORKSPACE_OTHER = 4096 * 1024 * 2 + 16 * 1024 * 8
MATMUL_THREADS = 2

# The most processes an estimate takes. Worlds beyond it shard within groups of nodes
# (hybrid sharding), which finetune does not run; and a sharded dry run builds torch's fake
# process group of that size, whose bookkeeping grows with it (8,192: 14 s; 65,536: 215 s).
MAX_PROCESSES = 8_192
# Whole parameters FSDP2 gathers for compute (sharded setups only).
SHARDING_COMPONENT = "gathered weights (sharding)"

COMPONENTS = (
    "frozen base weights",
    "quantization scales",
    "kept/upcast in higher precision",
    "trainable parameters",
    "gradients",
    "optimizer states",
    "master weights",
    "optimizer step temporaries",
    "activations",
    "backward temporaries",
    "logits and loss",
    "library workspaces",
    SHARDING_COMPONENT,
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
    # loop computes them only where the next token is trained (see positions.py).
    logit_positions: int | None = None
    grad_ckpt: bool = False
    optimizer: Optimizer = "adamw"
    attn: Attention = "sdpa"
    master_weights: bool = False
    # The 16-bit dtype autocast casts matmuls to (train.mixed_precision: bf16 by default on
    # a GPU and on a CPU with bf16 instructions; float32 adapters and upcast parameters are
    # cast over a 16-bit base too); None: no autocast.
    autocast: str | None = None
    device: str = "cuda"
    # Whether attention runs with an explicit mask: micro-batches with padding (rows of
    # different lengths) or packing. None: yes when batch > 1, as real data varies in
    # length. A mask costs memory: SDPA saves it per layer, and transformers expands the
    # keys and values of grouped-query attention to every head. flash-attention never
    # builds one (transformers unpads the batch), nor does flex (a block mask of a few
    # integers per 128 x 128 block), so flash and flex are never masked.
    masked: bool | None = None
    # train.objective: sft (the token loss), or a preference objective, whose step scores
    # both sides of each pair (dpo, orpo; `batch` counts pairs) and runs the reference
    # policy without gradients (dpo, kto; kto also its KL sequences).
    objective: str = "sft"
    # train.reference: forward (dpo, kto: the reference's forward in every step) or cached
    # (its log-probabilities read from the run's cache; kto still runs it on the KL rows).
    reference: str = "forward"
    # Processes training together (data parallelism or sharding) and the sharding: none
    # (each process holds the whole model) or fsdp (FSDP2 full shard, finetune.sharding).
    # `batch` is per process, like train.micro_batch_size; the estimate is one process's.
    processes: int = 1
    sharding: str = "none"
    # The loss through finetune.chunked_loss, the head's [positions x vocabulary] logits
    # never whole (where it applies: a plain Linear head); False: the head's own logits and
    # torch's cross-entropy, as versions before it ran (`recorded_fields`).
    chunked_loss: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}"),
            (self.quant in QUANTS, f"quant must be one of {', '.join(QUANTS)}"),
            (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}"),
            (
                self.autocast in (None, "bfloat16", "float16"),
                f"autocast must be bfloat16, float16 or None (got {self.autocast})",
            ),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.attn in ATTENTIONS, f"attn must be one of {', '.join(ATTENTIONS)}"),
            (
                self.objective in OBJECTIVES,
                f"objective must be one of {', '.join(OBJECTIVES)} (got {self.objective})",
            ),
            (
                self.reference in REFERENCES,
                f"reference must be one of {', '.join(REFERENCES)} (got {self.reference})",
            ),
            (
                self.reference == "forward" or self.objective in ("dpo", "kto"),
                f"--reference cached applies to --objective dpo or kto ({self.objective} has "
                "no reference); use --reference forward",
            ),
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
        self.check_sharding()

    def check_sharding(self) -> None:
        """Refuse a sharding train would refuse, with train's line.

        Raises:
            UserError: an unknown sharding, fewer than one process, FSDP over one process
                or of settings that cannot be sharded (sharding.refusal).
        """
        if self.sharding not in SHARDINGS:
            raise UserError(f"sharding must be one of {', '.join(SHARDINGS)} (got {self.sharding})")
        if not 1 <= self.processes <= MAX_PROCESSES:
            raise UserError(
                f"processes must be 1 to {MAX_PROCESSES:,} (got {self.processes:,}): the "
                "number of processes (GPUs) training together"
            )
        if self.sharding == "none":
            return
        if self.processes < 2:
            raise UserError(
                "--sharding fsdp splits the model over processes: give --processes 2 or more"
            )
        from finetune.sharding import refusal

        mixed = {"float16": "fp16", "bfloat16": "bf16"}.get(self.autocast or "", "no")
        problem = refusal(
            quantization=self.quant,
            method=self.method,
            objective=self.objective,
            mixed_precision=mixed,
        )
        if problem:
            raise UserError(problem)

    @property
    def data_parallel(self) -> bool:
        """Several processes, each holding the whole model (DDP)."""
        return self.processes > 1 and self.sharding == "none"

    @property
    def attention_masked(self) -> bool:
        if self.attn in ("flex", "flash"):  # neither builds a [seq x seq] mask or scores
            return False
        return self.batch > 1 if self.masked is None else self.masked


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


# ------------------------------------------------------------------ rules of thumb


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


def recorded_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A report's recorded setup as `Setup` arguments: lists as tuples, and chunked_loss
    False where the record has none (the run's version computed the head's whole logits)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return {"chunked_loss": False, **fields}
