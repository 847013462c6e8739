"""Live-tensor bytes by category, tracked at torch's dispatch level.

One tracker serves both the dry run (a training step on meta tensors, nothing allocated)
and the measurement of real training on the CPU, so an estimate and a measurement count the
same quantity: the bytes of live tensor storages. Each storage is counted once (views share
it), from the op that created it until its last reference dies.

Usage::

    tracker = MemoryTracker(model)          # weights and adapter registered up front
    with tracker:
        with tracker.phase("forward"):
            loss = compute_loss(model, batch)
        with tracker.phase("backward"):
            loss.backward()
        with tracker.phase("optimizer"):
            optimizer.step()
    tracker.peak_bytes, tracker.peak_breakdown, tracker.current

`torch.distributed._tools.mem_tracker.MemTracker` is not used: it hooks the gradient of
every parameter and fails on frozen ones.

Sharded training (FSDP2) needs two more things, both followed here: a sharded parameter is
a DTensor, whose own storage is an unallocated wrapper; what the process holds is its local
shard. And FSDP2 gathers and frees each layer's whole parameters by resizing their storages
in place (`UntypedStorage.resize_`, torch/distributed/fsdp/_fully_shard/_fsdp_param.py
`alloc_storage`/`free_storage`), which no op at the dispatch level shows: while a tracker is
active, `resize_` is wrapped to report each resize (a shrink to 0 is a free, a growth an
allocation, counted as "gathered weights").
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = (
    "weights",
    "adapter",
    "gradients",
    "optimizer",
    "optimizer step",
    "activations",
    "logits",
    "backward temporaries",
    "library workspaces",
    "gathered weights",  # sharded training: whole parameters of the layers being computed
)
# What a tensor created in each phase is, unless retagged (gradients, logits).
PHASE_CATEGORY = {
    "forward": "activations",
    "logits": "logits",
    "backward": "backward temporaries",
    "optimizer": "optimizer step",
}


@dataclass
class Event:
    """One allocation (`nbytes` > 0) or free (`nbytes` < 0) of storage `key`, in order."""

    key: int
    nbytes: int
    device: str


@dataclass
class _Storage:
    key: int
    nbytes: int
    category: str
    device: str
    saved: bool = False


class MemoryTracker(TorchDispatchMode):
    """Track live tensor storages by category; the peak total and its breakdown.

    Attributes:
        current: bytes alive now, by category (CATEGORIES).
        peak_bytes: the largest total seen; `peak_breakdown` its split by category and
            `peak_phase` the phase it happened in.
        peak_saved_bytes: the largest total of storages autograd saved for backward
            (parameters excluded).
        events: the allocation/free stream, in order (for the allocator model).
    """

    def __init__(self, model: Any = None, *, record_events: bool = True) -> None:
        """Args:
        model: registered up front when given (see `track_model`).
        record_events: keep the allocation/free stream in `events`.
        """
        super().__init__()
        self.record_events = record_events
        self.current: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.peak_bytes = 0
        self.peak_breakdown: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.peak_phase = ""
        # The peak outside the optimizer step (forward, logits, backward), with its breakdown
        # and phase: what a first step's forward and backward held before AdamW's states.
        self.training_peak = (0, dict(self.current), "")
        self.saved_bytes = 0
        self.peak_saved_bytes = 0
        self.events: list[Event] = []
        self._live: dict[int, _Storage] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._next_key = 0
        self._peak_key = -1  # the last storage added when the peak was reached
        self._total = 0
        self._phase = "forward"
        self._hooks: list[Any] = []
        self._saved_hooks: Any = None
        self._deferred: BaseException | None = None  # see _free
        # The model's hooks act only inside the mode: between tracked training steps
        # (train.py tracks a few) the model runs untracked.
        self._inside = False
        if model is not None:
            self.track_model(model)

    # ------------------------------------------------------------------ public API

    @property
    def total_bytes(self) -> int:
        """Bytes of every tracked storage alive now."""
        return self._total

    def track_model(self, model: Any) -> None:
        """Register `model`'s parameters and buffers and install its hooks.

        Trainable parameters count as `adapter` (all of them under full fine-tuning),
        frozen ones and buffers as `weights`. A post-accumulate-grad hook on each
        trainable parameter retags its `.grad` as `gradients`; a forward pre-hook on
        the output head switches the phase to `logits`, so the head's output and the
        loss computed after the model call count as logits.
        """
        for param in model.parameters():
            category = "adapter" if param.requires_grad else "weights"
            self.track(param, category)
            if param.requires_grad:
                self._hooks.append(param.register_post_accumulate_grad_hook(self._grad_landed))
        for buffer in model.buffers():
            self.track(buffer, "weights")
        for tensor in quantization_state(model):
            self.track(tensor, "weights")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            self._hooks.append(head.register_forward_pre_hook(self._enter_logits))

    def track(self, tensor: torch.Tensor, category: str) -> None:
        """Count `tensor`'s storage as `category` (retagged if already counted)."""
        storage = _storage(tensor)
        if storage is None:
            return
        known = self._live.get(storage._cdata)
        if known is None:
            self._add(storage, category, str(tensor.device))
        elif known.category != category:
            self.current[known.category] -= known.nbytes
            self.current[category] += known.nbytes
            known.category = category

    def keep_optimizer_states(self, optimizer: Any) -> None:
        """Retag what `optimizer` keeps between steps (moments, step counts) as
        `optimizer`; the rest its step allocated stays `optimizer step` (temporaries:
        foreach AdamW's whole-model ones are the size of the weights)."""
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self._retag_since_peak(value, "optimizer")
                    self.track(value, "optimizer")

    def _retag_since_peak(self, tensor: torch.Tensor, category: str) -> None:
        """Move `tensor` to `category` in the peak's breakdown too, if it was alive at the
        peak (it is alive now, so it was if it came before the peak's last storage): a
        peak in the step that created the optimizer's states counts them as states."""
        storage = _storage(tensor)
        known = self._live.get(storage._cdata) if storage is not None else None
        if known is None or known.category == category or known.key > self._peak_key:
            return
        self.peak_breakdown[known.category] -= known.nbytes
        self.peak_breakdown[category] += known.nbytes

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Tensors created inside count as the phase's category (see PHASE_CATEGORY)."""
        if name not in PHASE_CATEGORY:
            raise ValueError(f"phase must be one of {', '.join(PHASE_CATEGORY)}")
        before, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = before

    def remove_hooks(self) -> None:
        """Remove the hooks `track_model` installed (the model is left as it was)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def summary(self) -> dict[str, Any]:
        """Plain data: peak, its breakdown and phase, what is alive now, saved bytes."""
        return {
            "peak_bytes": self.peak_bytes,
            "peak_breakdown": dict(self.peak_breakdown),
            "peak_phase": self.peak_phase,
            "current": dict(self.current),
            "peak_saved_for_backward_bytes": self.peak_saved_bytes,
        }

    # ------------------------------------------------------------------ the mode

    def __enter__(self) -> MemoryTracker:
        # Saved-for-backward: a no-op pack hook marks the storages autograd keeps.
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._saved_hooks.__enter__()
        self._inside = True
        _watch_resizes(self)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._inside = False
        _unwatch_resizes(self)
        super().__exit__(*exc)
        self._saved_hooks.__exit__(*exc)
        if self._deferred is not None and exc[0] is None:  # no torch op came after it
            err, self._deferred = self._deferred, None
            raise err

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self._deferred is not None:
            err, self._deferred = self._deferred, None
            raise err
        out = func(*args, **(kwargs or {}))
        category = PHASE_CATEGORY[self._phase]
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                storage = _storage(item)
                if storage is not None and storage._cdata not in self._live:
                    self._add(storage, category, str(item.device))
        return out

    # ------------------------------------------------------------------ bookkeeping

    def _add(self, storage: torch.UntypedStorage, category: str, device: str) -> None:
        cdata, nbytes = storage._cdata, storage.nbytes()
        entry = _Storage(self._next_key, nbytes, category, device)
        self._next_key += 1
        self._live[cdata] = entry
        # The storage's Python object lives exactly as long as the storage (torch keeps
        # it with the C++ storage), so its weakref callback is the free.
        self._refs[cdata] = weakref.ref(storage, lambda _, c=cdata: self._free(c))
        self.current[category] += nbytes
        self._total += nbytes
        if self.record_events:
            self.events.append(Event(entry.key, nbytes, device))
        if self._total > self.peak_bytes:
            self.peak_bytes = self._total
            self.peak_breakdown = dict(self.current)
            self.peak_phase = self._phase
            self._peak_key = entry.key
        if self._phase != "optimizer" and self._total > self.training_peak[0]:
            self.training_peak = (self._total, dict(self.current), self._phase)

    def _free(self, cdata: int) -> None:
        # Python prints and drops an exception raised inside a weakref callback, and a signal
        # handler's (a second Ctrl-C: stopping.Interrupted) can land here; keep it and raise
        # it at the next torch op, so the stop still happens and no traceback is printed.
        try:
            self._forget(cdata)
        except BaseException as err:  # re-raised by __torch_dispatch__
            self._deferred = err

    def _forget(self, cdata: int) -> None:
        entry = self._live.pop(cdata, None)
        self._refs.pop(cdata, None)
        if entry is None:
            return
        self.current[entry.category] -= entry.nbytes
        self._total -= entry.nbytes
        if entry.saved:
            self.saved_bytes -= entry.nbytes
        if self.record_events:
            self.events.append(Event(entry.key, -entry.nbytes, entry.device))

    def _resized(self, storage: torch.UntypedStorage) -> None:
        """A storage resized in place: the old size freed, the new one allocated."""
        cdata = storage._cdata
        known = self._live.get(cdata)
        category = known.category if known is not None else "gathered weights"
        self._free(cdata)
        if storage.nbytes():
            self._add(storage, category, str(storage.device))

    def _grad_landed(self, param: torch.Tensor) -> None:
        if self._inside and param.grad is not None:
            self.track(param.grad, "gradients")

    def _enter_logits(self, module: Any, args: Any) -> None:
        if self._inside and self._phase == "forward":
            self._phase = "logits"  # restored when the caller's forward phase ends

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = _storage(tensor)
        entry = self._live.get(storage._cdata) if storage is not None else None
        if entry is not None and not entry.saved and entry.category not in ("weights", "adapter"):
            entry.saved = True
            self.saved_bytes += entry.nbytes
            self.peak_saved_bytes = max(self.peak_saved_bytes, self.saved_bytes)
        return tensor


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    """The tensor's storage (a DTensor's: its local shard's), or None for tensors without
    one (sparse, nested, other wrappers)."""
    tensor = getattr(tensor, "_local_tensor", tensor)  # a DTensor's shard: what is held here
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


# The trackers active now; `UntypedStorage.resize_` is wrapped while there are any.
_WATCHERS: list[MemoryTracker] = []


def _watched_resize(storage: torch.UntypedStorage, size: int) -> Any:
    out = torch._C.StorageBase.resize_(storage, size)
    for tracker in _WATCHERS:
        tracker._resized(storage)
    return out


def _watch_resizes(tracker: MemoryTracker) -> None:
    if not _WATCHERS:
        torch.UntypedStorage.resize_ = _watched_resize  # the Python subclass's own attribute
    _WATCHERS.append(tracker)


def _unwatch_resizes(tracker: MemoryTracker) -> None:
    _WATCHERS.remove(tracker)
    if not _WATCHERS:
        del torch.UntypedStorage.resize_  # StorageBase's method again


def quantization_state(model: Any) -> list[torch.Tensor]:
    """The tensors bitsandbytes hangs on its quantized weights instead of registering them
    as buffers: int8's per-row scales (`weight.SCB`) and 4-bit's QuantState (absmax, code,
    offset, and the nested state of double quantization). Without them a real quantized
    run would count fewer weight bytes than it holds (measured: the 2-layer test model's
    int8 row scales are 4,096 B, its nf4 code tables about 15 KB)."""
    found: list[torch.Tensor] = []
    for param in model.parameters():
        scales = getattr(param, "SCB", None)
        if isinstance(scales, torch.Tensor):
            found.append(scales)
        state = getattr(param, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                value = getattr(state, name, None)
                if isinstance(value, torch.Tensor):
                    found.append(value)
            state = getattr(state, "state2", None)
    return found
