"""`finetune export RUN --format FORMAT`: one output per format (an adapter folder, a merged
model folder, a GGUF file, a LoRA adapter GGUF), every option checked before a model loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.choices import EXPORT_FORMATS, GGUF_TYPES
from finetune.errors import UserError, closest
from finetune.export.adapter_folder import export_adapter
from finetune.export.checks import check_dtype, check_output, check_tolerance, folder_size
from finetune.export.gguf_adapter import export_gguf_adapter
from finetune.export.gguf_check import GGUFCheck
from finetune.export.gguf_model import model_to_export, write_checked_gguf
from finetune.export.merging import MergeReport, merge
from finetune.targets import resolve_target


@dataclass
class ExportReport:
    format: str
    out: str
    size_bytes: int
    merge: MergeReport | None = None
    gguf_type: str | None = None
    check: GGUFCheck | None = None


def export(
    run: str,
    out: Path,
    fmt: str,
    *,
    gguf_type: str = "f16",
    dtype: str = "float32",
    match_quantized: bool = False,
    force: bool = False,
    tolerance: float | None = None,
    model: str | None = None,
    base_gguf: Path | None = None,
) -> ExportReport:
    """Export RUN as an adapter folder, a merged model folder, a GGUF file, or its LoRA
    adapter as a GGUF adapter file.

    Raises:
        UserError: unknown format or GGUF type, bad input as for `merge`.
        CheckFailed: a merge or GGUF check failed; nothing written.
    """
    check_export_options(fmt, gguf_type, tolerance, dtype, base_gguf)
    if fmt == "merged":
        report = merge(
            run,
            out,
            dtype=dtype,
            match_quantized=match_quantized,
            force=force,
            tolerance=tolerance,
            model=model,
        )
        return ExportReport("merged", str(out), folder_size(out), merge=report)
    target = resolve_target(run, model)
    check_output(out, force, [target], "adapter" if fmt == "adapter" else "gguf", [base_gguf])
    if fmt == "adapter":
        export_adapter(target, out)
        return ExportReport("adapter", str(out), folder_size(out))
    if fmt == "gguf-adapter":
        check = export_gguf_adapter(target, out, base_gguf, tolerance)
        return ExportReport("gguf-adapter", str(out), out.stat().st_size, check=check)
    merged = model_to_export(target, match_quantized)
    check = write_checked_gguf(merged, out, gguf_type, tolerance)
    return ExportReport(
        "gguf", str(out), out.stat().st_size, merge=merged.report, gguf_type=gguf_type, check=check
    )


def check_export_options(
    fmt: str, gguf_type: str, tolerance: float | None, dtype: str, base_gguf: Path | None
) -> None:
    """Every option first: a typo must not wait for a model to load and merge."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(
            f"--format must be one of {', '.join(EXPORT_FORMATS)} (got {fmt!r})"
            f"{closest(fmt, EXPORT_FORMATS)}"
        )
    if gguf_type not in GGUF_TYPES:
        raise UserError(
            f"--gguf-type must be one of {', '.join(GGUF_TYPES)} (got {gguf_type!r})"
            f"{closest(gguf_type, GGUF_TYPES)}"
        )
    check_tolerance(tolerance)
    check_dtype(dtype)
    if base_gguf is not None and fmt != "gguf-adapter":
        raise UserError(f"--base-gguf applies to --format gguf-adapter, not {fmt}; drop it")


def gguf_check_line(report: ExportReport) -> str:
    """One console line: how a GGUF export was checked and what the check found."""
    check = report.check
    what = f"GGUF ({report.gguf_type})" if report.format == "gguf" else "adapter GGUF"
    if check.base_gguf:
        what += f" on {check.base_gguf}"
    line = f"{what} checked with {check.runner}: "
    if check.prompts:
        line += f"tokens {'identical' if check.tokens_identical else 'DIFFER'} on "
        line += f"{check.prompts} prompts, "
    line += f"max |logit difference| {check.max_logit_diff:.3g} (tolerance {check.tolerance:g})"
    if check.greedy_identical is not None:
        line += f", greedy answers identical on {check.greedy_identical}/{check.prompts}"
    if check.pre_tokenizer:
        line += f"; pre-tokenizer {check.pre_tokenizer}"
    return line + (f"; {check.note}" if check.note else "")
