"""`finetune export --format gguf-adapter`: the run's LoRA pairs as a llama.cpp adapter GGUF,
checked applied to its base GGUF in llama.cpp, or, where llama.cpp is not installed, by reading
the weight updates back out of the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import torch

from finetune import inference, models
from finetune.errors import UserError
from finetune.export import gguf_file
from finetune.export.checks import BASE_TOLERANCE, CheckFailed, require_adapter
from finetune.export.gguf_check import (
    GGUFCheck,
    checked_in_llamacpp_or,
    require_within,
    write_checked_file,
)
from finetune.export.merging import Merged
from finetune.inputs import require_file
from finetune.targets import Target, read_adapter_config


def export_gguf_adapter(
    target: Target, out: Path, base_gguf: Path | None, tolerance: float | None
) -> GGUFCheck:
    """Write the run's LoRA adapter as a llama.cpp adapter GGUF and check it applied to its
    base GGUF against the adapter model in transformers.

    Raises:
        UserError: not a plain LoRA adapter, or no base GGUF that is this adapter's base.
        CheckFailed: the adapter on its base does not reproduce the adapter model.
    """
    alpha = require_lora(target)
    base, facts = choose_base_gguf(target, base_gguf)
    limit = adapter_tolerance(facts) if tolerance is None else tolerance
    spec = target.model.model_copy(update={"quantization": "none", "dtype": "float32"})
    session = inference.load(target, device="cpu", spec=spec)
    match_base(base, facts, session.model.config, target)
    reference = Merged(session.model, session.tokenizer, None, target)

    def write(tmp: Path) -> GGUFCheck:
        gguf_file.write_lora(session.model, tmp, alpha, name=out.stem)
        check = checked_in_llamacpp_or(
            lambda: lora_file_check(session.model, tmp, alpha), base, tmp, reference, limit,
            f"the adapter on {base.name}",
        )  # fmt: skip
        check.base_gguf = str(base)
        return check

    return write_checked_file(out, write)


def require_lora(target: Target) -> float:
    """The adapter's lora_alpha, refusing what a llama.cpp LoRA file cannot hold.

    Raises:
        UserError: not a LoRA adapter, DoRA, trained full modules or biases, new tokens.
    """
    method = require_adapter(target, "export --format gguf-adapter")
    config = read_adapter_config(target.adapter_dir)
    if method != "lora" or config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise UserError(
            f"{target.given}: a {method} adapter; --format gguf-adapter writes plain LoRA "
            "(llama.cpp adapters hold only LoRA A and B); use --format gguf for the merged model"
        )
    extras = [
        f"{key}={config[key]}"
        for key in ("modules_to_save", "trainable_token_indices", "lora_bias")
        if config.get(key)
    ]
    if config.get("bias", "none") != "none":
        extras.append(f"bias={config['bias']}")
    if extras:
        raise UserError(
            f"{target.given}: the adapter also trains {', '.join(extras)}, which a llama.cpp "
            "LoRA file cannot hold; use --format gguf for the merged model"
        )
    return float(config["lora_alpha"])


def choose_base_gguf(target: Target, given: Path | None) -> tuple[Path, dict[str, Any]]:
    """The base GGUF llama.cpp applies the adapter to: --base-gguf, or the GGUF the run's
    base model came from (the embedded model is one).

    Raises:
        UserError: none to be had, or a file that is not this base model.
    """
    base = given if given is not None else models.source_gguf(target.model.path)
    if base is None:
        raise UserError(
            f"--base-gguf: {target.given} was trained on {target.model.path}, not a GGUF file, "
            "and llama.cpp applies an adapter GGUF on top of a base GGUF; make one with "
            f"`finetune export {target.model.path} --format gguf --out base.gguf` and pass "
            "--base-gguf base.gguf"
        )
    require_file(base, "--base-gguf", "the base model as a .gguf file")
    try:
        facts = gguf_file.base_facts(base)
    except Exception as err:  # the parser raises ValueError, struct.error, IndexError, ...
        raise UserError(
            f"--base-gguf: {base} is not a readable GGUF file ({models.first_line(err)[:120]})"
        ) from None
    return base, facts


def match_base(base: Path, facts: dict[str, Any], config: Any, target: Target) -> None:
    """Refuse a base GGUF that is not the model the adapter was trained on.

    Raises:
        UserError: an adapter file, another architecture, or another shape.
    """
    want = {
        "type": "model",
        "architecture": "llama",
        "block_count": config.num_hidden_layers,
        "embedding_length": config.hidden_size,
    }
    wrong = [f"{k} {facts[k]} (want {v})" for k, v in want.items() if facts[k] != v]
    if wrong:
        raise UserError(
            f"--base-gguf: {base} is not the base model {target.model.path}: "
            f"{', '.join(wrong)}; export the base with --format gguf"
        )


def adapter_tolerance(facts: dict[str, Any]) -> float:
    """By the base's coarsest weight type: the adapter is exact, the base arithmetic is not."""
    types = facts["weight_types"]
    return max(BASE_TOLERANCE.get(t, BASE_TOLERANCE["other"]) for t in types)


def lora_file_check(peft_model: Any, path: Path, alpha: float) -> GGUFCheck:
    """Without llama.cpp: read the adapter file back and rebuild each weight update as
    llama.cpp will (alpha / rank · B·A, q and k rows un-permuted), against peft's own."""
    tensors = {
        t.name: torch.from_numpy(t.data.copy()).float() for t in gguf.GGUFReader(path).tensors
    }
    expected = dict(gguf_file.lora_tensors(peft_model, alpha))
    diff = 0.0
    for name in expected:
        got = tensors.get(name)
        if got is None or got.shape != expected[name].shape:
            raise CheckFailed(f"GGUF adapter check failed: {name} missing or misshapen")
        diff = max(diff, float((got - expected[name]).abs().max()))
    diff = max(diff, lora_update_diff(peft_model, tensors, alpha))
    check = GGUFCheck("the gguf reader", diff, 1e-4, True, 0)
    check.note = "checked the weight updates the file encodes against peft's"
    require_within(check, "the adapter file")
    return check


def lora_update_diff(peft_model: Any, tensors: dict[str, torch.Tensor], alpha: float) -> float:
    """Largest difference between peft's delta weights and alpha/rank · B·A from the file."""
    from peft.tuners.lora import LoraLayer

    config = peft_model.base_model.model.config
    names = gguf_file.name_map(config)
    diff = 0.0
    for module_name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        kind, name = gguf_file.llama_tensor(names, f"{module_name}.weight")
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        update = gguf_file.rotary_rows(kind, module.get_delta_weight("default"), config)
        diff = max(diff, float((alpha / a.shape[0] * b @ a - update).abs().max()))
    return diff
