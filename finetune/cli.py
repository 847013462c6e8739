"""The `finetune` command line. It parses, calls one function per command, and prints.

User errors (`UserError`) end as one line on stderr and exit code 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from finetune.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Parameter-efficient fine-tuning of decoder language models, with memory you can "
    "know before you start.",
)
console = Console(stderr=True)
out = Console()

Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Dotted overrides such as train.lr=1e-4 adapter.r=16.", show_default=False),
]
RecipeArg = Annotated[Path, typer.Argument(help="A YAML recipe.", show_default=False)]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    if debug:
        os.environ["FINETUNE_DEBUG"] = "1"


# --------------------------------------------------------------------------- commands
# Each command imports its stage lazily so `finetune --help` stays fast.


@app.command()
def train(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in output.dir from its latest checkpoint.")
    ] = False,
) -> None:
    """Fine-tune a model as RECIPE says and write the run directory and its report."""
    import time

    from finetune.recipe import load_recipe
    from finetune.report import write_report
    from finetune.train import train as run_training

    started = time.perf_counter()
    spec = load_recipe(recipe, overrides or [])
    result = run_training(spec, resume=resume)
    report = write_report(result, time.perf_counter() - started)
    show_report(result.run_dir, report)


def show_report(run_dir: Path, report: dict) -> None:
    from rich.markdown import Markdown

    out.print(Markdown((run_dir / "report.md").read_text().replace("![loss](loss.png)", "")))
    out.print(f"run directory: {run_dir}  (report.md, report.json, loss.png, adapter/)")


@app.command()
def validate(recipe: RecipeArg, overrides: Overrides = None) -> None:
    """Check RECIPE's schema and data; show one example with its trained tokens marked."""
    from rich.text import Text

    from finetune.data import check_recipe_data
    from finetune.recipe import load_recipe

    spec = load_recipe(recipe, overrides or [])
    check = check_recipe_data(spec)
    train_data, eval_data = check.splits.train, check.splits.eval
    out.print(f"[green]recipe ok[/]: {recipe}")
    out.print(
        f"train: {len(train_data)} examples, {train_data.tokens:,} tokens, "
        f"{train_data.trained_tokens:,} trained, {train_data.truncated} truncated "
        f"at max_length {spec.data.max_length}"
    )
    if eval_data is not None:
        out.print(f"eval: {len(eval_data)} examples, {eval_data.tokens:,} tokens, "
                  f"{eval_data.truncated} truncated")
    out.print(f"\nexample (row {check.shown_row}); trained tokens are between ⟦ and ⟧:")
    text = Text()
    for chunk, trained in check.shown:
        text.append(f"⟦{chunk}⟧" if trained else chunk, style="bold green" if trained else "dim")
    out.print(text)


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    try:
        app(standalone_mode=False)
    except UserError as err:
        if os.environ.get("FINETUNE_DEBUG"):
            raise
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as err:  # click's usage errors carry their own exit code
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Exit):
            sys.exit(err.exit_code)
        raise
