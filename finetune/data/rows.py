"""Formatting a row into segments: `(text, trained)` pairs, as the recipe's format says.

Segments are tokenized one by one and concatenated (`finetune.data.tokens`), so the
boundary between prompt and response is exact whatever the format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.recipe import DataSection

ROLES = ("system", "user", "assistant")
Segment = tuple[str, bool]


def row_label(path: str | Path, row: dict[str, Any]) -> str:
    return f"{path} row {row.get('_row', '?')}"


def require_column(row: dict[str, Any], column: str, key: str, where: str) -> Any:
    if column not in row:
        found = ", ".join(k for k in row if k != "_row")
        raise UserError(
            f"{where}: no column '{column}' (found: {found}); set {key} to the right column"
        )
    return row[column]


def require_text(value: Any, column: str, where: str) -> str:
    if value is None:
        raise UserError(f"{where}: column '{column}' is missing (null); fill it or remove the row")
    if not isinstance(value, str):
        raise UserError(f"{where}: column '{column}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise UserError(f"{where}: column '{column}' is empty; fill it or remove the row")
    return value


def render_chat(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def chat_segments(tokenizer: Any, messages: list[dict[str, str]], where: str) -> list[Segment]:
    """Split a rendered conversation into untrained context and trained assistant turns."""
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context = render_chat(tokenizer, messages[:i], generation_prompt=True)
        full = render_chat(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (context.startswith(done) and full.startswith(context)):
            raise UserError(
                f"{where}: the tokenizer's chat template does not render turns as prefixes of "
                "each other, so assistant tokens cannot be located; use data.format: text"
            )
        segments.append((context[len(done) :], False))
        segments.append((full[len(context) :], True))
        done = full
    return segments


def check_messages(value: Any, column: str, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: column '{column}' must be a non-empty list of turns")
    for turn, message in enumerate(value, start=1):
        if not isinstance(message, dict) or set(message) - {"role", "content"} - {"name"}:
            raise UserError(f"{where}: turn {turn} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise UserError(
                f"{where}: turn {turn} has role {role!r}; use one of {', '.join(ROLES)}"
            )
        content = message.get("content")
        if content is None:
            raise UserError(f"{where}: turn {turn} ({role}) has no 'content'")
        require_text(content, f"{column}[{turn}].content", where)
    if not any(m["role"] == "assistant" for m in value):
        raise UserError(f"{where}: no assistant turn, so there is nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def example_segments(
    row: dict[str, Any], spec: DataSection, tokenizer: Any, path: str | Path
) -> list[Segment]:
    """The segments of one row, trained or not, as the recipe's format says."""
    where = row_label(path, row)
    if spec.format == "text":
        text = require_text(
            require_column(row, spec.text_column, "data.text_column", where),
            spec.text_column,
            where,
        )
        return [(text, True)]
    if spec.format == "chat":
        value = require_column(row, spec.messages_column, "data.messages_column", where)
        return chat_segments(tokenizer, check_messages(value, spec.messages_column, where), where)
    prompt = require_text(
        require_column(row, spec.prompt_column, "data.prompt_column", where),
        spec.prompt_column,
        where,
    )
    response = require_text(
        require_column(row, spec.response_column, "data.response_column", where),
        spec.response_column,
        where,
    )
    if spec.template == "chat":
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return chat_segments(tokenizer, messages, where)
    return [(render_template(spec.template, prompt), False), (response, True)]


def render_template(template: str, prompt: str) -> str:
    try:
        return template.format(prompt=prompt)
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(
            f"data.template: cannot fill it ({err!r}); use {{prompt}} as the only placeholder "
            "and double other braces"
        ) from None


def generation_prompt(
    row: dict[str, Any], spec: DataSection, tokenizer: Any, path: str
) -> tuple[str, str]:
    """The rendered prompt and the reference answer of a row, for exact-match evaluation."""
    segments = example_segments(row, spec, tokenizer, path)
    last = max(i for i, (_, trained) in enumerate(segments) if trained)
    prompt = "".join(text for text, _ in segments[:last])
    reference = segments[last][0]
    if spec.format == "chat" or spec.template == "chat":
        end = getattr(tokenizer, "eos_token", None) or ""
        reference = reference.split(end)[0] if end and end in reference else reference
    return prompt, reference.strip()


def first_prompt(spec: DataSection, rows: list[dict[str, Any]]) -> str | None:
    """The first training row's prompt in the user's own words (no template): the text
    prefix and prompt tuning start from by default. None when there is no row."""
    if not rows:
        return None
    row = rows[0]
    if spec.format == "instruction":
        value = row.get(spec.prompt_column)
    elif spec.format == "chat":
        turns = row.get(spec.messages_column) or []
        value = next((t.get("content") for t in turns if t.get("role") == "user"), None)
    else:
        value = row.get(spec.text_column)
    return value if isinstance(value, str) else None
