"""What a command runs on: a run directory, an adapter folder or a model. One resolver for all.

A target is one of
- a run directory (`runs/<name>/`): the base model from its `recipe.yaml`, the adapter from
  `adapter/`;
- an adapter folder (`adapter_config.json` inside, e.g. `runs/<name>/adapter`, a checkpoint's
  adapter, or what `finetune combine` writes): the base from a `recipe.yaml` beside it, one
  folder up, or in the run a checkpoint belongs to, else from `base_model_name_or_path` in
  its `adapter_config.json`;
- a model, in any form `model.path` accepts (folder, .gguf file, hub id, embedded name).

generate, chat, eval, merge, export, combine and estimate all resolve their argument here;
estimate also takes what only it sizes (presets, recipe files, a config.json) first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import models, runs
from finetune.errors import UserError
from finetune.inputs import refuse_special, refuse_special_inside
from finetune.methods import PEFT_TYPES, method_of_config
from finetune.precision import default_device, resolve_quantization
from finetune.recipe import ModelSection, Recipe

ADAPTER_CONFIG = "adapter_config.json"  # peft's, in every adapter folder


@dataclass
class Target:
    """A resolved RUN_OR_MODEL argument: the base model, and the adapter if there is one.

    Attributes:
        given: the argument as the user wrote it.
        kind: "run", "adapter" or "model".
        model: the base model (or the model), as a recipe's model section.
        adapter_dir: the adapter folder; None for a model, or a run that has none yet.
        recipe: the recipe that made the run or adapter, if there is one.
        run_dir: the folder that recipe is in (a run directory, or an exported adapter).
        trained_quantization: the base quantization the adapter was trained against.
    """

    given: str
    kind: str
    model: ModelSection
    adapter_dir: Path | None = None
    recipe: Recipe | None = None
    run_dir: Path | None = None
    trained_quantization: str = "none"

    @property
    def method(self) -> str | None:
        return adapter_method(self.adapter_dir) if self.adapter_dir else None


def resolve_target(given: str, model: str | None = None, *, need_adapter: bool = True) -> Target:
    """Resolve RUN_OR_MODEL; `model` replaces the base model the run or adapter names.

    `need_adapter`: refuse a run directory without adapter/ (one that stopped early); with
    False (estimate, which reads only its recipe) such a run resolves without an adapter.

    Raises:
        UserError: a run directory without an adapter, or a folder that is none of the three.
    """
    path = Path(given).expanduser()
    if refuse_special(path, "target", "a run directory, an adapter folder or a model") == "folder":
        refuse_special_inside(path, "target", "a run directory, an adapter folder or a model")
    if model is not None:
        refuse_special(Path(model).expanduser(), "--model", "a model folder or a .gguf file")
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        return adapter_target(given, path, model)
    if runs.holds_recipe(path):
        adapter_dir = runs.require_adapter(path) if need_adapter else None
        return made_by_recipe(given, "run", path, adapter_dir, model)
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(
            f"{path}: not a run directory (no recipe.yaml), an adapter folder (no "
            "adapter_config.json) or a model folder (no config.json)"
        )
    return Target(given, "model", ModelSection(path=model or given))


def adapter_target(given: str, adapter_dir: Path, model: str | None) -> Target:
    """An adapter folder: its base from the recipe that made it, else from its config."""
    folder = runs.recipe_beside(adapter_dir)
    if folder is not None:
        return made_by_recipe(given, "adapter", folder, adapter_dir, model)
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base and not model:
        raise UserError(
            f"{adapter_dir}: the adapter does not name its base model; pass --model PATH"
        )
    return Target(given, "adapter", ModelSection(path=str(model or base)), adapter_dir)


def made_by_recipe(
    given: str, kind: str, folder: Path, adapter_dir: Path | None, model: str | None
) -> Target:
    """A run or adapter made by the recipe in `folder`: its base model (or `model`) and the
    quantization the adapter was trained against."""
    recipe = runs.read_recipe(folder)
    spec = recipe.model.model_copy(update={"path": model}) if model else recipe.model
    quantization = trained_quantization(folder, recipe)
    return Target(given, kind, spec, adapter_dir, recipe, folder, quantization)


def trained_quantization(run_dir: Path, recipe: Recipe) -> str:
    """The quantization the adapter was trained against: the report's record, else the recipe's."""
    report = runs.read_report(run_dir)
    if report is not None:
        return report.quantization
    return resolve_quantization(recipe.model.quantization, default_device())


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable adapter config ({models.first_line(err)})") from None


def adapter_method(adapter_dir: Path) -> str:
    """The finetune method name (lora, dora, ia3, prefix, prompt) of an adapter folder."""
    config = read_adapter_config(adapter_dir)
    method = method_of_config(config)
    if method is None:
        raise UserError(
            f"{adapter_dir}: peft type {config.get('peft_type')!r} is not one finetune handles "
            f"({', '.join(sorted(PEFT_TYPES))})"
        )
    return method


def not_an_adapter(target: Target, needs: str) -> UserError:
    """The error for a target without an adapter where `needs` one: a path that does not
    exist is not found (it was read as a hub id, a model), not "a model"."""
    given = target.given
    if not Path(given).exists() and not models.looks_like_hub_id(given):
        return UserError(f"{given}: not found; {needs} a run directory or an adapter folder")
    return UserError(f"{given}: a model, not a run or adapter folder; {needs} a trained adapter")
