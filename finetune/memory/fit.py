"""Does a run fit a GPU: the largest micro-batch and sequence, which change makes it fit,
and the check before training.

Every verdict here compares the same quantity: the caching allocator's modelled reserved
peak plus the CUDA context (`Estimate.verdict_bytes`), because reserved memory, not
allocated, is what runs out first and what nvidia-smi shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from finetune.errors import UserError
from finetune.memory import setup_from_recipe
from finetune.memory.dryrun import estimate_from_config, reestimate
from finetune.memory.estimate import Estimate, Setup
from finetune.memory.render import human
from finetune.memory.target import subject_for_recipe
from finetune.methods import allows_gradient_checkpointing
from finetune.precision import on_cuda

# A bound on the search: each 7B dry run takes 1-4 s on a 2-core CPU.
MAX_BATCH = 1024
SEQ_QUANTUM = 64  # sequence lengths are searched in steps of 64 tokens
FALLBACK_MAX_SEQ = 32768  # when the config names no context length
GB = 1e9


def check_gpu_gb(gpu: float | None) -> None:
    """Refuse a --gpu that is not a finite, positive number of GB.

    Raises:
        UserError: nan, inf, zero or negative.
    """
    if gpu is not None and not (math.isfinite(gpu) and gpu > 0):
        raise UserError(f"--gpu must be a positive number of GB (1e9 bytes), got {gpu}")


def largest_fitting(fits: Callable[[int], bool], start: int, cap: int, quantum: int = 1) -> int:
    """The largest multiple of `quantum` in [start, cap] for which `fits` holds, or 0.

    Assumes `fits` is monotone (true up to some value, false beyond). Doubles from `start`
    until `fits` fails or `cap` is passed, then bisects the last bracket: about
    2·log2(answer / start) calls.
    """
    if start > cap or not fits(start):
        return 0
    low = start
    while low < cap:
        high = min(2 * low, cap)
        if not fits(high):
            break
        low = high
    else:
        return low
    while high - low > quantum:  # invariant: fits(low), not fits(high)
        mid = (low + high) // 2 // quantum * quantum
        if mid <= low:
            break
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


class FitSearch:
    """Dry runs of variants of one estimate, cached by setup, judged against one GPU."""

    def __init__(self, est: Estimate, gpu_bytes: float) -> None:
        self.est, self.gpu_bytes = est, gpu_bytes
        self._cache: dict[Setup, Estimate] = {est.setup: est}

    def estimate(self, setup: Setup) -> Estimate:
        if setup not in self._cache:
            self._cache[setup] = reestimate(self.est.arch, self.est.config, setup)
        return self._cache[setup]

    def fits(self, **change: Any) -> bool:
        return self.estimate(replace(self.est.setup, **change)).verdict_bytes <= self.gpu_bytes

    def largest_batch(self) -> int:
        return largest_fitting(lambda b: self.fits(batch=b), 1, MAX_BATCH)

    def longest_seq(self) -> int:
        cap = max_seq(self.est.config)
        return largest_fitting(lambda s: self.fits(seq=s), SEQ_QUANTUM, cap, SEQ_QUANTUM)


def max_seq(config: Any) -> int:
    """The model's context length (rounded down to the search quantum)."""
    length = getattr(config, "max_position_embeddings", None) or FALLBACK_MAX_SEQ
    return max(SEQ_QUANTUM, int(length) // SEQ_QUANTUM * SEQ_QUANTUM)


def fit_lines(est: Estimate, gpu_bytes: float, search: FitSearch | None = None) -> list[str]:
    """`--fit`: the largest micro-batch at this sequence, the longest sequence at this batch."""
    search = search or FitSearch(est, gpu_bytes)
    setup, gpu = est.setup, f"{gpu_bytes / GB:g} GB"
    what = "reserved (caching allocator model) + CUDA context"
    batch = search.largest_batch()
    seq = search.longest_seq()
    lines = [f"fit on {gpu} ({what}):"]
    lines.append(
        f"  largest micro-batch at seq {setup.seq}: {batch}"
        if batch
        else f"  no micro-batch fits at seq {setup.seq}"
    )
    limit = f" (the model's limit {max_seq(est.config)})" if seq == max_seq(est.config) else ""
    lines.append(
        f"  longest sequence at batch {setup.batch}: {seq}{limit} (searched in steps of "
        f"{SEQ_QUANTUM})"
        if seq
        else f"  no sequence of {SEQ_QUANTUM}+ tokens fits at batch {setup.batch}"
    )
    return lines


def fit_advice(
    est: Estimate,
    gpu_bytes: float,
    search: FitSearch | None = None,
    spell: Callable[[str, dict[str, Any]], str] | None = None,
) -> list[str]:
    """Whether the estimate fits in `gpu_bytes`, and if not, which change makes it fit.

    The verdict is on `Estimate.verdict_bytes`: the caching allocator's modelled reserved
    peak plus the CUDA context. Each candidate change is re-estimated by a dry run (when
    the estimate came from one); single changes are tried first, then the changes
    accumulated in order. `spell` writes a change as the user would make it (default:
    `finetune estimate`'s options; `as_recipe_overrides` for `finetune train`).
    """
    search = search or FitSearch(est, gpu_bytes)
    spell = spell or (lambda label, change: label)
    metric = est.verdict_metric
    if est.verdict_bytes <= gpu_bytes:
        return [f"fits: {human(est.verdict_bytes)} of {human(gpu_bytes)} ({metric})"]
    lines = [
        f"does not fit: {human(est.verdict_bytes)} needed ({metric}), {human(gpu_bytes)} available"
    ]
    changes = candidate_changes(est.setup)
    for label, change in changes:
        try:
            trial = search.estimate(replace(est.setup, **change))
        except UserError:  # an incompatible combination or one the dry run refuses
            continue
        if trial.verdict_bytes <= gpu_bytes:
            return [*lines, f"fits with {spell(label, change)}: {human(trial.verdict_bytes)}"]
    applied: dict[str, Any] = {}
    labels = []
    for label, change in changes:
        applied.update(change)
        labels.append(spell(label, change))
        try:
            trial = search.estimate(replace(est.setup, **applied))
        except UserError:  # an incompatible combination (full + quant): skip it
            applied = {k: v for k, v in applied.items() if k not in change}
            labels.pop()
            continue
        if trial.verdict_bytes <= gpu_bytes:
            return [*lines, f"fits with {' + '.join(labels)}: {human(trial.verdict_bytes)}"]
    return [*lines, "no combination of the usual changes fits; use a smaller model"]


# What each change of `candidate_changes` is in a recipe, as a command-line override.
RECIPE_FIELDS = {
    "grad_ckpt": "train.gradient_checkpointing",
    "batch": "train.micro_batch_size",
    "optimizer": "train.optimizer",
    "method": "adapter.method",
    "quant": "model.quantization",
    "double_quant": "model.double_quant",
    "seq": "data.max_length",
}


def as_recipe_overrides(label: str, change: dict[str, Any]) -> str:
    """A change as `finetune train` takes it: `train.micro_batch_size=2 ...`."""

    def value(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    return " ".join(f"{RECIPE_FIELDS[k]}={value(v)}" for k, v in change.items())


def candidate_changes(setup: Setup) -> list[tuple[str, dict[str, Any]]]:
    """The usual memory savers, cheapest in quality first."""
    out: list[tuple[str, dict[str, Any]]] = []
    if not setup.grad_ckpt and allows_gradient_checkpointing(setup.method):
        out.append(("--grad-ckpt", {"grad_ckpt": True}))
    batch = setup.batch
    while batch > 1:
        batch //= 2
        out.append((f"--batch {batch}", {"batch": batch}))
    if setup.method == "full":
        if setup.optimizer in ("adamw", "adamw-foreach") and setup.device == "cuda":
            # the same arithmetic without foreach's whole-model temporaries
            out.append(("--optimizer adamw-fused", {"optimizer": "adamw-fused"}))
        out.append(("--optimizer adamw8bit", {"optimizer": "adamw8bit"}))
        out.append(("--method lora", {"method": "lora"}))
    if setup.quant in ("none",):
        out.append(("--quant int8", {"quant": "int8"}))
    if setup.quant in ("none", "int8"):
        out.append(("--quant nf4 --double-quant", {"quant": "nf4", "double_quant": True}))
    seq = setup.seq
    while seq > 128:
        seq //= 2
        out.append((f"--seq {seq}", {"seq": seq}))
    return out


# ------------------------------------------------------------------ before training


@dataclass(frozen=True)
class DeviceVerdict:
    """Whether a run needing `need_bytes` fits in `free_bytes` of device memory."""

    fits: bool
    need_bytes: int
    free_bytes: int

    @property
    def shortfall_bytes(self) -> int:
        return max(0, self.need_bytes - self.free_bytes)


def device_verdict(need_bytes: int, free_bytes: int) -> DeviceVerdict:
    """Pure: the estimate (reserved + CUDA context) against the free device memory."""
    return DeviceVerdict(need_bytes <= free_bytes, int(need_bytes), int(free_bytes))


def refusal(verdict: DeviceVerdict, fix: str) -> str:
    """The one line `finetune train` refuses a run with."""
    return (
        f"this run needs about {verdict.need_bytes / GB:.1f} GB of GPU memory (reserved + CUDA "
        f"context, estimated) but {verdict.free_bytes / GB:.1f} GB is free: "
        f"{verdict.shortfall_bytes / GB:.1f} GB short; {fix}, or pass --force to run anyway"
    )


def check_recipe_fits_device(
    recipe: Any, device: str, *, force: bool = False, free_bytes: int | None = None
) -> str | None:
    """Before the model loads, after every other input check: refuse a CUDA run the estimate
    says cannot fit.

    A no-op on the CPU (no device memory to compare with) and with `force`. `free_bytes` is
    the device's free memory, by default `torch.cuda.mem_get_info()`'s; a test passes a
    budget to drive this check on a machine without CUDA.

    Returns:
        A note when the check could not be made: a model that runs its own code
        (model.trust_remote_code) is not one transformers can build on meta.

    Raises:
        UserError: a target module name picks no layer (the recipe's line, as loading the
            model would say it), or the estimate exceeds the free bytes.
    """
    if force or not on_cuda(device):
        return None
    from finetune.adapters import check_target_modules
    from finetune.memory.dryrun import build_model

    try:
        config, setup = subject_for_recipe(recipe).hf_config(), setup_from_recipe(recipe, device)
    except UserError as err:
        if not recipe.model.trust_remote_code:
            raise
        return f"GPU memory not checked before loading: the model runs its own code ({err})"
    # The dry run would name unknown targets as estimate's --targets option; the recipe's
    # own line comes first, from the same model built on meta.
    check_target_modules(build_model(config, setup), recipe.adapter)
    est = estimate_from_config(config, setup)
    free = torch.cuda.mem_get_info()[0] if free_bytes is None else free_bytes
    verdict = device_verdict(est.verdict_bytes, free)
    if not verdict.fits:
        advice = fit_advice(est, free, spell=as_recipe_overrides)[-1]
        fix = advice.removeprefix("fits with ").split(":")[0]
        raise UserError(refusal(verdict, f"try {fix}" if advice.startswith("fits") else advice))
    return None
