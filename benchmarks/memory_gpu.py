"""Re-estimate measured GPU runs on any machine: the dry run of each run's own setup set
beside what the run measured on CUDA.

Run: PYTHONPATH=. .venv/bin/python benchmarks/memory_gpu.py \
        --cases ../shared/gpu-measurements/reports --models ../shared/gpu-measurements/models

`--cases DIR` (repeatable): report.json files of `finetune train` runs (the format of
`../shared/gpu-measurements/reports/`; files without `memory.measured` on CUDA, such as
saved `finetune estimate` outputs, are skipped; `--any-device` keeps CPU runs, as
benchmarks/gpu_check.py --device cpu does to check itself without a GPU). `--models DIR`
(repeatable): folders of model configs, matched by the basename of each report's
`model.path` (`smol`, `llama7b`).
Each case is estimated from the report's `memory.estimate.setup`, the exact setup the run
estimated (batch, sequence, trained logit positions, mask, quantization, dtype, device),
with today's estimator: a dry run on the meta device, no GPU needed.

Measured: `memory.measured.peak_bytes` (torch.cuda.max_memory_allocated) and
`reserved_bytes` (max_memory_reserved) of the run. Estimate: `allocated_bytes` (the dry
run's peak of live tensors) and `reserved_bytes` (its allocation stream through the
caching-allocator model). Error = (estimate - measured) / measured. The last two lines:

    allocated: median |error| X%, worst Y% over N cases
    reserved: median |error| X%, worst Y% over N cases
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

GB = 1e9


@dataclass(frozen=True)
class Case:
    name: str
    config_dir: Path
    setup: dict
    measured_allocated: int
    measured_reserved: int


@dataclass(frozen=True)
class Row:
    case: Case
    allocated: int
    reserved: int

    @property
    def allocated_error(self) -> float:
        return relative_error(self.allocated, self.case.measured_allocated)

    @property
    def reserved_error(self) -> float:
        return relative_error(self.reserved, self.case.measured_reserved)


def relative_error(estimate: int, measured: int) -> float:
    return (estimate - measured) / measured


class BadInput(Exception):
    """A folder or report this tool cannot read: one line, exit 2."""


FOLDER_OF = {
    "--cases": "a folder of finetune report.json files (gpu-measurements/reports)",
    "--models": "a folder of model config folders (gpu-measurements/models)",
}


def check_folders(option: str, folders: list[Path]) -> None:
    for folder in folders:
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise BadInput(f"{option} {folder} {what}; give {FOLDER_OF[option]}")


def find_cases(
    case_dirs: list[Path], model_dirs: list[Path], any_device: bool = False
) -> list[Case]:
    """Every CUDA training report under `case_dirs` whose model config is found (with
    `any_device`, CPU training reports too)."""
    check_folders("--cases", case_dirs)
    check_folders("--models", model_dirs)
    cases = []
    for folder in case_dirs:
        for path in sorted(folder.glob("*.json")):
            case = read_case(path, model_dirs, any_device)
            if case is not None:
                cases.append(case)
    return cases


def read_case(path: Path, model_dirs: list[Path], any_device: bool = False) -> Case | None:
    try:
        report = json.loads(path.read_text())
        return case_of(path, report, model_dirs, any_device)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        detail = f"{type(e).__name__}: {e}" if not isinstance(e, KeyError) else f"no field {e}"
        raise BadInput(f"{path}: not a readable finetune report ({detail})") from None


def case_of(path: Path, report: dict, model_dirs: list[Path], any_device: bool) -> Case | None:
    memory = report.get("memory") or {}
    measured = memory.get("measured") or {}
    setup = (memory.get("estimate") or {}).get("setup")
    on_cuda = str(measured.get("device", "")).startswith("cuda")
    if not setup or not measured or not (on_cuda or any_device):
        return None  # not a CUDA training run (an estimate's own JSON, a CPU run)
    setup = with_autocast(setup, report.get("training") or {})
    model_name = Path(report["model"]["path"]).name
    config_dir = next((d / model_name for d in model_dirs if (d / model_name).is_dir()), None)
    if config_dir is None:
        raise BadInput(f"{path}: no config folder {model_name!r} under any --models DIR")
    return Case(
        name=path.stem,
        config_dir=config_dir,
        setup=setup,
        measured_allocated=int(measured["peak_bytes"]),
        # The CPU has no caching allocator: what it measures is its live-tensor peak.
        measured_reserved=int(measured.get("reserved_bytes") or measured["peak_bytes"]),
    )


# What train.mixed_precision resolves to, as autocast's dtype.
AUTOCAST = {"bf16": "bfloat16", "fp16": "float16", "no": None}


def with_autocast(setup: dict, training: dict) -> dict:
    """The setup with the autocast its run ran under.

    Reports record the resolved `training.mixed_precision` (accelerate's autocast). Older
    ones do not, and recorded `autocast: None` for every 16-bit base (the estimator then
    took autocast to act only on float32 weights); those runs used the recipes' default,
    `mixed_precision: auto`, which is bf16 on a GPU with bf16 (the H200 of
    ../shared/gpu-measurements: its snapshots show autocast's cast cache freed at every
    step's end).
    """
    mixed = training.get("mixed_precision", "bf16")
    return {**setup, "autocast": AUTOCAST[mixed]}


def estimate(case: Case) -> Row:
    """Today's dry run of the case's setup (as recorded, fields this version lacks dropped)."""
    from finetune.memory.dryrun import build_config, estimate_from_config
    from finetune.memory.estimate import Setup, recorded_fields

    known = {f.name for f in fields(Setup)}
    setup_fields = {k: v for k, v in recorded_fields(case.setup).items() if k in known}
    raw = json.loads((case.config_dir / "config.json").read_text())
    est = estimate_from_config(build_config(raw), Setup(**setup_fields), case.name)
    return Row(case, est.allocated_bytes, est.reserved_bytes or est.allocated_bytes)


def describe(setup: dict) -> str:
    shape = f"{setup['batch']} x {setup['seq']}"
    mask = "mask" if setup.get("masked") else "no mask"
    ckpt = ", ckpt" if setup.get("grad_ckpt") else ""
    return f"{setup['method']} {setup['quant']}/{setup['dtype']}, {shape}, {mask}{ckpt}"


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| case | setup | est. allocated | measured | error | est. reserved | measured | error |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        c = row.case
        lines.append(
            f"| {c.name} | {describe(c.setup)} "
            f"| {row.allocated / GB:.3f} | {c.measured_allocated / GB:.3f} "
            f"| {row.allocated_error:+.1%} "
            f"| {row.reserved / GB:.3f} | {c.measured_reserved / GB:.3f} "
            f"| {row.reserved_error:+.1%} |"
        )
    return lines


def summary(label: str, errors: list[float]) -> str:
    magnitudes = [abs(e) for e in errors]
    worst = max(errors, key=abs)
    return (
        f"{label}: median |error| {statistics.median(magnitudes):.1%}, "
        f"worst {worst:+.1%} over {len(errors)} cases"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=Path, action="append", required=True)
    parser.add_argument("--models", type=Path, action="append", required=True)
    parser.add_argument("--any-device", action="store_true", help="CPU runs too")
    # A dry run takes seconds of one core per case: a matrix of dozens wants several.
    parser.add_argument("--jobs", type=int, default=1, help="cases estimated at a time")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give 1 or more")
    try:
        cases = find_cases(args.cases, args.models, args.any_device)
    except BadInput as e:
        print(e, file=sys.stderr)
        return 2
    if not cases:
        print("no CUDA training reports found under --cases", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore", FutureWarning)  # transformers' renames, not ours
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(estimate, cases))
    else:
        rows = [estimate(case) for case in cases]
    print("\n".join(table(rows)))
    print()
    print(summary("allocated", [r.allocated_error for r in rows]))
    print(summary("reserved", [r.reserved_error for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
