"""A finished run's memory, estimated and measured the same way: the one owner of both.

The run report (report.py) calls `run_estimates` with the run's transformers config and
its candidate setups (the widest masked and unmasked micro-batches it visits, the most
logits positions its loop computed); the chosen setup and the config are recorded in
report.json, and `finetune estimate RUN` (command.py) dry-runs exactly those. Each
estimate is a dry run (dryrun.py) measured by the tracker that also measured the run's
CPU steps (train.py, `LiveTensorPeak`), so estimate and measurement
are the same metric: the peak bytes of live tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from finetune.memory.dryrun import build_config, estimate_from_config
from finetune.memory.estimate import Estimate, Setup


@dataclass
class RunEstimates:
    """The run's estimate and, beside it, full fine-tuning of the same model and shape.

    Attributes:
        run: the dry run of the run's own setup.
        full: the dry run of full fine-tuning at the same batch, sequence, dtype,
            checkpointing and logits positions (all components, activations included).
    """

    run: Estimate
    full: Estimate


def full_finetuning_setup(setup: Setup) -> Setup:
    """Full fine-tuning of the same model at the same batch, sequence and dtype.

    Unquantized (full fine-tuning cannot train quantized weights), no adapter; gradient
    checkpointing and the logits positions as the run had them, so only the method differs.
    """
    return replace(setup, method="full", quant="none")


def largest_setup_estimate(config: Any, setups: list[Setup], name: str = "") -> Estimate:
    """The run's own estimate: a dry run of each candidate setup (report.run_setups: the
    widest masked and unmasked micro-batches the run trained on), the higher peak kept."""
    runs = [estimate_from_config(config, setup, name) for setup in setups]
    return max(runs, key=lambda est: est.allocated_bytes)


def run_estimates(config: Any, setups: list[Setup], name: str = "") -> RunEstimates:
    """Dry-run the run's setup and full fine-tuning of the same shape on `config`'s model.

    Args:
        config: the run's transformers `PretrainedConfig`.
        setups: the run's candidate setups (see `largest_setup_estimate`).
        name: the model's label in the rendered estimate.
    """
    run = largest_setup_estimate(config, setups, name)
    return RunEstimates(
        run=run,
        full=estimate_from_config(config, full_finetuning_setup(run.setup), name),
    )


def config_from_record(raw: dict[str, Any], name: str) -> Any:
    """The transformers config a report recorded (`PretrainedConfig.to_dict()`)."""
    keep = {k: v for k, v in raw.items() if k not in ("transformers_version", "architectures")}
    return build_config(keep, name)
