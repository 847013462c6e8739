"""`finetune export --format gguf`: the merged model (or a plain base model, the file an adapter
GGUF applies to) as one GGUF file, checked in llama.cpp, or read back by transformers where
llama.cpp is not installed."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune import inference, models
from finetune.errors import UserError
from finetune.export import gguf_file
from finetune.export.checks import (
    GGUF_TOLERANCE,
    PROBE_PROMPTS,
    CheckFailed,
    max_logit_diff,
    probe_batch,
    probe_logits,
    require_adapter,
)
from finetune.export.gguf_check import (
    GGUFCheck,
    checked_in_llamacpp_or,
    join_notes,
    require_within,
    write_checked_file,
)
from finetune.export.merging import Merged, build_merged
from finetune.targets import Target


def model_to_export(target: Target, match_quantized: bool) -> Merged:
    """The model a GGUF holds: the target's adapter merged into its base, or a plain model
    (the base GGUF an adapter GGUF needs).

    Raises:
        UserError: an adapter that cannot be merged, or --match-quantized with nothing to fold.
        CheckFailed: the merge check failed.
    """
    if target.adapter_dir is None:
        if match_quantized:
            raise UserError(f"--match-quantized: {target.given} has no adapter to fold; drop it")
        return load_plain(target)
    require_adapter(target, "export --format gguf")
    return build_merged(target, dtype="float32", match_quantized=match_quantized)


def load_plain(target: Target) -> Merged:
    """A model without an adapter, in float32, shaped like a merge so it exports the same way."""
    inference.quiet_loading()
    spec = target.model.model_copy(update={"quantization": "none", "dtype": "float32"})
    loaded = models.load_model(spec, "cpu")
    return Merged(loaded.model.eval(), loaded.tokenizer, None, target)


def write_checked_gguf(
    merged: Merged, out: Path, gguf_type: str, tolerance: float | None
) -> GGUFCheck:
    """Write the model as GGUF under a temporary name, check it (in llama.cpp where
    installed), and rename it into place only if the check passes.

    Raises:
        UserError: a model or tokenizer the writer cannot give llama.cpp faithfully.
        CheckFailed: the file does not reproduce the model.
    """
    source = models.source_gguf(merged.target.model.path)
    limit = GGUF_TOLERANCE[gguf_type] if tolerance is None else tolerance

    def write(tmp: Path) -> GGUFCheck:
        pre = gguf_file.write_model(
            merged.model, merged.tokenizer, tmp, gguf_type, name=out.stem, source=source
        )
        check = checked_in_llamacpp_or(
            lambda: transformers_check(merged, tmp, limit), tmp, None, merged, limit,
            f"the {gguf_type} file",
        )  # fmt: skip
        check.pre_tokenizer = pre
        if source is not None:
            carried = f"tokenizer fields carried over from {source.name}"
            check.note = join_notes(check.note, carried)
        return check

    return write_checked_file(out, write)


def transformers_check(merged: Merged, path: Path, limit: float) -> GGUFCheck:
    """Without llama.cpp: load the GGUF back with transformers and compare (a weaker check:
    transformers reads tokenizer metadata llama.cpp would refuse)."""
    diff, same = gguf_round_trip(merged, path)
    check = GGUFCheck(
        runner="transformers",
        max_logit_diff=diff,
        tolerance=limit,
        tokens_identical=same,
        prompts=len(PROBE_PROMPTS),
    )
    if not same:
        raise CheckFailed(
            "GGUF check failed: the file's tokenizer, read back by transformers, encodes the "
            "probe prompts differently; nothing was written"
        )
    require_within(check, "the file loaded back")
    return check


def gguf_round_trip(merged: Merged, path: Path) -> tuple[float, bool]:
    """Max logit difference between the GGUF loaded back by transformers and the merged model,
    and whether the GGUF's tokenizer encodes the probe prompts to the same ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batch = probe_batch(merged.tokenizer)
    expected = probe_logits(merged.model, batch)
    reloaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    got = probe_logits(reloaded, batch)
    diff = max_logit_diff(expected, got, batch["attention_mask"])
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = [inference.render_prompt(merged.tokenizer, p) for p in PROBE_PROMPTS]
    same = all(
        tokenizer(t, add_special_tokens=False)["input_ids"]
        == merged.tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in texts
    )
    return diff, same
