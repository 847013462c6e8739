"""Packing keeps examples apart, and the loss does not depend on how examples fall into
micro-batches."""

import pytest
import torch
from helpers import build_model, build_tokenizer, date_rows, write_jsonl

from finetune import chunked_loss
from finetune.batching import build_items, collate, pack
from finetune.data import IGNORE_INDEX, load_rows, tokenize_rows
from finetune.positions import count_trained, logit_positions, trained_positions_loss
from finetune.recipe import DataSection, load_recipe
from finetune.train import train


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    tokenizer = build_tokenizer()
    rows = date_rows(7)
    for i, row in enumerate(rows):  # realistic variety: some long, some short
        row["prompt"] = row["prompt"] + " please" * (i * 3)
    path = write_jsonl(tmp_path_factory.mktemp("pack") / "d.jsonl", rows)
    spec = DataSection(path=str(path), template="{prompt} ", max_length=128)
    return tokenizer, tokenize_rows(load_rows(path), spec, tokenizer, path).examples


def per_token_losses(model, batch):
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits.float()
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses, targets != IGNORE_INDEX


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_packed_batch_gives_each_example_its_own_loss(tokenized, attn):
    tokenizer, examples = tokenized
    model = build_model(tokenizer)
    model.config._attn_implementation = attn
    model.eval()
    packs = pack(examples, length=128, seed=0)
    assert len(packs) < len(examples)  # several examples really share a sequence
    losses, trained = per_token_losses(model, collate(packs, tokenizer.pad_token_id, packed=True))
    by_row = {e.row: e for e in examples}
    checked = 0
    for p, item in enumerate(packs):
        start = 0
        for row in item.rows:
            n = len(by_row[row].input_ids)
            # positions start..start+n-1 hold this example; its targets are shifted by one.
            packed = losses[p, start : start + n - 1][trained[p, start : start + n - 1]]
            alone_batch = collate(build_items([by_row[row]], False, 128, 0), 0, packed=False)
            alone_losses, alone_trained = per_token_losses(model, alone_batch)
            alone = alone_losses[0][alone_trained[0]]
            assert torch.allclose(packed, alone, atol=1e-5), (row, packed, alone)
            checked += 1
            start += n
    assert checked == len(examples)


def test_packing_masks_the_first_token_of_every_example(tokenized):
    _, examples = tokenized
    for item in pack(examples, length=128, seed=0):
        starts = [i for i, p in enumerate(item.position_ids) if p == 0]
        assert len(starts) == len(item.rows)
        assert all(item.labels[i] == IGNORE_INDEX for i in starts)
        assert len(item) <= 128


def test_loss_does_not_depend_on_micro_batch_split(recipe_file, tmp_path):
    """8 examples as one micro-batch or as 4 micro-batches of 2: the same step (in fp32;
    bf16 autocast rounds differently shaped matmuls differently)."""
    runs = []
    for name, micro, accum in (("one", 8, 1), ("four", 2, 4)):
        train_section = {"max_steps": 3, "micro_batch_size": micro, "grad_accum": accum}
        path = recipe_file(
            f"{name}.yaml",
            train={**train_section, "mixed_precision": "no"},
            data={"group_by_length": False},
            output={"dir": str(tmp_path / name)},
        )
        runs.append(train(load_recipe(path)))
    one, four = runs
    for a, b in zip(one.history, four.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    weights_a = {k: v for k, v in one.prepared.model.state_dict().items() if "lora" in k}
    weights_b = four.prepared.model.state_dict()
    assert max(float((v - weights_b[k]).abs().max()) for k, v in weights_a.items()) < 1e-5


def test_packed_training_runs_end_to_end(recipe_file):
    path = recipe_file(data={"packing": True}, train={"max_steps": 4})
    result = train(load_recipe(path))
    assert result.history[-1]["loss"] < result.history[0]["loss"]


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_prompt_tuning_loss_at_trained_positions_is_peft_models_own(tokenized, train_on_prompt):
    """Prompt tuning's virtual tokens shift every position; the first label is predicted too."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    tokenizer, examples = tokenized
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5)
    model = get_peft_model(build_model(tokenizer), config)
    batch = collate(build_items(examples, False, 128, 0), tokenizer.pad_token_id, False)
    if train_on_prompt:  # every real token trained, the first one included
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    n = count_trained(batch["labels"], virtual_tokens=5)
    ours = trained_positions_loss(model, batch, n, virtual_tokens=5)
    theirs = model(**batch, use_cache=False, num_items_in_batch=n).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    ours.backward()
    mine = model.prompt_encoder["default"].embedding.weight.grad.clone()
    model.zero_grad()
    theirs.backward()
    assert torch.allclose(mine, model.prompt_encoder["default"].embedding.weight.grad, atol=1e-6)


@pytest.mark.parametrize("chunked", [True, False])
def test_the_head_computes_logits_only_where_a_row_is_trained(tokenized, chunked, monkeypatch):
    """Rows of different lengths: a kept position is untrained in some rows, and those rows
    get no logits; the head sees exactly the step's trained tokens. With the chunked loss
    the head's own matmul makes nothing ([1, n, 0]): the loss computes those logits."""
    if not chunked:
        monkeypatch.setattr(chunked_loss, "applies_to", lambda model, head: False)
    tokenizer, examples = tokenized
    model = build_model(tokenizer)
    batch = collate(build_items(examples, False, 128, 0), tokenizer.pad_token_id, False)
    n = count_trained(batch["labels"])
    rows, positions = batch["labels"].shape[0], logit_positions(batch["labels"])
    assert n < rows * positions  # the batch has untrained rows at kept positions
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: seen.append(tuple(out.shape))
    )
    trained_positions_loss(model, batch, n)
    hook.remove()
    assert seen == [(1, n, 0 if chunked else model.config.vocab_size)]


@pytest.mark.parametrize("packed", [False, True])
def test_logits_only_at_trained_positions_give_the_models_own_loss(tokenized, packed):
    tokenizer, examples = tokenized
    model = build_model(tokenizer)
    batch = collate(build_items(examples, packed, 128, 0), tokenizer.pad_token_id, packed)
    n = count_trained(batch["labels"])
    ours = trained_positions_loss(model, batch, n)
    theirs = model(**batch, use_cache=False, num_items_in_batch=n).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    ours.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    theirs.backward()
    for a, p in zip(grads, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)
