"""What a data check finds, how findings stop a run, and what every check reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from finetune import data
from finetune.errors import UserError

Level = Literal["ok", "warning", "error"]


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


@dataclass
class Inputs:
    """What every check reads: the recipe, the tokenizer and the tokenized splits."""

    recipe: Any
    tokenizer: Any
    splits: data.Splits

    @property
    def spec(self) -> Any:
        return self.recipe.data


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
