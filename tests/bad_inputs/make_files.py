"""Write the data files of the bad-input corpus whose bytes are awkward to type by hand.

Run once from anywhere (`python tests/bad_inputs/make_files.py`); the files it writes are
committed, so the tests never run it. Text files of the corpus are written by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> None:
    good = [
        {"prompt": f"Convert {d} March 2024 to ISO.", "response": f"2024-03-{d:02d}"}
        for d in range(1, 9)
    ]
    (HERE / "good.jsonl").write_text(jsonl(good), encoding="utf-8")
    # Wrong encodings: latin-1 bytes (é is 0xE9) on row 3, and UTF-16 with its BOM.
    accented = [*good[:2], {"prompt": "Café au lait in 3 May 2024?", "response": "2024-05-03"}]
    (HERE / "latin1.jsonl").write_bytes(jsonl(accented).encode("latin-1"))
    (HERE / "utf16.jsonl").write_bytes(jsonl(good).encode("utf-16"))
    csv = "prompt,response\n" + "".join(f'"{r["prompt"]}",{r["response"]}\n' for r in good)
    (HERE / "utf16.csv").write_bytes(csv.encode("utf-16"))
    # Parquet whose prompt column holds integers, and a text file posing as parquet.
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": [1, 2, 3], "response": ["a", "b", "c"]})
    pq.write_table(table, HERE / "int_prompt.parquet")
    (HERE / "not_parquet.parquet").write_text("prompt,response\nhello,world\n")
    text_files(good)
    csv_files(good)


def text_files(good: list[dict[str, str]]) -> None:
    """Valid files holding text that is not: a lone surrogate (a legal JSON escape), an
    ESC sequence in a chat turn, a bidi override in a column name; and legal text."""
    cut = [dict(r) for r in good[:3]]
    cut[1]["response"] = "2024-03-0\ud8002"
    (HERE / "lone_surrogate.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cut))
    turns = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": "clear \x1b[2J it"}, {"role": "assistant", "content": "ok"}],
    ]
    (HERE / "chat_escape_sequence.jsonl").write_text(jsonl([{"messages": t} for t in turns]))
    flipped = [{"prompt\u202e": r["prompt"], "response": r["response"]} for r in good[:3]]
    (HERE / "bidi_column_name.jsonl").write_text(jsonl(flipped), encoding="utf-8")
    # Hebrew with a right-to-left mark, Arabic, a combining accent: data, to be accepted.
    legal = [
        {"prompt": f"\u05e9\u05dc\u05d5\u05dd \u200f{i}", "response": "e\u0301 \u0627\u0644\u0639"}
        for i in range(4)
    ]
    (HERE / "rtl_and_combining.jsonl").write_text(jsonl(legal), encoding="utf-8")


def csv_files(good: list[dict[str, str]]) -> None:
    """CSV structure: a NUL inside a field, two columns of one name, a BOM before the
    header (legal), a header that is empty, random bytes named .csv."""
    body = "".join(f'"{r["prompt"]}",{r["response"]}\n' for r in good[:3])
    (HERE / "nul_in_field.csv").write_text(
        "prompt,response\n" + body.replace("2 March", "2\0March")
    )
    (HERE / "duplicate_columns.csv").write_text(
        "prompt,response,prompt\n" + body.replace("\n", ",x\n")
    )
    (HERE / "bom_header.csv").write_text("prompt,response\n" + body, encoding="utf-8-sig")
    (HERE / "empty_header.csv").write_text("\n" + body)
    (HERE / "binary.csv").write_bytes(bytes(range(256)) * 8)


if __name__ == "__main__":
    main()
