"""finetune eval: loss, perplexity and exact match of a run, and of its base beside it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import (
    CORPUS,
    build_model,
    build_tokenizer,
    date_rows,
    run_in_terminal,
    tiny_recipe,
    write_jsonl,
)

from finetune import inference
from finetune.cli import main
from finetune.recipe import load_recipe
from finetune.targets import resolve_target
from finetune.train import train


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory, tiny_model_dir):
    import yaml

    root = tmp_path_factory.mktemp("eval")
    data = write_jsonl(root / "train.jsonl", date_rows(24))
    test = write_jsonl(root / "test.jsonl", date_rows(6, offset=40))
    recipe = {**tiny_recipe(tiny_model_dir, data, root / "run"), "eval": {"max_new_tokens": 6}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    train(load_recipe(root / "recipe.yaml"))
    return root / "run", test


def independent_perplexity(model, tokenizer, rows):
    """exp(mean loss per response token), from logits and the chat template directly."""
    total, count = 0.0, 0
    for row in rows:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(
            [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["response"]},
            ],
            tokenize=False,
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        targets = ids[0, 1:]
        start = len(prompt_ids) - 1  # the first answer token is predicted at the last prompt one
        picked = logprobs[torch.arange(start, len(targets)), targets[start:]]
        total -= float(picked.sum())
        count += len(answer_ids)
    return math.exp(total / count), count


def test_perplexity_is_exp_of_the_mean_loss_computed_independently(run_and_data):
    run, test = run_and_data
    result = inference.evaluate_target(str(run), str(test), base=True)
    session = inference.load(resolve_target(str(run)), device="cpu")
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    expected, tokens = independent_perplexity(session.model, session.tokenizer, rows)
    assert result["adapter"]["tokens"] == tokens
    assert result["adapter"]["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert result["adapter"]["perplexity"] == pytest.approx(math.exp(result["adapter"]["loss"]))
    with session.model.disable_adapter():
        base_expected, _ = independent_perplexity(session.model, session.tokenizer, rows)
    assert result["base"]["perplexity"] == pytest.approx(base_expected, rel=1e-4)
    assert result["base"]["loss"] > result["adapter"]["loss"]
    assert result["adapter"]["exact_match"]["total"] == 6


def test_cli_eval_json_and_table(run_and_data, capsys):
    run, test = run_and_data
    main(["eval", str(run), "--data", str(test), "--base", "--json", "--max-examples", "2"])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert set(result) >= {"adapter", "base", "format", "examples"}
    assert result["format"] == "instruction" and result["adapter"]["exact_match"]["total"] == 2
    with pytest.raises(SystemExit):
        main(["eval", str(run), "--data", str(test), "--format", "text"])
    err = capsys.readouterr().err
    assert "no column 'text'" in err and len(err.strip().splitlines()) == 1


def test_eval_base_shows_progress_for_each_model_and_stage(run_and_data):
    run, test = run_and_data
    code, shown = run_in_terminal("eval", str(run), "--data", str(test), "--base")
    assert code == 0, shown[-2000:]
    for bar in ("adapter: loss", "adapter: exact match", "base: loss", "base: exact match"):
        assert bar in shown, f"{bar!r} never shown: {shown[-2000:]}"
    assert "6/6" in shown  # the bars count the rows of the file


def test_progress_callbacks_count_every_example_and_prompt(run_and_data):
    from finetune.data import load_rows, tokenize_rows
    from finetune.evaluate import evaluate_loss, generate

    run, test = run_and_data
    session = inference.load(resolve_target(str(run)), device="cpu")
    spec = load_recipe(run / "recipe.yaml").data.model_copy(update={"path": str(test)})
    data = tokenize_rows(load_rows(str(test)), spec, session.tokenizer, str(test))
    scored, answered = [], []
    evaluate_loss(session.model, data, 0, batch_size=4, advance=scored.append)
    prompts = ["a", "b", "c"]
    generate(session.model, session.tokenizer, prompts, 1, batch_size=2, advance=answered.append)
    assert scored == [4, 2] and answered == [2, 1]


def test_prompt_tuning_eval_counts_and_scores_the_tokens_training_does():
    """Prompt tuning's virtual tokens also predict the first label (trained in text data):
    evaluation counts it as training does, and the loss is peft's own."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from finetune.batching import collate, single
    from finetune.data import tokenize_rows
    from finetune.evaluate import evaluate_loss
    from finetune.positions import count_trained
    from finetune.recipe import DataSection

    tokenizer = build_tokenizer()
    rows = [{"text": text, "_row": i} for i, text in enumerate(CORPUS, start=1)]
    data = tokenize_rows(rows, DataSection(path="x.jsonl", format="text"), tokenizer, "x.jsonl")
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    model = get_peft_model(build_model(tokenizer), config)
    batch = collate([single(e) for e in data.examples], tokenizer.pad_token_id, packed=False)
    assert (batch["labels"][:, 0] != -100).all()  # so the shift changes the count
    n = count_trained(batch["labels"], virtual_tokens=4)
    with torch.no_grad():  # peft's own loss over every position, not our logits selection
        step = float(model(**batch, use_cache=False, num_items_in_batch=n).loss)
    result = evaluate_loss(model, data, tokenizer.pad_token_id, len(data))
    assert result.tokens == n
    assert result.loss == pytest.approx(step, rel=1e-5)
    with model.disable_adapter():  # the base model alone: no virtual token in front
        base = evaluate_loss(model, data, tokenizer.pad_token_id, len(data))
    assert base.tokens == count_trained(batch["labels"]) == n - len(rows)
