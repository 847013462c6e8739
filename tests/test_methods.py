"""The table of adapter methods: each row builds peft's own config, of the type it names,
and reads back from the adapter_config.json peft writes."""

from __future__ import annotations

import json

import pytest

from finetune.methods import (
    METHODS,
    allows_gradient_checkpointing,
    build_config,
    feedforward_targets,
    input_virtual_tokens,
    method_of_config,
)
from finetune.recipe import AdapterSection


def spec(method: str) -> AdapterSection:
    targets = ["q_proj", "down_proj"] if not METHODS[method].virtual_tokens else "all-linear"
    return AdapterSection(method=method, target_modules=targets, virtual_init="random")


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_builds_peft_config_of_its_type_and_reads_back(method, tmp_path):
    config = build_config(spec(method), "llama")
    assert config.peft_type.value == METHODS[method].peft_type
    config.save_pretrained(tmp_path)  # adapter_config.json, as peft writes it beside weights
    saved = json.loads((tmp_path / "adapter_config.json").read_text(encoding="utf-8"))
    assert method_of_config(saved) == method


def test_an_adapter_type_finetune_does_not_handle_reads_as_none():
    assert method_of_config({"peft_type": "LOHA"}) is None
    assert method_of_config({}) is None


@pytest.mark.parametrize(
    ("model_type", "targets", "feedforward"),
    [
        ("llama", ["q_proj", "v_proj", "down_proj"], ["down_proj"]),
        ("gpt2", ["c_attn", "c_proj"], ["c_proj"]),  # peft names it mlp.c_proj
        ("no-such-type", ["q_proj", "down_proj"], []),
    ],
)
def test_ia3_feedforward_layers_come_from_peft_own_table(model_type, targets, feedforward):
    assert feedforward_targets(targets, model_type) == feedforward
    config = build_config(spec("ia3").model_copy(update={"target_modules": targets}), model_type)
    assert config.feedforward_modules == set(feedforward)


def test_only_prefix_tuning_turns_gradient_checkpointing_off():
    allowed = {m: allows_gradient_checkpointing(m) for m in [*METHODS, "full"]}
    assert [m for m, ok in allowed.items() if not ok] == ["prefix"]
    assert METHODS["prefix"].no_checkpointing


def test_only_prompt_tuning_puts_virtual_tokens_in_front_of_the_input():
    shifts = {m: input_virtual_tokens(m, 7) for m in [*METHODS, "full"]}
    assert shifts == {m: 7 if m == "prompt" else 0 for m in shifts}
