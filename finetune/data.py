"""Load, format and tokenize training data, with prompt tokens masked from the loss.

Every example becomes a list of segments `(text, trained)`. Segments are tokenized one by
one and concatenated, so the boundary between prompt and response is exact whatever the
format: labels are the token ids on trained segments and -100 elsewhere.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.inputs import refuse_special
from finetune.recipe import DataSection

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

Segment = tuple[str, bool]
# json raises RecursionError, not JSONDecodeError, on arrays or objects nested thousands deep.
TOO_DEEP = "JSON nested too deeply to be an example (thousands of levels)"


# ------------------------------------------------------------------------------ loading


def load_rows(path: str | Path, field_name: str = "data.path") -> list[dict[str, Any]]:
    """Read a data file (or a `save_to_disk` folder) into a list of row dicts.

    Raises:
        UserError: missing file, unknown format, bad encoding, invalid JSON line, empty data.
    """
    path = Path(path)
    kind = refuse_special(path, field_name, "a data file or a save_to_disk folder")
    if kind == "missing":
        raise UserError(f"{field_name}: {path} not found")
    if kind == "folder":
        rows = _load_saved_dataset(path, field_name)
    else:
        kind = SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise UserError(
                f"{field_name}: {path} has an unknown extension; use .jsonl, .json, .csv, "
                ".parquet or a folder saved with datasets' save_to_disk"
            )
        rows = {
            "jsonl": _load_jsonl,
            "json": _load_json,
            "csv": _load_tabular,
            "parquet": _load_tabular,
        }[kind](path)
    if not rows:
        raise UserError(f"{path}: the dataset is empty; add examples")
    return rows


BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    for bom, encoding in BOMS.items():
        if raw.startswith(bom):
            raise UserError(f"{path}: the file is {encoding} text; re-save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text; re-save the file as UTF-8") from None


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    from datasets import Dataset

    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{path}:{number}: not valid JSON ({err.msg}); fix or remove the line"
            ) from None
        except RecursionError:
            raise UserError(f"{path}:{number}: {TOO_DEEP}; fix or remove the line") from None
        if not isinstance(row, dict):
            raise UserError(
                f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}"
            )
        row["_row"] = number
        rows.append(row)
    if not rows:
        return []
    # Round-trip through datasets so the column types are the ones every other format gets;
    # rows that arrow cannot put in one table (a number in a text column, a string where
    # other rows have a list) stay as they are, and the row checks then name the bad row.
    try:
        dataset = Dataset.from_list(rows)
    except Exception:  # pyarrow's ArrowInvalid / ArrowTypeError, among others
        return rows
    return _rows_from_dataset(dataset, path)


def _load_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise UserError(f"{path}: {TOO_DEEP}; fix the file") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f'{path}: a .json dataset is a list of objects (or {{"data": [...]}})')
    for number, row in enumerate(data, start=1):
        row["_row"] = number
    return data


def _load_tabular(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".csv":
        return _load_csv(path)
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises many kinds; all mean a file we can't read
        raise UserError(f"{path}: cannot read ({str(err).splitlines()[0][:200]})") from None
    for number, row in enumerate(rows, start=1):
        row["_row"] = number
    return rows


def _load_csv(path: Path) -> list[dict[str, Any]]:
    """Every cell as text (a response "42" stays a string); rows numbered from 1 after the
    header. Read with the csv module, so no cache is written and no progress bar shown."""
    import csv
    import io

    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), restval="")
    rows = []
    try:
        for number, row in enumerate(reader, start=1):
            if row.get(None):
                raise UserError(f"{path} row {number}: more cells than the header has columns")
            row.pop(None, None)
            if any(value.strip() for value in row.values()):
                rows.append({**row, "_row": number})
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None
    return rows


def _load_saved_dataset(path: Path, field_name: str) -> list[dict[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(
            f"{field_name}: {path} is a folder but not one saved with datasets' save_to_disk"
        ) from None
    except Exception as err:  # a damaged save: bad JSON, arrow or fingerprint files, ...
        raise UserError(
            f"{field_name}: {path}: cannot read the saved dataset ({str(err)[:200]}); "
            "save it again with save_to_disk"
        ) from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise UserError(f"{path}: saved DatasetDict has no 'train' split ({list(dataset)})")
        dataset = dataset["train"]
    return _rows_from_dataset(dataset, path)


def _rows_from_dataset(dataset: Any, path: Path) -> list[dict[str, Any]]:
    rows = dataset.to_list()
    for number, row in enumerate(rows, start=1):
        row.setdefault("_row", number)
    return rows


# --------------------------------------------------------------------------- formatting


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


# ---------------------------------------------------------------------------- tokenizing


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


# ----------------------------------------------------------------------------- batching


@dataclass
class Splits:
    train: TokenizedData
    eval: TokenizedData | None
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    eval_source: str


def prepare(spec: DataSection, tokenizer: Any, seed: int) -> Splits:
    """Load, split and tokenize the recipe's data (finetune.doctor then checks it)."""
    rows = load_rows(spec.path)
    eval_rows: list[dict[str, Any]] = []
    eval_source = spec.path
    if spec.eval_path:
        eval_rows = load_rows(spec.eval_path, "data.eval_path")
        eval_source = spec.eval_path
    elif spec.eval_fraction > 0:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(rows) * spec.eval_fraction))
        if n_eval >= len(rows):
            raise UserError(f"data.eval_fraction {spec.eval_fraction} leaves no training rows")
        held = set(order[:n_eval])
        eval_rows = [r for i, r in enumerate(rows) if i in held]
        rows = [r for i, r in enumerate(rows) if i not in held]
    train = tokenize_rows(rows, spec, tokenizer, spec.path)
    evaluation = tokenize_rows(eval_rows, spec, tokenizer, eval_source) if eval_rows else None
    # Examples left with nothing to train on are refused by finetune.doctor, which every
    # caller runs next: there they show up in `finetune validate`'s table with the rest.
    return Splits(train, evaluation, rows, eval_rows, eval_source)


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


@dataclass
class DataCheck:
    """What `finetune validate` reports about a recipe's data."""

    splits: Splits
    shown: list[tuple[str, bool]]
    shown_row: int
    tokenizer: Any


def check_recipe_data(recipe: Any) -> DataCheck:
    """Load the tokenizer, tokenize the data, and pick one example to show with its mask.

    Raises:
        UserError: a file, row or field the data cannot be read or formatted from (what the
            data holds once tokenized is finetune.doctor's to judge).
    """
    from finetune import models

    source = models.resolve_source(recipe.model.path)
    tokenizer = models.load_tokenizer(source, recipe.model.trust_remote_code)
    splits = prepare(recipe.data, tokenizer, recipe.train.seed)
    example = splits.train.examples[0]
    return DataCheck(splits, render_marked(example, tokenizer), example.row, tokenizer)
