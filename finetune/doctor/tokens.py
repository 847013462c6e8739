"""Checks of the examples as training sees them: tokens, masks, special tokens, lengths,
and packing."""

from __future__ import annotations

import statistics
from typing import Any

from finetune import batching, data
from finetune.doctor.findings import Finding, Inputs, ok, splits_of, where
from finetune.errors import UserError

# An example is a length outlier above this many times the median length (and 32 tokens).
OUTLIER_FACTOR = 4


def no_trained_tokens(inputs: Inputs) -> Finding:
    name = "zero trained tokens"
    why = (
        "an example whose response is masked or cut away entirely adds nothing but padding, "
        "and a batch of them has a loss of 0"
    )
    fix = "raise data.max_length or shorten the prompt"
    for split in splits_of(inputs):
        if split.no_trained:
            try:
                data.require_trained_tokens(split, inputs.spec)
            except UserError as err:
                line = str(err)
            total = sum(len(s.no_trained) for s in splits_of(inputs))
            summary = f"{total} of {sum(len(s) for s in splits_of(inputs))} examples"
            example = where(split.path, split.no_trained[0])
            return Finding(name, "error", total, summary, example, why, fix, line)
    return ok(name, "every example trains on some tokens", why, fix)


def truncated_responses(inputs: Inputs) -> Finding:
    name = "responses cut"
    why = "truncation cuts the end of a response, so the model learns answers that stop early"
    fix = "raise data.max_length, or shorten or drop the longest examples"
    cut = [e for d in splits_of(inputs) for e in d.examples if e.cut_trained and e.trained_tokens]
    if not cut:
        return ok(name, f"no response cut at max_length {inputs.spec.max_length}", why, fix)
    worst = max(cut, key=lambda e: e.cut_trained)
    lost = sum(e.cut_trained for e in cut)
    summary = (
        f"{len(cut)} responses lose {lost} tokens at data.max_length={inputs.spec.max_length}; "
        f"worst row {worst.row} loses {worst.cut_trained} of {worst.response_length}"
    )
    example = where(inputs.spec.path, worst.row)
    return Finding(name, "warning", len(cut), summary, example, why, fix)


def doubled_bos(inputs: Inputs) -> Finding:
    name = "doubled BOS"
    why = "a second begin-of-sequence token is input the model never saw in pretraining"
    fix = (
        "remove the BOS text from data.template or the data; the tokenizer adds its own "
        "(a chat template that writes BOS itself is rendered without a second one)"
    )
    tok = inputs.tokenizer
    bos = tok.bos_token_id
    if bos is None or bos in (tok.eos_token_id, tok.pad_token_id):
        return ok(name, "no distinct BOS token", why, fix)
    # Only at the start: some tokenizers use BOS as their chat turn marker (SmolLM2's
    # <|im_start|>), so a BOS inside a conversation is normal.
    found = [
        (d.path, e) for d in splits_of(inputs) for e in d.examples if e.input_ids[:2] == [bos] * 2
    ]
    if not found:
        return ok(name, "no example starts with two BOS tokens", why, fix)
    path, first = found[0]
    example = where(path, first.row, tok.decode(first.input_ids[:12]))
    summary = f"{len(found)} of {sum(len(d) for d in splits_of(inputs))} examples"
    return Finding(name, "warning", len(found), summary, example, why, fix)


def missing_eos(inputs: Inputs) -> Finding:
    name = "EOS after response"
    why = "without a trained end-of-sequence token the model never learns to stop generating"
    fix = (
        "use a tokenizer with an EOS token, or a chat template that ends the assistant turn with it"
    )
    eos = inputs.tokenizer.eos_token_id
    found = [
        (d.path, e)
        for d in splits_of(inputs)
        for e in d.examples
        if not e.truncated and e.trained_tokens and eos not in last_trained_run(e)
    ]
    if not found:
        return ok(name, "every response ends with EOS", why, fix)
    path, first = found[0]
    text = inputs.tokenizer.decode(last_trained_run(first)[-8:])
    summary = f"{len(found)} responses end without EOS ({inputs.tokenizer.eos_token!r})"
    return Finding(name, "warning", len(found), summary, where(path, first.row, text), why, fix)


def last_trained_run(example: data.TokenizedExample) -> list[int]:
    """The token ids of the example's last run of trained labels."""
    labels = example.labels
    end = max(i for i, label in enumerate(labels) if label != data.IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != data.IGNORE_INDEX:
        start -= 1
    return example.input_ids[start:end]


def template_masking(inputs: Inputs) -> Finding:
    name = "template masking"
    why = (
        "prompt masking needs a template that marks where the answer starts; without it "
        "nothing is trained, or the prompt is trained as if it were the answer"
    )
    fix = "set data.template to a text template with {prompt}, or fix the chat template"
    train, spec = inputs.splits.train, inputs.spec
    share = train.trained_tokens / max(train.tokens, 1)
    summary = f"{share:.0%} of tokens trained"
    if train.trained_tokens == 0:
        return Finding(
            name,
            "error",
            len(train),
            f"nothing trained under {template_name(spec)}",
            "",
            why,
            fix,
            f"{train.path}: no token of any example is trained under {template_name(spec)}; {fix}",
        )
    masks_prompt = spec.format != "text" and not spec.train_on_prompt
    if masks_prompt and all(e.prompt_length == 0 for e in train.examples):
        summary = f"every token trained: {template_name(spec)} renders no prompt"
        example = where(spec.path, train.examples[0].row)
        return Finding(name, "warning", len(train), summary, example, why, fix)
    if masks_prompt and is_chat(spec) and ignores_generation_prompt(inputs.tokenizer):
        summary += "; the chat template ignores add_generation_prompt, so the header is trained"
        return Finding(name, "warning", len(train), summary, "", why, fix)
    return ok(name, summary, why, fix)


def is_chat(spec: Any) -> bool:
    templated = ("instruction", "preference", "kto")
    return spec.format == "chat" or (spec.format in templated and spec.template == "chat")


def template_name(spec: Any) -> str:
    return "the chat template" if is_chat(spec) else f"data.format {spec.format}"


def ignores_generation_prompt(tokenizer: Any) -> bool:
    probe = [{"role": "user", "content": "hi"}]
    with_prompt = data.render_chat(tokenizer, probe, generation_prompt=True)
    return with_prompt == data.render_chat(tokenizer, probe, generation_prompt=False)


def length_outliers(inputs: Inputs) -> Finding:
    name = "length outliers"
    why = (
        "a few very long examples set the padding, memory and time of every batch they "
        "land in, and are the ones truncation cuts"
    )
    fix = "drop or split the longest examples, or check them for pasted junk"
    examples = [e for d in splits_of(inputs) for e in d.examples]
    lengths = [e.prompt_length + e.response_length for e in examples]
    median = statistics.median(lengths)
    limit = max(OUTLIER_FACTOR * median, median + 32)
    found = [(n, e) for n, e in zip(lengths, examples, strict=True) if n > limit]
    summary = f"median {median:g} tokens, longest {max(lengths)}"
    if not found:
        return ok(name, summary, why, fix)
    n, worst = max(found, key=lambda pair: pair[0])
    summary = f"{len(found)} over {OUTLIER_FACTOR}x the median ({median:g} tokens); longest {n}"
    example = where(inputs.spec.path, worst.row)
    return Finding(name, "warning", len(found), summary, example, why, fix)


def packing(inputs: Inputs) -> Finding:
    name = "packing"
    why = (
        "an example split across packed sequences is trained without its start, and one "
        "whose only trained token begins it trains nothing once packed"
    )
    fix = "set data.packing: false, or raise data.max_length"
    spec, train = inputs.spec, inputs.splits.train
    if not spec.packing:
        return ok(name, "off", why, fix)
    items = batching.build_items(train.examples, True, spec.max_length, inputs.recipe.train.seed)
    placed = [row for item in items for row in item.rows]
    split = len(placed) - len(set(placed))
    # Packing untrains each example's first token (batching.pack): fatal to a one-token answer.
    emptied = [
        e for e in train.examples if e.trained_tokens == 1 and e.labels[0] != data.IGNORE_INDEX
    ]
    fill = train.tokens / max(len(items) * spec.max_length, 1)
    summary = f"{len(train)} examples in {len(items)} sequences, {fill:.0%} full"
    if not split and not emptied:
        return ok(name, summary + ", none split", why, fix)
    example = where(spec.path, emptied[0].row) if emptied else ""
    summary += f"; {split} split, {len(emptied)} left with nothing to train"
    return Finding(name, "warning", split + len(emptied), summary, example, why, fix)
