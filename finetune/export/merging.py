"""`finetune merge`: fold an adapter into its base, in memory, and check the result.

Every merge checks itself: the merged model's logits are compared with the adapter model's on
a few fixed prompts, and a difference above the tolerance fails the command with nothing
written. After int8 or 4-bit training, `match_quantized` folds the adapter into the
dequantized quantized weights, the weights it was trained against, instead of the original
ones; the difference from the model as trained is measured and reported either way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune import inference, models, runs
from finetune.errors import UserError
from finetune.export.checks import (
    MERGE_TOLERANCE,
    PROBE_PROMPTS,
    CheckFailed,
    check_dtype,
    check_output,
    check_tolerance,
    max_logit_diff,
    probe_batch,
    probe_logits,
    require_adapter,
)
from finetune.inputs import parse_size
from finetune.targets import Target, resolve_target


@dataclass
class MergeReport:
    """How a merged model was made and how closely it reproduces the adapter model."""

    source: str
    method: str
    base_model: str
    dtype: str
    trained_quantization: str
    match_quantized: bool
    folded_into: str
    max_logit_diff: float
    tolerance: float
    max_logit_diff_vs_trained: float | None = None
    sixteen_bit_noise: float | None = None
    probe_prompts: list[str] = field(default_factory=lambda: list(PROBE_PROMPTS))


@dataclass
class Merged:
    model: Any
    tokenizer: Any
    report: MergeReport | None  # None: a plain model, nothing merged
    target: Target


def dequantized_weights(target: Target) -> dict[str, torch.Tensor]:
    """The quantized base as the adapter saw it, dequantized: Linear weight name to tensor."""
    from peft.utils.integrations import dequantize_bnb_weight

    spec = target.model.model_copy(update={"quantization": target.trained_quantization})
    loaded = models.load_model(spec, "cpu")
    weights: dict[str, torch.Tensor] = {}
    for name, module in loaded.model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.__class__.__name__ not in ("Params4bit", "Int8Params"):
            continue
        state = getattr(module, "state", None)
        weights[f"{name}.weight"] = dequantize_bnb_weight(weight, state).float().cpu()
    del loaded
    return weights


def build_merged(
    target: Target,
    *,
    dtype: str = "float32",
    match_quantized: bool = False,
    tolerance: float | None = None,
) -> Merged:
    """Fold the target's adapter into its base in memory and check it against the adapter model.

    Raises:
        UserError: no mergeable adapter, or --match-quantized after unquantized training.
        CheckFailed: merged and adapter logits differ by more than the tolerance.
    """
    check_dtype(dtype)
    method = require_adapter(target, "merge")
    quantized = target.trained_quantization not in ("none", "auto")
    if match_quantized and not quantized:
        raise UserError(
            f"--match-quantized: {target.given} was trained on an unquantized base, so there "
            "are no quantized weights to match; drop the flag"
        )
    inference.quiet_loading()
    fp_spec = target.model.model_copy(update={"quantization": "none", "dtype": dtype})
    folded_into = f"the original {dtype} weights"
    replacement = dequantized_weights(target) if match_quantized else {}
    loaded = models.load_model(fp_spec, "cpu")
    if replacement:
        folded_into = f"the dequantized {target.trained_quantization} weights (cast to {dtype})"
        with torch.no_grad():
            params = dict(loaded.model.named_parameters())
            for name, weight in replacement.items():
                params[name].copy_(weight.to(params[name].dtype))
    model = inference.attach_adapter(loaded.model, target.adapter_dir, fp_spec.path)
    model.eval()
    batch = probe_batch(loaded.tokenizer)
    expected = probe_logits(model, batch)
    merged = model.merge_and_unload()
    got = probe_logits(merged, batch)
    diff = max_logit_diff(expected, got, batch["attention_mask"])
    noise = None
    if dtype != "float32":
        noise = sixteen_bit_noise(target, fp_spec, replacement, batch, expected)
    limit = MERGE_TOLERANCE[dtype] if tolerance is None else tolerance
    if tolerance is None and noise is not None:
        limit = max(limit, 2 * noise)
    report = MergeReport(
        source=str(target.given),
        method=method,
        base_model=target.model.path,
        dtype=dtype,
        trained_quantization=target.trained_quantization,
        match_quantized=match_quantized,
        folded_into=folded_into,
        max_logit_diff=diff,
        tolerance=limit,
        sixteen_bit_noise=noise,
    )
    if quantized:
        # The model as trained: the adapter on the quantized base.
        as_trained = inference.load(
            target,
            device="cpu",
            spec=target.model.model_copy(update={"quantization": target.trained_quantization}),
        )
        trained = probe_logits(as_trained.model, batch)
        report.max_logit_diff_vs_trained = max_logit_diff(trained, got, batch["attention_mask"])
        del as_trained
    if not diff <= limit:
        raise CheckFailed(
            f"merge check failed: merged and adapter logits differ by {diff:.3g} (tolerance "
            f"{limit:g}); nothing was written. A {dtype} merge may need --tolerance, or merge "
            "in float32"
        )
    return Merged(merged, loaded.tokenizer, report, target)


def sixteen_bit_noise(
    target: Target,
    spec: Any,
    replacement: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    logits: torch.Tensor,
) -> float:
    """How far the unmerged adapter model's 16-bit logits already are from its float32 ones."""
    loaded = models.load_model(spec.model_copy(update={"dtype": "float32"}), "cpu")
    if replacement:
        with torch.no_grad():
            params = dict(loaded.model.named_parameters())
            for name, weight in replacement.items():
                params[name].copy_(weight)
    model = inference.attach_adapter(loaded.model, target.adapter_dir, spec.path)
    reference = probe_logits(model.eval(), batch)
    return max_logit_diff(reference, logits, batch["attention_mask"])


def merge(
    run: str,
    out: Path,
    *,
    dtype: str = "float32",
    match_quantized: bool = False,
    force: bool = False,
    max_shard_size: str = "2GB",
    tolerance: float | None = None,
    model: str | None = None,
) -> MergeReport:
    """Merge RUN's adapter into its base and save a checked, self-describing model folder.

    Raises:
        UserError: bad input (see `build_merged`, `check_output`).
        CheckFailed: the merged model does not reproduce the adapter model.
    """
    # Every option first: a typo must not wait for a model to load and merge.
    parse_size(max_shard_size, "--max-shard-size")
    check_tolerance(tolerance)
    check_dtype(dtype)
    target = resolve_target(run, model)
    check_output(out, force, [target], "merged")
    require_adapter(target, "merge")
    merged = build_merged(target, dtype=dtype, match_quantized=match_quantized, tolerance=tolerance)
    runs.write_atomically(out, lambda tmp: save_merged(merged, tmp, max_shard_size))
    return merged.report


def save_merged(merged: Merged, folder: Path, max_shard_size: str) -> None:
    merged.model.save_pretrained(folder, max_shard_size=max_shard_size)
    merged.tokenizer.save_pretrained(folder)
    (folder / "merge.json").write_text(json.dumps(asdict(merged.report), indent=2) + "\n")
    (folder / "README.md").write_text(merge_card(merged.report, merged.target), encoding="utf-8")


def merge_card(report: MergeReport, target: Target) -> str:
    vs_trained = (
        f"- max |logit difference| against the adapter on the {report.trained_quantization} base "
        f"it was trained with: {report.max_logit_diff_vs_trained:.4g}\n"
        if report.max_logit_diff_vs_trained is not None
        else ""
    )
    hint = (
        "- trained against quantized weights; "
        + (
            "folded into their dequantized values (--match-quantized)\n"
            if report.match_quantized
            else "folded into the original weights instead (pass --match-quantized to fold into "
            "the weights the adapter was trained against)\n"
        )
        if report.trained_quantization not in ("none", "auto")
        else ""
    )
    return (
        "# Merged model\n\n"
        f"Made by `finetune merge` from `{report.source}`: the {report.method} adapter in "
        f"`{target.adapter_dir}` folded into the base model `{report.base_model}`.\n\n"
        f"- dtype: {report.dtype}\n"
        f"- folded into: {report.folded_into}\n"
        f"- adapter trained with base quantization: {report.trained_quantization}\n"
        f"{hint}"
        f"- self-check: max |logit difference| between the merged model and the adapter model on "
        f"{len(report.probe_prompts)} prompts: {report.max_logit_diff:.4g} "
        f"(tolerance {report.tolerance:g})\n"
        f"{vs_trained}"
        + (
            f"- the unmerged adapter model in {report.dtype} is itself "
            f"{report.sixteen_bit_noise:.4g} from its float32 logits (16-bit arithmetic alone)\n"
            if report.sixteen_bit_noise is not None
            else ""
        )
        + "\n"
        "Load it with plain transformers: `AutoModelForCausalLM.from_pretrained(<this folder>)`.\n"
        "`merge.json` holds the same facts as data.\n"
    )


def merge_lines(report: MergeReport) -> list[str]:
    """What a merge reports on the console: the check, and the 16-bit and as-trained
    comparisons where they were made."""
    lines = [
        f"merged the {report.method} adapter into {report.folded_into}; check: max |logit "
        f"difference| {report.max_logit_diff:.3g} (tolerance {report.tolerance:g})"
    ]
    if report.sixteen_bit_noise is not None:
        lines.append(
            f"(the unmerged adapter model in {report.dtype} is itself "
            f"{report.sixteen_bit_noise:.3g} from float32; the tolerance allows twice that)"
        )
    if report.max_logit_diff_vs_trained is not None:
        lines.append(
            f"against the adapter on the {report.trained_quantization} base it was trained with: "
            f"max |logit difference| {report.max_logit_diff_vs_trained:.3g}"
            + ("" if report.match_quantized else " (--match-quantized folds into those weights)")
        )
    return lines
