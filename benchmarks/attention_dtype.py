"""SDPA forward and backward in fp32 and in bf16 on this CPU, alone: the measurement behind
an idea that did not pay (computing attention in fp32 under bf16 autocast; BENCHMARKS.md).

    .venv/bin/python benchmarks/attention_dtype.py

The embedded model's attention (SmolLM2-135M: 9 query heads of 64, 3 key-value heads
expanded to 9 as transformers does under a mask), 8 sequences, as a length-grouped batch
is: causal with a padding mask (rows 0-7 tokens shorter than the longest). Each timing is
one layer's forward and backward repeated 30 times (a step's 30 layers); fp32 and bf16 runs
alternate (A B A B), 5 of each, medians reported. The bf16 row includes the casts autocast
makes (q, k, v in, gradients out) and the fp32 row the cast of v up, as in training.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM, ROWS, LAYERS, REPEATS = 9, 64, 8, 30, 5
LENGTHS = (64, 128, 256)


def padded_causal_mask(length: int) -> torch.Tensor:
    """Causal, and row i's last i positions are padding (masked as keys)."""
    mask = torch.ones(length, length, dtype=torch.bool).tril().expand(ROWS, 1, -1, -1).clone()
    for row in range(ROWS):
        if row:
            mask[row, :, :, length - row :] = False
    mask[:, :, torch.arange(length), torch.arange(length)] = True  # no fully masked row
    return mask


def one_step_s(length: int, dtype: torch.dtype, mask: torch.Tensor) -> float:
    """Seconds for LAYERS forward+backward passes of SDPA in `dtype` from fp32 q and k and a
    bf16 v (what autocast's projections and the fp32 rotary embedding hand attention)."""
    shape = (ROWS, HEADS, length, HEAD_DIM)
    q, k = (torch.randn(shape, requires_grad=True) for _ in range(2))
    v = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    started = time.perf_counter()
    for _ in range(LAYERS):
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask)
        out.float().sum().backward()
    return time.perf_counter() - started


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| sequence length | fp32 s | bf16 s | bf16 / fp32 |")
    print("|---|---|---|---|")
    for length in LENGTHS:
        mask = padded_causal_mask(length)
        one_step_s(length, torch.float32, mask)  # warm-up
        one_step_s(length, torch.bfloat16, mask)
        times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
        for _ in range(REPEATS):
            for dtype in times:
                times[dtype].append(one_step_s(length, dtype, mask))
        fp32, bf16 = (statistics.median(times[d]) for d in times)
        print(f"| {length} | {fp32:.3f} | {bf16:.3f} | {bf16 / fp32:.2f}x |")


if __name__ == "__main__":
    main()
