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


if __name__ == "__main__":
    main()
