"""Per-process estimate against each process's measured live-tensor peak, sharded (FSDP2).

Run: PYTHONPATH=. .venv/bin/python benchmarks/memory_sharded.py [--repeats 3]
(about 6 minutes on 2 cores)

Each case trains a tiny random Llama (4 layers, hidden 128, the tests' tokenizer) for a few
steps with `torchrun --nproc_per_node N -m finetune train` and accelerate's FSDP variables
(ACCELERATE_USE_FSDP=true FSDP_VERSION=2: finetune shards with FSDP2 over gloo; one row
is plain data parallelism, each process holding the whole model). Every
process measures its own peak bytes of live tensors with `MemoryTracker` (which follows
FSDP2's in-place storage resizes) and the report keeps them in rank order; the estimate is
the report's own, one process's (a dry run of torch's fully_shard on meta tensors over a
fake process group of N ranks). The micro-batch is per process, so the rows of one method
show what sharding saves at the same micro-batch.

Prints a markdown table, one row per run and process, then the median and worst relative
error over all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

LORA = {"method": "lora", "r": 8, "alpha": 16}
CASES = (  # (label, adapter section, model section, processes); sharded when 2 or more
    ("lora", LORA, {}, 1),
    ("lora, data parallel (DDP)", LORA, {}, 2),
    ("lora", LORA, {}, 2),
    ("lora", LORA, {}, 4),
    ("dora", {"method": "dora", "r": 8, "alpha": 16}, {}, 2),
    ("ia3", {"method": "ia3"}, {}, 2),
    ("lora, nf4 base", LORA, {"quantization": "nf4"}, 2),
)


def build(folder: Path) -> tuple[Path, Path]:
    """The tiny model folder and a JSONL of instruction rows."""
    from helpers import build_model, build_tokenizer, date_rows, write_jsonl

    tokenizer = build_tokenizer()
    model_dir = folder / "model"
    build_model(tokenizer, hidden=128, layers=4).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, write_jsonl(folder / "train.jsonl", date_rows(48))


def run(folder: Path, model_dir: Path, data: Path, case: tuple, port: int) -> dict:
    """Train one case; its report's memory section."""
    label, adapter, model, processes = case
    out = folder / f"run-{port}"
    recipe = {
        "model": {"path": str(model_dir), **model},
        "adapter": adapter,
        "data": {"path": str(data), "format": "instruction", "max_length": 64},
        "train": {
            "max_steps": 3,
            "lr": 5e-3,
            "micro_batch_size": 2,
            "mixed_precision": "no",
            "seed": 0,
        },
        "output": {"dir": str(out)},
    }
    recipe_file = folder / f"recipe-{port}.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if processes > 1 and "DDP" not in label:
        env.update({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    # One process as a user starts it: under torchrun accelerate wraps even one process in
    # DDP, whose gradient buckets a one-process estimate does not count.
    command = [sys.executable]
    if processes > 1:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
        command = [torchrun, "--nproc_per_node", str(processes), "--master_port", str(port)]
    command += ["-m", "finetune", "train", str(recipe_file)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{label} x {processes} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "report.json").read_text())["memory"]


def rows_of(label: str, processes: int, memory: dict) -> list[dict]:
    estimate = memory["estimate"]["allocated_bytes"]
    measured = memory["measured"]
    each = measured.get("per_process_peak_bytes") or [measured["peak_bytes"]]
    return [
        {
            "case": label,
            "processes": processes,
            "rank": rank,
            "estimate": estimate,
            "measured": peak,
            "error": (estimate - peak) / peak,
        }
        for rank, peak in enumerate(each)
    ]


def table(rows: list[dict]) -> str:
    lines = [
        "| case | processes | rank | estimate (B) | measured (B) | error |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['processes']} | {r['rank']} | {r['estimate']:,} | "
            f"{r['measured']:,} | {100 * r['error']:+.2f}% |"
        )
    errors = [abs(r["error"]) for r in rows]
    worst = max(rows, key=lambda r: abs(r["error"]))
    lines += [
        "",
        f"median |error| {100 * statistics.median(errors):.2f}%, worst "
        f"{100 * worst['error']:+.2f}% ({worst['case']}, {worst['processes']} processes, "
        f"rank {worst['rank']}) over {len(rows)} process peaks",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each case (>= 1)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be 1 or more")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir, data = build(folder)
        port = 29700
        for case in CASES:
            for _ in range(args.repeats):
                port += 1
                memory = run(folder, model_dir, data, case, port)
                rows += rows_of(case[0], case[3], memory)
                print(f"{case[0]} x {case[3]}: done", file=sys.stderr, flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
