"""The data doctor: named checks that find what makes a fine-tune silently go wrong.

Every check reads the examples exactly as training sees them (`finetune.data`'s loading,
formatting, masking and truncation, and `finetune.batching`'s packing), before any model
weights load. `finetune validate` shows them all as a table; `finetune train` runs the same
checks and stops on an error, or notes each warning once at the start of the run.

An error is a check that makes training (or its evaluation) meaningless: an example with
nothing left to train on, a template that trains nothing, a held-out set that is all
training data. Everything else is a warning, and `--strict` makes warnings errors too.

`findings` holds what a check returns and how findings stop a run; `tokens` checks the
examples as training sees them, `rows` the text as the user wrote it; `display` draws
what `validate` shows beside the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finetune import data
from finetune.doctor.display import plot_lengths, sanitize
from finetune.doctor.findings import Diagnosis, Finding, Inputs, refuse
from finetune.doctor.rows import (
    duplicates,
    empty_fields,
    held_out_overlap,
    response_like_prompt,
    special_tokens_in_text,
)
from finetune.doctor.tokens import (
    doubled_bos,
    length_outliers,
    missing_eos,
    no_trained_tokens,
    packing,
    template_masking,
    truncated_responses,
)

__all__ = ["CHECKS", "Diagnosis", "Finding", "diagnose", "plot_lengths", "refuse", "sanitize"]

CHECKS: list[Callable[[Inputs], Finding]] = [
    no_trained_tokens,
    template_masking,
    truncated_responses,
    doubled_bos,
    missing_eos,
    duplicates,
    held_out_overlap,
    empty_fields,
    response_like_prompt,
    special_tokens_in_text,
    length_outliers,
    packing,
]


def diagnose(recipe: Any, tokenizer: Any, splits: data.Splits) -> Diagnosis:
    """Run every check on the recipe's tokenized data, in the order the table shows them."""
    inputs = Inputs(recipe, tokenizer, splits)
    return Diagnosis([check(inputs) for check in CHECKS], splits.train.path)
