"""Rich progress bars: training (step, loss, learning rate, tokens per second) and the
counted stages of evaluation (rows scored, prompts answered)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self.task = self.progress.add_task(
            "train", total=total, completed=start, loss="-", lr="-", tps="-"
        )

    def __enter__(self) -> TrainProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def update(self, step: int, record: dict[str, Any]) -> None:
        self.progress.update(
            self.task,
            completed=step,
            loss=f"{record['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            tps=f"{record['tokens_per_s']:.0f}",
        )


@contextmanager
def stage_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bar on stderr for one counted stage; yields `advance(n)`. Evaluating a base model
    and then its adapter can take minutes on a CPU, and silence looks like a hang."""
    progress = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = progress.add_task(label, total=total)
    with progress:
        yield lambda n: progress.advance(task, n)
