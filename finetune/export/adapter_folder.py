"""`finetune export --format adapter`: the run's adapter folder as it is, with its recipe and a
model card, so it can be shared and loaded with peft alone."""

from __future__ import annotations

import shutil
from pathlib import Path

from finetune import runs
from finetune.export.checks import require_adapter
from finetune.recipe import dump_recipe
from finetune.targets import Target


def export_adapter(target: Target, out: Path) -> None:
    """Copy the target's adapter folder to `out` (written whole or not at all)."""
    method = require_adapter(target, "export --format adapter")
    runs.write_atomically(out, lambda tmp: copy_adapter(target, method, tmp))


def copy_adapter(target: Target, method: str, folder: Path) -> None:
    shutil.copytree(target.adapter_dir, folder, dirs_exist_ok=True)
    if target.recipe is not None:
        runs.write_recipe_copy(folder, dump_recipe(target.recipe))
    (folder / "README.md").write_text(adapter_card(target, method), encoding="utf-8")


def adapter_card(target: Target, method: str) -> str:
    recipe = target.recipe
    trained = ""
    if recipe is not None:
        trained = (
            f"- trained with: lr {recipe.train.lr}, "
            f"{recipe.train.max_steps or recipe.train.epochs} "
            f"{'steps' if recipe.train.max_steps else 'epochs'}, data `{recipe.data.path}` "
            f"({recipe.data.format})\n"
        )
    return (
        "---\nlibrary_name: peft\n"
        f"base_model: {target.model.path}\n---\n\n"
        f"# {method} adapter\n\n"
        f"Exported by `finetune export --format adapter` from `{target.given}`.\n\n"
        f"- method: {method}\n"
        f"- base model: `{target.model.path}` (quantization during training: "
        f"{target.trained_quantization})\n"
        f"{trained}"
        "- `recipe.yaml` (when present) is the fully resolved recipe that produced it.\n\n"
        'Use it with `finetune generate <this folder> "prompt"`, or with peft:\n\n'
        "```python\nfrom peft import PeftModel\n"
        'model = PeftModel.from_pretrained(base_model, "<this folder>")\n```\n'
    )
