"""Reading a data file (.jsonl, .json, .csv, .parquet or a `save_to_disk` folder) into rows.

Every row is a dict with its 1-based position in the file under `_row`, so later errors
name the row; every failure to read is one line naming the file and, where it can, the line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.inputs import (
    check_tree_text,
    dangling,
    refuse_special,
    refuse_special_inside,
    require_clean_text,
    split_path,
)

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# json raises RecursionError, not JSONDecodeError, on arrays or objects nested thousands deep.
TOO_DEEP = "JSON nested too deeply to be an example (thousands of levels)"


def load_rows(path: str | Path, field_name: str = "data.path") -> list[dict[str, Any]]:
    """Read a data file (or a `save_to_disk` folder) into a list of row dicts.

    Raises:
        UserError: missing file, unknown format, bad encoding, invalid JSON line, empty data.
    """
    path, split = split_path(path)
    kind = refuse_special(path, field_name, "a data file or a save_to_disk folder")
    if kind == "missing":
        head, _, split = str(path).rpartition(":")
        if head and Path(head).is_file():
            raise UserError(
                f"{field_name}: {head} is a file, without splits; drop ':{split}' (a split "
                "applies to a folder saved with datasets' save_to_disk)"
            )
        raise UserError(f"{field_name}: {path} not found{dangling(path)}")
    if kind == "folder":
        rows = _load_saved_dataset(path, field_name, split)
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
    check_rows_text(rows, path)
    return rows


def check_rows_text(rows: list[dict[str, Any]], path: Path) -> None:
    """Refuse a column name or a text anywhere in a row that is not valid text (a lone
    surrogate, NUL, a control character): the tokenizer would fail on it with a traceback,
    or train on it silently. Every format and every command reads its rows through here."""
    for row in rows:
        where = f"{path} row {row.get('_row', '?')}"
        for column, value in row.items():
            if column == "_row":
                continue
            if isinstance(column, str):
                require_clean_text(column, f"{where}: the column name {column!a}", name=True)
            if isinstance(value, str):
                require_clean_text(value, f"{where}: column '{column}'")
            else:
                check_tree_text(value, f"{where}: {column}")


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
    # split("\n"), not splitlines(): a JSON string may hold U+2028, U+0085 or a form feed
    # unescaped, and splitlines() would cut the line there.
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
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
    header. Read with the csv module, so no cache is written and no progress bar shown.
    A byte order mark before the header is dropped (spreadsheets write one)."""
    import csv
    import io

    if path.read_bytes()[:4] == b"PK\x03\x04":
        raise UserError(f"{path}: a zip file (an Excel workbook?), not CSV; export it as CSV")
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return []
        columns = _csv_header(header, path)
        rows = []
        for number, cells in enumerate(reader, start=1):
            if not any(cell.strip() for cell in cells):
                continue  # a blank line between rows
            if len(cells) != len(columns):
                more = "more" if len(cells) > len(columns) else "fewer"
                count = f"{len(cells)} cell{'s' * (len(cells) != 1)}"
                raise UserError(
                    f"{path} row {number}: {count}, {more} than the header's "
                    f"{len(columns)} columns; quote cells holding commas, or fix the row"
                )
            rows.append({**dict(zip(columns, cells, strict=True)), "_row": number})
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None
    return rows


def _csv_header(header: list[str], path: Path) -> list[str]:
    """The column names of the first line: none blank, none given twice (DictReader keeps
    the last of two columns of one name and drops the other without a word).

    Raises:
        UserError: the header is empty, a name is blank, or a name appears twice.
    """
    if not any(name.strip() for name in header):
        raise UserError(
            f"{path}: the first line is empty; it must name the columns (e.g. prompt,response)"
        )
    blank = [str(i) for i, name in enumerate(header, start=1) if not name.strip()]
    if blank:
        raise UserError(f"{path}: header column {', '.join(blank)} has no name; name every column")
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise UserError(
            f"{path}: the header names column {', '.join(map(repr, twice))} more than "
            "once; rename or remove the copies"
        )
    return header


def _load_saved_dataset(path: Path, field_name: str, split: str | None) -> list[dict[str, Any]]:
    from datasets import load_from_disk

    refuse_special_inside(path, field_name, "a folder saved with save_to_disk")
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
    return _rows_from_dataset(choose_split(dataset, path, field_name, split), path)


def choose_split(dataset: Any, path: Path, field_name: str, split: str | None) -> Any:
    """The split of a saved DatasetDict the path names (`saved:test`); a DatasetDict of one
    split is that split. Reading `train` for every role scored training rows as held-out.

    Raises:
        UserError: several splits and none named, an unknown split, or a split named for a
            saved Dataset (which has none).
    """
    from datasets import DatasetDict

    if not isinstance(dataset, DatasetDict):
        if split is not None:
            raise UserError(
                f"{field_name}: {path} is one saved Dataset, without splits; drop ':{split}'"
            )
        return dataset
    names = list(dataset)
    if split is None and len(names) == 1:
        return dataset[names[0]]
    if split is None:
        raise UserError(
            f"{field_name}: {path} is a DatasetDict with splits {', '.join(names)}; name one, "
            f"such as {path}:{names[0]}"
        )
    if split not in dataset:
        raise UserError(
            f"{field_name}: {path} has no split '{split}' (it has {', '.join(names)}); "
            f"give {path}:<split>"
        )
    return dataset[split]


def _rows_from_dataset(dataset: Any, path: Path) -> list[dict[str, Any]]:
    rows = dataset.to_list()
    for number, row in enumerate(rows, start=1):
        row.setdefault("_row", number)
    return rows
