"""Cost of measuring live tensors during training: steps/s with and without the tracker.

Run: PYTHONPATH=. .venv/bin/python benchmarks/tracking_overhead.py [STEPS_PER_ARM]

The quickstart recipe (SmolLM2-135M-Instruct, LoRA r16 on all linear layers, fp32, batch
8) on the CPU. The same micro-batch is stepped with tracking off (A) and on (B),
interleaved A B A B, and the median step time of each arm is printed.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from finetune.memory.measure import LiveTensorPeak, PeakMemory
from finetune.prepare import prepare
from finetune.recipe import load_recipe
from finetune.train import Loop

ROOT = Path(__file__).resolve().parents[1]


class EveryStep(LiveTensorPeak):
    """Track every step (the arm that pays the full cost)."""

    def wants(self, step: int, shape: tuple[int, int, int]) -> bool:
        return self.tracker is not None


def main(reps: int = 5) -> None:
    from accelerate import Accelerator

    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(ROOT / "recipes/quickstart.yaml", [f"output.dir={out}/run"])
        prepared = prepare(recipe)
        loop = Loop(recipe, prepared, Accelerator(cpu=True), Path(out), None, PeakMemory())
        arms = {"off": LiveTensorPeak(loop.unwrapped(), enabled=False)}
        loop.live.close()
        arms["on"] = EveryStep(loop.unwrapped())
        batch = [list(range(recipe.train.micro_batch_size))]
        times: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(reps):
            for name, live in arms.items():
                loop.live = live
                started = time.perf_counter()
                loop.step(batch)
                times[name].append(time.perf_counter() - started)
                print(f"{name}: {times[name][-1]:.2f} s", flush=True)
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        print(f"steps/s without tracking: {1 / off:.3f} (median of {reps}: {off:.2f} s/step)")
        print(f"steps/s with tracking:    {1 / on:.3f} (median of {reps}: {on:.2f} s/step)")
        print(f"overhead: {100 * (on - off) / off:+.1f}% per tracked step")
        print(f"live-tensor peak: {arms['on'].tracker.peak_bytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
