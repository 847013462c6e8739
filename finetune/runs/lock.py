"""One writer per run directory: an exclusive `flock` on `<run_dir>/.lock`."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.outputs import writing

# Held by the one process writing the run; not part of the layout, so a fresh run never
# deletes it from under a live one.
LOCK_NAME = ".lock"


class RunLock:
    """One writer per run directory: an exclusive `flock` on `<run_dir>/.lock`.

    The kernel drops a flock when its process dies, however it dies, so a lock file left by a
    killed run is stale by construction and simply taken over. The file holds who owns it, so
    a refusal can name the process. Readers (generate, eval, merge, export) never take it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self.fd: int | None = None
        self.made_dir = False

    def clear_stale(self) -> None:
        """Refuse if a living process holds the lock; delete a lock file nobody holds (what a
        killed run leaves), so that it does not make the folder look foreign.

        Raises:
            UserError: another process holds the lock.
        """
        if not self.path.is_file() or self.path.is_symlink():
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # gone meanwhile, or unreadable: acquire() decides
        try:
            if not try_flock(fd):
                raise self.held_error()
            if same_file(fd, self.path):  # holding it, so no one else can be using it
                self.path.unlink()
        finally:
            os.close(fd)  # drops the probe's lock

    def acquire(self) -> None:
        """Create the folder if needed and hold its lock until `release`.

        Raises:
            UserError: another process holds it.
        """
        self.refuse_foreign()
        with writing(self.path):
            if not self.run_dir.exists():
                self.run_dir.mkdir(parents=True)
                self.made_dir = True
            while not self.hold():
                pass
            os.ftruncate(self.fd, 0)
            os.write(self.fd, json.dumps(lock_owner()).encode())

    def refuse_foreign(self) -> None:
        """A link, FIFO or other special file at `.lock` is none finetune made: a link to a
        file would have it overwritten with the lock's owner, a link to nowhere or a FIFO
        ended in a traceback.

        Raises:
            UserError: `.lock` is not a plain file (a folder is refused by `writing`).
        """
        path = self.path
        if path.is_symlink():
            kind = f"a link to {os.readlink(path)}"
        elif path.exists() and not path.is_file() and not path.is_dir():
            kind = "not a regular file (a FIFO, socket or device)"
        else:
            return
        raise UserError(
            f"{path} is {kind}, where finetune keeps the run's lock file; move it away, then "
            "run the command again"
        )

    def hold(self) -> bool:
        """One try at the lock. False when the holder before us deleted the file between our
        open and our flock: we would hold a lock on a name nobody sees, so try again.

        Raises:
            UserError: another process holds it.
        """
        # O_NOFOLLOW: a link put there after refuse_foreign still writes nothing through it
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        if not try_flock(fd):
            os.close(fd)
            raise self.held_error()
        if not same_file(fd, self.path):
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        """Delete the lock file, then drop the lock (in that order: see `acquire`)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        if self.made_dir and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()  # the run failed before writing anything: leave no trace

    def held_error(self) -> UserError:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            owner = {}
        pid = owner.get("pid", "?")
        who = f"process {pid} on {owner.get('host', '?')}, started {owner.get('started', '?')}"
        return UserError(
            f"output.dir: {self.run_dir} is in use by another finetune run ({who}); wait for "
            f"it to end, stop it (kill -INT {pid} saves a checkpoint), or choose another folder"
        )


def same_file(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the file at `path` (not deleted or replaced)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def try_flock(fd: int) -> bool:
    import fcntl  # POSIX only: imported here so that the package imports everywhere

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_owner() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": sys.argv,
    }
