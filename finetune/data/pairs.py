"""Preference data: a prompt with a chosen and a rejected response (format `preference`),
or a prompt with one response and a boolean label (format `kto`).

The prompt is rendered and tokenized once and both responses are tokenized after it, so
chosen and rejected share the prompt's tokens exactly and the prompt is never trained.
A prompt or a response is a string (rendered with `data.template`, or as a user turn and
an assistant turn with the chat template) or a role/content turn list (the chat template).

Bad rows are refused in one line naming file, row and column: an empty side, chosen equal
to rejected before or after truncation, a prompt so long that truncation cuts a response
away entirely, a label that is not a boolean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.data.rows import (
    check_messages,
    render_chat,
    render_template,
    require_column,
    require_text,
    row_label,
)
from finetune.data.tokens import IGNORE_INDEX, TokenizedData, TokenizedExample, _adds_bos
from finetune.errors import UserError
from finetune.recipe import DataSection


@dataclass
class PairExample:
    """One preference row as token ids: the shared prompt and each side's response.
    KTO rows have one response (`chosen`), `rejected` empty and `label` set."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    row: int
    label: bool | None = None

    def __len__(self) -> int:
        """Tokens of the longer side: what a micro-batch's width grows with."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class PairData:
    examples: list[PairExample]
    path: str
    truncated: int = 0
    chosen_sides: TokenizedData = field(default_factory=lambda: TokenizedData([], ""))

    def __len__(self) -> int:
        return len(self.examples)


def is_chat(spec: DataSection, value: Any) -> bool:
    return spec.template == "chat" or isinstance(value, list)


def render_prompt(value: Any, spec: DataSection, tokenizer: Any, where: str) -> tuple[str, list]:
    """The prompt as text, and as turns (empty unless it is rendered with the chat template)."""
    column = spec.prompt_column
    if isinstance(value, list):
        turns = check_turns(value, column, where, last_assistant=False)
        return render_chat(tokenizer, turns, generation_prompt=True), turns
    text = require_text(value, column, where)
    if spec.template == "chat":
        turns = [{"role": "user", "content": text}]
        return render_chat(tokenizer, turns, generation_prompt=True), turns
    return render_template(spec.template, text), []


def check_turns(value: Any, column: str, where: str, last_assistant: bool) -> list[dict]:
    """Role/content turns; a prompt's may not hold an assistant turn at its end, a response
    must be assistant turns only."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: column '{column}' is empty; fill it or remove the row")
    if last_assistant:
        if any(not isinstance(t, dict) or t.get("role") != "assistant" for t in value):
            raise UserError(
                f"{where}: column '{column}' must hold assistant turns only (the prompt holds "
                "the rest)"
            )
        return check_messages(value, column, where)
    # check_messages wants an assistant turn; a prompt need not hold one
    turns = check_messages([*value, {"role": "assistant", "content": "x"}], column, where)[:-1]
    if turns[-1]["role"] == "assistant":
        raise UserError(
            f"{where}: column '{column}' ends with an assistant turn; move it to the response"
        )
    return turns


def render_response(
    value: Any, column: str, context: tuple[str, list], tokenizer: Any, where: str
) -> str:
    """A response's text after the rendered prompt: with the chat template, the rendered
    conversation minus the rendered prompt; else the text itself."""
    text, turns = context
    if isinstance(value, list) or turns:
        if isinstance(value, list):
            reply = check_turns(value, column, where, last_assistant=True)
        else:
            reply = [{"role": "assistant", "content": require_text(value, column, where)}]
        full = render_chat(tokenizer, [*turns, *reply], generation_prompt=False)
        if not full.startswith(text):
            raise UserError(
                f"{where}: the tokenizer's chat template does not render the prompt as a "
                "prefix of the conversation, so the response cannot be located"
            )
        return full[len(text) :]
    return require_text(value, column, where)


@dataclass
class Tokenized:
    prompt: list[int]
    responses: list[list[int]]
    truncated: bool


def tokenize_sides(
    prompt: str, responses: list[str], tokenizer: Any, spec: DataSection, chat: bool
) -> Tokenized:
    """Token ids of the prompt and each response, each side cut to `data.max_length`."""
    ids: list[int] = []
    if not chat and tokenizer.bos_token_id is not None and _adds_bos(tokenizer):
        ids.append(tokenizer.bos_token_id)
    ids += tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sides = []
    for text in responses:
        side = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not chat and tokenizer.eos_token_id is not None:
            side.append(tokenizer.eos_token_id)  # the response teaches the model to stop
        sides.append(side)
    room = max(0, spec.max_length - len(ids))
    truncated = any(len(side) > room for side in sides)
    return Tokenized(ids, [side[:room] for side in sides], truncated)


def pair_example(
    row: dict[str, Any], spec: DataSection, tokenizer: Any, path: str | Path
) -> tuple[PairExample, bool]:
    """One `preference` or `kto` row as token ids, and whether truncation cut it.

    Raises:
        UserError: a missing or empty column, equal sides, a response cut away entirely,
            a label that is not a boolean.
    """
    where = row_label(path, row)
    prompt_value = require_column(row, spec.prompt_column, "data.prompt_column", where)
    context = render_prompt(prompt_value, spec, tokenizer, where)
    if spec.format == "kto":
        columns = [(spec.completion_column, "data.completion_column")]
    else:
        columns = [(spec.chosen_column, "data.chosen_column")]
        columns.append((spec.rejected_column, "data.rejected_column"))
    texts = [
        render_response(require_column(row, c, key, where), c, context, tokenizer, where)
        for c, key in columns
    ]
    chat = bool(context[1])
    if len(texts) == 2 and texts[0] == texts[1]:
        raise UserError(
            f"{where}: columns '{spec.chosen_column}' and '{spec.rejected_column}' are "
            "identical, so there is no preference to learn; fix or remove the row"
        )
    tokens = tokenize_sides(context[0], texts, tokenizer, spec, chat)
    for (column, _), side in zip(columns, tokens.responses, strict=True):
        if not side:
            raise UserError(
                f"{where}: column '{column}' is cut away entirely: the prompt takes "
                f"{len(tokens.prompt)} of data.max_length={spec.max_length} tokens; raise "
                "data.max_length or shorten the prompt"
            )
    if len(texts) == 2 and tokens.responses[0] == tokens.responses[1]:
        raise UserError(
            f"{where}: columns '{spec.chosen_column}' and '{spec.rejected_column}' are "
            f"identical after truncation to data.max_length={spec.max_length}; raise "
            "data.max_length or fix the row"
        )
    label = kto_label(row, spec, where, untyped=is_csv(path)) if spec.format == "kto" else None
    rejected = tokens.responses[1] if len(texts) == 2 else []
    number = int(row.get("_row", 0))
    return PairExample(
        tokens.prompt, tokens.responses[0], rejected, number, label
    ), tokens.truncated


def is_csv(path: str | Path) -> bool:
    return Path(str(path)).suffix.lower() == ".csv"


# A CSV cell is text: no CSV can hold a JSON boolean, so there the words are the labels.
CSV_LABELS = {"true": True, "false": False}


def kto_label(row: dict[str, Any], spec: DataSection, where: str, *, untyped: bool) -> bool:
    """The row's label; `untyped` (a CSV file) reads the words true and false, any case."""
    value = require_column(row, spec.label_column, "data.label_column", where)
    if untyped and isinstance(value, str) and value.strip().lower() in CSV_LABELS:
        return CSV_LABELS[value.strip().lower()]
    if not isinstance(value, bool):
        fix = "write true or false" if untyped else "write a JSON boolean"
        raise UserError(
            f"{where}: column '{spec.label_column}' must be true or false (desirable or not), "
            f"got {value!r}; {fix}"
        )
    return value


def tokenize_pairs(
    rows: list[dict[str, Any]], spec: DataSection, tokenizer: Any, path: str | Path
) -> PairData:
    """Every preference row as token ids, with the chosen sides as ordinary examples (what
    the data checks and the report count)."""
    if spec.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"data.format: {spec.format} with the chat template, but the tokenizer has none; "
            "set data.template to a text template with {prompt}"
        )
    data = PairData(examples=[], path=str(path), chosen_sides=TokenizedData([], str(path)))
    for row in rows:
        example, truncated = pair_example(row, spec, tokenizer, path)
        data.examples.append(example)
        data.truncated += truncated
        side = as_example(example, example.chosen, truncated)
        data.chosen_sides.examples.append(side)
        data.chosen_sides.truncated += truncated
        data.chosen_sides.tokens += len(side.input_ids)
        data.chosen_sides.trained_tokens += side.trained_tokens
    return data


def as_example(pair: PairExample, response: list[int], truncated: bool) -> TokenizedExample:
    """One side of a pair as a training example: the prompt masked, the response trained."""
    ids = pair.prompt + response
    labels = [IGNORE_INDEX] * len(pair.prompt) + response
    return TokenizedExample(ids, labels, pair.row, truncated, len(pair.prompt), len(response))
