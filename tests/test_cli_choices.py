"""Closed choices are Enums: `--help` lists them, a wrong one is one line naming the option,
the choices and the closest, before anything loads."""

from __future__ import annotations

import pytest
from helpers import run_cli

from finetune import choices
from finetune.methods import METHODS


def test_the_adapter_methods_offered_are_the_methods_table():
    assert tuple(METHODS) == choices.ADAPTER_METHODS
    assert ("full", *METHODS) == choices.ESTIMATE_METHODS


@pytest.mark.parametrize(
    "command,listed",
    [
        ("export", "<adapter|merged|gguf|gguf-adapter>"),
        ("export", "<f16|f32|q8_0>"),
        ("combine", "<linear|ties|dare_linear|dare_ties>"),
        ("estimate", "<full|lora|dora|ia3|prefix|prompt>"),
        ("merge", "<float32|bfloat16|float16>"),
    ],
)
def test_help_lists_the_choices(command, listed):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and listed in result.stdout


def test_a_wrong_choice_is_one_line_with_the_closest():
    result = run_cli("estimate", "llama-2-7b", "--quant", "nf5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --quant must be one of none, int8, nf4, fp4 (got 'nf5') (did you mean 'nf4'?); "
        "see 'finetune estimate --help'"
    ]
