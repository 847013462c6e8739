"""Memory estimator on the embedded model's architecture (SmolLM2-135M), random weights."""

from __future__ import annotations

import pytest
from test_memory import METHODS, check_allocated, peft_model

from finetune.memory import Setup
from finetune.memory.arch import to_hf_config
from finetune.memory.dryrun import dry_run
from finetune.memory.presets import get_preset

CONFIG = to_hf_config(get_preset("smollm2-135m"))


@pytest.mark.parametrize("method", METHODS)
def test_trainable_count_equals_peft_on_embedded_architecture(method):
    setup = Setup(method=method, r=16, virtual_tokens=20)
    model = peft_model(CONFIG, method, setup, device="meta")
    trainable, _ = model.get_nb_trainable_parameters()
    assert dry_run(CONFIG, setup).trainable_params == trainable


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_allocated_bytes_equal_estimate_on_embedded_architecture(method):
    check_allocated(CONFIG, Setup(method=method, dtype="float32", device="cpu", batch=1, seq=16))
