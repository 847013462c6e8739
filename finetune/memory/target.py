"""Resolve the TARGET of `finetune estimate` into an architecture (and a recipe's setup).

TARGET is a preset name, a model folder or config.json, a .gguf file, a hub id (online
users), a recipe YAML (with overrides), or a run directory (its recipe.yaml, and the peak
its report.json measured).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.memory.arch import Architecture, from_config
from finetune.memory.presets import closest_names, get_preset, is_preset

EMBEDDED_PRESET = "smollm2-135m"


@dataclass
class Target:
    """What a TARGET resolved to: the architecture, and a recipe and measurement if any."""

    arch: Architecture
    recipe: Any = None
    measured: dict[str, Any] | None = None
    setup: Any = None  # the exact setup a run's report was estimated with, if any
    config: Any = None  # the transformers config the dry run builds

    def hf_config(self) -> Any:
        """The transformers config to build (a preset's is made from its numbers)."""
        from finetune.memory.arch import to_hf_config

        return self.config if self.config is not None else to_hf_config(self.arch)


def resolve(target: str, overrides: list[str] | tuple[str, ...] = ()) -> Target:
    """Resolve `target` (see the module docstring).

    Raises:
        UserError: unknown preset (closest names listed), unreadable or incomplete config,
            a hub id that cannot be fetched.
    """
    path = Path(target).expanduser()
    if path.is_dir() and (path / "recipe.yaml").is_file():
        return run_directory(path, overrides)
    if path.suffix in (".yaml", ".yml"):
        return from_recipe(path, overrides)
    if path.is_dir() or path.suffix == ".json" or path.suffix == ".gguf":
        return target_from_path(path)
    if is_preset(target):
        return Target(get_preset(target))
    if "/" in target and not path.exists() and not target.startswith((".", "/", "~")):
        arch = from_hub(target)
        return Target(arch, config=arch_config_from_hub(target))
    raise UserError(
        f"unknown preset '{target}' (and no such file); closest presets: "
        f"{', '.join(closest_names(target))}"
    )


def target_from_path(path: Path, recipe: Any = None) -> Target:
    """A model folder, config.json or .gguf file: its transformers config and a summary."""
    from finetune.memory.dryrun import build_config, describe

    raw, name = raw_config(path)
    config = build_config(raw, name)
    return Target(describe(config, name), recipe=recipe, config=config)


def raw_config(path: Path) -> tuple[dict[str, Any], str]:
    """The config dict of a model folder, a config.json or a .gguf file, and its label."""
    if path.suffix == ".gguf":
        return gguf_config(path), path.name
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise UserError(
            f"{config}: not found (give a preset, a model folder with config.json, "
            "a .gguf file, a recipe or a run directory)"
        )
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config}: malformed JSON ({err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config}: a config.json holds one JSON object")
    return raw, str(config)


def from_hub(repo_id: str) -> Architecture:
    """Architecture of a hub model (its config.json only; needs the network or a cache)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(repo_id)
    except (OSError, ValueError):
        raise UserError(
            f"'{repo_id}': cannot fetch its config from the hub (offline?); use a "
            f"preset, a local folder or config.json"
        ) from None
    return from_config(config, name=repo_id)


def arch_config_from_hub(repo_id: str) -> Any:
    """The hub model's transformers config (cached by transformers after from_hub)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(repo_id)


def from_gguf(path: Path) -> Architecture:
    """Architecture from a GGUF file's metadata (llama.cpp's key names)."""
    return from_config(gguf_config(path), name=path.name)


def gguf_config(path: Path) -> dict[str, Any]:
    """A transformers config dict from a GGUF file's metadata (llama.cpp's key names)."""
    if not path.is_file():
        raise UserError(f"{path}: GGUF file not found")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as err:
        raise UserError(f"{path}: not a readable GGUF file ({err})") from None

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.parts[field.data[0]].tolist()[0]

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    heads = value(f"{arch}.attention.head_count")
    hidden = value(f"{arch}.embedding_length")
    tensor_names = {t.name for t in reader.tensors}
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "num_hidden_layers": value(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv") or heads,
        "head_dim": value(f"{arch}.attention.key_length"),
        "vocab_size": value(f"{arch}.vocab_size") or (len(tokens.data) if tokens else None),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    return {k: v for k, v in config.items() if v is not None}


def from_recipe(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> Target:
    """A recipe's model architecture, with the recipe kept for its setup."""
    from finetune.recipe import load_recipe

    return target_for_recipe(load_recipe(path, overrides))


def target_for_recipe(recipe: Any) -> Target:
    """The model a loaded recipe trains, with the recipe kept for its setup."""
    from finetune.recipe import EMBEDDED_MODEL

    source = recipe.model.path
    if source == EMBEDDED_MODEL:
        return Target(get_preset(EMBEDDED_PRESET), recipe=recipe)
    candidate = Path(source).expanduser()
    if candidate.exists():
        return target_from_path(candidate, recipe)
    if is_preset(source):
        return Target(get_preset(source), recipe=recipe)
    return Target(from_hub(source), recipe=recipe, config=arch_config_from_hub(source))


def run_directory(run: Path, overrides: list[str] | tuple[str, ...] = ()) -> Target:
    """A run's recipe and, when its report.json has one, the peak it measured."""
    target = from_recipe(run / "recipe.yaml", overrides)
    report = run / "report.json"
    if report.is_file():
        try:
            data = json.loads(report.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return target
        target.measured = find_measured(data)
        if not overrides:  # overrides describe another run than the one recorded
            target.setup = recorded_setup(data)
            recorded_model(target, data, report)
    return target


def recorded_model(target: Target, report: dict[str, Any], path: Path) -> None:
    """Use the transformers config the run's report was estimated with, when it has one, so
    `estimate RUN` dry-runs exactly the model the report did (runmemory.run_estimates)."""
    from finetune.memory.dryrun import describe
    from finetune.memory.runmemory import config_from_record

    raw = (report.get("memory") or {}).get("model_config")
    if isinstance(raw, dict):
        target.config = config_from_record(raw, str(path))
        target.arch = describe(target.config, target.arch.name)


def recorded_setup(report: dict[str, Any]) -> Any:
    """The setup the run's own report estimated (its real sequence length and the logits
    positions its loop computed), so `estimate RUN` shows the same figure as the report."""
    from finetune.memory.estimate import Setup

    fields = (report.get("memory") or {}).get("estimate", {}).get("setup")
    if not isinstance(fields, dict):
        return None
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        return Setup(**fields)
    except (TypeError, UserError):
        return None


def find_measured(report: Any) -> dict[str, Any] | None:
    """The run's measured peak: report.json's memory.measured (the live-tensor peak on the
    CPU, max allocated on CUDA); in older reports, the first mapping with `peak_bytes`."""
    measured = (report.get("memory") or {}).get("measured") if isinstance(report, dict) else None
    if isinstance(measured, dict) and isinstance(measured.get("peak_bytes"), int):
        return measured
    return first_with_peak(report)


def first_with_peak(report: Any) -> dict[str, Any] | None:
    """The first mapping in a report that carries `peak_bytes` (PeakMemory.to_dict())."""
    if isinstance(report, dict):
        if isinstance(report.get("peak_bytes"), int):
            return report
        for value in report.values():
            found = first_with_peak(value)
            if found:
                return found
    if isinstance(report, list):
        for value in report:
            found = first_with_peak(value)
            if found:
                return found
    return None
