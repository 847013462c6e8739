"""Experiment trackers through accelerate's tracker classes: TensorBoard, W&B, MLflow.

`train.report_to` names them. Each receives exactly the records metrics.jsonl gets (the
numbers of each record, at its step), and writes inside the run directory unless the user
pointed it elsewhere: TensorBoard to tb/, W&B to wandb/ (WANDB_MODE=offline needs no
network), MLflow to a file store in mlruns/ (unless MLFLOW_TRACKING_URI names a server).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from finetune.errors import UserError

TRACKERS = ("tensorboard", "wandb", "mlflow")
# The package each tracker imports, and the extra that installs it.
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_available(names: list[str]) -> None:
    """Refuse, before any work, a tracker whose package is missing or that cannot log.

    Raises:
        UserError: names the tracker and the install command or setting that fixes it.
    """
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UserError(
                f"train.report_to: {name} is not installed; pip install 'finetune[{name}]' "
                f"or remove {name} from train.report_to"
            )
    if "wandb" in names and not wandb_can_log():
        raise UserError(
            "train.report_to: wandb has no API key; run `wandb login`, or set "
            "WANDB_MODE=offline to keep the W&B run in the run directory"
        )


def wandb_can_log() -> bool:
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")


def start(
    run_dir: Path,
    names: list[str],
    resume_step: int,
    config: dict[str, Any],
    folders: dict[str, str],
) -> list:
    """Start each named tracker for the run in `run_dir`, writing into `folders[name]` there
    (the run directory's layout names them); call only on the main process."""
    trackers = [make(name, run_dir, resume_step, folders[name]) for name in names]
    for tracker in trackers:
        tracker.start()
        if tracker.name != "tensorboard":
            # TensorBoard would put hyperparameters in a second event folder; recipe.yaml
            # beside tb/ already holds them.
            tracker.store_init_configuration(config)
    return trackers


def make(name: str, run_dir: Path, resume_step: int, folder: str) -> Any:
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    run = run_dir.resolve()
    if name == "tensorboard":
        # purge_step: a resumed run drops the events past its checkpoint, as metrics.jsonl does.
        return TensorBoardTracker(folder, run, purge_step=resume_step + 1 or None)
    if name == "wandb":
        # W&B makes its own folder, named as `folder` says, inside `dir`.
        return WandBTracker("finetune", dir=str(run), name=run.name, settings={"console": "off"})
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        # mlflow 3 refuses a file store unless asked; a folder in the run needs no server.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((run / folder).as_uri())
    return MLflowTracker(experiment_name="finetune", run_name=run.name)


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The values of a metrics.jsonl record that trackers log: its numbers, without the step."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, int | float)}


def log(trackers: list, record: dict[str, Any]) -> None:
    values = numbers(record)
    for tracker in trackers:
        tracker.log(values, step=record["step"])


def finish(trackers: list) -> None:
    for tracker in trackers:
        tracker.finish()


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe dict as `section.key` pairs of scalars (trackers store flat params)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat
