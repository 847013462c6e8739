"""The run directory: refusing to clobber, atomic writes, checkpoints, metrics.

```
runs/<name>/
  recipe.yaml  adapter/  checkpoints/step-N/  metrics.jsonl  tb/  (wandb/  mlruns/)
  report.md  report.json  loss.png  memory.png
```
Every folder and report is written under a temporary name and renamed into place, so a
kill during a write leaves the previous version intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.outputs import (
    AGAIN,
    claim_output,
    write_error,
    write_file_atomically,
    writing,
)

# Every entry a run directory holds. A fresh run over an old one (output.overwrite) removes
# these and nothing else: a file the user put beside them is never finetune's to delete.
RUN_LAYOUT = (
    "recipe.yaml",
    "adapter",
    "checkpoints",
    "metrics.jsonl",
    "tb",
    "wandb",
    "mlruns",
    "report.md",
    "report.json",
    "loss.png",
    "memory.png",
)
# What only a started run leaves beside its recipe.yaml (a user's folder may hold a recipe).
RUN_MARKERS = ("adapter", "checkpoints", "metrics.jsonl", "report.json")
# Held by the one process writing the run (see RunLock); not part of the layout, so a fresh
# run never deletes it from under a live one.
LOCK_NAME = ".lock"


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` is a finetune run: its resolved recipe and something a run writes."""
    return (
        run_dir.is_dir()
        and (run_dir / "recipe.yaml").is_file()
        and any((run_dir / m).exists() for m in RUN_MARKERS)
    )


def claim_run_dir(
    run_dir: Path, *, overwrite: bool, resume: bool, inputs: list, sealed: list
) -> RunLock:
    """Check that a run may be written to `run_dir` (see `finetune.outputs`), before any work,
    and take the folder's lock, which the caller releases. Called by the process that writes
    the run (the main one under data parallelism).

    A fresh run goes into a new or empty folder, or replaces a run with output.overwrite;
    --resume continues the run already there. Neither while another process trains there.

    Raises:
        UserError: the folder may not be written, another process holds its lock, or
            --resume finds no run there.
    """
    run_lock = RunLock(run_dir)
    run_lock.clear_stale()
    check_run_dir(run_dir, overwrite=overwrite, resume=resume, inputs=inputs, sealed=sealed)
    run_lock.acquire()
    return run_lock


def check_run_dir(
    run_dir: Path, *, overwrite: bool, resume: bool, inputs: list, sealed: list
) -> None:
    if resume:
        if not holds_run(run_dir):
            raise UserError(f"--resume: {run_dir} holds no run to resume; drop --resume")
        return
    claim_output(
        run_dir,
        option="output.dir",
        kind="folder",
        force=overwrite,
        inputs=inputs,
        sealed=sealed,
        replaceable=holds_run,
        what_it_holds="a finetune run",
        force_hint="pass --resume to continue it, output.overwrite=true to replace it",
        exists_words="already holds a run",
    )


def start_run_dir(run_dir: Path, *, fresh: bool, recipe_yaml: str) -> None:
    """Create the run directory (a fresh run first removes an old run's entries, and only
    those) and write the resolved recipe."""
    if fresh and run_dir.exists():
        for name in RUN_LAYOUT:
            entry = run_dir / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(run_dir / "recipe.yaml", recipe_yaml)


def write_recipe_copy(folder: Path, recipe_yaml: str) -> None:
    """The recipe beside an exported adapter (or combination), as a run directory keeps it."""
    (folder / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")


def write_atomically(target: Path, write: Callable[[Path], Any], then: str = AGAIN) -> None:
    """Call `write(tmp_folder)` and rename the folder to `target`, replacing an older one.

    A failed write leaves no temporary folder and the older `target` untouched; a full disk,
    a file size limit or a read-only folder is one `UserError` line (`then`: how to go on).
    """
    with writing(target, then):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; a run folder is as readable as any other
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as err:
        error = write_error(err, target, then)  # before the cleanup frees the disk again
        shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error from None
        raise


def write_text_atomically(path: Path, text: str, then: str = AGAIN) -> None:
    write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), then)


def remove_partial_writes(run_dir: Path) -> None:
    """Delete what a killed write left behind: the temporary names `write_atomically`,
    `write_text_atomically` and the report give their entries (`.adapter.x1y2`,
    `.step-3.ab12`, `.report.md.tmp`), and nothing else that starts with a dot."""
    for folder, names in ((run_dir, RUN_LAYOUT), (run_dir / "checkpoints", ("step-",))):
        if not folder.is_dir():
            continue
        prefixes = tuple(f".{name}" for name in names)
        for leftover in folder.glob(".*"):
            if not leftover.name.startswith(prefixes) or leftover.is_symlink():
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            elif ".tmp" in leftover.name:
                leftover.unlink(missing_ok=True)


# ------------------------------------------------------------------------------- lock


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
        with writing(self.path):
            if not self.run_dir.exists():
                self.run_dir.mkdir(parents=True)
                self.made_dir = True
            while not self.hold():
                pass
            os.ftruncate(self.fd, 0)
            os.write(self.fd, json.dumps(lock_owner()).encode())

    def hold(self) -> bool:
        """One try at the lock. False when the holder before us deleted the file between our
        open and our flock: we would hold a lock on a name nobody sees, so try again.

        Raises:
            UserError: another process holds it.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_owner() -> dict[str, Any]:
    import socket
    import sys
    import time

    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": sys.argv,
    }


# ------------------------------------------------------------------------ checkpoints


def checkpoint_step(folder: Path) -> int:
    try:
        return int(folder.name.removeprefix("step-"))
    except ValueError:
        return -1


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, so complete by construction), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) >= 0]
    return sorted((p for p in found if (p / "state.json").is_file()), key=checkpoint_step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resume_hint(run_dir: Path) -> str:
    """How to carry on when a write fails mid-run: from the newest checkpoint, which is intact."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return "then start the run again (it has no checkpoint yet)"
    return f"then continue with --resume (the checkpoint {latest.name} is intact)"


def prune_checkpoints(run_dir: Path, keep_last: int | None) -> None:
    if not keep_last:
        return
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- metrics


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a line cut short by a kill mid-write is dropped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_history(run_dir: Path, up_to_step: int) -> list[dict[str, Any]]:
    return [r for r in read_records(run_dir) if "loss" in r and r["step"] <= up_to_step]


def read_evals(run_dir: Path, up_to_step: int) -> list[dict[str, Any]]:
    return [r for r in read_records(run_dir) if "eval_loss" in r and r["step"] <= up_to_step]


class MetricsWriter:
    """metrics.jsonl and the trackers of train.report_to (finetune.tracking); on resume,
    drops records past the checkpoint's step."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        resume_step: int,
        report_to: list[str] | tuple[str, ...] = ("tensorboard",),
        config: dict[str, Any] | None = None,
    ) -> None:
        from finetune import tracking

        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.trackers: list = []
        if not enabled:
            return
        kept = [r for r in read_records(run_dir) if r["step"] <= resume_step]
        write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        flat = tracking.flatten(config or {})
        self.trackers = tracking.start(run_dir, list(report_to), resume_step, flat)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from finetune import tracking

        # The hint is worked out only if the write fails (it lists the checkpoints).
        hint = lambda: resume_hint(self.path.parent)  # noqa: E731
        with writing(self.path, hint), self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        tracking.log(self.trackers, record)

    def close(self) -> None:
        from finetune import tracking

        tracking.finish(self.trackers)
        self.trackers = []
