"""Cross-entropy through the output head without the whole [positions x vocabulary] logits.

The logits of a step are its largest activation at a large vocabulary: Llama-3's 128,256
columns make 4 x 2,048 trained positions 4.2 GB in fp32, and torch's cross-entropy keeps
them, their log-softmax and their gradient. Here the head's matmul, the log-softmax and
its gradient run a chunk of positions at a time, and the gradient with respect to the
hidden states (and the head's weight, when it trains) is made in the forward pass, as
Liger Kernel's fused linear cross-entropy does: only [chunk x vocabulary] is ever alive.

Same arithmetic as the model's own head under the same autocast: the matmul in the
autocast dtype (else the weight's), log-softmax in fp32, the logits' gradient cast back
to the matmul dtype before the two gradient matmuls (tests/test_chunked_loss.py).

Used where the head is a plain `torch.nn.Linear` and the model does nothing to the logits
after it; anything else (an adapter on the head, a quantized head, soft-capped or scaled
logits) goes through the model's own head unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

# fp32 logits of one chunk: 64 MiB (341 positions of SmolLM2's 49,152 columns, 130 of
# Llama-3's 128,256): large enough that the chunk's matmuls run at full speed.
CHUNK_BYTES = 64 * 2**20

# Config fields of transformers models that change the logits after the head.
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
    "lm_head_multiplier",
    "logit_softcapping",
)


# Off only to compare with the model's own head (benchmarks, tests) and to re-estimate runs
# measured before the chunked loss existed (`finetune.memory.estimate.Setup.chunked_loss`).
_enabled = True


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """While inside, the chunked loss is used where it applies (`on`) or nowhere."""
    global _enabled
    before, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = before


def applies_to(model: Any, head: Any) -> bool:
    """Whether the chunked loss gives `model`'s own loss: its head is a plain Linear and
    its config names no transformation of the logits."""
    if not _enabled or type(head) is not torch.nn.Linear or hasattr(head.weight, "_local_tensor"):
        return False  # a sharded head's weight is whole only inside its own forward
    config = getattr(getattr(model, "module", model), "config", None)
    # Multimodal configs (Gemma 3n) keep the text model's settings in a nested config.
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    return not any(
        getattr(c, field, None) not in (None, 1, 1.0)
        for c in (config, text)
        for field in LOGIT_TRANSFORMS
    )


def chunk_rows(vocab: int) -> int:
    """Positions per chunk: as many as keep one chunk's fp32 logits within CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * vocab))


def cross_entropy_sum(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor) -> Any:
    """Sum over rows of the cross-entropy of `head(hidden)` against `labels` (one label per
    row of `hidden`, [positions, hidden size]; every label trained)."""
    dtype = matmul_dtype(hidden, head.weight)
    # Inside the Function grad mode is always off; whether gradients are wanted is known here.
    wanted = torch.is_grad_enabled()
    return _ChunkedCrossEntropy.apply(hidden, head.weight, head.bias, labels, dtype, wanted)


# The memory dry run's emulated autocast dtype (finetune.memory.metaops.autocast_to): torch
# has no autocast for meta tensors, so the dry run says which dtype the real step would use.
_meta_autocast: torch.dtype | None = None


@contextlib.contextmanager
def autocast_on_meta(dtype: torch.dtype | None) -> Iterator[None]:
    """While inside, meta tensors' head matmul runs in `dtype` (None: the weight's)."""
    global _meta_autocast
    before, _meta_autocast = _meta_autocast, dtype
    try:
        yield
    finally:
        _meta_autocast = before


def matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where it is on, else the weight's."""
    device = hidden.device.type
    if device == "meta":
        return _meta_autocast or weight.dtype
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def no_autocast(device: str) -> Any:
    """Autocast off on `device` (the chunks cast explicitly); meta has no autocast."""
    return contextlib.nullcontext() if device == "meta" else torch.autocast(device, enabled=False)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, labels, dtype, wanted) -> torch.Tensor:
        want_hidden, want_weight, want_bias = (wanted and n for n in ctx.needs_input_grad[:3])
        with no_autocast(hidden.device.type):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            grads = _Grads(hidden, weight, bias, want_hidden, want_weight, want_bias)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            rows = chunk_rows(weight.shape[0])
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start : start + rows].to(dtype)
                logits = torch.nn.functional.linear(h, w, b).float()
                target = labels[start : start + rows].unsqueeze(1)
                norm = torch.logsumexp(logits, dim=1, keepdim=True)
                total += (norm - logits.gather(1, target)).sum()
                if grads.wanted:
                    # d(sum of losses)/d(logits) = softmax - one-hot, made in place.
                    probs = logits.sub_(norm).exp_()
                    probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                    grads.add(start, h, probs.to(dtype), w)
                del logits, norm
        ctx.save_for_backward(*grads.saved())
        ctx.has = (want_hidden, want_weight, want_bias)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple:
        # The gradients were made in the forward pass; the chain rule only scales them.
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_total if has else None for has in ctx.has]
        return (*grads, None, None, None)


class _Grads:
    """The gradients `_ChunkedCrossEntropy` makes in its forward pass, chunk by chunk."""

    def __init__(self, hidden, weight, bias, want_hidden, want_weight, want_bias) -> None:
        self.hidden = torch.empty_like(hidden) if want_hidden else None
        # Summed in the parameter's dtype, which the gradient takes anyway: no second copy
        # of a [vocabulary x hidden] matrix (Liger Kernel does the same).
        self.weight = torch.zeros_like(weight) if want_weight else None
        self.bias = torch.zeros_like(bias) if want_bias else None
        self.wanted = want_hidden or want_weight or want_bias
        self.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)

    def add(self, start: int, h: torch.Tensor, grad: torch.Tensor, w: torch.Tensor) -> None:
        if self.hidden is not None:
            self.hidden[start : start + grad.shape[0]] = grad @ w
        if self.weight is not None:
            self.weight += grad.t() @ h
        if self.bias is not None:
            self.bias += grad.sum(0, dtype=self.bias.dtype)

    def saved(self) -> list[torch.Tensor]:
        kept = zip((self.hidden, self.weight, self.bias), self.dtypes, strict=True)
        return [g.to(dtype) for g, dtype in kept if g is not None]
