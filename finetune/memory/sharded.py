"""The dry run of a sharded step: torch's own FSDP2 on the meta model, over a fake world.

What one process of a sharded run holds is decided by torch's `fully_shard` code (its shard
of every parameter, padded; the whole parameters of the layer being computed, gathered
before its forward and again before its backward; the root module's kept from forward to
backward; the gradients' reduce-scatter buffers). Rather than write that down again, the
dry run applies `finetune.sharding.shard` (the code training uses) to the meta model over a
process group of torch's "fake" backend (one process playing rank 0 of N: collectives
return at once and move nothing), and the tracker measures the step as it measures an
unsharded one. Two things FSDP2 does not offer on meta tensors are lent for the duration:
a device module for "meta" (FSDP2 asks `torch.<device>` for streams and events; the CPU's
serve, as they do in a CPU run) and its check that no parameter is on meta.

A process that already belongs to a process group (a sharded run writing its report)
cannot start the fake one: torch allows one default group per process, so the dry run runs
in a child process there (started once, see `in_child_process`).
"""

from __future__ import annotations

import atexit
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch


class _MetaDeviceModule:
    """What FSDP2 asks of `torch.<device>` (streams, events, the device count), for meta."""

    Stream = torch.cpu.Stream
    Event = torch.cpu.Event
    stream = staticmethod(torch.cpu.stream)
    current_stream = staticmethod(torch.cpu.current_stream)
    synchronize = staticmethod(torch.cpu.synchronize)

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def device_count() -> int:
        return 1


def in_process_group() -> bool:
    """Whether this process already belongs to a process group (see the module docstring)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def fake_world(processes: int) -> Iterator[Any]:
    """A device mesh of `processes` fake ranks on meta, this process rank 0; torch's
    process group and the lent attributes are removed on leaving."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    check = FSDPParamGroup._validate_no_meta_params
    # init_process_group wraps sys.excepthook to prefix "[rank0]:" and nothing unwraps it.
    excepthook = sys.excepthook
    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=processes)
    try:
        torch.meta = _MetaDeviceModule  # type: ignore[attr-defined]
        FSDPParamGroup._validate_no_meta_params = lambda self: None
        yield init_device_mesh("meta", (processes,))
    finally:
        dist.destroy_process_group()
        sys.excepthook = excepthook
        FSDPParamGroup._validate_no_meta_params = check
        if hasattr(torch, "meta"):
            del torch.meta


def shard_on_meta(model: Any, mesh: Any) -> None:
    """Shard the meta peft model as a sharded run does (decoder layers, then the root)."""
    from finetune import sharding

    plan = sharding.Sharding(reshard_after_forward=True, layer_classes=())
    sharding.shard(model, plan, "meta", mesh=mesh)


_worker: Any = None  # the child process of `in_child_process`, started on first use


def in_child_process(function: Any, *args: Any) -> Any:
    """`function(*args)` in a child Python process, its result (or its exception)
    returned. The child is spawned (nothing of this process's process group is inherited),
    once: a run's report asks for several dry runs, and each would otherwise pay for
    importing torch and transformers again. It ends with this process."""
    global _worker
    if _worker is None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from finetune.noise import silence_third_party

        _worker = ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=silence_third_party
        )
        # Shut down before the interpreter tears its modules down: left to garbage
        # collection then, the executor's callback printed "Exception ignored in ..." at
        # the end of a pytest-xdist worker (not reproduced in a plain process).
        atexit.register(_worker.shutdown)
    return _worker.submit(function, *args).result()
