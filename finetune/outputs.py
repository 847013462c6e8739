"""May this path be written? The one place that decides, for every command that writes.

train (`output.dir`), merge, export, combine (`--out`) and `estimate --plot` all call
`claim_output` before any work starts. The rules, in the order they are checked:

1. The path is not empty, not a symbolic link, and not the root folder, a home folder,
   the current directory or a folder that contains one of them.
2. It neither is nor holds one of the command's own inputs (the recipe and its data, the
   source run or adapter, the base model folder), and it does not lie inside a source run
   or adapter folder (writing there would change the source).
3. A path that exists is replaced only with `force` (`--force`, `output.overwrite=true`),
   only when it is of the kind the command writes (a file for a file, a folder for a
   folder), and a folder only when it holds what the command itself makes (`replaceable`).
   An empty folder counts as new.
4. A file's folder must exist; a folder's missing parents are created when it is written.

A refusal is one `UserError` line naming the option, the path and the fix.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal

from finetune.errors import UserError
from finetune.inputs import check_path_text, path_kind, shown_path
from finetune.stopping import raise_if_terminated

Kind = Literal["file", "folder"]


def claim_output(
    path: str | Path,
    *,
    option: str,
    kind: Kind,
    force: bool = False,
    inputs: Iterable[str | Path | None] = (),
    sealed: Iterable[str | Path | None] = (),
    replaceable: Callable[[Path], bool] | None = None,
    what_it_holds: str = "what this command writes",
    force_hint: str = "pass --force to replace it",
    exists_words: str = "already exists",
) -> Path:
    """Check that `path` may be written by a command and return it as given.

    Args:
        path: the output path the user gave.
        option: how the user named it (`--out`, `output.dir`, `--plot`), for messages.
        kind: "file" or "folder": what the command writes there.
        force: the user asked to replace an existing output at exactly this path.
        inputs: the command's inputs (files or folders; None entries are skipped): the
            output may not be one of them or hold one.
        sealed: input folders nothing may be written into either (a source run or adapter:
            a new file inside would change what it is).
        replaceable: whether an existing non-empty folder (or an existing file) holds what
            this command makes, and so may be replaced with `force`; None: never replaceable
            for folders, any regular file for files.
        what_it_holds: words for a replaceable folder's contents or file, for the refusal.
        force_hint: how this command spells "replace it" (`--force`, `output.overwrite=true`).
        exists_words: how to say that the path exists ("already holds a run").

    Raises:
        UserError: the path may not be written; the message names it and the fix.
    """
    text = str(path)
    if not text.strip():
        raise UserError(f"{option} is empty; give a new file or folder name such as runs/<name>")
    given = check_path_text(text, option).expanduser()
    refuse_undecodable(absolute(given), option)
    where = f"{option}: {text}"
    path_kind(given, option)  # a link loop on the way, a folder that may not be looked in
    if given.is_symlink():
        raise UserError(f"{where} is a symbolic link; give the real path it points to")
    target = absolute(given)
    refuse_protected(target, where)
    sealed = [item for item in sealed if item is not None]
    refuse_inputs(target, where, [*inputs, *sealed], sealed)
    refuse_run_record(target, where)
    if given.exists():
        holds = (what_it_holds, force_hint, exists_words)
        refuse_existing(given, where, kind, force, replaceable, holds)
    refuse_missing_parent(given, where, kind)
    hold_claim(target, where)
    return given


def refuse_undecodable(target: Path, option: str) -> None:
    """Refuse an output path (or a folder on its way) holding bytes that are not UTF-8.

    Reading such a path works (os.fsencode gives the bytes back), but an output is written
    by libraries that take paths as text (tokenizers' save_pretrained failed after a whole
    merge with UnicodeEncodeError) and is recorded in JSON and YAML."""
    text = str(target)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        byte = os.fsencode(text[err.start])[0]
        raise UserError(
            f"{option}: {shown_path(ascii(text))} holds the byte 0x{byte:02x}, which is not "
            "UTF-8 text; outputs are written by libraries that take text paths, so give a "
            "UTF-8 name"
        ) from None


# What only a run leaves beside its recipe.yaml (runs.layout.RUN_MARKERS; runs imports this
# module, not the other way round).
RUN_MARKERS = ("adapter", "checkpoints", "metrics.jsonl", "report.json")


def refuse_run_record(target: Path, where: str) -> None:
    """A run's folder holds its record (recipe, report, plots, metrics, checkpoints): only
    the run itself writes there (`estimate RUN --plot RUN/loss.png --force` replaced the
    run's own plot; a merge into runs/a/merged would become part of run a)."""
    for folder in target.parents:
        is_run = (folder / "recipe.yaml").is_file() and any(
            (folder / name).exists() for name in RUN_MARKERS
        )
        if is_run:
            raise UserError(
                f"{where} lies inside the run directory {folder}, whose files only its run "
                "writes; choose a path outside it"
            )


# ------------------------------------------------------------------ claims

# Output path -> the open lock file this process holds for it, until `release_claims`.
CLAIMS: dict[str, int] = {}


def claim_lock_path(target: Path) -> Path:
    """The lock file for an output path: in the temporary folder, so nothing is left beside
    the output and a folder output's missing parents need not exist yet."""
    import hashlib
    import tempfile

    folder = Path(tempfile.gettempdir()) / f"finetune-claims-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)  # OSError: the caller goes on without a claim
    return folder / f"{hashlib.sha256(os.fsencode(target)).hexdigest()[:32]}.lock"


def hold_claim(target: Path, where: str) -> None:
    """Hold an exclusive flock for the output path until this command ends, so two commands
    started together cannot both write it (the second is refused here, before any work).
    The kernel drops the lock when the process dies, however it dies.

    Raises:
        UserError: another process holds the claim.
    """
    import fcntl

    key = str(target)
    if key in CLAIMS:
        return
    try:
        path = claim_lock_path(target)
    except OSError:  # no writable temporary folder: the checks above still hold
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:  # another command removed the empty folder meanwhile
            path = claim_lock_path(target)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(
                f"{where} is being written by another finetune command (pid {owner}); wait "
                "for it to finish, or choose another path"
            ) from None
        if same_inode(fd, path):  # not a file its last holder unlinked meanwhile
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    CLAIMS[key] = fd


def same_inode(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError:
        return False


def release_claims() -> None:
    """Let go of every output this process claimed (the CLI calls it as a command ends)."""
    for key, fd in list(CLAIMS.items()):
        with suppress(OSError):
            lock = claim_lock_path(Path(key))
            lock.unlink(missing_ok=True)  # while still holding it
            lock.parent.rmdir()  # when empty: nothing left in TMPDIR
        os.close(fd)
        del CLAIMS[key]


def absolute(path: Path) -> Path:
    """`path` made absolute with every symbolic link in it followed, existing or not."""
    return Path(os.path.realpath(path))


def protected_folders() -> list[Path]:
    """Folders no command may replace or write a run over: root, home, the current one."""
    found = [Path(os.path.abspath(os.sep)), absolute(Path.cwd())]
    for home in (os.environ.get("HOME"), os.path.expanduser("~")):
        if home and home != "~":
            found.append(absolute(Path(home)))
    return found


def refuse_protected(target: Path, where: str) -> None:
    for folder in protected_folders():
        if target == folder or target in folder.parents:
            name = "the root folder" if folder.parent == folder else describe_folder(folder)
            holds = "is" if target == folder else "contains"
            raise UserError(
                f"{where} {holds} {name}; give a new folder for the output, such as runs/<name>"
            )


def describe_folder(folder: Path) -> str:
    if folder == absolute(Path.cwd()):
        return f"the current directory ({folder})"
    return f"the home folder ({folder})"


def refuse_inputs(
    target: Path, where: str, inputs: Iterable[str | Path | None], sealed: list[str | Path]
) -> None:
    """Refuse an output that is or holds one of the command's inputs, or lies inside a sealed
    one."""
    sealed_folders = {absolute(Path(item).expanduser()) for item in sealed}
    for item in inputs:
        if item is None or not str(item).strip():
            continue
        source = absolute(Path(item).expanduser())
        if target == source or target in source.parents:
            holds = "is" if target == source else "holds"
            raise UserError(
                f"{where} {holds} this command's input {source}; writing there would "
                "destroy it; choose another path"
            )
        if source in sealed_folders and source in target.parents:
            raise UserError(
                f"{where} lies inside this command's input {source}; writing there would "
                "change the input; choose a path outside it"
            )


def refuse_existing(
    given: Path,
    where: str,
    kind: Kind,
    force: bool,
    replaceable: Callable[[Path], bool] | None,
    words: tuple[str, str, str],
) -> None:
    what_it_holds, force_hint, exists_words = words
    if kind == "file" and given.is_dir():
        raise UserError(f"{where} is a folder; give a file name")
    if kind == "file" and not given.is_file():
        raise UserError(f"{where} is not a regular file (a pipe or device); give a file name")
    if kind == "file" and replaceable is not None and not replaceable(given):
        raise UserError(
            f"{where} exists and is not {what_it_holds}; it is not touched; choose another path"
        )
    if kind == "folder" and not given.is_dir():
        raise UserError(f"{where} is a file, not a folder; give a folder name")
    if kind == "folder" and is_empty_folder(given):
        return
    if kind == "folder" and (replaceable is None or not replaceable(given)):
        raise UserError(
            f"{where} exists and does not hold {what_it_holds}; nothing in it "
            "is touched; choose a new or empty folder"
        )
    if not force:
        raise UserError(f"{where} {exists_words}; {force_hint}, or choose another path")


def is_empty_folder(folder: Path) -> bool:
    return folder.is_dir() and next(folder.iterdir(), None) is None


def refuse_missing_parent(given: Path, where: str, kind: Kind) -> None:
    """A file needs an existing folder; a folder needs no file in the way of its parents."""
    parent = absolute(given).parent
    if kind == "file":
        if not parent.is_dir():
            raise UserError(f"{where}: its folder {parent} does not exist; create it first")
        return
    for ancestor in (parent, *parent.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise UserError(f"{where}: {ancestor} is a file, so no folder can be made there")
            return


# ------------------------------------------------------------------ failed writes

# Why a write can fail for reasons the user can fix, by errno.
WRITE_FAILURES = {
    errno.ENOSPC: "no space left on the disk",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "a folder is where the file goes",
}
AGAIN = "then run the command again"
Then = str | Callable[[], str]  # how to carry on after a failed write, or what works it out
FIXES = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space",
    errno.EFBIG: "raise the limit (ulimit -f unlimited)",
    errno.EROFS: "write somewhere writable",
    errno.EACCES: "fix the folder's permissions or write somewhere else",
    errno.EPERM: "fix the folder's permissions or write somewhere else",
    errno.EISDIR: "move that folder away",
}


@contextmanager
def writing(path: str | Path, then: Then = AGAIN) -> Iterator[None]:
    """Turn a write that fails for a reason the user can fix (full disk, file size limit,
    read-only or forbidden folder) into one `UserError` line naming `path` and the fix.

    Other failures keep their traceback: they are bugs. `then` says how to carry on (or is
    a function that says it, called only when a write fails).
    """
    try:
        yield
    except Exception as err:
        error = write_error(err, path, then)
        if error is None:
            raise
        raise error from None


def write_error(err: BaseException, path: str | Path, then: Then = AGAIN) -> UserError | None:
    """The one-line `UserError` for a write that failed for a fixable reason, else None."""
    if isinstance(err, UserError) or not isinstance(err, Exception):
        return None
    code = write_errno(err, Path(path))
    if code is None:
        return None
    how = then() if callable(then) else then
    return UserError(f"{path}: cannot write, {WRITE_FAILURES[code]}; {FIXES[code]}, {how}")


def write_errno(err: BaseException, path: Path) -> int | None:
    """The errno behind a failed write, from the exception or, where the library hides it
    (torch.save reports only "unexpected pos", numpy a byte count), from the process's
    limits and the disk."""
    for link in (err, err.__cause__, err.__context__):
        if isinstance(link, OSError) and link.errno in WRITE_FAILURES:
            return link.errno
    text = str(err)
    found = re.search(r"os error (\d+)", text)
    if found and int(found.group(1)) in WRITE_FAILURES:
        return int(found.group(1))
    for code in WRITE_FAILURES:
        if os.strerror(code) in text:
            return code
    # torch's zip writer ("inline_container") and numpy's tofile ("N requested and M
    # written", under gguf's writer) drop the errno of a short write: find out why.
    if "inline_container" in text or re.search(r"\d+ requested and \d+ written", text):
        return probable_write_errno(path)
    return None


def probable_write_errno(path: Path) -> int | None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return errno.EFBIG
    folder = next((p for p in (path, *path.parents) if p.is_dir()), Path("."))
    stats = os.statvfs(folder)
    if stats.f_bavail * stats.f_frsize < 64 * 2**20:
        return errno.ENOSPC
    if not os.access(folder, os.W_OK):
        return errno.EACCES
    return None


def write_file_atomically(path: Path, write: Callable[[Path], Any], then: str = AGAIN) -> None:
    """Call `write(tmp_file)` and rename the file to `path`: a reader, or a kill, never sees
    half a file, and a failed write leaves no temporary file (see `write_atomically`)."""
    # keeps the suffix: savefig reads it; short: a 250-byte name plus ".tmp" is too long
    tmp = path.with_name(f".{short_name(path.name)}.tmp{path.suffix[:16]}")
    try:
        write(tmp)
        raise_if_terminated()  # a stopped command publishes nothing
        os.replace(tmp, path)
    except BaseException as err:
        error = write_error(err, path, then)
        tmp.unlink(missing_ok=True)
        if error is not None:
            raise error from None
        raise


def short_name(name: str, limit: int = 40) -> str:
    """The start of a file name for a temporary beside it: a legal 255-byte name plus a
    prefix and a random part would be too long for the filesystem."""
    return name[:limit]


# A temporary output: `.` + the output's short name + `.` + mkdtemp's 8 random characters
# + this suffix, so the next command for the same output knows a killed one's leftovers.
PARTIAL = ".partial"


def temporary_prefix(target: Path) -> str:
    return f".{short_name(target.name)}."


def previous_version(target: Path) -> Path:
    """Where the version being replaced waits during the two renames that replace it."""
    return target.with_name(f"{temporary_prefix(target)}previous{PARTIAL}")


def remove_stale_partials(target: Path) -> None:
    """Delete what a killed (SIGKILL) write to `target` left: called by the command that
    holds `target`'s claim (or its run's lock), so no live writer owns them. A previous
    version killed between its two renames is put back first."""
    old = previous_version(target)
    if old.exists() and not target.exists():
        os.replace(old, target)
    pattern = re.compile(rf"^{re.escape(temporary_prefix(target))}[A-Za-z0-9_]{{8}}{PARTIAL}")
    parent = target.parent
    if not parent.is_dir():
        return
    import shutil

    for leftover in parent.iterdir():
        if not pattern.match(leftover.name) or leftover.is_symlink():
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
