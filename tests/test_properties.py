"""Property-based tests of formatting, loss masking, truncation and packing.

For any valid example, on the tiny byte-level tokenizer: the trained tokens decode to
exactly the response(s) plus the end marker the format adds, the untrained tokens to
exactly the rest, labels align 1:1 with the input ids, truncation never exceeds
`data.max_length`, and a packed sequence gives every example the same logits it gets alone.
"""

from __future__ import annotations

import pytest
import torch
from helpers import build_model, build_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.batching import collate, pack
from finetune.data import IGNORE_INDEX, render_chat, tokenize_rows
from finetune.recipe import DataSection

TEMPLATE = "### Question:\n{prompt}\n### Answer:\n"
END = "<|im_end|>"  # the tiny tokenizer's eos, which also closes every chat turn

# Letters, digits, punctuation (braces included), spaces, newlines, tabs, and non-ASCII
# text: accents, CJK, an emoji. Never the special-token spellings ('<' and '|' are out).
ALPHABET = st.sampled_from(
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list(" \n\r\t.,;:!?'\"-_()[]{}/\\#@$%&*+=~")
    + ["é", "ß", "ñ", "ø", "中", "文", "日", "é", "🙂", "€", "\u00a0"]
)
text = st.text(ALPHABET, min_size=1, max_size=40).filter(lambda s: s.strip() != "")
# No example database: the tests leave no .hypothesis folder behind (a failure prints its
# example, which is enough to reproduce it).
PROPERTY = settings(
    max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def spec(**kw) -> DataSection:
    return DataSection(path="memory.jsonl", **kw)


def tokenize_one(row: dict, data_spec: DataSection, tokenizer):
    data = tokenize_rows([{**row, "_row": 1}], data_spec, tokenizer, "memory.jsonl")
    return data.examples[0]


def runs(example) -> list[tuple[list[int], bool]]:
    """Consecutive tokens grouped by trained or not."""
    out: list[tuple[list[int], bool]] = []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        trained = label != IGNORE_INDEX
        if out and out[-1][1] == trained:
            out[-1][0].append(token)
        else:
            out.append(([token], trained))
    return out


def assert_aligned(example) -> None:
    assert len(example.labels) == len(example.input_ids)
    for token, label in zip(example.input_ids, example.labels, strict=True):
        assert label in (token, IGNORE_INDEX)


def decoded(tokenizer, example, trained: bool) -> list[str]:
    return [tokenizer.decode(ids) for ids, t in runs(example) if t == trained]


# ------------------------------------------------------------------------- masking


@PROPERTY
@given(prompt=text, response=text)
def test_text_template_trains_exactly_the_response(tok, prompt, response):
    s = spec(template=TEMPLATE, max_length=4096)
    example = tokenize_one({"prompt": prompt, "response": response}, s, tok)
    assert_aligned(example)
    assert decoded(tok, example, trained=True) == [response + END]
    assert decoded(tok, example, trained=False) == [TEMPLATE.format(prompt=prompt)]
    assert not example.truncated


@PROPERTY
@given(prompt=text, response=text)
def test_chat_template_trains_exactly_the_answer(tok, prompt, response):
    example = tokenize_one({"prompt": prompt, "response": response}, spec(max_length=4096), tok)
    assert_aligned(example)
    assert decoded(tok, example, trained=True) == [response + END + "\n"]
    user = f"<|im_start|>user\n{prompt}{END}\n<|im_start|>assistant\n"
    assert decoded(tok, example, trained=False) == [user]


@st.composite
def conversations(draw) -> list[dict[str, str]]:
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(text)})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(text)})
        messages.append({"role": "assistant", "content": draw(text)})
    return messages


@PROPERTY
@given(messages=conversations())
def test_chat_messages_train_exactly_every_assistant_turn(tok, messages):
    example = tokenize_one({"messages": messages}, spec(format="chat", max_length=4096), tok)
    assert_aligned(example)
    answers = [m["content"] + END + "\n" for m in messages if m["role"] == "assistant"]
    assert decoded(tok, example, trained=True) == answers
    # The untrained runs are exactly the rest of the rendered conversation, in order.
    rendered = render_chat(tok, messages, generation_prompt=False)
    pieces = [tok.decode(ids) for ids, _ in runs(example)]
    assert "".join(pieces) == rendered
    context = [f"<|im_start|>{m['role']}\n{m['content']}{END}\n" for m in messages]
    expected_rest, pending = [], ""
    for message, turn in zip(messages, context, strict=True):
        if message["role"] == "assistant":
            expected_rest.append(pending + "<|im_start|>assistant\n")
            pending = ""
        else:
            pending += turn
    assert decoded(tok, example, trained=False) == expected_rest


@PROPERTY
@given(prompt=text, response=text, on_prompt=st.booleans(), chat=st.booleans())
def test_train_on_prompt_trains_every_token(tok, prompt, response, on_prompt, chat):
    s = spec(template="chat" if chat else TEMPLATE, train_on_prompt=on_prompt, max_length=4096)
    example = tokenize_one({"prompt": prompt, "response": response}, s, tok)
    assert_aligned(example)
    if on_prompt:
        assert example.labels == example.input_ids


# ----------------------------------------------------------------------- truncation


@PROPERTY
@given(
    prompt=text,
    response=text,
    max_length=st.integers(8, 80),
    chat=st.booleans(),
)
def test_truncation_cuts_a_prefix_within_max_length(tok, prompt, response, max_length, chat):
    row = {"prompt": prompt, "response": response}
    template = "chat" if chat else TEMPLATE
    full = tokenize_one(row, spec(template=template, max_length=1_000_000), tok)
    cut = tokenize_one(row, spec(template=template, max_length=max_length), tok)
    assert_aligned(cut)
    assert len(cut.input_ids) <= max_length
    assert cut.truncated == (len(full.input_ids) > max_length)
    assert cut.input_ids == full.input_ids[:max_length]
    assert cut.labels == full.labels[:max_length]


# -------------------------------------------------------------------------- packing


@st.composite
def example_sets(draw):
    """2 to 5 tokenized-looking examples (ids from the tiny vocabulary, some labels masked)."""
    examples = []
    for row in range(1, draw(st.integers(2, 5)) + 1):
        n = draw(st.integers(2, 24))
        ids = draw(st.lists(st.integers(4, 300), min_size=n, max_size=n))
        masked = draw(st.integers(0, n - 1))
        labels = [IGNORE_INDEX] * masked + ids[masked:]
        examples.append((ids, labels, row))
    return examples


def as_examples(raw):
    from finetune.data import TokenizedExample

    return [TokenizedExample(ids, labels, row, False) for ids, labels, row in raw]


@PROPERTY
@given(raw=example_sets(), length=st.integers(24, 64), seed=st.integers(0, 3))
def test_packing_keeps_every_example_whole_and_apart(raw, length, seed):
    examples = as_examples(raw)
    items = pack(examples, length, seed)
    by_row = {e.row: e for e in examples}
    assert sorted(r for item in items for r in item.rows) == sorted(by_row)
    for item in items:
        assert len(item) <= length
        assert len(item.labels) == len(item.position_ids) == len(item)
        start = 0
        for row in item.rows:
            example = by_row[row]
            n = len(example.input_ids)
            assert item.input_ids[start : start + n] == example.input_ids
            assert item.position_ids[start : start + n] == list(range(n))
            # Nothing is learnt across the seam: the first token of each example is no target.
            assert item.labels[start] == IGNORE_INDEX
            assert item.labels[start + 1 : start + n] == example.labels[1:]
            start += n
        assert start == len(item)


@pytest.fixture(scope="module")
def tiny_model(tok):
    model = build_model(tok)
    model.eval()
    return model


@settings(PROPERTY, max_examples=15)
@given(raw=example_sets(), seed=st.integers(0, 3))
def test_packed_examples_never_attend_to_each_other(tiny_model, raw, seed):
    """Logits of each example inside a packed sequence equal its logits alone: no token
    attends across the seam (the block-diagonal mask built from restarting position ids)."""
    examples = as_examples(raw)
    items = pack(examples, 200, seed)
    batch = collate(items, pad_id=0, packed=True)
    with torch.no_grad():
        packed = tiny_model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    by_row = {e.row: e for e in examples}
    for b, item in enumerate(items):
        start = 0
        for row in item.rows:
            ids = by_row[row].input_ids
            with torch.no_grad():
                alone = tiny_model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            inside = packed[b, start : start + len(ids)]
            assert torch.allclose(inside, alone, atol=1e-5), (row, item.rows)
            start += len(ids)
