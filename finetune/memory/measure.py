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
            import torch

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
            import torch

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
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    found: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes() > 0:
            found[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield found
