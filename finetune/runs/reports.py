"""The run report's files: report.json (for machines), report.md (for people), the plots;
and report.json read back, as one typed object, by the commands that use a finished run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.runs.layout import (
    ADAPTER,
    LOSS_PLOT,
    MEMORY_PLOT,
    REPORT_JSON,
    REPORT_MD,
    adapter_path,
    write_text_atomically,
)


@dataclass(frozen=True)
class RunReport:
    """What later commands read from a run's report.json (report.py writes it).

    Attributes:
        path: the report.json read.
        quantization: the base model's quantization the adapter was trained against.
        measured: the run's measured memory peak (`memory.measured`: the live-tensor peak on
            the CPU, torch's allocator statistics on CUDA; `peak_bytes`, `metric`, `device`).
        estimated_setup: the memory estimator's `Setup` fields the report estimated with.
        model_config: the transformers config (`to_dict()`) that estimate dry-ran.
    """

    path: Path
    quantization: str
    measured: dict[str, Any]
    estimated_setup: dict[str, Any]
    model_config: dict[str, Any]


def read_report(run_dir: Path) -> RunReport | None:
    """The run's report.json as a `RunReport`, or None when the run wrote none.

    Raises:
        UserError: the file is unreadable, or lacks a field (a report from another version of
            finetune, or edited): the message names the field.
    """
    path = run_dir / REPORT_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(
            f"{path}: unreadable run report ({str(err).strip()[:120]}); delete it to use the "
            "run without it"
        ) from None
    return RunReport(
        path=path,
        quantization=str(report_field(data, "model.quantization", path)),
        measured=report_field(data, "memory.measured", path, dict),
        estimated_setup=report_field(data, "memory.estimate.setup", path, dict),
        model_config=report_field(data, "memory.model_config", path, dict),
    )


def report_field(data: Any, dotted: str, path: Path, kind: type | None = None) -> Any:
    """`data[a][b]...` for `dotted` "a.b...", refusing a missing field or one of another type."""
    value = data
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            value = None
            break
        value = value[key]
    if value is None or (kind is not None and not isinstance(value, kind)):
        raise UserError(
            f"{path}: the run report has no {dotted} (written by another finetune version?); "
            "delete it to use the run without it"
        )
    return value


def write_report(run_dir: Path, report: dict[str, Any], markdown: str) -> None:
    """report.json (the report as data) and report.md (`markdown`), each written atomically."""
    write_text_atomically(run_dir / REPORT_JSON, json.dumps(report, indent=2, default=str))
    write_text_atomically(run_dir / REPORT_MD, markdown)


def loss_plot_path(run_dir: Path) -> Path:
    return run_dir / LOSS_PLOT


def memory_plot_path(run_dir: Path) -> Path:
    return run_dir / MEMORY_PLOT


def written_outputs(run_dir: Path) -> list[str]:
    """The report's files and the adapter, as far as the run wrote them (a run that stopped
    early has no adapter/, and one without a logged step no loss plot)."""
    files = [REPORT_MD, REPORT_JSON, LOSS_PLOT, MEMORY_PLOT]
    shown = [name for name in files if (run_dir / name).exists()]
    return shown + ([f"{ADAPTER}/"] if adapter_path(run_dir).exists() else [])
