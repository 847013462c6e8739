"""What kind of thing an input path names, decided before anything opens it.

Opening a FIFO waits for a writer and reading a device never ends, so every loader asks
here first: a recipe, a data file or folder, a model folder and the files in it, a GGUF
file, an adapter folder. One owner for the rule, one wording for the error.
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from finetune.errors import UserError

# Names for the kinds of path that are neither a regular file nor a folder.
SPECIAL_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


# Linux refuses a name component longer than NAME_MAX bytes and a path longer than PATH_MAX
# (ENAMETOOLONG); checked on the text first, so the message says which and no call fails.
NAME_MAX = 255
PATH_MAX = 4096


def shown_path(path: str | Path, limit: int = 120) -> str:
    """A path short enough for a one-line message: its start and end around an ellipsis."""
    text = str(path)
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 :]}"


def check_path_text(path: str | Path, field: str) -> Path:
    """Refuse a path no system call can take: a NUL byte, a name over NAME_MAX bytes, a
    path over PATH_MAX bytes. Every path check in finetune starts here; returns the Path.

    Raises:
        UserError: one line naming the option, the path (shortened) and the limit.
    """
    text = str(path)
    if "\x00" in text:
        raise UserError(f"{field}: {shown_path(ascii(text))} holds a NUL byte; fix the path")
    try:
        encoded = os.fsencode(text)  # bytes that were not UTF-8 in argv come back as they were
    except UnicodeEncodeError:
        raise UserError(
            f"{field}: {shown_path(ascii(text))} holds a lone surrogate, which no file name "
            "can hold; fix the path"
        ) from None
    longest = max((len(part) for part in encoded.split(b"/")), default=0)
    if longest > NAME_MAX:
        raise UserError(
            f"{field}: {shown_path(text)} has a name of {longest} bytes; file systems allow "
            f"{NAME_MAX}, so shorten it"
        )
    if len(encoded) >= PATH_MAX:
        raise UserError(
            f"{field}: {shown_path(text)} is {len(encoded)} bytes long; paths are limited to "
            f"{PATH_MAX - 1}, so give a shorter one"
        )
    return Path(text)


LINK_TROUBLE = {
    errno.ELOOP: "is a symbolic link loop (or a chain of links too long to follow)",
    errno.EACCES: "cannot be opened: permission denied",
    errno.ENAMETOOLONG: "is too long for the file system",
}


def path_kind(path: Path, field: str) -> str:
    """The kind of `path` after following links: "missing", "file", "folder" or a special kind.
    A dangling link is "missing"; its message says where it points.

    Raises:
        UserError: the path cannot even be looked at (too long, no permission, a link loop).
    """
    check_path_text(path, field)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:  # a file used as a folder
        return "missing"
    except OSError as err:
        trouble = LINK_TROUBLE.get(err.errno, f"cannot be looked at ({err.strerror})")
        raise UserError(f"{field}: {shown_path(path)} {trouble}; check the path") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return SPECIAL_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def dangling(path: Path) -> str:
    """ ", a link to X, which does not exist" for a dangling link, else nothing."""
    try:
        return f", a link to {os.readlink(path)}, which does not exist" if path.is_symlink() else ""
    except OSError:
        return ""


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


def refuse_special_inside(folder: Path, field: str, want: str, limit: int = 10_000) -> None:
    """The files of an input folder (a saved dataset, a model, an adapter), looked at before
    a library opens them: a FIFO among them would make it wait forever, a link loop end in
    a traceback.

    Raises:
        UserError: a special file or an unreadable link inside, or more than `limit` entries.
    """
    seen = 0
    for root, folders, files in os.walk(folder):
        for name in [*files, *folders]:
            seen += 1
            if seen > limit:
                raise UserError(f"{field}: {folder} holds more than {limit:,} files; give {want}")
            refuse_special(Path(root) / name, field, want)


def require_file(path: Path, field: str, want: str) -> None:
    """Refuse anything but an existing regular file (or a link to one).

    Raises:
        UserError: missing, a folder, a FIFO, a device or a socket.
    """
    kind = refuse_special(path, field, want)
    if kind == "missing":
        raise UserError(f"{field}: {path} not found{dangling(path)}; give {want}")
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


# ------------------------------------------------------------------------------ text

# Characters no text may hold: lone surrogates (a JSON escape such as "\ud800" that encodes
# nothing: no tokenizer, file or terminal takes it), NUL, and the C0 and C1 controls other
# than tab, newline, carriage return, vertical tab and form feed (ESC runs terminal
# sequences when a row is shown; C1 controls mostly mean text decoded with the wrong codec).
# Everything else is legal data: combining marks, right-to-left scripts and their bidi
# marks, emoji, private-use characters.
BAD_TEXT = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
# A name (a column, a recipe key) must also display as what it is: no bidi overrides or
# isolates, zero-width characters or byte order marks, which make one name look like another.
BAD_NAME = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]"
)


def _char_kind(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # how Python's argv and os.fsdecode carry a non-UTF-8 byte
        return (
            f"the byte 0x{code - 0xDC00:02x}, which is not UTF-8 (from the command line), "
            "or a lone surrogate"
        )
    if 0xD800 <= code <= 0xDFFF:
        return "a lone surrogate (half of a UTF-16 pair, not a character)"
    if code == 0:
        return "a NUL character"
    if code < 0x20 or 0x7F <= code <= 0x9F:
        return "a control character"
    return "an invisible formatting character (bidi control, zero-width or BOM)"


def text_problem(text: str, *, name: bool = False) -> str | None:
    """What makes `text` unusable as data (or, with `name`, as a name), or None when it is fine.

    The answer names the character, its code point and its position (from 1), e.g.
    "holds a NUL character (U+0000) at character 3".
    """
    found = (BAD_NAME if name else BAD_TEXT).search(text)
    if found is None:
        return None
    char = found.group()
    return f"holds {_char_kind(char)} (U+{ord(char):04X}) at character {found.start() + 1}"


def require_clean_text(text: str, where: str, *, name: bool = False) -> str:
    """Return `text`, or refuse it in one line: `where` names the file, row, field or option.

    Raises:
        UserError: the text holds a lone surrogate, NUL, a control or (names) a bidi control.
    """
    problem = text_problem(text, name=name)
    if problem is not None:
        raise UserError(f"{where} {problem}; remove it or replace it with the intended text")
    return text


def check_tree_text(value: Any, where: str, *, keys: bool = True) -> None:
    """Every string in a JSON-like value (dict keys as names, unless `keys` is false, and
    values as text), recursively.

    Raises:
        UserError: the first bad string, `where` extended with its key or index.
    """
    if isinstance(value, str):
        require_clean_text(value, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            if keys and isinstance(key, str):
                require_clean_text(key, f"{where}: the key {_shown(key)}", name=True)
            label = f"{where}.{key}" if isinstance(key, str) else where
            check_tree_text(item, label, keys=keys)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_tree_text(item, f"{where}[{index + 1}]", keys=keys)


def _shown(text: str) -> str:
    """A name as the message can print it: escapes instead of the characters it refuses."""
    return ascii(text) if text_problem(text, name=True) else repr(text)
