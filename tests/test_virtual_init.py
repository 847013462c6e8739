"""Prefix and prompt tuning start from text, not from noise: the prefix is the base model's
own keys and values for a text (with or without the MLP reparametrisation), prompt tuning's
virtual tokens are a text's embeddings, and by default that text is the first training prompt."""

import json

import pytest
import torch
from helpers import ROOT, build_model, build_tokenizer

from finetune import adapters
from finetune.prepare import prepare
from finetune.recipe import AdapterSection, load_recipe

TEXT = "the quick brown fox"


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("n", [6, 30])  # shorter than the rendered text, and longer (repeated)
def test_prefix_is_the_models_own_keys_and_values_for_the_text(projection, n):
    """A prefix started from TEXT makes the model answer exactly as the base model does with
    TEXT (as a system message, repeated or cut to n tokens) written in front of the input."""
    tokenizer = build_tokenizer()
    spec = AdapterSection(
        method="prefix", num_virtual_tokens=n, prefix_projection=projection, prefix_init_text=TEXT
    )
    model = adapters.attach(
        build_model(tokenizer),
        spec,
        quantized=False,
        gradient_checkpointing=False,
        tokenizer=tokenizer,
    )
    text_ids = adapters.rendered_ids(tokenizer, TEXT)
    in_front = (text_ids * 2)[:n]
    assert len(in_front) == n
    x = tokenizer("January February March", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = model(input_ids=x).logits
        with model.disable_adapter():
            whole = torch.cat([torch.tensor([in_front]), x], dim=1)
            expected = model(input_ids=whole).logits[:, n:]
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    if projection:  # the MLP, not a copied table, produces it: training goes through it
        assert model.prompt_encoder["default"].transform[-1].weight.requires_grad


def test_random_start_is_still_available():
    tokenizer = build_tokenizer()
    texts, randoms = [], []
    for init, into in (("text", texts), ("random", randoms)):
        spec = AdapterSection(
            method="prefix",
            num_virtual_tokens=4,
            virtual_init=init,
            prefix_init_text=TEXT if init == "text" else None,
        )
        model = adapters.attach(
            build_model(tokenizer),
            spec,
            quantized=False,
            gradient_checkpointing=False,
            tokenizer=tokenizer,
        )
        into.append(model.prompt_encoder["default"].embedding.weight.detach().clone())
    assert not torch.equal(texts[0], randoms[0])


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_the_default_text_is_the_first_training_prompt(method, recipe_file, tmp_path):
    path = recipe_file(adapter={"method": method, "num_virtual_tokens": 5})
    prepared = prepare(load_recipe(path))
    first = prepared.splits.train_rows[0]["prompt"]
    assert any(first in note and f"{method}_init_text" in note for note in prepared.notes)
    model, tokenizer = prepared.model, prepared.loaded.tokenizer
    weights = model.prompt_encoder["default"].embedding.weight.detach()
    if method == "prompt":
        config = model.peft_config["default"]
        assert (str(config.prompt_tuning_init), config.prompt_tuning_init_text) == (
            "PromptTuningInit.TEXT",
            first,
        )
        ids = tokenizer(first)["input_ids"]
        ids = (ids * 5)[:5]
        embeddings = model.get_input_embeddings()(torch.tensor(ids))
        assert torch.equal(weights, embeddings.detach())
    else:
        fresh = adapters.attach(
            build_model(tokenizer),
            AdapterSection(method="prefix", num_virtual_tokens=5, prefix_init_text=first),
            quantized=False,
            gradient_checkpointing=False,
            tokenizer=tokenizer,
        )
        assert torch.equal(weights, fresh.prompt_encoder["default"].embedding.weight.detach())


def test_init_text_for_the_wrong_method_is_refused(recipe_file):
    from finetune.errors import UserError

    with pytest.raises(UserError, match="adapter.prefix_init_text needs adapter.method: prefix"):
        load_recipe(recipe_file(adapter={"method": "prompt", "prefix_init_text": "x"}))
    with pytest.raises(UserError, match="not used with adapter.virtual_init: random"):
        load_recipe(
            recipe_file(
                adapter={"method": "prompt", "prompt_init_text": "x", "virtual_init": "random"}
            )
        )


@pytest.mark.slow
def test_prefix_from_text_starts_near_the_base_models_loss(cli, tmp_path):
    """SmolLM2-135M on the quickstart task: a random prefix starts at a held-out loss about 9x
    the base model's; the text start is within a few percent of it."""
    start = {}
    # 15 of the 60 held-out rows: the losses' ratios are what is tested, and each run
    # evaluates three times (adapter and base at step 0, adapter at the end).
    rows = (ROOT / "recipes" / "data" / "quickstart" / "test.jsonl").read_text().splitlines()
    (tmp_path / "eval.jsonl").write_text("\n".join(rows[:15]) + "\n")
    for init in ("text", "random"):
        run = tmp_path / init
        proc = cli(
            "train",
            str(ROOT / "recipes" / "quickstart-prefix.yaml"),
            "train.max_steps=1",
            "eval.max_examples=0",
            f"data.eval_path={tmp_path / 'eval.jsonl'}",
            f"adapter.virtual_init={init}",
            f"output.dir={run}",
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        start[init] = json.loads((run / "report.json").read_text())["eval_start"]
    base = start["text"]["base_eval_loss"]
    assert start["random"]["base_eval_loss"] == pytest.approx(base)
    assert start["random"]["eval_loss"] > 4 * base
    assert abs(start["text"]["eval_loss"] - base) < 0.25 * base
