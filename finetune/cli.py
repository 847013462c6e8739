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
