"""Run `python -m finetune ARGS` with every write to stderr traced to the code that made it.

Usage: python tests/stderr_owner.py TRACE_FILE ARGS...

Each write to `sys.stderr` is appended to TRACE_FILE as one JSON line: the text, and the
file of the innermost frame that is neither the standard library nor a console library
(rich, typer, click), or null when there is none (rich's refresh thread). A write is the
project's when that file is under finetune/ (or null: only the project drives the console
libraries); a warning from transformers or a log record from bitsandbytes is not. Writes
that bypass Python (a C library writing to file descriptor 2) are in the captured stderr
but not in the trace, which the test compares.
"""

from __future__ import annotations

import json
import runpy
import sys
import sysconfig
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROJECT = str(ROOT / "finetune") + "/"
STDLIB = str(Path(sysconfig.get_paths()["stdlib"]).resolve()) + "/"
CONSOLE = tuple(f"/site-packages/{name}/" for name in ("rich", "typer", "click"))


def writer(frame: Any) -> str | None:
    """The file of the innermost frame outside the standard library and console libraries."""
    while frame is not None:
        file = frame.f_code.co_filename
        inside = file.startswith("<") or any(lib in file for lib in CONSOLE)
        if not inside and "/site-packages/" not in file:
            inside = str(Path(file).resolve()).startswith(STDLIB)
        if not inside:
            return file
        frame = frame.f_back
    return None


class TracedStream:
    """sys.stderr, with every write recorded beside the file that made it."""

    def __init__(self, stream: Any, trace: Any) -> None:
        self._stream, self._trace = stream, trace

    def write(self, text: str) -> int:
        origin = writer(sys._getframe(1))
        project = origin is None or origin.startswith(PROJECT)
        record = {"text": text, "writer": origin, "project": project}
        self._trace.write(json.dumps(record) + "\n")
        self._trace.flush()
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main() -> None:
    trace_path, *args = sys.argv[1:]
    sys.path.insert(0, str(ROOT))  # this checkout's finetune, whatever is installed
    trace = open(trace_path, "w", encoding="utf-8")  # noqa: SIM115 (open until exit)
    sys.stderr = TracedStream(sys.stderr, trace)
    sys.argv = ["finetune", *args]
    runpy.run_module("finetune", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
