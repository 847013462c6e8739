"""Load, format and tokenize training data, with prompt tokens masked from the loss.

Every example becomes a list of segments `(text, trained)`. Segments are tokenized one by
one and concatenated, so the boundary between prompt and response is exact whatever the
format: labels are the token ids on trained segments and -100 elsewhere.

`files` reads a data file into rows, `rows` formats a row into segments, `tokens` turns
segments into token ids and labels; here the recipe's splits are made from them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from finetune import models
from finetune.data.files import load_rows
from finetune.data.pairs import PairData, PairExample, as_example, tokenize_pairs
from finetune.data.rows import (
    first_prompt,
    generation_prompt,
    render_chat,
)
from finetune.data.tokens import (
    IGNORE_INDEX,
    TokenizedData,
    TokenizedExample,
    render_marked,
    require_trained_tokens,
    tokenize_rows,
)
from finetune.errors import UserError
from finetune.recipe import DataSection

__all__ = [
    "IGNORE_INDEX",
    "PREFERENCE_FORMATS",
    "DataCheck",
    "PairData",
    "PairExample",
    "Splits",
    "TokenizedData",
    "TokenizedExample",
    "check_recipe_data",
    "first_prompt",
    "generation_prompt",
    "load_rows",
    "prepare",
    "render_chat",
    "render_marked",
    "require_trained_tokens",
    "tokenize_rows",
]


PREFERENCE_FORMATS = ("preference", "kto")


@dataclass
class Splits:
    train: TokenizedData
    eval: TokenizedData | None
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    eval_source: str
    # Preference formats: the rows as pairs (`train`/`eval` then hold their chosen sides,
    # which the data checks and the report count as examples).
    train_pairs: PairData | None = None
    eval_pairs: PairData | None = None


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
    if spec.format in PREFERENCE_FORMATS:
        pairs = tokenize_pairs(rows, spec, tokenizer, spec.path)
        held = tokenize_pairs(eval_rows, spec, tokenizer, eval_source) if eval_rows else None
        held_sides = held.chosen_sides if held else None
        return Splits(pairs.chosen_sides, held_sides, rows, eval_rows, eval_source, pairs, held)
    train = tokenize_rows(rows, spec, tokenizer, spec.path)
    evaluation = tokenize_rows(eval_rows, spec, tokenizer, eval_source) if eval_rows else None
    # Examples left with nothing to train on are refused by finetune.doctor, which every
    # caller runs next: there they show up in `finetune validate`'s table with the rest.
    return Splits(train, evaluation, rows, eval_rows, eval_source)


@dataclass
class DataCheck:
    """What `finetune validate` reports about a recipe's data."""

    splits: Splits
    shown: list[tuple[str, bool]]
    shown_row: int
    tokenizer: Any
    # Preference formats: the rejected side of the shown pair (None for a KTO row).
    shown_rejected: list[tuple[str, bool]] | None = None


def check_recipe_data(recipe: Any) -> DataCheck:
    """Load the tokenizer, tokenize the data, and pick one example to show with its mask.

    Raises:
        UserError: a file, row or field the data cannot be read or formatted from (what the
            data holds once tokenized is finetune.doctor's to judge).
    """
    source = models.resolve_source(recipe.model.path)
    tokenizer = models.load_tokenizer(source, recipe.model.trust_remote_code)
    splits = prepare(recipe.data, tokenizer, recipe.train.seed)
    example = splits.train.examples[0]
    shown = DataCheck(splits, render_marked(example, tokenizer), example.row, tokenizer)
    pair = splits.train_pairs.examples[0] if splits.train_pairs else None
    if pair is not None and pair.label is None:
        shown.shown_rejected = render_marked(as_example(pair, pair.rejected, False), tokenizer)
    return shown
