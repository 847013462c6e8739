"""`finetune estimate`: resolve the target, build the setup, dry-run it, render.

The printed estimate always comes from the dry run (dryrun.py); the analytic model
(estimate.estimate) is no longer on this path.

Kept here so that the CLI only parses and dispatches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from finetune.choices import ADAPTER_METHODS
from finetune.errors import UserError
from finetune.memory import setup_from_recipe
from finetune.memory.dryrun import estimate_from_config
from finetune.memory.estimate import Setup
from finetune.memory.fit import FitSearch, check_gpu_gb, fit_advice, fit_lines
from finetune.memory.render import (
    GB,
    plot_comparison,
    print_tables,
    to_json,
    to_markdown,
)
from finetune.memory.target import resolve_subject
from finetune.outputs import claim_output
from finetune.precision import autocast_dtype, resolve_mixed_precision

SETUP_FIELDS = {f.name for f in fields(Setup)}


@dataclass(frozen=True)
class EstimateOptions:
    """What the command line sets of the estimated setup; None: not given (the recipe's
    value, or the default, stands)."""

    method: str | None = None
    quant: str | None = None
    double_quant: bool | None = None
    dtype: str | None = None
    r: int | None = None
    targets: str | None = None  # comma-separated module names, or all-linear
    virtual_tokens: int | None = None
    batch: int | None = None
    seq: int | None = None
    grad_ckpt: bool | None = None
    optimizer: str | None = None
    attn: str | None = None
    objective: str | None = None
    reference: str | None = None
    masked: bool | None = None
    processes: int | None = None
    sharding: str | None = None


# Options that set a recipe field: the recipe's bounds apply, in train's words.
OPTION_FIELDS = {
    "r": ("adapter", "r"),
    "targets": ("adapter", "target_modules"),
    "virtual_tokens": ("adapter", "num_virtual_tokens"),
    "batch": ("train", "micro_batch_size"),
    "seq": ("data", "max_length"),
}


def check_as_recipe_fields(given: dict[str, Any]) -> None:
    """Refuse an option out of its recipe field's bounds with the line train gives for the
    field (`--r 1000000` used to end in a pydantic or peft traceback).

    Raises:
        UserError: "--r 1000000: adapter.r: Input should be less than or equal to 4096".
    """
    from pydantic import ValidationError

    from finetune.recipe import Recipe
    from finetune.recipe.load import describe_errors

    method = given.get("method")
    for option, (section, field) in OPTION_FIELDS.items():
        if option not in given:
            continue
        value = given[option]
        raw: dict[str, Any] = {"data": {"path": "data.jsonl"}}
        raw.setdefault(section, {})[field] = list(value) if isinstance(value, tuple) else value
        if method in ADAPTER_METHODS:
            raw.setdefault("adapter", {})["method"] = method
        try:
            Recipe.model_validate(raw)
        except ValidationError as err:
            shown = ",".join(value) if isinstance(value, tuple) else str(value)
            name = "--" + option.replace("_", "-")
            raise UserError(f"{name} {shown or repr(shown)}: {describe_errors(err)}") from None


def estimate_with_recipe_lines(resolved: Any, setup: Setup, targets_given: bool) -> Any:
    """The dry run of `setup`; target modules that pick no layer are named as the recipe's
    `adapter.target_modules` when they came from the recipe, not as the --targets option."""
    config = resolved.hf_config()
    try:
        return estimate_from_config(config, setup, resolved.arch.name)
    except UserError as err:
        from_recipe = resolved.recipe is not None and not targets_given
        if from_recipe and str(err).startswith("--targets:"):
            from finetune.adapters import check_target_modules
            from finetune.memory.dryrun import build_model

            check_target_modules(build_model(config, setup), resolved.recipe.adapter)
        raise


def bare_setup() -> Setup:
    """The setup of a model estimated without a recipe: training's defaults on a GPU, so
    `train.mixed_precision: auto` too (bf16 autocast, which casts float32 adapter weights
    and upcast layers at every matmul)."""
    return Setup(autocast=autocast_dtype(resolve_mixed_precision("auto", "cuda")))


def show_estimate(
    target: str,
    overrides: list[str],
    options: EstimateOptions,
    fmt: str,
    gpu: float | None,
    plot: Path | None,
    out: Any,
    force: bool = False,
    fit_search: bool = False,
) -> None:
    """Estimate `target` with the given options (None means "not given") and print it.

    Options given on the command line win over a recipe's values, which win over defaults.
    """
    check_gpu_gb(gpu)
    if fit_search and gpu is None:
        raise UserError("--fit needs --gpu GB: the memory to fit in")
    if plot is not None:  # checked before any work, like every output
        source = Path(target).expanduser()
        claim_output(plot, option="--plot", kind="file", force=force, inputs=[source])
    resolved = resolve_subject(target, overrides)
    if overrides and resolved.recipe is None:
        raise UserError(
            f"{overrides[0]}: dotted overrides change a recipe, and {target} is not a recipe "
            "or run directory; use the options (--method, --seq, ...) instead"
        )
    device = "cuda"
    if resolved.measured and str(resolved.measured.get("device", "")).startswith("cpu"):
        device = "cpu"  # estimate the run as it was made
    if resolved.setup is not None:
        base = resolved.setup
    else:
        base = setup_from_recipe(resolved.recipe, device) if resolved.recipe else bare_setup()
    given = {k: v for k, v in asdict(options).items() if v is not None and k in SETUP_FIELDS}
    if isinstance(given.get("targets"), str) and given["targets"] != "all-linear":
        given["targets"] = tuple(t.strip() for t in given["targets"].split(",") if t.strip())
    check_as_recipe_fields(given)
    setup = replace(base, **given)
    est = estimate_with_recipe_lines(resolved, setup, "targets" in given)
    fit = None
    if gpu is not None:
        search = FitSearch(est, gpu * GB)
        fit = fit_advice(est, gpu * GB, search)
        if fit_search:
            fit += fit_lines(est, gpu * GB, search)
    if fmt == "json":
        out.print_json(to_json(est, fit))
    elif fmt == "markdown":
        out.print(to_markdown(est, resolved.measured, fit), markup=False, highlight=False)
    else:
        print_tables(est, out, fit, resolved.measured)
    if plot is not None:
        plot_comparison(est, plot)
        if fmt == "table":
            out.print(f"wrote {plot}")
