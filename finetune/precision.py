"""What "auto" means for the device, the quantization, the dtype and mixed precision.

One owner for each decision: loading a model (models.py), estimating a recipe's memory
(memory) and the training loop all ask here, so an estimate describes the run that loads.
"""

from __future__ import annotations

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def on_cuda(device: str) -> bool:
    return device.startswith("cuda")


def resolve_quantization(requested: str, device: str) -> str:
    """`model.quantization`: auto is int8 on CUDA, none on the CPU."""
    if requested != "auto":
        return requested
    return "int8" if on_cuda(device) else "none"


def resolve_dtype(requested: str, device: str) -> str:
    """`model.dtype` as a torch dtype name: auto is float32 on the CPU, bfloat16 on a GPU
    that supports it, else float16."""
    if requested != "auto":
        return requested
    if not on_cuda(device):
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def resolve_mixed_precision(requested: str, device: str) -> str:
    """`train.mixed_precision` as accelerate names it: auto is bf16 (else fp16) on a GPU,
    bf16 on a CPU with bf16 instructions (AVX512-BF16 or AMX), else no."""
    if requested != "auto":
        return requested
    if not on_cuda(device):
        # Without bf16 instructions, bf16 matmuls are emulated and slower than fp32 (measured
        # ~2.5x); with AVX512-BF16 oneDNN's bf16 matmuls ran 2.1x fp32 (BENCHMARKS.md).
        return "bf16" if cpu_has_bf16_instructions() else "no"
    if not torch.cuda.is_available():
        return "bf16"  # a GPU estimated from elsewhere: every GPU since Ampere has bf16
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


# The CPU flags (Linux /proc/cpuinfo names) of native bf16 matrix instructions.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16_instructions() -> bool:
    """Whether this CPU multiplies bf16 natively; False where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def autocast_dtype(mixed_precision: str) -> str | None:
    """The dtype autocast casts matmuls to, None without mixed precision.

    Not only float32 weights are cast: over a 16-bit base, peft keeps adapter weights in
    float32 (`autocast_adapter_dtype`), and `prepare_model_for_kbit_training` upcasts a
    quantized model's norms and embeddings to float32; autocast casts each of them at
    every matmul (measured on CUDA: a bf16 copy of the float32 tied head, 57 MB for
    SmolLM2, alive through backward).
    """
    if mixed_precision == "no":
        return None
    return "bfloat16" if mixed_precision == "bf16" else "float16"
