"""metrics.jsonl (one record per logged step and per evaluation) and the run's trackers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune import tracking
from finetune.outputs import writing
from finetune.runs.checkpoints import resume_hint
from finetune.runs.layout import TRACKER_FOLDERS, metrics_path, write_text_atomically


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records. A line cut short by a kill mid-write is dropped, as is any
    line that is not a record finetune writes (an object with an integer step): the file is
    text people edit and tools append to, and a resume rewrites it with its records."""
    path = metrics_path(run_dir)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(record, dict) and type(record.get("step")) is int:
            records.append(record)
    return records


def read_history(run_dir: Path, up_to_step: int) -> list[dict[str, Any]]:
    return [r for r in read_records(run_dir) if "loss" in r and r["step"] <= up_to_step]


def read_evals(run_dir: Path, up_to_step: int) -> list[dict[str, Any]]:
    return [r for r in read_records(run_dir) if "eval_loss" in r and r["step"] <= up_to_step]


def exact_match_record(when: str, step: int, accuracy: float, **details: Any) -> dict[str, Any]:
    """metrics.jsonl's record of an exact-match evaluation (`when`: before or after
    training): trackers log its accuracy; `details` (counts, samples) stay in the file."""
    return {"step": step, f"exact_match_{when}": accuracy, "exact_match": details}


def read_exact_match(run_dir: Path, when: str) -> dict[str, Any] | None:
    """The run's exact-match record of `when`, if it has one: a resumed run reports the
    accuracy its first session measured before training."""
    found = [r for r in read_records(run_dir) if well_formed(r, when)]
    return found[-1] if found else None


def well_formed(record: dict[str, Any], when: str) -> bool:
    """A record (`read_records`) holding an exact match as `exact_match_record` writes it."""
    if not isinstance(record.get(f"exact_match_{when}"), float):
        return False
    details = record.get("exact_match")
    return (
        isinstance(details, dict)
        and all(isinstance(details.get(k), int) for k in ("correct", "total"))
        and isinstance(details.get("samples"), list)
        and all(
            isinstance(s, dict) and all(isinstance(s.get(k), str) for k in SAMPLE_KEYS)
            for s in details["samples"]
        )
    )


SAMPLE_KEYS = ("prompt", "reference", "prediction")  # of finetune.evaluate's samples


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
        self.enabled = enabled
        self.path = metrics_path(run_dir)
        self.trackers: list = []
        if not enabled:
            return
        # A run that starts over from step 0 (no checkpoint was complete) records step 0 again.
        kept = [r for r in read_records(run_dir) if r["step"] <= resume_step] if resume_step else []
        write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        flat = tracking.flatten(config or {})
        self.trackers = tracking.start(
            run_dir, list(report_to), resume_step, flat, TRACKER_FOLDERS
        )

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # The hint is worked out only if the write fails (it lists the checkpoints).
        hint = lambda: resume_hint(self.path.parent)  # noqa: E731
        with writing(self.path, hint), self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        tracking.log(self.trackers, record)

    def close(self) -> None:
        tracking.finish(self.trackers)
        self.trackers = []
