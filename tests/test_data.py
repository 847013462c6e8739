"""Data loading, formatting and loss masking on a tiny tokenizer."""

import json

import pytest
from helpers import build_tokenizer, date_rows, write_jsonl

from finetune.batching import collate, micro_batches, single
from finetune.data import (
    IGNORE_INDEX,
    load_rows,
    prepare,
    require_trained_tokens,
    tokenize_rows,
)
from finetune.errors import UserError
from finetune.recipe import DataSection


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def spec(path, **kw) -> DataSection:
    return DataSection(path=str(path), **kw)


def trained_text(example, tokenizer) -> str:
    ids = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    return tokenizer.decode(ids)


def test_instruction_template_masks_the_prompt(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "Convert 3 March", "response": "2024-03-03"}]
    )
    s = spec(path, template="Q: {prompt}\nA: ")
    data = tokenize_rows(load_rows(path), s, tok, path)
    assert trained_text(data.examples[0], tok) == "2024-03-03<|im_end|>"
    assert tok.decode(data.examples[0].input_ids).startswith("Q: Convert 3 March\nA: ")


def test_instruction_with_chat_template_trains_only_the_answer(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hello", "response": "yes"}])
    data = tokenize_rows(load_rows(path), spec(path, template="chat"), tok, path)
    assert trained_text(data.examples[0], tok) == "yes<|im_end|>\n"


def test_train_on_prompt_trains_everything(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hello", "response": "yes"}])
    data = tokenize_rows(load_rows(path), spec(path, train_on_prompt=True), tok, path)
    example = data.examples[0]
    assert example.labels == example.input_ids


def test_chat_messages_train_every_assistant_turn(tmp_path, tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "second"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    data = tokenize_rows(load_rows(path), spec(path, format="chat"), tok, path)
    assert trained_text(data.examples[0], tok) == "first<|im_end|>\nsecond<|im_end|>\n"


def test_text_format_trains_all_tokens(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "the quick brown fox"}])
    data = tokenize_rows(load_rows(path), spec(path, format="text"), tok, path)
    assert trained_text(data.examples[0], tok) == "the quick brown fox<|im_end|>"


def test_truncation_is_counted_and_fully_masked_examples_fail(tmp_path, tok):
    rows = [{"prompt": "word " * 40, "response": "yes"}, {"prompt": "hi", "response": "no"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    s = spec(path, template="{prompt}", max_length=16)
    data = tokenize_rows(load_rows(path), s, tok, path)
    assert data.truncated == 1
    assert all(len(e.input_ids) <= 16 for e in data.examples)
    assert data.no_trained == [1]
    with pytest.raises(UserError, match=r"row 1: no trained tokens .*max_length=16"):
        require_trained_tokens(data, s)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "saved"])
def test_every_file_format_loads_the_same_rows(tmp_path, kind):
    import datasets

    rows = date_rows(5)
    dataset = datasets.Dataset.from_list(rows)
    path = tmp_path / f"d.{kind}"
    if kind == "jsonl":
        write_jsonl(path, rows)
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        dataset.to_csv(str(path), index=False)
    elif kind == "parquet":
        dataset.to_parquet(str(path))
    else:
        dataset.save_to_disk(str(path))
    loaded = [{k: v for k, v in r.items() if k != "_row"} for r in load_rows(path)]
    assert loaded == rows


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: not valid JSON"):
        load_rows(path)


def test_missing_column_lists_the_columns_found(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(UserError, match=r"row 1: no column 'prompt' \(found: question, answer\)"):
        tokenize_rows(load_rows(path), spec(path), tok, path)


def test_bad_role_is_named(tmp_path, tok):
    messages = [{"role": "human", "content": "a"}, {"role": "assistant", "content": "b"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    with pytest.raises(UserError, match=r"row 1: turn 1 has role 'human'"):
        tokenize_rows(load_rows(path), spec(path, format="chat"), tok, path)


def test_empty_dataset_and_missing_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        load_rows(tmp_path / "e.jsonl")
    with pytest.raises(UserError, match="not found"):
        load_rows(tmp_path / "nope.jsonl")


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: not UTF-8"):
        load_rows(path)


def test_eval_fraction_holds_out_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", date_rows(20))
    splits = prepare(spec(path, eval_fraction=0.25), tok, seed=1)
    assert len(splits.train) == 15 and len(splits.eval) == 5
    train_rows = {r["_row"] for r in splits.train_rows}
    assert train_rows.isdisjoint(r["_row"] for r in splits.eval_rows)


def test_collate_pads_and_masks(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", date_rows(3))
    data = tokenize_rows(load_rows(path), spec(path, template="{prompt}"), tok, path)
    batch = collate([single(e) for e in data.examples], tok.pad_token_id, packed=False)
    lengths = [len(e.input_ids) for e in data.examples]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_micro_batches_resume_at_any_position():
    lengths = [3, 9, 4, 8, 1, 7, 2, 6, 5, 10]
    full = micro_batches(lengths, 3, seed=7, shuffle=True, group_by_length=True)
    first = [next(full) for _ in range(8)]
    resumed = micro_batches(lengths, 3, seed=7, shuffle=True, group_by_length=True, start=5)
    assert [next(resumed) for _ in range(3)] == first[5:8]
    epoch = [i for batch in first[:3] for i in batch]
    assert len(epoch) == len(set(epoch)) == 9  # no repeats within an epoch


def test_group_by_length_keeps_padding_small():
    rng = __import__("random").Random(0)
    lengths = [rng.randint(5, 500) for _ in range(400)]

    def padding(group):
        batches = micro_batches(lengths, 8, seed=1, shuffle=True, group_by_length=group)
        return sum(
            8 * max(lengths[i] for i in b) - sum(lengths[i] for i in b)
            for b in (next(batches) for _ in range(50))
        )

    assert padding(True) < 0.2 * padding(False)


def test_short_epochs_sort_in_smaller_windows():
    """The Trainer's megabatch rule: a quarter of the epoch's batches, at most 50 (a short
    epoch sorted whole gives uniform batches, which cost held-out loss: benchmarks)."""
    from finetune.batching import group_window

    assert group_window(64, 8) == 2
    assert group_window(10, 8) == 1
    assert group_window(1600, 8) == group_window(10**6, 8) == 50
    lengths = list(range(1, 65))
    batches = micro_batches(lengths, 8, seed=3, shuffle=True, group_by_length=True)
    spans = [max(b) - min(b) for b in (next(batches) for _ in range(8))]
    assert max(spans) > 7  # sorted whole, every batch would be 8 consecutive lengths
