"""The recipe: a YAML file loaded into one typed, validated object.

Config flows one way: YAML, then dotted `key=value` overrides, then one `Recipe` that is
passed explicitly to every stage. Unknown keys are errors that suggest the closest name;
each field's description is written once, on the schema, and reused by `--help`,
`validate` and docs.

`sections` holds each section's fields, `schema` the whole recipe and the checks across
sections, `load` the YAML file, the overrides and the resolved copy a run writes.

Relative paths in `model.path`, `data.path`, `data.eval_path` and `adapter.init_from` are
taken relative to the recipe file's folder; `output.dir` is relative to where you run.
"""

from finetune.recipe.load import apply_override, dump_recipe, load_recipe, validate
from finetune.recipe.schema import Recipe, field_help
from finetune.recipe.sections import (
    EMBEDDED_MODEL,
    AdapterSection,
    DataSection,
    EvalSection,
    ModelSection,
    OutputSection,
    TrainSection,
)

__all__ = [
    "EMBEDDED_MODEL",
    "AdapterSection",
    "DataSection",
    "EvalSection",
    "ModelSection",
    "OutputSection",
    "Recipe",
    "TrainSection",
    "apply_override",
    "dump_recipe",
    "field_help",
    "load_recipe",
    "validate",
]
