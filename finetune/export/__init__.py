"""After training: merge an adapter into its base, export it (adapter, merged, GGUF), combine.

One module per output, each with its own check:
- `merging`: `finetune merge` (and `export --format merged`), checked against the adapter model;
- `adapter_folder`: `export --format adapter`;
- `gguf_model`, `gguf_adapter`: `export --format gguf` and `gguf-adapter`, checked in llama.cpp
  (`gguf_check`, `llamacpp`), written by `gguf_file` and `gguf_vocab` (with `llama_pre`,
  llama.cpp's pre-tokenizer table, generated);
- `combining`: `finetune combine`;
- `formats`: `export RUN --format FORMAT` dispatching to the above;
- `checks`: what they share: option, source and --out checks, probe prompts, tolerances.

Every output is written under a temporary name and renamed into place when complete, and a
failed self-check (`CheckFailed`, exit code 1) leaves nothing behind.
"""

from __future__ import annotations

from finetune.export.checks import CheckFailed
from finetune.export.combining import CombineReport, combine
from finetune.export.formats import ExportReport, export, gguf_check_line
from finetune.export.merging import MergeReport, merge, merge_lines

__all__ = [
    "CheckFailed",
    "CombineReport",
    "ExportReport",
    "MergeReport",
    "combine",
    "export",
    "gguf_check_line",
    "merge",
    "merge_lines",
]
