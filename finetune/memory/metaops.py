"""What a training step on meta tensors needs to allocate what the real step allocates.

- SDPA on meta tensors would fall back to the math kernel, which stores the s x s score
  matrix that no fused kernel stores; it is routed to the fused CPU flash kernel, which
  saves what CUDA's flash kernel saves (output and a fp32 logsumexp per head and row),
  except on CUDA where torch itself would run the math kernel (`cuda_sdpa_kernel`).
- Mixed precision: torch.autocast does not act on meta tensors, so the dry run does what
  autocast does by hand: parameters are fp32 (the master weights, so gradients and AdamW
  states are fp32 too), and every Linear casts its input, weight and bias to the 16-bit
  dtype before the matmul, as autocast's lower-precision op list does; autograd records
  the casts, so the 16-bit weight copies stay saved for backward and gradients come back
  to fp32, as under real autocast. SDPA casts q, k, v the same way, and eager attention's
  two matmuls cast their inputs (`_AutocastMatmul`). Other ops follow
  torch's type promotion, as under autocast (RMSNorm's fp32 math, the fp32 residual
  stream, the fp32 loss). Not emulated: autocast's weight-cast cache (each Linear runs
  once per forward, so it would hit only for tied weights).
- Data-dependent answers meta tensors cannot give (`KnownSizes`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from finetune import chunked_loss

# The 16-bit dtype the by-hand autocast casts to during a mixed-precision dry run, else
# None. A plain global, not a mode: backward (checkpoint recomputation) must see it too.
_autocast_dtype: torch.dtype | None = None
# The device the dry run stands for: SDPA's kernel choice depends on it.
_device: str = "cpu"


@contextlib.contextmanager
def autocast_to(dtype: torch.dtype | None, device: str = "cpu") -> Iterator[None]:
    """Inside the block, emulated autocast (`emulate_autocast`, the fused SDPA, eager
    attention's matmuls) casts to `dtype`; None casts nothing.

    For a CUDA setup torch's CUDA autocast flag is on too (it does not act on meta
    tensors): library code that asks `torch.is_autocast_enabled()` takes the branch it
    takes on the GPU (peft's bitsandbytes LoRA and IA3 layers skip their input casts).
    """
    global _autocast_dtype, _device
    _autocast_dtype, _device = dtype, device
    flag = dtype is not None and device == "cuda"
    was_enabled, was_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    if flag:
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", dtype)
    try:
        with _AutocastMatmul(), chunked_loss.autocast_on_meta(dtype):
            yield
    finally:
        _autocast_dtype, _device = None, "cpu"
        if flag:
            torch.set_autocast_enabled("cuda", was_enabled)
            torch.set_autocast_dtype("cuda", was_dtype)


class _AutocastMatmul(TorchFunctionMode):
    """Eager attention's matmuls (q @ k^T and weights @ v, 4-D on both sides) cast their
    inputs as autocast's lower-precision matmul does. Only 4-D ones: the rotary embedding's
    3-D matmul runs with autocast disabled (a model whose rotary matmul is 4-D would be
    counted in 16 bits, a small undercount)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        is_matmul = func in (torch.matmul, torch.Tensor.__matmul__)
        if is_matmul and len(args) == 2 and all(_is_4d_meta(a) for a in args):
            args = tuple(_autocast(a) for a in args)
        return func(*args, **kwargs)


def _is_4d_meta(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.is_meta and tensor.dim() == 4


def cuda_sdpa_kernel(dtype: torch.dtype, masked: bool, head_dim: int, value_dim: int) -> str:
    """The kernel torch's CUDA SDPA picks on an Ampere-or-newer GPU (sm80 to sm121), as
    `select_sdp_backend` in aten/src/ATen/native/transformers/cuda/sdp_utils.cpp decides:

    - flash (`can_use_flash_attention`): fp16 or bf16, no attn_mask, q, k and v of one
      head size of at most 256 (`check_head_dim_size_flash`);
    - memory-efficient (`can_use_mem_efficient_attention`): fp32, fp16 or bf16, a mask
      allowed, head sizes divisible by the GEMM alignment (`minimum_gemm_alignment`:
      8 for 16-bit, 4 for fp32 on tensor-core GPUs);
    - math otherwise: the composite implementation, which upcasts 16-bit inputs to fp32
      and keeps the [heads x seq x seq] attention weights for backward.

    cuDNN attention, which torch prefers on Hopper and Blackwell with a recent cuDNN
    (`check_prefer_cudnn_attention`), keeps what flash keeps (the output and an fp32
    log-sum-exp per head and row) and falls back to flash or memory-efficient where it
    cannot run, so it does not change the memory.
    """
    half = dtype in (torch.float16, torch.bfloat16)
    if half and not masked and head_dim == value_dim and head_dim <= 256:
        return "flash"
    alignment = 8 if half else 4
    if head_dim % alignment == 0 and value_dim % alignment == 0:
        return "efficient"
    return "math"


class _FusedAttention(TorchFunctionMode):
    """Route F.scaled_dot_product_attention on meta tensors to the fused flash kernel,
    or, on CUDA where no fused kernel takes the call (`cuda_sdpa_kernel`), to the math
    kernel meta tensors run anyway."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and args[0].is_meta:
            q, k, v = (_autocast(t) for t in args[:3])
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            if _device == "cuda" and _math_on_cuda(q, v, mask):
                return func(q, k, v, *args[3:], **kwargs)
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


def _math_on_cuda(q: torch.Tensor, v: torch.Tensor, mask: Any) -> bool:
    kernel = cuda_sdpa_kernel(q.dtype, mask is not None, q.shape[-1], v.shape[-1])
    return kernel == "math"


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
    """Make every Linear of `model` (the head included) cast as autocast would, and every
    attention module's eager matmuls (`_AutocastMatmul`, entered inside the module's call,
    so a checkpointed layer's recomputation in backward casts too: a mode entered around
    the step does not reach it there)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = functools.partial(_autocast_linear, module)
        elif type(module).__name__.endswith("Attention"):
            module.forward = functools.partial(_with_autocast_matmul, module.forward)


def _with_autocast_matmul(forward: Any, *args: Any, **kwargs: Any) -> Any:
    with _AutocastMatmul():
        return forward(*args, **kwargs)


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


class KnownSizes(TorchDispatchMode):
    """Answer the data-dependent questions meta tensors cannot: `nonzero` of the 1-D mask of
    positions gets the number of trained positions, `nonzero` of the 2-D mask of rows at
    those positions gets all of them (every row trained at every kept position: the most
    logits `trained_positions_loss` computes); a boolean `.item()` (transformers' "is every
    position attended?" check on the attention mask) gets True for an unmasked micro-batch,
    False for a padded or packed one, so transformers builds the 4D mask the real step
    builds."""

    def __init__(self, rows: int, masked: bool) -> None:
        super().__init__()
        self.rows, self.unmasked = rows, not masked

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten.nonzero.default and args[0].is_meta:
            mask = args[0]
            found = self.rows if mask.dim() == 1 else mask.numel()
            return torch.empty(found, mask.dim(), dtype=torch.long, device="meta")
        is_item = func is torch.ops.aten._local_scalar_dense.default
        if is_item and args[0].is_meta and args[0].dtype == torch.bool:
            return self.unmasked
        return func(*args, **(kwargs or {}))
