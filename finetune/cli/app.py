"""The `finetune` application object, its consoles and the one-line error exit, shared by
the command modules (finetune.cli.before, finetune.cli.after)."""

from __future__ import annotations

import os
import sys
from typing import Annotated, NoReturn

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    # Plain help text: with rich markup on, "[default: 8]" in a help string is read as a
    # markup tag and vanishes, leaving "LoRA/DoRA rank ." in --help.
    rich_markup_mode=None,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Parameter-efficient fine-tuning of decoder language models, with memory you can "
    "know before you start.",
)
console = Console(stderr=True)
out = Console()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    if debug:
        os.environ["FINETUNE_DEBUG"] = "1"


def fail(message: str, code: int) -> NoReturn:
    """Print one error line and exit.

    The message may quote the user's input: a key or column name holding a newline or a
    control character is shown escaped (one line, always), and "[q_proj, v_proj]" is text
    to show, not rich markup to swallow.
    """
    from rich.markup import escape

    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    sys.exit(code)
