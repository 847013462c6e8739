"""Checks of the rows' text as the user wrote it: repeats, overlap with the held-out set,
empty-looking fields, responses that echo their prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.doctor.findings import Finding, Inputs, ok, where

# Invisible characters that str.strip() keeps: a field of only these is empty to a reader.
INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
# What spreadsheets and dataframes write for a missing value.
PLACEHOLDERS = frozenset({"null", "none", "nan", "n/a", "undefined"})


def fields(row: dict[str, Any], spec: Any) -> tuple[str, str]:
    """(prompt, response) of a row as text: the columns, the turns before the last assistant
    turn and that turn, or the text of a text row (then the prompt is empty)."""
    if spec.format == "text":
        return "", str(row.get(spec.text_column, ""))
    if spec.format == "instruction":
        return str(row.get(spec.prompt_column, "")), str(row.get(spec.response_column, ""))
    if spec.format in ("preference", "kto"):
        # A pair is the same pair only with both sides (and a KTO row with its label).
        sides = preference_sides(spec)
        return plain(row.get(spec.prompt_column)), "\n".join(plain(row.get(c)) for c in sides)
    turns = [t for t in row.get(spec.messages_column) or [] if isinstance(t, dict)]
    last = max((i for i, t in enumerate(turns) if t.get("role") == "assistant"), default=0)
    before = "\n".join(str(t.get("content", "")) for t in turns[:last])
    return before, str(turns[last].get("content", "")) if turns else ""


def preference_sides(spec: Any) -> list[str]:
    if spec.format == "kto":
        return [spec.completion_column, spec.label_column]
    return [spec.chosen_column, spec.rejected_column]


def plain(value: Any) -> str:
    """A preference field as text: a string, or the contents of its turns."""
    if isinstance(value, list):
        return "\n".join(str(t.get("content", "")) for t in value if isinstance(t, dict))
    return str(value if value is not None else "")


def normal(text: str) -> str:
    return " ".join(text.casefold().split())


def duplicates(inputs: Inputs) -> Finding:
    name = "duplicates"
    why = "repeated examples are trained on more often than the rest and overfit"
    fix = "remove the repeated rows (or keep them on purpose to up-weight them)"
    exact: dict[tuple[str, str], int] = {}
    folded: dict[tuple[str, str], int] = {}
    found: list[tuple[int, int, bool]] = []  # (row, earlier row, exact)
    for row in inputs.splits.train_rows:
        pair = fields(row, inputs.spec)
        key = (normal(pair[0]), normal(pair[1]))
        number = int(row.get("_row", 0))
        if pair in exact:
            found.append((number, exact[pair], True))
        elif key in folded:
            found.append((number, folded[key], False))
        exact.setdefault(pair, number)
        folded.setdefault(key, number)
    if not found:
        return ok(name, "no repeated example", why, fix)
    n_exact = sum(1 for _, _, same in found if same)
    summary = f"{n_exact} exact, {len(found) - n_exact} differing only in case or spacing"
    row, earlier, _ = found[0]
    example = f"{Path(inputs.spec.path).name} row {row} repeats row {earlier}"
    return Finding(name, "warning", len(found), summary, example, why, fix)


def held_out_overlap(inputs: Inputs) -> Finding:
    name = "train/held-out overlap"
    why = "held-out examples also in training make evaluation measure memory, not learning"
    fix = "remove from the held-out file every example whose prompt is in the training data"
    eval_rows, spec = inputs.splits.eval_rows, inputs.spec
    if not eval_rows:
        return ok(name, "no held-out set", why, fix)
    pairs = [fields(r, spec) for r in inputs.splits.train_rows]
    prompts = {normal(p) for p, _ in pairs}
    seen = {(normal(p), normal(r)) for p, r in pairs}
    same, prompt_only = [], []
    for row in eval_rows:
        p, r = fields(row, spec)
        if (normal(p), normal(r)) in seen:
            same.append(row)
        elif spec.format != "text" and normal(p) in prompts:
            prompt_only.append(row)
    if not same and not prompt_only:
        return ok(name, f"{len(eval_rows)} held-out examples, none in training", why, fix)
    first = (same or prompt_only)[0]
    example = where(inputs.splits.eval_source, int(first.get("_row", 0)), fields(first, spec)[0])
    summary = f"{len(same)} identical, {len(prompt_only)} same prompt, of {len(eval_rows)}"
    count = len(same) + len(prompt_only)
    if len(same) == len(eval_rows):
        line = (
            f"{inputs.splits.eval_source}: every held-out example is also in the training data "
            f"({Path(spec.path).name}), so evaluation measures nothing; {fix}"
        )
        return Finding(name, "error", count, summary, example, why, fix, line)
    return Finding(name, "warning", count, summary, example, why, fix)


def texts(row: dict[str, Any], spec: Any) -> list[str]:
    """The text fields of a row that the recipe reads."""
    if spec.format == "chat":
        turns = row.get(spec.messages_column) or []
        return [str(t.get("content", "")) for t in turns if isinstance(t, dict)]
    if spec.format == "text":
        return [str(row.get(spec.text_column, ""))]
    if spec.format == "preference":
        columns = [spec.prompt_column, spec.chosen_column, spec.rejected_column]
        return [plain(row.get(c)) for c in columns]
    if spec.format == "kto":
        return [plain(row.get(spec.prompt_column)), plain(row.get(spec.completion_column))]
    return [str(row.get(spec.prompt_column, "")), str(row.get(spec.response_column, ""))]


def looks_empty(text: str) -> bool:
    visible = text.translate(INVISIBLE).strip()
    return not visible or visible.casefold() in PLACEHOLDERS


def empty_fields(inputs: Inputs) -> Finding:
    name = "empty fields"
    why = (
        "a field of invisible characters or a placeholder such as 'nan' or 'null' (a "
        "spreadsheet's missing value) trains the model to say nothing, or 'nan'"
    )
    fix = "fill or remove those rows (fields that are truly empty are refused when loading)"
    found = [
        (path, row)
        for path, rows in row_sets(inputs)
        for row in rows
        if any(looks_empty(t) for t in texts(row, inputs.spec))
    ]
    if not found:
        return ok(name, "no empty, invisible or placeholder field", why, fix)
    path, row = found[0]
    text = next(t for t in texts(row, inputs.spec) if looks_empty(t))
    example = where(path, int(row.get("_row", 0)), text)
    rows = sum(len(r) for _, r in row_sets(inputs))
    return Finding(name, "warning", len(found), f"{len(found)} of {rows} rows", example, why, fix)


def row_sets(inputs: Inputs) -> list[tuple[str, list[dict[str, Any]]]]:
    found = [(inputs.spec.path, inputs.splits.train_rows)]
    if inputs.splits.eval_rows:
        found.append((inputs.splits.eval_source, inputs.splits.eval_rows))
    return found


def response_like_prompt(inputs: Inputs) -> Finding:
    name = "response repeats prompt"
    why = "a response that is, or starts with, its prompt teaches the model to echo the question"
    spec = inputs.spec
    fix = (
        f"check data.response_column ({spec.response_column}) and data.prompt_column "
        f"({spec.prompt_column}) name the right columns"
        if spec.format in ("instruction", "preference", "kto")
        else "check the assistant turns hold the answers"
    )
    if spec.format == "text":
        return ok(name, "not applicable to data.format text", why, fix)
    found = []
    for row in inputs.splits.train_rows:
        prompt, response = (normal(t) for t in fields(row, spec))
        if prompt and response.startswith(prompt):
            found.append(row)
    if not found:
        return ok(name, "no response repeats its prompt", why, fix)
    first = found[0]
    example = where(spec.path, int(first.get("_row", 0)), fields(first, spec)[1])
    summary = f"{len(found)} of {len(inputs.splits.train_rows)} responses"
    return Finding(name, "warning", len(found), summary, example, why, fix)


def special_tokens_in_text(inputs: Inputs) -> Finding:
    """A literal special token in a row (`<|im_end|>` typed into a response) is read by the
    tokenizer as the token itself: the model learns to end a turn, or start one, mid-text."""
    name = "special tokens in text"
    why = (
        "the tokenizer turns a special token written in the text into the token itself, so "
        "the model learns to end or start a turn in the middle of an example"
    )
    fix = (
        "remove them from the text (with data.format: chat the template writes them); keep "
        "them only in rows pre-rendered on purpose"
    )
    specials = special_token_texts(inputs.tokenizer)
    found: list[tuple[int, str]] = []
    for row in inputs.splits.train_rows:
        text = "\n".join(fields(row, inputs.spec))
        token = next((t for t in specials if t in text), None)
        if token is not None:
            found.append((int(row.get("_row", 0)), token))
    if not found:
        return ok(name, "no special token written in the text", why, fix)
    row, token = found[0]
    summary = f"{len(found)} of {len(inputs.splits.train_rows)} examples"
    example = f"{Path(inputs.spec.path).name} row {row} holds {token}"
    return Finding(name, "warning", len(found), summary, example, why, fix)


def special_token_texts(tokenizer: Any) -> list[str]:
    """Every special token's text (BOS, EOS, pad, chat markers), longest first."""
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            texts.add(str(added.content))
    return sorted((t for t in texts if t.strip()), key=len, reverse=True)
