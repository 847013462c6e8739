"""Measuring memory during a run: the peak, and the bytes autograd saves for backward.

On a GPU the peak is torch's own statistics: `max_memory_allocated` (tensors) and
`max_memory_reserved` (what the caching allocator holds). On the CPU there are no such
statistics; the peak is the process's peak resident set size (VmHWM in /proc/self/status,
or ru_maxrss) minus the resident size measured before the model loaded. A background
thread also samples VmRSS so the peak can be taken relative to the baseline even when the
process's high-water mark was set earlier (VmHWM cannot be reset without privileges).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune import compiling
from finetune.memory.tracker import MemoryTracker
from finetune.positions import logit_positions

CPU_METRIC = "peak process resident memory (VmRSS sampled every 5 ms) minus the baseline"
GPU_METRIC = "torch.cuda.max_memory_allocated (max reserved beside it)"


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_field("VmRSS") or _maxrss()


def hwm_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM, else ru_maxrss)."""
    return _status_field("VmHWM") or _maxrss()


def _status_field(name: str) -> int:
    status = Path("/proc/self/status")
    if not status.is_file():
        return 0
    for line in status.read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024  # kB
    return 0


def _maxrss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes


@dataclass
class PeakMemory:
    """Peak memory between start() and stop(); also a context manager.

    Attributes:
        device: "cuda" or "cpu".
        baseline_bytes: memory in use at start() (allocated on CUDA, RSS on the CPU).
        peak_bytes: the peak minus the baseline on the CPU; max allocated on CUDA.
        reserved_bytes: max reserved on CUDA (None on the CPU).
        metric: text naming the metric of `peak_bytes`.
    """

    device: str = "cpu"
    interval_s: float = 0.005
    baseline_bytes: int = 0
    peak_bytes: int = 0
    reserved_bytes: int | None = None
    metric: str = CPU_METRIC
    _max_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> PeakMemory:
        """Take the baseline and start watching."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_bytes = torch.cuda.memory_allocated()
            self.metric = GPU_METRIC
            return self
        self.baseline_bytes = self._max_rss = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max_rss = max(self._max_rss, rss_bytes())

    def update(self) -> None:
        """Fold the current figures into the peak (call it at points that matter)."""
        if self.device.startswith("cuda"):
            self.peak_bytes = torch.cuda.max_memory_allocated()
            self.reserved_bytes = torch.cuda.max_memory_reserved()
            return
        self._max_rss = max(self._max_rss, rss_bytes())
        self.peak_bytes = self._max_rss - self.baseline_bytes

    def stop(self) -> PeakMemory:
        """Stop watching and fix `peak_bytes`."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.update()
        return self

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "metric": self.metric,
            "baseline_bytes": self.baseline_bytes,
            "peak_bytes": self.peak_bytes,
            "reserved_bytes": self.reserved_bytes,
        }


@contextlib.contextmanager
def saved_tensors(model: Any) -> Iterator[dict[int, int]]:
    """Record every storage autograd saves for backward inside the block, parameters excluded.

    Yields a dict from storage address to storage bytes, filled as the forward runs; a
    storage saved by several ops appears once, as it is held once.
    """

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    found: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes() > 0:
            found[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield found


LIVE_METRIC = "peak bytes of live tensors (MemoryTracker: the metric the estimate predicts)"
RSS_NAME = "peak resident memory minus baseline (process RSS; not comparable to the estimate)"


def batch_shape(batch: dict[str, Any], virtual_tokens: int = 0) -> tuple[int, int, int]:
    """(rows, padded length, logits positions) of a micro-batch: what a step's peak grows
    with. Logits positions are those the loss computes (`finetune.positions`)."""
    labels = batch["labels"]
    rows, width = labels.shape
    return rows, width, logit_positions(labels, virtual_tokens)


class LiveTensorPeak:
    """The peak bytes of live tensors during real training, by the dry run's `MemoryTracker`.

    Tracking costs a Python call per torch op (a tracked step is about 16% slower,
    benchmarks/tracking_overhead.py), so only the steps that can set the peak are tracked:
    the first (the epoch's widest micro-batch comes first: `batching.widest_first`), and
    any later step whose widest micro-batch has more rows, more padded tokens or more logits
    positions than any tracked before. A step no larger in any of these holds the same
    tensors at most, so it cannot exceed the peak already seen.

    The first step's forward and backward run before AdamW's states exist; every later
    step's run with them alive. The steady state of the first step's shape is therefore
    its forward-and-backward peak plus the states its optimizer step made (both measured),
    or its optimizer step's own peak, whichever is higher: what a second tracked step of
    the same shape measures, without paying for it.

    A model with compiled layers (train.compile) runs its tracked steps eagerly: torch
    does not compile under a dispatch mode, and a layer first called under one would never
    be compiled afterwards. The measurement is then of the eager step, as estimated.

    Args:
        model: the model being trained (parameters are registered before the first step).
        enabled: False on CUDA, where torch's allocator statistics are the measurement.
        compiled: the model has layers compiled by torch.compile.
    """

    def __init__(self, model: Any, enabled: bool = True, compiled: bool = False) -> None:
        self.tracker = MemoryTracker(model, record_events=False) if enabled else None
        self.compiled = compiled
        self.widest = (0, 0, 0)
        self.tracked_steps: list[int] = []
        self.active = False
        self.steady_first: tuple[int, dict[str, int], str] | None = None

    def wants(self, step: int, shape: tuple[int, int, int]) -> bool:
        """Whether step `step` (1-based) with widest micro-batch `shape` is tracked."""
        if self.tracker is None:
            return False
        if step == 1:
            return True
        return any(new > old for new, old in zip(shape, self.widest, strict=True))

    @contextlib.contextmanager
    def step(
        self, step: int, batches: list[dict[str, Any]], virtual_tokens: int = 0
    ) -> Iterator[None]:
        """Track this optimizer step if it can set the peak (see the class docstring);
        `virtual_tokens`: prompt tuning's, in front of every sequence."""
        shapes = [batch_shape(b, virtual_tokens) for b in batches]
        shape = tuple(max(s[i] for s in shapes) for i in range(3))
        if not self.wants(step, shape):
            yield
            return
        for batch in batches:  # made by collate before the step, as the dry run's batch
            for tensor in batch.values():
                self.tracker.track(tensor, "activations")
        self.widest = tuple(max(a, b) for a, b in zip(shape, self.widest, strict=True))
        self.tracked_steps.append(step)
        self.active = True
        try:
            with self.tracker, compiling.eager(self.compiled):
                yield
        finally:
            self.active = False
        if step == 1:
            self.steady_first = self.first_step_steady_state()

    def first_step_steady_state(self) -> tuple[int, dict[str, int], str]:
        """The first step's forward-and-backward peak with the optimizer states it made
        alive beside it: (bytes, breakdown, phase)."""
        peak, breakdown, phase = self.tracker.training_peak
        states = self.tracker.current["optimizer"]
        return peak + states, {**breakdown, "optimizer": breakdown["optimizer"] + states}, phase

    def phase(self, name: str) -> Any:
        """The tracker's phase while a tracked step runs, else nothing."""
        return self.tracker.phase(name) if self.active else contextlib.nullcontext()

    def keep_optimizer_states(self, optimizer: Any) -> None:
        """After a tracked optimizer step: its states are `optimizer`, the rest temporaries."""
        if self.active:
            self.tracker.keep_optimizer_states(optimizer)

    def to_dict(self) -> dict[str, Any] | None:
        """Plain data for the report: metric, peak, its breakdown, the steps tracked."""
        if self.tracker is None:
            return None
        summary = self.tracker.summary()
        peak = (summary["peak_bytes"], summary["peak_breakdown"], summary["peak_phase"])
        if self.steady_first is not None and self.steady_first[0] > peak[0]:
            peak = self.steady_first
        return {
            "device": "cpu",
            "metric": LIVE_METRIC,
            "peak_bytes": peak[0],
            "breakdown": peak[1],
            "peak_phase": peak[2],
            "tracked_steps": list(self.tracked_steps),
        }

    def close(self) -> None:
        """Remove the tracker's hooks from the model."""
        if self.tracker is not None:
            self.tracker.remove_hooks()


def every_process(measured: dict[str, Any]) -> dict[str, Any]:
    """This process's `LiveTensorPeak.to_dict()` joined with every other process's (a
    collective: every process calls it): the highest process's figures, and each process's
    peak in rank order under `per_process_peak_bytes`."""
    import torch.distributed as dist

    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, measured)
    highest = max(everyone, key=lambda m: m["peak_bytes"])
    return {
        **highest,
        "rank": everyone.index(highest),
        "per_process_peak_bytes": [m["peak_bytes"] for m in everyone],
    }
