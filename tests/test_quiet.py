"""Importing finetune changes nothing; a normal run's console holds only the project's lines.

Third-party notices (bitsandbytes' missing optional kernel, peft's deprecated-name warning)
read like errors to a new user; the CLI silences them once, at its entry point, and no
module does anything on import.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT, tiny_recipe

# Imported before finetune, so that what they do on import is in the baseline.
THIRD_PARTY = (
    "numpy",
    "torch",
    "yaml",
    "pydantic",
    "rich",
    "typer",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "safetensors",
)

IMPORT_EVERYTHING = r"""
import importlib, importlib.util, json, logging, os, pkgutil, sys, warnings

def state():
    loggers = {
        name: [l.level, [repr(f) for f in l.filters], [repr(h) for h in l.handlers],
               l.propagate, l.disabled]
        for name, l in logging.Logger.manager.loggerDict.items()
        if isinstance(l, logging.Logger)
    }
    root = logging.getLogger()
    return {
        "warnings": [repr(f) for f in warnings.filters],
        "root": [root.level, [repr(f) for f in root.filters], [repr(h) for h in root.handlers]],
        "disable": logging.root.manager.disable,
        "loggers": loggers,
        "env": dict(os.environ),
    }

for name in sys.argv[1:]:
    if importlib.util.find_spec(name) is not None:
        importlib.import_module(name)
before = state()
import finetune
modules = [m.name for m in pkgutil.walk_packages(finetune.__path__, "finetune.")]
for name in modules:
    if name != "finetune.__main__":  # __main__ runs the CLI
        importlib.import_module(name)
print(json.dumps({"before": before, "after": state(), "modules": modules}))
"""


def test_importing_every_module_leaves_logging_and_warnings_as_they_were():
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERYTHING, *THIRD_PARTY],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    before, after = found["before"], found["after"]
    assert len(found["modules"]) > 40  # every module, subpackages included
    for key in ("warnings", "root", "disable", "env"):
        assert after[key] == before[key], key
    for name, settings in after["loggers"].items():
        # A logger first created by these imports must be in logging's default state.
        assert settings == before["loggers"].get(name, [0, [], [], True, False]), name


def traced_run(
    tmp_path, *args: str, timeout: int = 600, stdin: str | None = None
) -> tuple[Any, list[dict]]:
    """Run the CLI under tests/stderr_owner.py: the process and its traced stderr writes."""
    trace = tmp_path / f"stderr-{args[0]}.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "stderr_owner.py"), str(trace), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
        timeout=timeout,
        input=stdin,
    )
    writes = [json.loads(line) for line in trace.read_text(encoding="utf-8").splitlines()]
    return proc, writes


def assert_only_project_lines(proc: Any, writes: list[dict]) -> None:
    foreign = [(w["writer"], w["text"]) for w in writes if not w["project"] and w["text"].strip()]
    assert not foreign, f"third-party lines on stderr: {foreign}"
    # What bypassed Python (a C library writing to the file descriptor) is not in the trace.
    traced = set("".join(w["text"] for w in writes).splitlines())
    untraced = [line for line in proc.stderr.splitlines() if line.strip() and line not in traced]
    assert not untraced, f"stderr lines written outside Python: {untraced}"
    warning = re.compile(r"^\S+:\d+: \w*Warning: ")
    assert not [line for line in proc.stderr.splitlines() if warning.match(line)]


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
def test_a_training_run_prints_only_the_projects_lines(
    tmp_path, tiny_model_dir, instruction_data, method
):
    recipe = tiny_recipe(tiny_model_dir, instruction_data, tmp_path / "run")
    recipe["adapter"] = {"method": method}
    # A held-out share, so the run also evaluates and generates (exact match).
    recipe["data"]["eval_fraction"] = 0.25
    recipe["eval"] = {"max_new_tokens": 2, "max_examples": 2}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc, writes = traced_run(tmp_path, "train", str(path), "train.max_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any("trainable parameters" in w["text"] for w in writes)  # the trace saw the run
    assert_only_project_lines(proc, writes)


@pytest.fixture(scope="module")
def prefix_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A prefix-tuning run (the traced runs below use it): prefix is the
    method whose peft code passes transformers a deprecated argument."""
    from helpers import date_rows, run_cli, write_jsonl

    folder = tmp_path_factory.mktemp("quiet")
    data = write_jsonl(folder / "train.jsonl", date_rows(8))
    recipe = tiny_recipe(tiny_model_dir, data, folder / "run")
    recipe["adapter"] = {"method": "prefix"}
    recipe["train"]["max_steps"] = 1
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    done = run_cli("train", str(folder / "recipe.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "run"


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A real LoRA adapter folder of the tiny model, for merge, export and combine."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("lora")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path=str(tiny_model_dir))
    get_peft_model(model, config).save_pretrained(folder)
    return folder


# Every command but train (above), one normal run each: @run is the prefix run, @lora a
# LoRA adapter folder, @data its training data, @out a fresh output path.
COMMANDS = {
    "validate": ("validate", "@recipe"),
    "estimate": ("estimate", "@model", "--seq", "32"),
    # A quantized base with checkpointing (torch warned that use_reentrant was not named)
    # and the sharded dry run (torch's fake process group, FSDP2 on meta tensors).
    "estimate-sharded-qlora": (
        "estimate",
        "@model",
        "--seq",
        "32",
        "--quant",
        "nf4",
        "--grad-ckpt",
        "--processes",
        "2",
        "--sharding",
        "fsdp",
    ),
    "eval": ("eval", "@run", "--data", "@data"),
    "generate": ("generate", "@run", "hello", "--max-new-tokens", "3"),
    "chat": ("chat", "@run", "--max-new-tokens", "3"),
    "merge": ("merge", "@lora", "--out", "@out"),
    "export": ("export", "@lora", "--format", "adapter", "--out", "@out"),
    "combine": ("combine", "@lora", "@lora", "--weights", "0.5,0.5", "--out", "@out"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_prints_only_the_projects_lines(
    tmp_path, tiny_model_dir, prefix_run, lora_adapter, command
):
    places = {
        "@recipe": str(prefix_run / "recipe.yaml"),
        "@model": str(tiny_model_dir),
        "@run": str(prefix_run),
        "@data": str(prefix_run.parent / "train.jsonl"),
        "@lora": str(lora_adapter),
        "@out": str(tmp_path / "out"),
    }
    args = [places.get(a, a) for a in COMMANDS[command]]
    stdin = "hello\n" if command == "chat" else None
    proc, writes = traced_run(tmp_path, *args, stdin=stdin)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_only_project_lines(proc, writes)


@pytest.mark.slow
def test_the_demo_recipe_prints_only_the_projects_lines(tmp_path):
    pytest.importorskip("gguf")
    # A few held-out rows: the run evaluates (at step 0 and at the end) as the demo does.
    rows = (ROOT / "recipes" / "data" / "quickstart" / "test.jsonl").read_text().splitlines()
    (tmp_path / "eval.jsonl").write_text("\n".join(rows[:6]) + "\n")
    proc, writes = traced_run(
        tmp_path,
        "train",
        str(ROOT / "recipes" / "quickstart.yaml"),
        "train.max_steps=1",
        f"data.eval_path={tmp_path / 'eval.jsonl'}",
        "train.eval_every=0",
        "train.save_every=0",
        "eval.max_examples=1",
        f"output.dir={tmp_path / 'run'}",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_only_project_lines(proc, writes)


# Ways a library draws a progress bar: tqdm itself (transformers' GGUF conversion does, on
# a model cache's first use, past transformers' own switch), and the libraries' wrappers.
BARS = {
    "tqdm.auto": "from tqdm.auto import tqdm",
    "tqdm": "from tqdm import tqdm",
    "transformers": "from transformers.utils.logging import tqdm",
    "huggingface_hub": "from huggingface_hub.utils import tqdm",
}


@pytest.mark.parametrize("bar", list(BARS))
def test_no_progress_bar_is_drawn_after_the_cli_silences_third_parties(bar):
    """Round 4: the first command on an empty model cache printed transformers' 'Converting
    and de-quantizing GGUF tensors...' bar (tqdm.auto, drawn directly), a foreign line that
    test_the_demo_recipe missed because its cache was warm."""
    from helpers import run_python

    code = (
        "from finetune.noise import silence_third_party; silence_third_party()\n"
        f"{BARS[bar]}\n"
        "for _ in tqdm(range(3), desc='a bar'): pass\n"
    )
    done = run_python(code, env={"TQDM_DISABLE": None})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "a bar" not in done.stderr, done.stderr
