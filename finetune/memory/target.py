"""Resolve the TARGET of `finetune estimate` into an architecture (and a recipe's setup).

TARGET is what every command takes (a run directory, an adapter folder, a model folder, a
.gguf file, a hub id: `finetune.targets` resolves those), or what only estimate sizes: a
preset name, a config.json, or a recipe YAML (with overrides). A run (or an adapter in one)
brings its recipe and, from its report, the peak it measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import runs
from finetune.errors import UserError
from finetune.inputs import refuse_special
from finetune.memory.arch import Architecture, from_config
from finetune.memory.presets import closest_names, get_preset, is_preset
from finetune.models import check_model_config, looks_like_hub_id
from finetune.recipe import EMBEDDED_MODEL, load_recipe
from finetune.targets import Target, resolve_target

EMBEDDED_PRESET = "smollm2-135m"


@dataclass
class EstimateSubject:
    """What estimate sizes: the architecture, and a recipe and measurement if any."""

    arch: Architecture
    recipe: Any = None
    measured: dict[str, Any] | None = None
    setup: Any = None  # the exact setup a run's report was estimated with, if any
    config: Any = None  # the transformers config the dry run builds

    def hf_config(self) -> Any:
        """The transformers config to build (a preset's is made from its numbers)."""
        from finetune.memory.arch import to_hf_config

        return self.config if self.config is not None else to_hf_config(self.arch)


def resolve_subject(given: str, overrides: list[str] | tuple[str, ...] = ()) -> EstimateSubject:
    """Resolve estimate's TARGET (see the module docstring).

    Raises:
        UserError: unknown preset (closest names listed), unreadable or incomplete config,
            a hub id that cannot be fetched, a folder that is no run, adapter or model.
    """
    path = Path(given).expanduser()
    refuse_special(path, "target", "a run, a model folder, a config.json or a recipe")
    if not path.is_dir():
        if path.suffix in (".yaml", ".yml"):
            return from_recipe(path, overrides)
        if path.suffix == ".json":
            return subject_from_path(path)
        if is_preset(given):
            return EstimateSubject(get_preset(given))
    return subject_for_target(resolve_target(given, need_adapter=False), overrides)


def subject_for_target(target: Target, overrides: list[str] | tuple[str, ...]) -> EstimateSubject:
    """A run, adapter or model: the model it trains (or is), with the recipe that made it
    and, for a run, what its report measured and estimated with."""
    if target.recipe is None or target.run_dir is None:
        return subject_for_model(target.model.path)
    recipe = target.recipe
    if overrides:
        recipe = load_recipe(runs.recipe_path(target.run_dir), overrides)
    subject = subject_for_recipe(recipe)
    report = runs.read_report(target.run_dir)
    if report is not None:
        subject.measured = report.measured
        if not overrides:  # overrides describe another run than the one recorded
            subject.setup = recorded_setup(report.estimated_setup)
            recorded_model(subject, report)
    return subject


def subject_from_path(path: Path, recipe: Any = None) -> EstimateSubject:
    """A model folder, config.json or .gguf file: its transformers config and a summary."""
    from transformers import CONFIG_MAPPING

    from finetune.memory.dryrun import build_config, describe

    raw, name = raw_config(path)
    if path.suffix != ".gguf" and raw.get("model_type") in CONFIG_MAPPING:
        check_model_config(raw, Path(name))  # train's own check of config.json, same words
    config = build_config(raw, name)
    return EstimateSubject(describe(config, name), recipe=recipe, config=config)


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


def from_recipe(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> EstimateSubject:
    """A recipe's model architecture, with the recipe kept for its setup."""
    return subject_for_recipe(load_recipe(path, overrides))


def subject_for_recipe(recipe: Any) -> EstimateSubject:
    """The model a loaded recipe trains, with the recipe kept for its setup."""
    return subject_for_model(recipe.model.path, recipe)


def subject_for_model(source: str, recipe: Any = None) -> EstimateSubject:
    """A model as `model.path` names it (the embedded one, a folder, a .gguf file, a hub
    id) or a preset name."""
    if source == EMBEDDED_MODEL:
        return EstimateSubject(get_preset(EMBEDDED_PRESET), recipe=recipe)
    candidate = Path(source).expanduser()
    if candidate.exists() or candidate.suffix == ".gguf":
        return subject_from_path(candidate, recipe)
    if is_preset(source):
        return EstimateSubject(get_preset(source), recipe=recipe)
    if looks_like_hub_id(source):
        arch = from_hub(source)
        return EstimateSubject(arch, recipe=recipe, config=arch_config_from_hub(source))
    raise UserError(
        f"unknown preset '{source}' (and no such file); closest presets: "
        f"{', '.join(closest_names(source))}"
    )


def recorded_model(subject: EstimateSubject, report: runs.RunReport) -> None:
    """Use the transformers config the run's report was estimated with, so `estimate RUN`
    dry-runs exactly the model the report did (runmemory.run_estimates)."""
    from finetune.memory.dryrun import describe
    from finetune.memory.runmemory import config_from_record

    subject.config = config_from_record(report.model_config, str(report.path))
    subject.arch = describe(subject.config, subject.arch.name)


def recorded_setup(fields: dict[str, Any]) -> Any:
    """The setup the run's own report estimated (its real sequence length and the logits
    positions its loop computed), so `estimate RUN` shows the same figure as the report;
    None when this version's `Setup` no longer takes those fields."""
    from finetune.memory.estimate import Setup, recorded_fields

    try:
        return Setup(**recorded_fields(fields))
    except (TypeError, UserError):
        return None
