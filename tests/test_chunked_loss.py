"""The chunked cross-entropy gives the model's own loss and gradients, and never holds the
whole [positions x vocabulary] logits."""

import pytest
import torch
from helpers import build_model, build_tokenizer, date_rows, write_jsonl
from torch.utils._python_dispatch import TorchDispatchMode

from finetune import chunked_loss
from finetune.batching import build_items, collate
from finetune.data import load_rows, tokenize_rows
from finetune.positions import count_trained, trained_positions_loss
from finetune.recipe import DataSection


@pytest.fixture(scope="module")
def batch_and_tokenizer(tmp_path_factory):
    tokenizer = build_tokenizer()
    rows = date_rows(6)
    for i, row in enumerate(rows):  # rows of different lengths: untrained rows at kept positions
        row["prompt"] = row["prompt"] + " please" * (i * 2)
    path = write_jsonl(tmp_path_factory.mktemp("chunk") / "d.jsonl", rows)
    spec = DataSection(path=str(path), template="{prompt} ", max_length=128)
    examples = tokenize_rows(load_rows(path), spec, tokenizer, path).examples
    batch = collate(build_items(examples, False, 128, 0), tokenizer.pad_token_id, False)
    return batch, tokenizer


def loss_and_grads(model, batch, chunked: bool, monkeypatch, autocast: bool = False):
    with monkeypatch.context() as patch:
        if not chunked:
            patch.setattr(chunked_loss, "applies_to", lambda model, head: False)
        model.zero_grad()
        n = count_trained(batch["labels"])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = trained_positions_loss(model, batch, n)
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


@pytest.mark.parametrize("rows_per_chunk", [3, None])
def test_full_fine_tuning_gets_the_models_own_loss_and_gradients(
    batch_and_tokenizer, rows_per_chunk, monkeypatch
):
    """Every parameter trains, the head's weight included; chunks of 3 positions (many
    chunks) or the default (one here)."""
    batch, tokenizer = batch_and_tokenizer
    model = build_model(tokenizer)
    if rows_per_chunk:
        monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 4 * len(tokenizer) * rows_per_chunk)
    n = count_trained(batch["labels"])
    theirs = model(**batch, use_cache=False, num_items_in_batch=n).loss
    model.zero_grad()
    theirs.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    ours, grads = loss_and_grads(model, batch, True, monkeypatch)
    assert ours == pytest.approx(float(theirs.detach()), rel=1e-6)
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, reference[name], atol=1e-6, rtol=1e-5), name


def test_bf16_autocast_lora_matches_the_heads_own_path(batch_and_tokenizer, monkeypatch):
    """Under bf16 autocast (as finetune trains on a CPU with bf16) with LoRA: the same loss
    and adapter gradients as the model's head followed by torch's cross-entropy."""
    from peft import LoraConfig, get_peft_model

    batch, tokenizer = batch_and_tokenizer
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 4 * len(tokenizer) * 5)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(build_model(tokenizer), config)
    plain_loss, plain = loss_and_grads(model, batch, False, monkeypatch, autocast=True)
    ours, grads = loss_and_grads(model, batch, True, monkeypatch, autocast=True)
    assert ours == pytest.approx(plain_loss, rel=2e-3)
    assert grads.keys() == plain.keys() and grads
    for name, grad in grads.items():
        scale = plain[name].abs().max()
        assert (grad - plain[name]).abs().max() <= 2e-2 * scale, name


class LargestTensor(TorchDispatchMode):
    """The most elements any torch op returned while inside."""

    def __init__(self) -> None:
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(item, torch.Tensor):
                self.most = max(self.most, item.numel())
        return out


@pytest.mark.parametrize("chunked", [True, False])
def test_no_tensor_as_large_as_the_logits_is_made(batch_and_tokenizer, chunked, monkeypatch):
    """Forward and backward with 4 positions per chunk: no tensor of the step reaches the
    [trained positions x vocabulary] logits (without chunking, one does: the check can fail)."""
    batch, tokenizer = batch_and_tokenizer
    vocab = 8192  # a large vocabulary beside a narrow model, as at Llama-3's scale
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 4 * vocab * 4)
    if not chunked:
        monkeypatch.setattr(chunked_loss, "applies_to", lambda model, head: False)
    model = build_model(tokenizer, hidden=16)
    model.resize_token_embeddings(vocab)
    n = count_trained(batch["labels"])
    assert n * vocab > 4 * batch["input_ids"].numel() * 32  # logits: the largest activation
    with LargestTensor() as seen:
        trained_positions_loss(model, batch, n).backward()
    if chunked:
        assert seen.most < n * vocab
        assert seen.most <= max(4 * vocab, model.get_output_embeddings().weight.numel())
    else:
        assert seen.most >= n * vocab


def test_without_gradients_no_gradient_is_made(batch_and_tokenizer, monkeypatch):
    """Held-out evaluation (no_grad): the same loss, and no chunk makes a gradient (with
    gradients on, every chunk does)."""
    batch, tokenizer = batch_and_tokenizer
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 4 * len(tokenizer) * 8)
    made = []
    original = chunked_loss._Grads.add
    monkeypatch.setattr(
        chunked_loss._Grads, "add", lambda self, *args: made.append(1) or original(self, *args)
    )
    model = build_model(tokenizer)
    n = count_trained(batch["labels"])
    with torch.no_grad():
        theirs = model(**batch, use_cache=False, num_items_in_batch=n).loss
        ours = trained_positions_loss(model, batch, n)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    assert not ours.requires_grad and made == []
    trained_positions_loss(model, batch, n).backward()
    assert len(made) == -(-n // 8)


def test_heads_it_cannot_compute_go_through_the_model(batch_and_tokenizer, monkeypatch):
    """An adapter on the head, or soft-capped logits: the model's own head runs, and the
    loss is still the model's own."""
    from peft import LoraConfig, get_peft_model

    batch, tokenizer = batch_and_tokenizer
    n = count_trained(batch["labels"])
    config = LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False)
    with_head = get_peft_model(build_model(tokenizer), config)
    head = with_head.get_output_embeddings()
    assert not chunked_loss.applies_to(with_head, head)
    capped = build_model(tokenizer)
    capped.config.final_logit_softcapping = 30.0
    assert not chunked_loss.applies_to(capped, capped.get_output_embeddings())
    plain = build_model(tokenizer)
    assert chunked_loss.applies_to(plain, plain.get_output_embeddings())
    # Gemma 3n's composite config keeps its text model's soft-capping (30) one level down.
    from transformers import Gemma3nConfig

    nested = build_model(tokenizer)
    nested.config = Gemma3nConfig()
    assert nested.config.get_text_config().final_logit_softcapping == 30.0
    assert not chunked_loss.applies_to(nested, nested.get_output_embeddings())
    for model in (with_head, plain):
        theirs = model(**batch, use_cache=False, num_items_in_batch=n).loss
        ours = trained_positions_loss(model, batch, n)
        assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
