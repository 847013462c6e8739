"""train.reference cached: the reference's log-probabilities of every training example,
computed once before the first step and kept in the run directory, so a DPO or KTO step
needs no second forward pass (KTO still runs the reference on its KL rows).

The file keeps the data fingerprint it was computed from (as checkpoints do): --resume
reuses it for the same data and computes it again for other data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from finetune import preference
from finetune.data import PairExample
from finetune.runs.layout import REFERENCE_LOGPS as FILE


def path(run_dir: Path) -> Path:
    return run_dir / FILE


def read(run_dir: Path, fingerprint: str, examples: int) -> torch.Tensor | None:
    """The cached log-probabilities, or None when there are none for this data."""
    from safetensors import safe_open

    try:
        with safe_open(str(path(run_dir)), framework="pt") as cache:
            meta = cache.metadata() or {}
            logps = cache.get_tensor("logps")
    except Exception:  # missing or unreadable (a killed write): computed again
        return None
    if meta.get("data_sha256") != fingerprint or logps.shape[0] != examples:
        return None
    return logps


def write(run_dir: Path, logps: torch.Tensor, fingerprint: str) -> None:
    from safetensors.torch import save_file

    from finetune.outputs import write_file_atomically

    metadata = {"data_sha256": fingerprint, "examples": str(logps.shape[0])}
    write_file_atomically(
        path(run_dir), lambda tmp: save_file({"logps": logps.contiguous()}, str(tmp), metadata)
    )


def compute(
    model: Any,
    examples: list[PairExample],
    order: list[int],
    batch_size: int,
    pad_id: int,
    reference: preference.Reference,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> torch.Tensor:
    """Every example's reference log-probabilities, keyed by its index. Batched in `order`
    (the first epoch's), so the first epoch's micro-batches are the step's own shapes."""
    from finetune.progress import stage_progress

    columns = 1 if examples[0].label is not None else 2
    logps = torch.zeros(len(examples), columns, dtype=torch.float32)
    with stage_progress("reference log-probabilities", len(order)) as advance:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            with autocast():
                rows = preference.reference_rows(
                    model, [examples[i] for i in chunk], pad_id, reference
                )
            logps[chunk] = rows.float()
            advance(len(chunk))
    return logps
