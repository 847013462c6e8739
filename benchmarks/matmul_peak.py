"""This CPU's sustained matrix-multiplication rate in fp32 and bf16: the machine's limit that a
training step's model FLOPs utilisation (MFU) is measured against.

    .venv/bin/python benchmarks/matmul_peak.py

Shapes: a square 2048 matmul and the shapes of a SmolLM2-135M training step (1,200 tokens
against its 576 x 1,536 feed-forward and 576 x 576 attention projections, and against the
576 x 49,152 vocabulary projection). Each rate is the median of 5 timed repeats of about
20 GFLOP each, after a warm-up, on torch's default threads.

On a GPU (`peak_gflops("bf16", "cuda")`, as `make gpu-check` calls it): the shapes of a
7B-body training step (2,048 tokens against the 4,096 x 4,096, 4,096 x 11,008 and
11,008 x 4,096 projections) and a square 8,192, about 2 TFLOP per timed repeat, with the
device synchronised around each repeat.
"""

from __future__ import annotations

import statistics
import time

import torch

SHAPES = {
    "square 2048": (2048, 2048, 2048),
    "feed-forward 1200x576x1536": (1200, 576, 1536),
    "feed-forward down 1200x1536x576": (1200, 1536, 576),
    "attention proj 1200x576x576": (1200, 576, 576),
    "vocabulary 1200x576x49152": (1200, 576, 49152),
}
CUDA_SHAPES = {
    "square 8192": (8192, 8192, 8192),
    "attention proj 2048x4096x4096": (2048, 4096, 4096),
    "feed-forward 2048x4096x11008": (2048, 4096, 11008),
    "feed-forward down 2048x11008x4096": (2048, 11008, 4096),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rate_gflops(
    m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 5, device: str = "cpu"
) -> float:
    """Sustained GFLOP/s of an (m x k) @ (k x n) matmul in `dtype` on `device`."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    flops = 2 * m * k * n
    # A GPU runs 20 GFLOP in tens of microseconds: time about 2 TFLOP there instead.
    per_repeat = max(3, int((2e12 if device != "cpu" else 2e10) / flops))
    for _ in range(3):
        a @ b
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(per_repeat):
            a @ b
        synchronize(device)  # CUDA launches are asynchronous: wait for the last matmul
        seconds.append((time.perf_counter() - started) / per_repeat)
    return flops / statistics.median(seconds) / 1e9


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gflops(dtype: str, device: str = "cpu") -> float:
    """The best sustained rate over the step's own shapes: the limit MFU is taken against."""
    shapes = SHAPES if device == "cpu" else CUDA_SHAPES
    return max(rate_gflops(*shape, DTYPES[dtype], device=device) for shape in shapes.values())


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| shape | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |\n|---|---|---|---|")
    for name, shape in SHAPES.items():
        fp32, bf16 = (rate_gflops(*shape, dtype) for dtype in DTYPES.values())
        print(f"| {name} | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.2f}x |")


if __name__ == "__main__":
    main()
