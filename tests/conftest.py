"""Shared fixtures: a tiny Llama-family model and tokenizer, built in-process and saved as a
real model folder, plus small datasets. Nothing is downloaded.

Every test runs on the CPU, even on a machine with a GPU: finetune picks CUDA when it sees
one (int8 by default, the fit check before the model loads, another memory metric), which
would change what a CPU test means. So this file hides the GPUs at import, before torch
initialises CUDA: `CUDA_VISIBLE_DEVICES` becomes empty for this process and every
subprocess it starts (run_cli included), and its original value is kept in
FINETUNE_TEST_GPUS. Tests marked `gpu` (tests/test_gpu.py) run finetune in subprocesses with
the original value restored (`helpers.gpu_env`), and skip with one line when such a
subprocess sees no CUDA device (asked once per session).
"""

from __future__ import annotations

from helpers import hide_gpus, share_cores_between_workers

hide_gpus()  # first: before anything below can initialise CUDA
share_cores_between_workers()  # and before torch sizes its thread pool

import fcntl  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from helpers import (  # noqa: E402
    ROOT,
    build_model,
    build_tokenizer,
    date_rows,
    gpu_skip_reason,
    run_cli,
    tiny_recipe,
    write_jsonl,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama model folder (config, safetensors, tokenizer with chat template)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def instruction_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", date_rows(24))


@pytest.fixture
def recipe_file(tmp_path, tiny_model_dir, instruction_data):
    """Write a recipe for the tiny model; keyword arguments override sections."""

    def make(name: str = "recipe.yaml", **sections) -> Path:
        import yaml

        recipe = tiny_recipe(tiny_model_dir, instruction_data, tmp_path / "run")
        for section, values in sections.items():
            recipe.setdefault(section, {}).update(values)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe))
        return path

    return make


@pytest.fixture(scope="session")
def embedded_run(tmp_path_factory):
    """The real embedded model trained 4 steps from the quickstart recipe, through the CLI,
    once: the training test checks the run, the export test merges and exports it (one real
    training, a minute or two on 2 cores, instead of two). Under pytest-xdist each worker
    has its own session, so the run lives in the folder the workers share, made by whichever
    worker comes first while the other waits on a lock."""
    pytest.importorskip("gguf")
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    run = shared / "embedded-run"
    with open(shared / "embedded-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run / "report.json").is_file():
            proc = run_cli(
                "train",
                str(ROOT / "recipes" / "quickstart.yaml"),
                "train.max_steps=4",
                "train.eval_every=0",
                "train.save_every=2",
                "eval.max_examples=4",
                f"output.dir={run}",
                "output.overwrite=true",
                timeout=900,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(autouse=True)
def _gpu_or_skip(request):
    """Skip a `gpu` test when no CUDA device is visible with the original devices."""
    if request.node.get_closest_marker("gpu") is not None:
        reason = gpu_skip_reason()
        if reason:
            pytest.skip(reason)


@pytest.fixture(autouse=True)
def _release_output_claims():
    """Outputs claimed by a test calling finetune's functions directly (the CLI releases its
    own as each command ends) are let go, as a finished process lets go of them."""
    yield
    from finetune.outputs import release_claims

    release_claims()
