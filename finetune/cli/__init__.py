"""The `finetune` command line. It parses, calls one function per command, and prints.

User errors (`UserError`) end as one line on stderr and exit code 2; `--debug` shows the
traceback instead. The commands live in finetune.cli.before (train, validate, estimate)
and finetune.cli.after (generate, chat, eval, merge, export, combine).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys

import typer

from finetune.cli import after, before  # noqa: F401  (registers the commands on `app`)
from finetune.cli.app import app, console, fail
from finetune.errors import UserError, closest
from finetune.noise import silence_third_party
from finetune.outputs import release_claims, write_error
from finetune.stopping import Interrupted, Terminated, raise_if_terminated, sigterm_unwinds


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    tolerate_narrow_encodings()
    try:
        run_app(argv)
    finally:
        release_claims()  # the outputs this command claimed are written or abandoned


def tolerate_narrow_encodings() -> None:
    """Under PYTHONIOENCODING=ascii or a Latin-1 terminal, a character the output encoding
    lacks is written escaped instead of ending the command in a UnicodeEncodeError; text
    read from stdin that is not valid in its encoding reaches the checks that name it."""
    streams = ((sys.stdout, "backslashreplace"), (sys.stderr, "backslashreplace"))
    for stream, errors in (*streams, (sys.stdin, "surrogateescape")):
        # A closed or replaced stream (pytest's capture, a detached stdin) is left alone.
        with contextlib.suppress(AttributeError, ValueError, OSError, io.UnsupportedOperation):
            stream.reconfigure(errors=errors)


def run_app(argv: list[str] | None) -> None:
    silence_third_party()
    try:
        with sigterm_unwinds():
            code = app(args=argv, standalone_mode=False, prog_name="finetune")
            raise_if_terminated()  # a SIGTERM whose exception Python swallowed
        # Without standalone mode, click returns a typer.Exit's code instead of exiting.
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as err:
        if os.environ.get("FINETUNE_DEBUG"):
            raise
        fail(str(err), err.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Terminated as err:
        console.print("stopped by SIGTERM")
        sys.exit(err.exit_code)
    except Interrupted as err:  # a second Ctrl-C or SIGTERM while a run was saving and stopping
        console.print(f"stopped at once by a second {err}; every file written is complete")
        sys.exit(err.exit_code)
    except OSError as err:  # a write failing outside the places that name their path
        error = write_error(err, err.filename or "output")
        if error is None:
            raise
        fail(str(error), error.exit_code)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except typer.TyperException as err:  # typer's own (vendored) click errors
        if type(err).__name__ == "NoArgsIsHelpError":
            err.show()  # the help text
        else:  # a usage error: one line, like every other user error
            ctx = getattr(err, "ctx", None)
            hint = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
            fail(f"{choice_error(err) or err.format_message().rstrip('.')}{hint}", err.exit_code)
        sys.exit(err.exit_code)


def choice_error(err: Exception) -> str | None:
    """A refused Enum choice in the words of every other choice check, with the closest
    name: "--format must be one of adapter, merged, gguf, gguf-adapter (got 'gguf_adapter')
    (did you mean 'gguf-adapter'?)". None for other usage errors."""
    found = re.search(r"'(.*)' is not one of (.+)\.$", str(getattr(err, "message", "")))
    opts = getattr(getattr(err, "param", None), "opts", None)
    if found is None or not opts:
        return None
    given, choices = found.group(1), re.findall(r"'([^']*)'", found.group(2))
    return f"{opts[0]} must be one of {', '.join(choices)} (got {given!r}){closest(given, choices)}"
