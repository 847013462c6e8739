"""Ending a run early on purpose: Ctrl-C, a scheduler's SIGTERM, or the recipe's time budget.

The first SIGINT or SIGTERM only raises a flag: the loop finishes the optimizer step it is in,
writes a checkpoint and the report, and the process exits with 128 + the signal's number (130,
143), as a shell expects. A second signal stops at once (`Interrupted`): every file is written
under a temporary name and renamed into place, so stopping mid-write corrupts nothing.
`train.max_time` stops the same way before the step that would overrun the budget.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from finetune.inputs import DURATION_UNITS

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A second signal: stop now. A BaseException so that no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class Terminated(Interrupted):
    """SIGTERM outside a training run (`kill`, `docker stop`): it unwinds as Ctrl-C does, so
    temporary outputs are removed and child processes stopped, instead of the process
    vanishing on the spot with its partial files left behind."""


# Set by the SIGTERM handler below. Raising from a signal handler can land where Python
# swallows the exception (a logging lock's release, a __del__: "Exception ignored in ..."),
# so whatever publishes an output asks here too, and the command still ends as stopped.
TERM_PENDING: list[int] = []


def raise_if_terminated() -> None:
    """Raise `Terminated` if a SIGTERM arrived, even one whose exception was swallowed."""
    if TERM_PENDING:
        raise Terminated(TERM_PENDING[0])


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within: SIGTERM raises `Terminated` (a training run installs its own handler inside,
    `StopRequests`, and puts this one back). Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    TERM_PENDING.clear()  # a new command (tests run several in one process)

    def unwind(signum: int, frame: FrameType | None) -> None:
        TERM_PENDING.append(signum)
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopRequests:
    """Catches SIGINT and SIGTERM while a run trains and keeps its time budget.

    Use as a context manager around the loop; the previous handlers come back on exit. Outside
    the main thread (where Python cannot install handlers) only the time budget works.
    """

    def __init__(self, max_time_s: float | None = None, started: float | None = None) -> None:
        self.signum: int | None = None
        self.max_time_s = max_time_s
        self.started = time.monotonic() if started is None else started
        self.out_of_time = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second one: the user means it
            raise Interrupted(signum)
        self.signum = signum

    def check_time(self, next_step_s: float) -> bool:
        """Whether the next step, lasting about `next_step_s`, would end past the budget."""
        if self.max_time_s is None:
            return False
        elapsed = time.monotonic() - self.started
        self.out_of_time = self.out_of_time or elapsed + next_step_s > self.max_time_s
        return self.out_of_time

    def agreed(self, accelerator: Any, next_step_s: float) -> bool:
        """Whether to stop before the next step. Under data parallelism the processes agree
        (a signal may reach them at different steps), so all stop after the same step."""
        import torch

        self.check_time(next_step_s)
        if accelerator.num_processes == 1:
            return self.requested
        flags = torch.tensor([self.signum or 0, int(self.out_of_time)])
        flags = accelerator.reduce(flags.to(accelerator.device), reduction="max")
        signum, out_of_time = (int(v) for v in flags.cpu())
        self.signum = self.signum or signum or None
        self.out_of_time = bool(out_of_time)
        return self.requested

    @property
    def requested(self) -> bool:
        return self.signum is not None or self.out_of_time

    def reason(self) -> str | None:
        """Why the run stopped early, in words for the report; None if it was not asked to."""
        if self.signum is not None:
            return f"interrupted by {signal.Signals(self.signum).name}"
        if self.out_of_time:
            return f"stopped by train.max_time ({format_duration(self.max_time_s or 0)})"
        return None

    def exit_code(self) -> int:
        """130 after SIGINT, 143 after SIGTERM, 0 after the time budget (a planned stop)."""
        return 128 + self.signum if self.signum is not None else 0


def format_duration(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds >= DURATION_UNITS[unit] and seconds % DURATION_UNITS[unit] == 0:
            return f"{seconds / DURATION_UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"
