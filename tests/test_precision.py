"""Frozen weights cast once for autocast: the same numbers as autocast's own casts, the
model left as it was, and a run's measured peak still the estimate's."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from finetune.cli import main
from finetune.positions import count_trained, trained_positions_loss
from finetune.precision import FrozenCasts, caches_frozen_casts


def lora_model():
    """A tiny Llama with tied embeddings and LoRA on every linear layer, adapter nonzero."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules="all-linear")
    model = get_peft_model(LlamaForCausalLM(config), lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # LoRA B starts at zero: make the adapter do something
            torch.nn.init.normal_(param, std=0.1)
    model.train()
    return model


def loss_and_grads(model, batch, casts=None):
    n = count_trained(batch["labels"])
    swapped = casts.swapped_in() if casts else contextlib.nullcontext()
    with torch.autocast("cpu", dtype=torch.bfloat16), swapped:
        loss = trained_positions_loss(model, batch, n)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def a_batch(vocab: int) -> dict:
    torch.manual_seed(0)
    ids = torch.randint(3, vocab, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[2, 9:] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_cast_copies_compute_bit_for_bit_what_autocast_computes():
    model = lora_model()
    batch = a_batch(model.config.vocab_size)
    casts = FrozenCasts(model, torch.bfloat16)
    assert casts.tensors() and all(t.dtype == torch.bfloat16 for t in casts.tensors())
    loss, grads = loss_and_grads(model, batch)
    cached_loss, cached_grads = loss_and_grads(model, batch, casts)
    assert torch.equal(loss, cached_loss)
    assert grads.keys() == cached_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(grad, cached_grads[name]), name


def test_the_model_gets_its_own_weights_back_even_after_an_error():
    model = lora_model()
    before = {name: p for name, p in model.named_parameters()}
    casts = FrozenCasts(model, torch.bfloat16)
    with pytest.raises(RuntimeError), casts.swapped_in():
        head = model.get_output_embeddings()
        assert head.weight.dtype == torch.bfloat16
        raise RuntimeError("a step failed")
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[name] is param for name, param in before.items())
    # The tied head shares the embedding's weight again, and only one copy of it was made.
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    shared = model.get_input_embeddings().weight
    assert sum(t.shape == shared.shape for t in casts.tensors()) == 1


def test_only_autocast_without_gradient_checkpointing_caches():
    assert caches_frozen_casts("bfloat16", gradient_checkpointing=False)
    assert not caches_frozen_casts("bfloat16", gradient_checkpointing=True)
    assert not caches_frozen_casts(None, gradient_checkpointing=False)


def test_a_bf16_run_counts_its_copies_and_meets_its_estimate(recipe_file, tmp_path):
    path = recipe_file(train={"max_steps": 3, "mixed_precision": "bf16"})
    main(["train", str(path)])
    memory = json.loads((tmp_path / "run" / "report.json").read_text())["memory"]
    copies = memory["estimate"]["components"]["16-bit copies of frozen weights"]
    assert copies > 0
    measured = memory["measured"]["peak_bytes"]
    assert memory["estimate"]["allocated_bytes"] == pytest.approx(measured, rel=0.05)
    assert memory["measured"]["breakdown"]["weights"] >= copies
