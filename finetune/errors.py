"""The one exception type a user can cause.

Anything raised as `UserError` is printed by the CLI as a single line and ends the
process with exit code 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: one line that names the file, row or field and the fix."""

    exit_code = 2


def closest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return ` (did you mean 'x'?)` for the closest choice, or an empty string."""
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
