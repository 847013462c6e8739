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
    no on the CPU."""
    if requested != "auto":
        return requested
    if not on_cuda(device):
        return "no"  # CPU autocast to bf16 is slower than fp32 on most CPUs (measured ~2.5x)
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
