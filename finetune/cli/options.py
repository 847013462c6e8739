"""Arguments and options shared by several commands, and the closed choices as Enums (so
`--help` lists them and a wrong one is refused before anything loads)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from finetune import choices
from finetune.choices import choice_enum

EstimateMethod = choice_enum("EstimateMethod", choices.ESTIMATE_METHODS)
Quant = choice_enum("Quant", choices.QUANTS)
Dtype = choice_enum("Dtype", choices.DTYPES)
Optimizer = choice_enum("Optimizer", choices.OPTIMIZERS)
Objective = choice_enum("Objective", choices.OBJECTIVES)
Reference = choice_enum("Reference", choices.REFERENCES)
Attention = choice_enum("Attention", choices.ATTENTIONS)
Sharding = choice_enum("Sharding", choices.SHARDINGS)
EstimateFormat = choice_enum("EstimateFormat", choices.ESTIMATE_FORMATS)
ExportFormat = choice_enum("ExportFormat", choices.EXPORT_FORMATS)
GGUFType = choice_enum("GGUFType", choices.GGUF_TYPES)
CombineMethod = choice_enum("CombineMethod", choices.COMBINE_METHODS)


def value(choice: Enum | None) -> str | None:
    """The plain string of an Enum option (None when not given)."""
    return None if choice is None else choice.value


Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Dotted overrides such as train.lr=1e-4 adapter.r=16.", show_default=False),
]
RecipeArg = Annotated[Path, typer.Argument(help="A YAML recipe.", show_default=False)]
StrictOpt = Annotated[
    bool, typer.Option("--strict", help="Treat data warnings as errors (exit code 2).")
]


RunOrModel = Annotated[
    str,
    typer.Argument(
        help="A run directory, an adapter folder, or a model (folder, .gguf, hub id, "
        "smollm2-135m-instruct).",
        show_default=False,
    ),
]
RunArg = Annotated[
    str, typer.Argument(help="A run directory or an adapter folder.", show_default=False)
]
BaseModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Use this base model instead of the one the run names."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
MatchQuantizedOpt = Annotated[
    bool,
    typer.Option(
        "--match-quantized",
        help="After int8/nf4 training: fold into the dequantized quantized weights the "
        "adapter was trained against, instead of the original ones.",
    ),
]
ToleranceOpt = Annotated[
    float | None,
    typer.Option(help="Max |logit difference| the self-check accepts [default: by dtype/type]."),
]


SampleOpt = Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding.")]
TemperatureOpt = Annotated[
    float | None, typer.Option(help="Sampling temperature (implies --sample).")
]
TopPOpt = Annotated[float | None, typer.Option(help="Nucleus sampling mass (implies --sample).")]
