"""The data doctor: named checks that find what makes a fine-tune silently go wrong.

Every check reads the examples exactly as training sees them (`finetune.data`'s loading,
formatting, masking and truncation, and `finetune.batching`'s packing), before any model
weights load. `finetune validate` shows them all as a table; `finetune train` runs the same
checks and stops on an error, or notes each warning once at the start of the run.

An error is a check that makes training (or its evaluation) meaningless: an example with
nothing left to train on, a template that trains nothing, a held-out set that is all
training data. Everything else is a warning, and `--strict` makes warnings errors too.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from finetune import batching, data
from finetune.errors import UserError
from finetune.outputs import write_file_atomically

Level = Literal["ok", "warning", "error"]
# Invisible characters that str.strip() keeps: a field of only these is empty to a reader.
INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
# What spreadsheets and dataframes write for a missing value.
PLACEHOLDERS = frozenset({"null", "none", "nan", "n/a", "undefined"})
# An example is a length outlier above this many times the median length (and 32 tokens).
OUTLIER_FACTOR = 4


@dataclass
class Finding:
    """The result of one check: its level, how many examples, one example, why and fix."""

    name: str
    level: Level
    count: int
    summary: str
    example: str
    why: str
    fix: str
    error_line: str | None = None  # the one line `train` stops with, when it differs

    def line(self, path: str) -> str:
        """This finding as one line naming the data file, the example and the fix."""
        if self.error_line:
            return self.error_line
        example = f" (e.g. {self.example})" if self.example else ""
        return f"{path}: {self.name}: {self.summary}{example}; {self.fix}"


@dataclass
class Diagnosis:
    findings: list[Finding]
    path: str

    def problems(self, strict: bool) -> list[Finding]:
        """The findings that stop a run: errors, and warnings too under --strict."""
        stopping = ("error", "warning") if strict else ("error",)
        return [f for f in self.findings if f.level in stopping]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def warning_lines(self) -> list[str]:
        return [f"data check: {f.line(self.path)}" for f in self.warnings]


def refuse(diagnosis: Diagnosis, strict: bool = False) -> None:
    """Stop on the first error (or warning, when strict) with one line; the rest are counted.

    Raises:
        UserError: a check failed.
    """
    problems = diagnosis.problems(strict)
    if not problems:
        return
    first = problems[0].line(diagnosis.path)
    if first and problems[0].level == "warning":
        first += " (--strict makes data warnings errors)"
    more = len(problems) - 1
    if more:
        first += f"; {more} more failed data check(s): run finetune validate to see them all"
    raise UserError(first)


# ------------------------------------------------------------------------- the checks


@dataclass
class Inputs:
    """What every check reads: the recipe, the tokenizer and the tokenized splits."""

    recipe: Any
    tokenizer: Any
    splits: data.Splits

    @property
    def spec(self) -> Any:
        return self.recipe.data


def diagnose(recipe: Any, tokenizer: Any, splits: data.Splits) -> Diagnosis:
    """Run every check on the recipe's tokenized data, in the order the table shows them."""
    inputs = Inputs(recipe, tokenizer, splits)
    return Diagnosis([check(inputs) for check in CHECKS], splits.train.path)


def ok(name: str, summary: str, why: str, fix: str) -> Finding:
    return Finding(name, "ok", 0, summary, "", why, fix)


def where(path: str, row: int, text: str = "") -> str:
    shown = f": {short(text)}" if text else ""
    return f"{Path(path).name} row {row}{shown}"


def short(text: str, width: int = 40) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[: width - 1] + "…")


def splits_of(inputs: Inputs) -> list[data.TokenizedData]:
    return [d for d in (inputs.splits.train, inputs.splits.eval) if d is not None]


def no_trained_tokens(inputs: Inputs) -> Finding:
    name = "zero trained tokens"
    why = (
        "an example whose response is masked or cut away entirely adds nothing but padding, "
        "and a batch of them has a loss of 0"
    )
    fix = "raise data.max_length or shorten the prompt"
    for split in splits_of(inputs):
        if split.no_trained:
            try:
                data.require_trained_tokens(split, inputs.spec)
            except UserError as err:
                line = str(err)
            total = sum(len(s.no_trained) for s in splits_of(inputs))
            summary = f"{total} of {sum(len(s) for s in splits_of(inputs))} examples"
            example = where(split.path, split.no_trained[0])
            return Finding(name, "error", total, summary, example, why, fix, line)
    return ok(name, "every example trains on some tokens", why, fix)


def truncated_responses(inputs: Inputs) -> Finding:
    name = "responses cut"
    why = "truncation cuts the end of a response, so the model learns answers that stop early"
    fix = "raise data.max_length, or shorten or drop the longest examples"
    cut = [e for d in splits_of(inputs) for e in d.examples if e.cut_trained and e.trained_tokens]
    if not cut:
        return ok(name, f"no response cut at max_length {inputs.spec.max_length}", why, fix)
    worst = max(cut, key=lambda e: e.cut_trained)
    lost = sum(e.cut_trained for e in cut)
    summary = (
        f"{len(cut)} responses lose {lost} tokens at data.max_length={inputs.spec.max_length}; "
        f"worst row {worst.row} loses {worst.cut_trained} of {worst.response_length}"
    )
    example = where(inputs.spec.path, worst.row)
    return Finding(name, "warning", len(cut), summary, example, why, fix)


def doubled_bos(inputs: Inputs) -> Finding:
    name = "doubled BOS"
    why = "a second begin-of-sequence token is input the model never saw in pretraining"
    fix = (
        "remove the BOS text from data.template or the data; the tokenizer adds its own "
        "(a chat template that writes BOS itself is rendered without a second one)"
    )
    tok = inputs.tokenizer
    bos = tok.bos_token_id
    if bos is None or bos in (tok.eos_token_id, tok.pad_token_id):
        return ok(name, "no distinct BOS token", why, fix)
    # Only at the start: some tokenizers use BOS as their chat turn marker (SmolLM2's
    # <|im_start|>), so a BOS inside a conversation is normal.
    found = [
        (d.path, e) for d in splits_of(inputs) for e in d.examples if e.input_ids[:2] == [bos] * 2
    ]
    if not found:
        return ok(name, "no example starts with two BOS tokens", why, fix)
    path, first = found[0]
    example = where(path, first.row, tok.decode(first.input_ids[:12]))
    summary = f"{len(found)} of {sum(len(d) for d in splits_of(inputs))} examples"
    return Finding(name, "warning", len(found), summary, example, why, fix)


def missing_eos(inputs: Inputs) -> Finding:
    name = "EOS after response"
    why = "without a trained end-of-sequence token the model never learns to stop generating"
    fix = (
        "use a tokenizer with an EOS token, or a chat template that ends the assistant turn with it"
    )
    eos = inputs.tokenizer.eos_token_id
    found = [
        (d.path, e)
        for d in splits_of(inputs)
        for e in d.examples
        if not e.truncated and e.trained_tokens and eos not in last_trained_run(e)
    ]
    if not found:
        return ok(name, "every response ends with EOS", why, fix)
    path, first = found[0]
    text = inputs.tokenizer.decode(last_trained_run(first)[-8:])
    summary = f"{len(found)} responses end without EOS ({inputs.tokenizer.eos_token!r})"
    return Finding(name, "warning", len(found), summary, where(path, first.row, text), why, fix)


def last_trained_run(example: data.TokenizedExample) -> list[int]:
    """The token ids of the example's last run of trained labels."""
    labels = example.labels
    end = max(i for i, label in enumerate(labels) if label != data.IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != data.IGNORE_INDEX:
        start -= 1
    return example.input_ids[start:end]


def template_masking(inputs: Inputs) -> Finding:
    name = "template masking"
    why = (
        "prompt masking needs a template that marks where the answer starts; without it "
        "nothing is trained, or the prompt is trained as if it were the answer"
    )
    fix = "set data.template to a text template with {prompt}, or fix the chat template"
    train, spec = inputs.splits.train, inputs.spec
    share = train.trained_tokens / max(train.tokens, 1)
    summary = f"{share:.0%} of tokens trained"
    if train.trained_tokens == 0:
        return Finding(
            name,
            "error",
            len(train),
            f"nothing trained under {template_name(spec)}",
            "",
            why,
            fix,
            f"{train.path}: no token of any example is trained under {template_name(spec)}; {fix}",
        )
    masks_prompt = spec.format != "text" and not spec.train_on_prompt
    if masks_prompt and all(e.prompt_length == 0 for e in train.examples):
        summary = f"every token trained: {template_name(spec)} renders no prompt"
        example = where(spec.path, train.examples[0].row)
        return Finding(name, "warning", len(train), summary, example, why, fix)
    if masks_prompt and is_chat(spec) and ignores_generation_prompt(inputs.tokenizer):
        summary += "; the chat template ignores add_generation_prompt, so the header is trained"
        return Finding(name, "warning", len(train), summary, "", why, fix)
    return ok(name, summary, why, fix)


def is_chat(spec: Any) -> bool:
    return spec.format == "chat" or (spec.format == "instruction" and spec.template == "chat")


def template_name(spec: Any) -> str:
    return "the chat template" if is_chat(spec) else f"data.format {spec.format}"


def ignores_generation_prompt(tokenizer: Any) -> bool:
    probe = [{"role": "user", "content": "hi"}]
    with_prompt = data.render_chat(tokenizer, probe, generation_prompt=True)
    return with_prompt == data.render_chat(tokenizer, probe, generation_prompt=False)


def fields(row: dict[str, Any], spec: Any) -> tuple[str, str]:
    """(prompt, response) of a row as text: the columns, the turns before the last assistant
    turn and that turn, or the text of a text row (then the prompt is empty)."""
    if spec.format == "text":
        return "", str(row.get(spec.text_column, ""))
    if spec.format == "instruction":
        return str(row.get(spec.prompt_column, "")), str(row.get(spec.response_column, ""))
    turns = [t for t in row.get(spec.messages_column) or [] if isinstance(t, dict)]
    last = max((i for i, t in enumerate(turns) if t.get("role") == "assistant"), default=0)
    before = "\n".join(str(t.get("content", "")) for t in turns[:last])
    return before, str(turns[last].get("content", "")) if turns else ""


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
        if spec.format == "instruction"
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


def length_outliers(inputs: Inputs) -> Finding:
    name = "length outliers"
    why = (
        "a few very long examples set the padding, memory and time of every batch they "
        "land in, and are the ones truncation cuts"
    )
    fix = "drop or split the longest examples, or check them for pasted junk"
    examples = [e for d in splits_of(inputs) for e in d.examples]
    lengths = [e.prompt_length + e.response_length for e in examples]
    median = statistics.median(lengths)
    limit = max(OUTLIER_FACTOR * median, median + 32)
    found = [(n, e) for n, e in zip(lengths, examples, strict=True) if n > limit]
    summary = f"median {median:g} tokens, longest {max(lengths)}"
    if not found:
        return ok(name, summary, why, fix)
    n, worst = max(found, key=lambda pair: pair[0])
    summary = f"{len(found)} over {OUTLIER_FACTOR}x the median ({median:g} tokens); longest {n}"
    example = where(inputs.spec.path, worst.row)
    return Finding(name, "warning", len(found), summary, example, why, fix)


def packing(inputs: Inputs) -> Finding:
    name = "packing"
    why = (
        "an example split across packed sequences is trained without its start, and one "
        "whose only trained token begins it trains nothing once packed"
    )
    fix = "set data.packing: false, or raise data.max_length"
    spec, train = inputs.spec, inputs.splits.train
    if not spec.packing:
        return ok(name, "off", why, fix)
    items = batching.build_items(train.examples, True, spec.max_length, inputs.recipe.train.seed)
    placed = [row for item in items for row in item.rows]
    split = len(placed) - len(set(placed))
    # Packing untrains each example's first token (batching.pack): fatal to a one-token answer.
    emptied = [
        e for e in train.examples if e.trained_tokens == 1 and e.labels[0] != data.IGNORE_INDEX
    ]
    fill = train.tokens / max(len(items) * spec.max_length, 1)
    summary = f"{len(train)} examples in {len(items)} sequences, {fill:.0%} full"
    if not split and not emptied:
        return ok(name, summary + ", none split", why, fix)
    example = where(spec.path, emptied[0].row) if emptied else ""
    summary += f"; {split} split, {len(emptied)} left with nothing to train"
    return Finding(name, "warning", split + len(emptied), summary, example, why, fix)


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
    length_outliers,
    packing,
]


# ---------------------------------------------------------------------- the length plot


def plot_lengths(splits: data.Splits, max_length: int, path: Path) -> Path:
    """Histograms (PNG) of prompt, response and total token lengths before truncation, with
    data.max_length marked; written under a temporary name and renamed into place."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples = [e for d in (splits.train, splits.eval) if d is not None for e in d.examples]
    series = {
        "prompt": [e.prompt_length for e in examples],
        "response": [e.response_length for e in examples],
        "prompt + response": [e.prompt_length + e.response_length for e in examples],
    }
    fig, ax = plt.subplots(figsize=(8, 4.5))
    top = max(max(series["prompt + response"]), max_length)
    bins = range(0, top + 2, max(1, (top + 1) // 60))
    for label, values in series.items():
        ax.hist(values, bins=bins, alpha=0.55, label=label)
    ax.axvline(max_length, color="black", linestyle="--", label=f"data.max_length {max_length}")
    ax.set_xlabel("tokens (before truncation)")
    ax.set_ylabel("examples")
    ax.set_title(f"token lengths of {len(examples)} examples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        write_file_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
    return path


def sanitize(text: str) -> str:
    """Control characters of the user's data shown escaped, so a table cell stays one line."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)
