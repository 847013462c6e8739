"""The run directory's layout: the name of every entry, claiming and starting a run there.

Every folder and report is written under a temporary name and renamed into place, so a
kill during a write leaves the previous version intact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import UserError
from finetune.models import first_line
from finetune.outputs import (
    AGAIN,
    PARTIAL,
    absolute,
    claim_output,
    previous_version,
    remove_stale_partials,
    temporary_prefix,
    write_error,
    write_file_atomically,
    writing,
)
from finetune.recipe import Recipe, validate
from finetune.recipe.load import RecipeLoader
from finetune.runs.lock import RunLock
from finetune.stopping import raise_if_terminated

RECIPE = "recipe.yaml"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step-"  # checkpoints/step-N/
METRICS = "metrics.jsonl"
REFERENCE_LOGPS = "reference_logps.safetensors"  # train.reference cached
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LOSS_PLOT = "loss.png"
MEMORY_PLOT = "memory.png"
# Where each tracker of train.report_to writes (W&B names its folder itself).
TRACKER_FOLDERS = {"tensorboard": "tb", "wandb": "wandb", "mlflow": "mlruns"}

# Every entry a run directory holds. A fresh run over an old one (output.overwrite) removes
# these and nothing else: a file the user put beside them is never finetune's to delete.
RUN_LAYOUT = (
    RECIPE,
    ADAPTER,
    CHECKPOINTS,
    METRICS,
    REFERENCE_LOGPS,
    *TRACKER_FOLDERS.values(),
    REPORT_MD,
    REPORT_JSON,
    LOSS_PLOT,
    MEMORY_PLOT,
)
# The entries that are folders; the rest are files.
RUN_FOLDERS = (ADAPTER, CHECKPOINTS, *TRACKER_FOLDERS.values())
# What only a started run leaves beside its recipe.yaml (a user's folder may hold a recipe).
RUN_MARKERS = (ADAPTER, CHECKPOINTS, METRICS, REPORT_JSON)


def recipe_path(folder: Path) -> Path:
    """The resolved recipe of a run (or beside an exported adapter or a combination)."""
    return folder / RECIPE


def adapter_path(run_dir: Path) -> Path:
    return run_dir / ADAPTER


def metrics_path(run_dir: Path) -> Path:
    return run_dir / METRICS


def tracker_folder(name: str) -> str:
    """The folder inside the run directory where tracker `name` writes."""
    return TRACKER_FOLDERS[name]


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` is a finetune run: its resolved recipe and something a run writes."""
    return (
        run_dir.is_dir()
        and recipe_path(run_dir).is_file()
        and any((run_dir / m).exists() for m in RUN_MARKERS)
    )


def holds_recipe(folder: Path) -> bool:
    """Whether `folder` holds a resolved recipe: a run directory, possibly unfinished."""
    return folder.is_dir() and recipe_path(folder).is_file()


def recipe_beside(adapter_dir: Path) -> Path | None:
    """The folder whose recipe.yaml made the adapter in `adapter_dir`: the adapter folder
    itself (an exported adapter or a combination), the run one folder up, or the run of a
    checkpoint's adapter (run/checkpoints/step-N/adapter), or None."""
    folders = [adapter_dir, adapter_dir.parent]
    step = adapter_dir.parent
    if step.name.startswith(CHECKPOINT_PREFIX) and step.parent.name == CHECKPOINTS:
        folders.append(step.parent.parent)
    for folder in folders:
        if recipe_path(folder).is_file():
            return folder
    return None


def read_recipe(folder: Path) -> Recipe:
    """Reload the resolved recipe.yaml a run (or combine, or export) wrote into `folder`.

    Raises:
        UserError: the file is unreadable or no longer a valid recipe.
    """
    path = recipe_path(folder)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=RecipeLoader) or {}
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as err:
        raise UserError(f"{path}: cannot read the run's recipe ({first_line(err)})") from None
    return validate(raw, source=str(path))


def read_recipe_fields(run_dir: Path) -> dict[str, Any] | None:
    """The run's recipe.yaml as plain data, or None when it is missing or unreadable."""
    try:
        raw = yaml.load(recipe_path(run_dir).read_text(encoding="utf-8"), Loader=RecipeLoader)
    except (OSError, ValueError, RecursionError, yaml.YAMLError):
        return None
    return raw if isinstance(raw, dict) else None


def has_adapter(run_dir: Path) -> bool:
    """The run finished and wrote its adapter/ (peft writes adapter_config.json in it)."""
    return (adapter_path(run_dir) / "adapter_config.json").is_file()


def require_adapter(run_dir: Path) -> Path:
    """The run's adapter/ folder.

    Raises:
        UserError: the run has none yet (it stopped before the end).
    """
    adapter_dir = adapter_path(run_dir)
    if not has_adapter(run_dir):
        example = Path(CHECKPOINTS) / f"{CHECKPOINT_PREFIX}N" / ADAPTER
        raise UserError(
            f"{run_dir}: the run directory has no {ADAPTER}/ (did training finish?); finish it "
            f"with `finetune train {recipe_path(run_dir)} --resume`, or give a checkpoint's "
            f"adapter folder ({example})"
        )
    return adapter_dir


def run_of_recipe(recipe_file: Path) -> Path | None:
    """The run directory whose own recipe.yaml `recipe_file` is, else None."""
    path = Path(recipe_file)
    return path.parent if path.name == RECIPE and holds_run(path.parent) else None


def bind_to_own_run(
    recipe: Recipe, recipe_file: Path, overrides: list[str], resume: bool
) -> Recipe:
    """A run is identified by its folder: given a run's own recipe.yaml, train (and
    --resume) act on that folder, whatever output.dir the copied or moved file still names.

    Raises:
        UserError: no --resume and no output.dir (a fresh run would replace the run the
            recipe belongs to), or --resume with an output.dir naming another folder.
    """
    folder = run_of_recipe(recipe_file)
    if folder is None:
        return recipe
    named = any(item.split("=", 1)[0].strip() == "output.dir" for item in overrides)
    if not named and not resume:
        raise UserError(
            f"{recipe_file} is the recipe of the run in {folder}, which it would replace; "
            f"continue that run with `finetune train {recipe_file} --resume`, or start a new "
            "run from it with output.dir=<a new folder>"
        )
    if not named:
        output = recipe.output.model_copy(update={"dir": str(folder)})
        return recipe.model_copy(update={"output": output})
    if resume and absolute(Path(recipe.output.dir)) != absolute(folder):
        raise UserError(
            f"--resume: {recipe_file} is the recipe of the run in {folder}, but output.dir="
            f"{recipe.output.dir} names another folder; drop output.dir to resume {folder}, "
            "or resume the other run with its own recipe.yaml"
        )
    return recipe


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
        refuse_entries_of_the_wrong_kind(run_dir)
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


def refuse_entries_of_the_wrong_kind(run_dir: Path) -> None:
    """A resumed run writes into its entries: a folder where it keeps a file (or a file, a
    FIFO or a link to nowhere where it keeps a folder) is named before the model loads,
    not found by the first write after minutes of work."""
    for name in RUN_LAYOUT:
        entry = run_dir / name
        if not (entry.exists() or entry.is_symlink()):
            continue
        wanted = "folder" if name in RUN_FOLDERS else "file"
        found = entry.is_dir() if wanted == "folder" else entry.is_file()
        if not found:
            kind = entry_kind(entry)
            raise UserError(
                f"--resume: {entry} is {kind}, where the run keeps its {name} {wanted}; "
                "move it out of the run directory and resume again"
            )


def entry_kind(entry: Path) -> str:
    """What `entry` is, in the words of a refusal: a file where a folder belongs is a file."""
    if entry.is_symlink() and not entry.exists():
        return f"a link to {os.readlink(entry)}, which does not exist"
    if entry.is_dir():
        return "a folder"
    if entry.is_file():
        return "a file"
    return "not a regular file (a FIFO, socket or device)"


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
    write_text_atomically(recipe_path(run_dir), recipe_yaml)


def write_recipe_copy(folder: Path, recipe_yaml: str) -> None:
    """The recipe beside an exported adapter (or combination), as a run directory keeps it."""
    recipe_path(folder).write_text(recipe_yaml, encoding="utf-8")


def write_atomically(target: Path, write: Callable[[Path], Any], then: str = AGAIN) -> None:
    """Call `write(tmp_folder)` and rename the folder to `target`, replacing an older one.

    A failed write leaves no temporary folder and the older `target` untouched; a full disk,
    a file size limit or a read-only folder is one `UserError` line (`then`: how to go on).
    """
    with writing(target, then):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(target)
        prefix = temporary_prefix(target)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=PARTIAL, dir=target.parent))
    try:
        write(tmp)
        raise_if_terminated()  # a stopped command publishes nothing
        tmp.chmod(0o755)  # mkdtemp makes it private; a run folder is as readable as any other
        if target.exists() or target.is_symlink():  # a dangling link is replaced too
            old = previous_version(target)
            discard(old)
            os.replace(target, old)
            os.replace(tmp, target)
            discard(old)
        else:
            os.replace(tmp, target)
    except BaseException as err:
        error = write_error(err, target, then)  # before the cleanup frees the disk again
        shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error from None
        raise


def discard(path: Path) -> None:
    """Remove a replaced version: a folder with what it holds, a link (never what it names)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def write_text_atomically(path: Path, text: str, then: str = AGAIN) -> None:
    write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), then)


def remove_partial_writes(run_dir: Path) -> None:
    """Delete what a killed write left behind: the temporary names `write_atomically`,
    `write_text_atomically` and the report give their entries (`.adapter.x1y2`,
    `.step-3.ab12`, `.report.md.tmp`), and nothing else that starts with a dot."""
    for folder, names in ((run_dir, RUN_LAYOUT), (run_dir / CHECKPOINTS, (CHECKPOINT_PREFIX,))):
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
