"""Text that is not valid Unicode, or not text, inside files that are otherwise valid.

Generated, not fixed: any lone surrogate, NUL or control character, put in any column or
column name of any data format, is refused in one line naming the file, row and column;
any legal text (combining marks, right-to-left scripts with their bidi marks, emoji) loads
unchanged. The same rule holds for recipe strings and generate's prompts.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.data import load_rows
from finetune.errors import UserError
from finetune.inputs import text_problem

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
CONTROLS = st.sampled_from([chr(c) for c in [*range(0, 9), *range(14, 32), *range(0x7F, 0xA0)]])
BAD_CHARS = st.one_of(SURROGATES, CONTROLS)
# Legal data: letters of many scripts, combining marks, bidi marks inside right-to-left
# text, zero-width joiners in emoji, tabs and newlines.
LEGAL = st.text(
    st.one_of(
        st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")),
        st.sampled_from(list("\t\n\u0301\u200f\u202b\u2067\u200d\u05e9\u0644\u2028\u2029")),
    ),
    min_size=1,
    max_size=30,
).filter(str.strip)
FORMATS = st.sampled_from(["jsonl", "json", "csv", "parquet"])


def write_rows(folder: Path, fmt: str, rows: list[dict[str, str]]) -> Path:
    path = folder / f"data.{fmt}"
    if fmt == "jsonl":
        # Raw characters, not escapes (U+2028 and friends must not end a JSONL line), except
        # lone surrogates, which only an escape can hold.
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        text = re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text)
        path.write_text(text, encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@PROPERTY
@given(
    fmt=FORMATS,
    prefix=LEGAL,
    bad=BAD_CHARS,
    row=st.integers(1, 3),
    in_name=st.booleans(),
)
def test_a_bad_character_anywhere_is_refused_naming_file_row_and_column(
    tmp_path_factory, fmt, prefix, bad, row, in_name
):
    if fmt in ("csv", "parquet") and 0xD800 <= ord(bad) <= 0xDFFF:
        fmt = "jsonl"  # only a JSON escape can hold one: UTF-8 files and arrow cannot
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(1, 4)]
    if in_name:
        for r in rows:
            r[f"col{bad}"] = r.pop("response")
    else:
        rows[row - 1]["prompt"] = prefix + bad
    path = write_rows(tmp_path_factory.mktemp("d"), fmt, rows)
    with pytest.raises(UserError) as err:
        load_rows(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert f"U+{ord(bad):04X}" in message
    assert ("column name" in message) if in_name else (f"row {row}: column 'prompt'" in message)


@PROPERTY
@given(fmt=FORMATS, texts=st.lists(LEGAL, min_size=1, max_size=3))
def test_legal_text_in_any_script_loads_unchanged(tmp_path_factory, fmt, texts):
    if fmt == "csv":  # the csv module reads a lone "\r" as a line end, as spreadsheets do
        texts = [t.replace("\r", " ") for t in texts]
    rows = [{"prompt": t, "response": t[::-1]} for t in texts]
    path = write_rows(tmp_path_factory.mktemp("d"), fmt, rows)
    loaded = load_rows(path)
    assert [(r["prompt"], r["response"]) for r in loaded] == [
        (r["prompt"], r["response"]) for r in rows
    ]


@pytest.mark.parametrize("char", ["\u202e", "\u200b", "\ufeff", "\u2066"])
def test_a_column_name_must_display_as_itself(tmp_path, char):
    path = write_rows(tmp_path, "jsonl", [{f"prompt{char}": "q", "response": "a"}])
    with pytest.raises(UserError, match=rf"column name .*U\+{ord(char):04X}"):
        load_rows(path)
    # ...while the same character inside the text is data (a right-to-left quote, say).
    assert load_rows(write_rows(tmp_path, "json", [{"prompt": f"q{char}", "response": "a"}]))


def test_chat_message_contents_are_checked(tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x\udfffy"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(UserError, match=r"row 1: messages\[2\]\.content holds a lone surrogate"):
        load_rows(path)


@given(text=st.text(max_size=20))
@settings(max_examples=200, database=None)
def test_text_problem_names_exactly_the_refused_characters(text):
    refused = [c for c in text if 0xD800 <= ord(c) <= 0xDFFF or c in BAD_SET]
    assert (text_problem(text) is None) == (not refused)


BAD_SET = {chr(c) for c in [*range(0, 9), *range(14, 32), *range(0x7F, 0xA0)]}


# --------------------------------------------------------------------- CSV structure

NAMES = st.text("abcxyz_", min_size=1, max_size=4)


@PROPERTY
@given(names=st.lists(NAMES, min_size=2, max_size=5), bom=st.booleans())
def test_a_csv_header_naming_a_column_twice_is_refused_naming_it(tmp_path_factory, names, bom):
    path = tmp_path_factory.mktemp("c") / "d.csv"
    body = ",".join(names) + "\n" + ",".join("v" for _ in names) + "\n"
    path.write_text(body, encoding="utf-8-sig" if bom else "utf-8")
    twice = sorted({n for n in names if names.count(n) > 1})
    if not twice:  # a BOM is stripped: the first column keeps its name
        assert list(load_rows(path)[0])[: len(names)] == names
        return
    with pytest.raises(UserError, match="more than once") as err:
        load_rows(path)
    assert all(repr(n) in str(err.value) for n in twice)


@PROPERTY
@given(width=st.integers(1, 4), cells=st.integers(0, 6), row=st.integers(1, 3))
def test_a_ragged_csv_row_is_refused_naming_the_row(tmp_path_factory, width, cells, row):
    header = [f"c{i}" for i in range(width)]
    lines = [",".join(header)] + [",".join("v" * width) for _ in range(3)]
    lines[row] = ",".join("w" * max(cells, 1)) if cells else "w"
    path = tmp_path_factory.mktemp("c") / "d.csv"
    path.write_text("\n".join(",".join(c) if isinstance(c, list) else c for c in lines) + "\n")
    given_cells = max(cells, 1)
    if given_cells == width:
        assert len(load_rows(path)) == 3
        return
    with pytest.raises(UserError, match=rf"row {row}: {given_cells} cells?, "):
        load_rows(path)


@pytest.mark.parametrize(
    "header, expect",
    [("\n", "first line is empty"), (" , \n", "first line is empty"), ("a,,b\n", "column 2")],
)
def test_a_csv_header_without_names_is_refused(tmp_path, header, expect):
    path = tmp_path / "d.csv"
    path.write_text(header + "x,y,z\n")
    with pytest.raises(UserError, match=expect):
        load_rows(path)


def test_a_workbook_named_csv_is_refused(tmp_path):
    import zipfile

    path = tmp_path / "d.csv"
    with zipfile.ZipFile(path, "w") as book:
        book.writestr("xl/workbook.xml", "<workbook/>")
    with pytest.raises(UserError, match="Excel workbook"):
        load_rows(path)


def test_right_to_left_text_and_combining_marks_are_data():
    rows = load_rows(Path(__file__).parent / "bad_inputs" / "rtl_and_combining.jsonl")
    assert rows[0]["prompt"].startswith("\u05e9") and "\u0301" in rows[0]["response"]


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85"])
def test_a_jsonl_line_ends_only_at_a_newline(tmp_path, char):
    """splitlines() also ends lines at these, and JSON lets a string hold them raw (as
    json.dumps(ensure_ascii=False) writes them). U+0085 is a C1 control: refused by name."""
    path = write_rows(tmp_path, "jsonl", [{"prompt": f"a{char}b", "response": "c"}])
    assert char in path.read_text(encoding="utf-8")
    if char == "\x85":
        with pytest.raises(UserError, match=r"row 1: column 'prompt' holds a control .*U\+0085"):
            load_rows(path)
        return
    assert load_rows(path)[0]["prompt"] == f"a{char}b"


@pytest.mark.parametrize(
    "key", ["tr\udcffin.lr", "train.l\udcc3r", "\udc80train.lr", "train.lr\udcfe", "train.\ud800lr"]
)
def test_an_override_key_that_is_not_clean_text_is_named(key):
    """Round 4: a key with a byte that is not UTF-8 (argv's U+DCxx) ended in pydantic's
    'Input should be a valid string', naming neither the override nor the byte."""
    from finetune.errors import UserError
    from finetune.recipe.load import apply_override

    with pytest.raises(UserError, match=r"^override key .* at character \d+; remove it"):
        apply_override({}, f"{key}=1")
