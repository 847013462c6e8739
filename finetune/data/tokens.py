"""Tokenizing segments with loss labels: token ids on trained segments, -100 elsewhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.data.rows import Segment, example_segments
from finetune.errors import UserError
from finetune.recipe import DataSection

# The label of a position the loss skips (torch's cross_entropy ignore_index default).
IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    row: int
    truncated: bool
    # Before truncation, for the data checks: tokens of untrained segments (the prompt and
    # template), of trained segments (the response), and trained tokens the cut removed.
    prompt_length: int = 0
    response_length: int = 0
    cut_trained: int = 0

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def tokenize_segments(
    segments: list[Segment], tokenizer: Any, spec: DataSection, is_chat: bool
) -> TokenizedExample:
    """Token ids and loss labels of one example, cut to `data.max_length` (row set by caller)."""
    input_ids: list[int] = []
    labels: list[int] = []
    lengths = [0, 0]  # untrained, trained segment tokens
    if not is_chat and tokenizer.bos_token_id is not None and _adds_bos(tokenizer):
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
        lengths[0] += 1
    for text, trained in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if (trained or spec.train_on_prompt) else [IGNORE_INDEX] * len(ids)
        lengths[trained] += len(ids)
    if not is_chat and tokenizer.eos_token_id is not None:
        # Teach the model to stop: the end-of-sequence token is part of the response.
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
        lengths[1] += 1
    cut = spec.max_length
    cut_trained = sum(1 for label in labels[cut:] if label != IGNORE_INDEX)
    return TokenizedExample(
        input_ids[:cut], labels[:cut], 0, len(input_ids) > cut, *lengths, cut_trained
    )


def _adds_bos(tokenizer: Any) -> bool:
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


@dataclass
class TokenizedData:
    examples: list[TokenizedExample]
    path: str
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    no_trained: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)


def tokenize_rows(
    rows: list[dict[str, Any]], spec: DataSection, tokenizer: Any, path: str | Path
) -> TokenizedData:
    """Tokenize every row with loss masks; count tokens, truncations and fully masked rows."""
    is_chat = spec.format == "chat" or (spec.format == "instruction" and spec.template == "chat")
    if is_chat and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"data.format: {spec.format} with the chat template, but the tokenizer has none; "
            "set data.template to a text template with {prompt}"
        )
    data = TokenizedData(examples=[], path=str(path))
    for row in rows:
        segments = example_segments(row, spec, tokenizer, path)
        example = tokenize_segments(segments, tokenizer, spec, is_chat)
        example.row = int(row.get("_row", 0))
        data.examples.append(example)
        data.truncated += example.truncated
        data.tokens += len(example.input_ids)
        data.trained_tokens += example.trained_tokens
        if example.trained_tokens == 0:
            data.no_trained.append(example.row)
    return data


def require_trained_tokens(data: TokenizedData, spec: DataSection) -> None:
    """Fail when an example has nothing to train on (all masked or cut by max_length)."""
    if not data.no_trained:
        return
    rows = ", ".join(str(r) for r in data.no_trained[:5])
    more = f" and {len(data.no_trained) - 5} more" if len(data.no_trained) > 5 else ""
    raise UserError(
        f"{data.path} row {rows}{more}: no trained tokens left after masking the prompt and "
        f"truncating to data.max_length={spec.max_length}; raise data.max_length or shorten "
        "the prompt"
    )


def render_marked(example: TokenizedExample, tokenizer: Any) -> list[tuple[str, bool]]:
    """Decode an example into runs of text, each flagged trained or not, for display."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return [(tokenizer.decode(ids), trained) for ids, trained in runs]
