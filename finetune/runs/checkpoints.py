"""Checkpoints: everything `--resume` needs to continue a run exactly, written and read here.

```
checkpoints/step-N/
  adapter/                     the adapter, peft's format
  prefix_encoder.safetensors   prefix tuning's MLP (prefix_projection), which peft leaves out
  optimizer.pt  scheduler.pt   their state dicts
  rng_torch.pt  rng.json       torch's, Python's and numpy's random states
  state.json                   where the loop is, and the recipe it started with (`RunState`)
```
A checkpoint is written under a temporary name and renamed into place, so one that is
listed is complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.errors import UserError
from finetune.inputs import split_path
from finetune.models import first_line
from finetune.recipe import Recipe
from finetune.runs.layout import (
    ADAPTER,
    CHECKPOINT_PREFIX,
    CHECKPOINTS,
    adapter_path,
    has_adapter,
    read_recipe_fields,
    write_atomically,
)

# Beside a checkpoint's adapter: the prefix MLP, which peft's saved adapter leaves out.
PROJECTION_FILE = "prefix_encoder.safetensors"
STATE_FILE = "state.json"


@dataclass
class RunState:
    """Where the loop is; saved in every checkpoint so a resumed run continues exactly."""

    step: int = 0
    micro_step: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    elapsed: float = 0.0
    # Of `elapsed`, the seconds torch.compile spent compiling (train.compile).
    compile_s: float = 0.0
    skipped_steps: int = 0
    # The widest micro-batch any process trained on, with an attention mask ("masked":
    # padded or packed) and without ("unmasked"): [padded length, logits positions]. The
    # report's memory estimate dry-runs these shapes.
    widest: dict[str, list[int]] = field(default_factory=dict)
    # sha256 of the training data's bytes (`data_fingerprint`): the data position a checkpoint
    # holds means something only for this content. Empty in checkpoints of older versions.
    data_sha256: str = ""
    # The resolved recipe the run was started with, kept with the checkpoint: run_dir's
    # recipe.yaml can be edited by hand, and --resume checks against what was trained.
    # Empty in checkpoints of older versions (recipe.yaml is checked then).
    recipe: dict[str, Any] = field(default_factory=dict)


@dataclass
class SavedCheckpoint:
    """A checkpoint read into memory, so a broken one is found before anything is written."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    torch_rng: torch.Tensor
    rng: dict[str, Any]
    state: RunState
    projection: dict[str, torch.Tensor] | None = None  # the prefix MLP (prefix_projection)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(folder: Path) -> int:
    try:
        return int(folder.name.removeprefix(CHECKPOINT_PREFIX))
    except ValueError:
        return -1


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, so complete by construction), oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) >= 0]
    return sorted((p for p in found if (p / STATE_FILE).is_file()), key=checkpoint_step)


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


# ------------------------------------------------------------------------- writing


def save_adapter(run_dir: Path, model: Any, weights: dict[str, torch.Tensor] | None = None) -> None:
    """The run's final adapter/ (peft's `save_pretrained` of `model`).

    `weights`: the adapter's tensors by state-dict name, when the model's own are not whole
    (a sharded run's, gathered by every process); None reads them from the model.
    """
    write_atomically(
        adapter_path(run_dir), lambda folder: save_pretrained(model, folder, weights),
        resume_hint(run_dir),
    )


def save_pretrained(model: Any, folder: Path, weights: dict[str, torch.Tensor] | None) -> None:
    if weights is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, state_dict=weights)


def save_checkpoint(
    run_dir: Path,
    state: RunState,
    *,
    model: Any,
    projection: dict[str, torch.Tensor] | None,
    optimizer: dict[str, Any],
    scheduler: Any,
    keep_last: int | None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoints/step-N for `state.step`, then drop all but the `keep_last` newest.

    `projection`: the prefix MLP's weights (adapters.projection_state), or None. `optimizer`:
    its state dict, whole (a sharded run gathers it first). `weights`: as for save_adapter.
    """
    target = checkpoint_path(run_dir, state.step)
    parts = (state, model, weights, projection, optimizer, scheduler)
    write_atomically(target, lambda folder: write_checkpoint(folder, *parts), resume_hint(run_dir))
    prune_checkpoints(run_dir, keep_last)
    return target


def write_checkpoint(
    folder: Path,
    state: RunState,
    model: Any,
    weights: dict[str, torch.Tensor] | None,
    projection: dict[str, torch.Tensor] | None,
    optimizer: dict[str, Any],
    scheduler: Any,
) -> None:
    save_pretrained(model, folder / ADAPTER, weights)
    if projection is not None:
        from safetensors.torch import save_file

        save_file(projection, folder / PROJECTION_FILE)
    torch.save(optimizer, folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state()}, folder / "rng_torch.pt")
    np_state = np.random.get_state()
    rng = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    (folder / "rng.json").write_text(json.dumps(rng))
    (folder / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))


# ------------------------------------------------------------------------- reading


def read_checkpoint(checkpoint: Path) -> SavedCheckpoint:
    """Read every part of a checkpoint (tensors only: `weights_only=True`, no pickled code).

    Raises:
        UserError: a part is missing or unreadable.
    """
    from safetensors.torch import load_file

    try:
        saved = SavedCheckpoint(
            path=checkpoint,
            weights=load_file(checkpoint / ADAPTER / "adapter_model.safetensors"),
            optimizer=torch.load(checkpoint / "optimizer.pt", weights_only=True),
            scheduler=torch.load(checkpoint / "scheduler.pt", weights_only=True),
            torch_rng=torch.load(checkpoint / "rng_torch.pt", weights_only=True)["torch"],
            rng=json.loads((checkpoint / "rng.json").read_text()),
            state=RunState(**json.loads((checkpoint / STATE_FILE).read_text())),
        )
        if (checkpoint / PROJECTION_FILE).exists():
            saved.projection = load_file(checkpoint / PROJECTION_FILE)
    except Exception as err:  # any unreadable part means this checkpoint is unusable
        raise UserError(
            f"{checkpoint}: corrupt checkpoint ({first_line(err)[:120]}); delete it "
            "to resume from an earlier one"
        ) from None
    return saved


def checkpoint_to_resume(recipe: Recipe, run_dir: Path) -> SavedCheckpoint | None:
    """For --resume: check that `recipe` may continue the run in `run_dir`, then read its
    newest checkpoint (None when it has none yet). Nothing is written before this returns.

    Raises:
        UserError: the recipe or the training data changes what the checkpoints mean, the
            run's trained adapter has no checkpoint to go on from (resuming would train it
            again from step 0), or the checkpoint is corrupt. (`refuse_finished` checks, once
            the data is read, that some step is left to train.)
    """
    latest = latest_checkpoint(run_dir)
    if latest is None:
        check_resumable(recipe, run_dir)
        refuse_retraining(run_dir)
        return None
    saved = read_checkpoint(latest)
    check_resumable(recipe, run_dir, saved.state.recipe)
    check_same_data(recipe, saved)
    return saved


def refuse_retraining(run_dir: Path) -> None:
    """A run with a trained adapter and no checkpoint (checkpoints/ deleted, or save_every 0)
    cannot be continued: --resume would start from step 0 and replace that adapter."""
    if has_adapter(run_dir):
        raise UserError(
            f"--resume: {run_dir} holds a trained {ADAPTER}/ but no checkpoint to continue "
            f"from ({CHECKPOINTS}/ is empty or gone), and resuming would train it again from "
            f"step 0; to train it further, start a new run from it: adapter.init_from="
            f"{adapter_path(run_dir)} output.dir=<a new folder>"
        )


def data_fingerprint(path: Path) -> str:
    """sha256 of a data file's bytes, or of every file in a data folder (names and bytes, in
    name order); empty when the path does not exist (the data checks say so later)."""
    import hashlib

    path, split = split_path(path)  # a saved DatasetDict's folder: every split's files
    digest = hashlib.sha256((split or "").encode())
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if not file.is_file():
            return ""
        digest.update(os.fsencode(file.relative_to(path)) if path.is_dir() else b"")
        with file.open("rb") as source:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_same_data(recipe: Recipe, saved: SavedCheckpoint) -> None:
    """Refuse a checkpoint whose data position is in other data than data.path holds now."""
    if not saved.state.data_sha256:
        return  # a checkpoint of an older version: its recipe fields were checked
    if data_fingerprint(Path(recipe.data.path)) != saved.state.data_sha256:
        raise UserError(
            f"--resume: data.path {recipe.data.path} is not the data {saved.path.name} was "
            "trained on (its content changed), so the saved data position means nothing in "
            "it; put the original data back, or start a new run (adapter.init_from="
            f"{saved.path / ADAPTER} can start from this checkpoint's adapter)"
        )


def refuse_finished(run_dir: Path, saved: SavedCheckpoint, planned_steps: int) -> None:
    """A checkpoint already at the last step the recipe asks for leaves nothing to train:
    resuming would only rewrite the run's record (its report, metrics and memory)."""
    if saved.state.step >= planned_steps:
        raise UserError(
            f"--resume: the run in {run_dir} is at step {saved.state.step} of "
            f"{planned_steps}; nothing to continue. To train it longer, raise train.max_steps "
            "(or train.epochs) and --resume; to train again, start a new run"
        )


def restore_rng(saved: SavedCheckpoint) -> None:
    """Put torch's, Python's and numpy's random states back as the checkpoint saved them."""
    torch.set_rng_state(saved.torch_rng)
    random.setstate(_tupled(saved.rng["python"]))
    kind, keys, *rest = saved.rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


# What a resumed run may change: its length, how often it evaluates, saves, logs and where it
# reports, its time budget, memory-only choices and what to do on a NaN (a run stopped by one
# may go on skipping it). Every other field of these sections must match, so a field added
# later is checked by default: a new objective, beta or clipping norm would otherwise be
# recorded in recipe.yaml and mixed into a run whose first half used the old value.
RESUME_MAY_CHANGE = {
    "model": (),
    "adapter": (),
    "data": (),
    "train": (
        "max_steps",
        "epochs",
        "eval_every",
        "save_every",
        "log_every",
        "keep_last",
        "report_to",
        "max_time",
        "gradient_checkpointing",  # the same gradients, less memory
        "compile",  # the same step, compiled or not
        "reference",  # the same reference log-probabilities, computed once or every step
        "on_nonfinite",
    ),
}


def check_resumable(recipe: Recipe, run_dir: Path, trained: dict[str, Any] | None = None) -> None:
    """Refuse to resume a run with a recipe that changes what its checkpoints mean.

    `trained`: the recipe the checkpoint keeps (RunState.recipe); run_dir's recipe.yaml when
    there is none (no checkpoint, or one of an older version)."""
    before = trained or read_recipe_fields(run_dir)
    if before is None:
        return  # no readable record of the old recipe: the checkpoint itself is checked
    now = recipe.model_dump(mode="json")
    for section, free in RESUME_MAY_CHANGE.items():
        old_section = before.get(section) or {}
        for key in now[section]:
            if key in free or key not in old_section or old_section[key] == now[section][key]:
                continue
            raise UserError(
                f"--resume: {section}.{key} is {now[section][key]!r} but the run in "
                f"{run_dir} was made with {old_section[key]!r}; resume with the same "
                "value, or start a new run (adapter.init_from can start from its adapter)"
            )


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value
