"""The CUDA path (tests marked `gpu`) and the CPU side of how the tests treat GPUs.

Every test here marked `gpu` runs the real CLI in a subprocess with the GPUs the test run
was started with (conftest.py hides them from everything else), on a tiny Llama built in
process, and skips with one line where no CUDA device is visible. Their non-CUDA parts
(building the recipe, reading report.json, comparing) are run by the CPU tests below on CPU
runs, so a mistake there shows on any machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import (
    GPUS_VAR,
    build_model,
    build_tokenizer,
    date_rows,
    gpu_env,
    run_cli,
    run_python,
    tiny_recipe,
    write_jsonl,
)

# ------------------------------------------------------------------ hiding the GPUs


def test_a_cpu_test_sees_no_gpu_in_process():
    import torch

    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert torch.cuda.device_count() == 0


def test_the_tests_hide_the_gpus_from_every_subprocess():
    """A fresh interpreter started as from a shell with a GPU (CUDA_VISIBLE_DEVICES=0) loads
    conftest; a child it starts as run_cli does sees no device, and gpu_env gives 0 back."""
    child = (
        "import os, torch; "
        "print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')), torch.cuda.device_count())"
    )
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import conftest, helpers\n"
        f"print(helpers.run_python({child!r}).stdout.strip())\n"
        "print(helpers.gpu_env()['CUDA_VISIBLE_DEVICES'])\n"
    )
    parent = run_python(code, env={"CUDA_VISIBLE_DEVICES": "0", GPUS_VAR: None})
    assert parent.returncode == 0, parent.stderr
    assert parent.stdout.splitlines() == ["'' 0", "0"]
    unset = run_python(code, env={"CUDA_VISIBLE_DEVICES": None, GPUS_VAR: None})
    assert unset.stdout.splitlines() == ["'' 0", "None"], unset.stderr


# ------------------------------------------------------------------ the CUDA path

# The goal of the estimate on CUDA (tests/test_memory_gpu.py): 3% of max allocated, 5% of
# max reserved; int8 keeps data-dependent outlier columns for backward, half a point more.
ALLOCATED, ALLOCATED_INT8, RESERVED = 0.03, 0.035, 0.05
STEPS = 6


def save_model(folder: Path, hidden: int, layers: int = 2) -> Path:
    """A random-weight Llama with the tiny tokenizer: hidden 256 makes CUDA allocations
    large next to the allocator's rounding."""
    tokenizer = build_tokenizer()
    build_model(tokenizer, hidden=hidden, layers=layers).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_256(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("llama-256"), hidden=256)


def write_recipe(tmp: Path, model_dir: Path, name: str = "recipe.yaml", **sections) -> Path:
    """The tiny recipe, packed (every micro-batch the same shape, so the measured peak is
    the steady state the estimate models), `sections` merged over it."""
    import yaml

    data = write_jsonl(tmp / "train.jsonl", date_rows(64))
    recipe = tiny_recipe(model_dir, data, tmp / "run")
    recipe["data"]["packing"] = True
    recipe["train"]["max_steps"] = STEPS
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = tmp / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def read_report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def memory_errors(report: dict) -> tuple[float, float | None]:
    """(allocated, reserved) relative errors of the run's estimate against its measurement
    (as benchmarks/memory_gpu.py reads them); reserved is None on the CPU."""
    memory = report["memory"]
    estimate, measured = memory["estimate"], memory["measured"]
    allocated = estimate["allocated_bytes"] / measured["peak_bytes"] - 1
    reserved = measured.get("reserved_bytes")
    return allocated, None if reserved is None else estimate["reserved_bytes"] / reserved - 1


def losses(run: Path) -> dict[int, float]:
    """The training loss of each step in metrics.jsonl (evaluation lines have no loss)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def train_on_gpu(recipe: Path, *args: str) -> subprocess.CompletedProcess:
    done = run_cli("train", str(recipe), *args, env=gpu_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["int8", "nf4", "none"])
def test_lora_trains_on_cuda_within_the_estimate_goal(quant, model_256, tmp_path):
    train_on_gpu(write_recipe(tmp_path, model_256), f"model.quantization={quant}")
    report = read_report(tmp_path / "run")
    assert report["memory"]["measured"]["device"].startswith("cuda")
    allocated, reserved = memory_errors(report)
    assert abs(allocated) <= (ALLOCATED_INT8 if quant == "int8" else ALLOCATED), allocated
    assert reserved is not None and abs(reserved) <= RESERVED, reserved


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_token_methods_train_on_int8(method, model_256, tmp_path):
    adapter = {"method": method, "num_virtual_tokens": 4}
    train_on_gpu(write_recipe(tmp_path, model_256, adapter=adapter), "model.quantization=int8")
    assert len(losses(tmp_path / "run")) == STEPS


@pytest.mark.gpu
def test_the_fit_check_refuses_before_the_model_loads(model_256, tmp_path):
    """65536 x 512 tokens: the logits alone are 43 GB in float32, more than any GPU's free
    memory with the rest; refused in one line, exit 2, no run folder."""
    recipe = write_recipe(tmp_path, model_256, train={"micro_batch_size": 65536})
    done = run_cli("train", str(recipe), env=gpu_env())
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert re.search(r"this run needs about .* GB of GPU memory .* --force", line), line
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
def test_resume_on_cuda_continues_the_loss_curve(model_256, tmp_path):
    """Three steps, then --resume to six, against six uninterrupted: the same losses (fp32,
    no autocast; a constant schedule makes the rate independent of max_steps)."""
    # In the recipe, not as overrides: an override's YAML reads "no" as false.
    exact = {"model": {"quantization": "none", "dtype": "float32"}}
    train = {"schedule": "constant", "warmup_steps": 0, "save_every": 1, "mixed_precision": "no"}
    for name, out in (("whole", "a"), ("part", "b")):
        output = {"dir": str(tmp_path / out)}
        write_recipe(tmp_path, model_256, f"{name}.yaml", output=output, train=train, **exact)
    train_on_gpu(tmp_path / "whole.yaml")
    train_on_gpu(tmp_path / "part.yaml", "train.max_steps=3")
    train_on_gpu(tmp_path / "part.yaml", "--resume")
    resumed, reference = losses(tmp_path / "b"), losses(tmp_path / "a")
    assert sorted(resumed) == sorted(reference) == list(range(1, STEPS + 1))
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx(
        [reference[s] for s in (4, 5, 6)], rel=1e-4
    )


@pytest.mark.gpu
def test_merging_an_int8_run_writes_a_model_that_loads(model_256, tmp_path):
    train_on_gpu(write_recipe(tmp_path, model_256), "model.quantization=int8")
    merged = tmp_path / "merged"
    done = run_cli("merge", str(tmp_path / "run"), "--out", str(merged), env=gpu_env())
    assert done.returncode == 0, done.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)  # on the CPU: the tests hide CUDA
    assert model.config.hidden_size == 256


# One full fine-tuning step as a plain loop does it (no finetune code): bf16 weights,
# torch's default AdamW (foreach on CUDA), transformers' own loss; prints the peak.
FULL_STEP = """
import torch
from transformers import AutoModelForCausalLM
folder, batch, seq = {folder!r}, {batch}, {seq}
torch.cuda.init()
torch.cuda.reset_peak_memory_stats()
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda")
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
for _ in range(2):
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(torch.cuda.max_memory_allocated())
"""


def full_estimate_args(model: Path, batch: int, seq: int) -> list[str]:
    """`finetune estimate` for the step FULL_STEP takes."""
    shape = ["--batch", str(batch), "--seq", str(seq), "--unmasked"]
    return ["estimate", str(model), "--method", "full", "--dtype", "bfloat16", *shape]


@pytest.mark.gpu
def test_full_finetuning_estimate_matches_a_measured_step(tmp_path):
    model = save_model(tmp_path / "llama-512", hidden=512, layers=4)
    step = FULL_STEP.format(folder=str(model), batch=1, seq=256)
    measured = run_python(step, env=gpu_env(), timeout=600)
    assert measured.returncode == 0, measured.stderr[-3000:]
    done = run_cli(*full_estimate_args(model, 1, 256), "--format", "json", env=gpu_env())
    assert done.returncode == 0, done.stderr[-3000:]
    estimated = json.loads(done.stdout)["allocated_bytes"]
    peak = int(measured.stdout.split()[-1])
    assert estimated == pytest.approx(peak, rel=ALLOCATED)


# ------------------------------------------------- their non-CUDA parts, on the CPU


def test_the_gpu_tests_recipe_report_and_losses_read_a_real_run(model_256, tmp_path):
    """The GPU tests' recipe, report reading and loss reading, on a CPU run of it."""
    recipe = write_recipe(tmp_path, model_256, train={"max_steps": 2})
    done = run_cli("train", str(recipe))
    assert done.returncode == 0, done.stderr[-3000:]
    report = read_report(tmp_path / "run")
    allocated, reserved = memory_errors(report)
    assert reserved is None and abs(allocated) <= 0.05, allocated  # the CPU's own goal
    assert report["memory"]["estimate"]["setup"]["masked"] is True  # packed
    assert sorted(losses(tmp_path / "run")) == [1, 2]


def test_the_full_step_estimate_is_asked_with_options_estimate_has(model_256):
    done = run_cli(*full_estimate_args(model_256, 1, 64), "--format", "json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["allocated_bytes"] > 0
