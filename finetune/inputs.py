"""What kind of thing an input path names, decided before anything opens it.

Opening a FIFO waits for a writer and reading a device never ends, so every loader asks
here first: a recipe, a data file or folder, a model folder and the files in it, a GGUF
file, an adapter folder. One owner for the rule, one wording for the error.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

from finetune.errors import UserError

# Names for the kinds of path that are neither a regular file nor a folder.
SPECIAL_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def path_kind(path: Path, field: str) -> str:
    """The kind of `path` after following links: "missing", "file", "folder" or a special kind.

    Raises:
        UserError: the path cannot even be looked at (too long, no permission, a link loop).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except (NotADirectoryError, ValueError):  # a file used as a folder; an embedded NUL
        return "missing"
    except OSError as err:
        raise UserError(
            f"{field}: {path} cannot be read ({err.strerror}); check the path"
        ) from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return SPECIAL_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def refuse_special(path: Path, field: str, want: str) -> str:
    """Return the kind of `path`, refusing FIFOs, devices and sockets in one line.

    Args:
        path: the path to look at.
        field: the recipe field or option that named it, for the message.
        want: what should be there instead, e.g. "a data file".

    Raises:
        UserError: the path is a FIFO, device, socket or cannot be looked at.
    """
    kind = path_kind(path, field)
    if kind not in ("missing", "file", "folder"):
        raise UserError(
            f"{field}: {path} is {kind}, not a regular file; reading it could wait forever. "
            f"Give {want}"
        )
    return kind


def require_file(path: Path, field: str, want: str) -> None:
    """Refuse anything but an existing regular file (or a link to one).

    Raises:
        UserError: missing, a folder, a FIFO, a device or a socket.
    """
    kind = refuse_special(path, field, want)
    if kind == "missing":
        raise UserError(f"{field}: {path} not found; give {want}")
    if kind == "folder":
        raise UserError(f"{field}: {path} is a folder; give {want}")


def split_path(text: str | Path) -> tuple[Path, str | None]:
    """A data path and the split it names: `saved:test` is the `test` split of the
    `save_to_disk` folder `saved`. A path that exists as typed is that path (a colon is a
    legal file name character)."""
    path = Path(text)
    head, colon, split = str(text).rpartition(":")
    if not colon or not split or "/" in split or os.path.exists(path):
        return path, None
    return (Path(head), split) if os.path.isdir(head) else (path, None)


# torch.manual_seed refuses 2**64 and above; numpy is seeded with the seed modulo 2**32.
MAX_SEED = 2**63 - 1


def check_number(
    name: str,
    value: float,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> float:
    """Refuse a command-line number that is nan, infinite or out of bounds; return it.

    The recipe's numbers get the same rule from its schema (finite floats, bounded fields).

    Raises:
        UserError: one line naming the option, the value and the allowed range.
    """
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number (got {value})")
    limits = [
        (gt, lambda v, b: v > b, "above"),
        (ge, lambda v, b: v >= b, "at least"),
        (lt, lambda v, b: v < b, "below"),
        (le, lambda v, b: v <= b, "at most"),
    ]
    for bound, holds, words in limits:
        if bound is not None and not holds(value, bound):
            raise UserError(f"{name} must be {words} {bound:g} (got {value:g})")
    return value


def parse_size(text: str, name: str) -> int:
    """A size such as 2GB or 500MB, as transformers' save_pretrained reads it, in bytes.

    Parsed before any work starts, so a typo fails in a second, not after a long merge.

    Raises:
        UserError: not an integer with a unit (KB, MB, GB, KiB, MiB, GiB), or not positive.
    """
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text.strip())
    except (ValueError, TypeError):
        size = None
    if not isinstance(size, int) or size <= 0:
        raise UserError(f"{name} {text!r}: give a positive size such as 500MB or 2GB")
    return size


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str | float | int) -> float | None:
    """Seconds in a duration such as `45m`, `2h`, `1.5h`, `90s` or a bare number of seconds;
    None when `text` is not a positive, finite duration."""
    raw = str(text).strip().lower()
    unit = raw[-1:] if raw[-1:] in DURATION_UNITS else "s"
    number = raw[:-1] if raw[-1:] in DURATION_UNITS else raw
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except ValueError:
        return None
    return seconds if 0 < seconds < float("inf") else None
