"""What every output shares: its options, its sources and its --out checked before any model
loads, the probe prompts its self-check runs, the tolerances it is held to, and the failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finetune import inference, models
from finetune.choices import DTYPES
from finetune.errors import UserError, closest
from finetune.inputs import check_number
from finetune.methods import MERGEABLE, VIRTUAL_TOKEN_METHODS
from finetune.outputs import claim_output
from finetune.targets import Target, not_an_adapter

# Default tolerances (max absolute logit difference) for the self-checks.
# A 16-bit merge is also allowed twice the difference 16-bit arithmetic alone makes (the same
# adapter model in float32 against 16-bit), measured on the same prompts.
MERGE_TOLERANCE = {"float32": 1e-2, "bfloat16": 0.5, "float16": 0.1}
# Absolute bounds on the GGUF checks' max |logit difference| (over every position and every
# vocabulary entry of the probe prompts), which catch a wrong layout or tokenizer (those change
# logits by whole units and more). Measured in llama.cpp on SmolLM2-135M (a quickstart run):
# f16 0.11, q8_0 4.1 (llama.cpp's own convert_hf_to_gguf.py writes bit-identical q8_0 tensors
# and scores the same: q8_0 arithmetic, weights and activations, is the whole difference), an
# adapter GGUF on the embedded Q4_1 base 2.7. transformers reading the file back: f16 0.07,
# q8_0 1.6.
GGUF_TOLERANCE = {"f32": 1e-2, "f16": 0.5, "q8_0": 8.0}
# An adapter GGUF is checked on its base GGUF, whose weights may be quantized (the embedded
# model's are Q4_1): the bound follows the base's coarsest weight type.
BASE_TOLERANCE = {"F32": 1e-2, "F16": 0.5, "BF16": 1.0, "Q8_0": 8.0, "other": 8.0}
PROBE_PROMPTS = (
    "Convert 3 March 2024 to ISO.",
    "The capital of France is",
    "Write one sentence about the sea.",
)


class CheckFailed(Exception):
    """A self-check failed: the artefact does not reproduce the model (exit code 1)."""

    exit_code = 1


# ------------------------------------------------------------------------ the self-check


def probe_batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    """A few fixed prompts, rendered and padded, for comparing two models' logits."""
    texts = [inference.render_prompt(tokenizer, p) for p in PROBE_PROMPTS]
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def probe_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 logits of `model` on `batch`, on the CPU."""
    device = next(p.device for p in model.parameters())
    out = model(**{k: v.to(device) for k, v in batch.items()})
    return out.logits.float().cpu()


def max_logit_diff(a: torch.Tensor, b: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Largest absolute difference between two logit tensors over real (unpadded) positions."""
    keep = attention_mask.bool()
    return float((a[keep] - b[keep]).abs().max())


# ------------------------------------------------------------------------ options and sources


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(
            f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r}){closest(dtype, DTYPES)}"
        )


def check_tolerance(tolerance: float | None) -> None:
    """--tolerance is a finite, non-negative logit difference (omitted: by dtype or type)."""
    if tolerance is not None:
        check_number("--tolerance", tolerance, ge=0)


def require_adapter(target: Target, what: str) -> str:
    """The target's adapter method, refusing plain models and, for merges, virtual tokens."""
    if target.adapter_dir is None:
        raise not_an_adapter(target, f"{what} needs")
    method = target.method or ""
    if what != "export --format adapter" and method in VIRTUAL_TOKEN_METHODS:
        raise UserError(
            f"{target.given}: {method} tuning learns virtual tokens fed in front of the input, "
            f"it has no weights to fold into the base; use the adapter folder with `finetune "
            "generate`, or `finetune export --format adapter`"
        )
    if what != "export --format adapter" and method not in MERGEABLE:
        raise UserError(f"{target.given}: cannot merge a {method} adapter")
    return method


# ------------------------------------------------------------------------ --out


# What an existing --out folder must hold for --force to replace it: the files each kind of
# output is written with (finetune.outputs refuses every other folder).
OUTPUT_SIGNS = {
    "merged": ("merge.json", "a model written by finetune merge (merge.json)"),
    "adapter": ("adapter_config.json", "an adapter folder (adapter_config.json)"),
    "combined": ("adapter_config.json", "an adapter folder (adapter_config.json)"),
}


def check_output(
    out: Path,
    force: bool,
    targets: list[Target],
    output: str = "gguf",
    files: list[Path | None] = (),
) -> None:
    """Check `out` with the one rule for outputs (`finetune.outputs.claim_output`): never the
    source run, adapter or base model, and an existing output only with --force.

    Args:
        out: the --out path.
        force: --force was given.
        targets: the command's sources (their run, adapter and model folders are inputs).
        output: "merged", "adapter", "combined" (folders) or "gguf" (a file).
        files: more input files (the base GGUF an adapter GGUF is checked on).

    Raises:
        UserError: `out` may not be written.
    """
    sources = [folder for t in targets for folder in (t.run_dir, t.adapter_dir)]
    models_ = [t.model.path for t in targets if Path(t.model.path).expanduser().exists()]
    # The GGUF a base came from (the embedded model's file, too) is an input like the rest.
    models_ += [models.source_gguf(t.model.path) for t in targets] + list(files)
    if output == "gguf":
        claim_output(
            out,
            option="--out",
            kind="file",
            force=force,
            inputs=models_,
            sealed=sources,
            replaceable=is_gguf,
            what_it_holds="a GGUF file (--force replaces an earlier export only)",
        )
        return
    sign, words = OUTPUT_SIGNS[output]
    claim_output(
        out,
        option="--out",
        kind="folder",
        force=force,
        inputs=models_,
        sealed=sources,
        replaceable=lambda folder: (folder / sign).is_file(),
        what_it_holds=words,
    )


def is_gguf(path: Path) -> bool:
    """Whether a file starts with GGUF's magic bytes: the only files --force replaces."""
    with path.open("rb") as handle:
        return handle.read(4) == b"GGUF"


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
