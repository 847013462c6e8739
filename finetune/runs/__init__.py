"""The run directory: the only code that names what is inside one.

```
runs/<name>/
  recipe.yaml  adapter/  checkpoints/step-N/  metrics.jsonl  tb/  (wandb/  mlruns/)
  report.md  report.json  loss.png  memory.png
```
- `layout`: the names, claiming a folder for a run, starting it, atomic writes.
- `lock`: one writer per run directory.
- `checkpoints`: writing, reading, listing and pruning checkpoints; the resume checks.
- `metrics`: metrics.jsonl and the trackers.
- `reports`: the report's files, and report.json read back as a typed `RunReport`.
"""

from finetune.runs.checkpoints import (
    PROJECTION_FILE,
    RESUME_MAY_CHANGE,
    RunState,
    SavedCheckpoint,
    check_resumable,
    checkpoint_path,
    checkpoint_step,
    checkpoint_to_resume,
    data_fingerprint,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    refuse_finished,
    restore_rng,
    resume_hint,
    save_adapter,
    save_checkpoint,
)
from finetune.runs.layout import (
    LOSS_PLOT,
    MEMORY_PLOT,
    RUN_LAYOUT,
    TRACKER_FOLDERS,
    adapter_path,
    bind_to_own_run,
    claim_run_dir,
    run_of_recipe,
    holds_recipe,
    holds_run,
    read_recipe,
    recipe_beside,
    recipe_path,
    remove_partial_writes,
    require_adapter,
    start_run_dir,
    write_atomically,
    write_recipe_copy,
    write_text_atomically,
)
from finetune.runs.lock import RunLock
from finetune.runs.metrics import (
    MetricsWriter,
    exact_match_record,
    read_evals,
    read_exact_match,
    read_history,
    read_records,
)
from finetune.runs.reports import (
    RunReport,
    loss_plot_path,
    memory_plot_path,
    read_report,
    write_report,
    written_outputs,
)

__all__ = [
    "LOSS_PLOT",
    "MEMORY_PLOT",
    "PROJECTION_FILE",
    "RESUME_MAY_CHANGE",
    "RUN_LAYOUT",
    "TRACKER_FOLDERS",
    "MetricsWriter",
    "RunLock",
    "RunReport",
    "RunState",
    "SavedCheckpoint",
    "adapter_path",
    "bind_to_own_run",
    "run_of_recipe",
    "check_resumable",
    "checkpoint_path",
    "checkpoint_step",
    "checkpoint_to_resume",
    "data_fingerprint",
    "claim_run_dir",
    "holds_recipe",
    "holds_run",
    "exact_match_record",
    "latest_checkpoint",
    "list_checkpoints",
    "loss_plot_path",
    "memory_plot_path",
    "prune_checkpoints",
    "read_checkpoint",
    "refuse_finished",
    "read_evals",
    "read_exact_match",
    "read_history",
    "read_recipe",
    "read_records",
    "read_report",
    "recipe_beside",
    "recipe_path",
    "remove_partial_writes",
    "require_adapter",
    "restore_rng",
    "resume_hint",
    "save_adapter",
    "save_checkpoint",
    "start_run_dir",
    "write_atomically",
    "write_recipe_copy",
    "write_report",
    "write_text_atomically",
    "written_outputs",
]
