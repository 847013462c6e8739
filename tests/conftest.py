"""Shared fixtures: a tiny Llama-family model and tokenizer, built in-process and saved as a
real model folder, plus small datasets. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import build_model, build_tokenizer, date_rows, run_cli, tiny_recipe, write_jsonl


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


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(autouse=True)
def _release_output_claims():
    """Outputs claimed by a test calling finetune's functions directly (the CLI releases its
    own as each command ends) are let go, as a finished process lets go of them."""
    yield
    from finetune.outputs import release_claims

    release_claims()
