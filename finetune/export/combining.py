"""`finetune combine`: LoRA adapters trained on one base made into one adapter folder with
peft's weighted adapter merging."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune import inference, models, runs
from finetune.choices import COMBINE_METHODS
from finetune.errors import UserError, closest
from finetune.export.checks import check_output
from finetune.inputs import check_number
from finetune.recipe import dump_recipe
from finetune.targets import Target, not_an_adapter, read_adapter_config, resolve_target


@dataclass
class CombineReport:
    out: str
    method: str
    weights: list[float]
    density: float | None
    sources: list[str]
    base_model: str


def parse_weights(text: str | None, n: int) -> list[float]:
    """One finite, non-negative number per adapter from "0.6,0.4", not all zero; 1/N each
    (the average) when omitted.

    Raises:
        UserError: not numbers, nan, infinite, negative, all zero, or not one per adapter.
    """
    if text is None:
        return [1.0 / n] * n
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(
            f"--weights {text!r}: give comma-separated numbers such as 0.6,0.4"
        ) from None
    if len(weights) != n:
        raise UserError(
            f"--weights has {len(weights)} numbers for {n} adapters; give one per adapter"
        )
    # nan or inf would make every tensor of the combined adapter nan, silently; a negative
    # weight flips an adapter's update (ties and dare take its square root).
    weights = [check_number("--weights", w, ge=0, le=1e6) for w in weights]
    if not any(weights):
        raise UserError(
            f"--weights {text}: all zero makes an adapter that changes nothing; give each "
            "adapter a positive weight (they are usually fractions that sum to 1)"
        )
    return weights


def refuse_duplicates(targets: list[Target], explicit: bool) -> None:
    """The same adapter twice (by path or by identical weights) with the default weights is
    almost always a typo; with --weights it is the user's stated intent."""
    if explicit:
        return
    seen: dict[str, Target] = {}
    for t in targets:
        key = adapter_fingerprint(t.adapter_dir)
        if key in seen:
            raise UserError(
                f"{t.given}: the same adapter as {seen[key].given}; combine different adapters, "
                "or pass --weights to weigh one adapter more on purpose"
            )
        seen[key] = t


def adapter_fingerprint(adapter_dir: Path) -> str:
    """sha256 of the adapter's weights file (copies of one adapter are the same adapter)."""
    import hashlib

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return str(adapter_dir.resolve())
    digest = hashlib.sha256()
    with weights.open("rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# peft's "linear" multiplies the weighted sums of A and of B, so N copies of one adapter at
# weight 1/N give N times its update; "cat" stacks the ranks and is exactly
# sum(w_i * delta_W_i). finetune's linear is that weighted sum.
PEFT_COMBINATION = {"linear": "cat"}


def combine(
    sources: list[str],
    out: Path,
    *,
    method: str = "linear",
    weights: str | None = None,
    density: float | None = None,
    force: bool = False,
) -> CombineReport:
    """Combine LoRA adapters trained on the same base with peft's weighted adapter merging.

    Writes a standard adapter folder (plus the first run's `recipe.yaml`, so generate and eval
    find the base model).

    Raises:
        UserError: fewer than two adapters, adapters that do not fit together (base, method,
            target modules), bad weights, method or density, or an existing output.
    """
    if method not in COMBINE_METHODS:
        raise UserError(
            f"--method must be one of {', '.join(COMBINE_METHODS)} (got {method!r})"
            f"{closest(method, COMBINE_METHODS)}"
        )
    if len(sources) < 2:
        raise UserError("combine needs at least two runs or adapter folders")
    if method == "linear" and density is not None:
        raise UserError("--density applies to ties, dare_linear and dare_ties, not linear")
    if density is not None:
        check_number("--density", density, gt=0, le=1)
    if method != "linear" and density is None:
        density = 1.0 if method == "ties" else 0.5
    numbers = parse_weights(weights, len(sources))
    targets = [resolve_target(s) for s in sources]
    check_output(out, force, targets, "combined")
    check_compatible(targets)
    refuse_duplicates(targets, explicit=weights is not None)

    first = targets[0]
    inference.quiet_loading()
    loaded = models.load_model(first.model.model_copy(update={"quantization": "none"}), "cpu")
    names = [f"source{i}" for i in range(len(targets))]
    model = loaded.model
    for name, t in zip(names, targets, strict=True):
        model = inference.attach_adapter(model, t.adapter_dir, first.model.path, name)
    try:
        model.add_weighted_adapter(
            names,
            numbers,
            "default",
            combination_type=PEFT_COMBINATION.get(method, method),
            density=density,
        )
    except ValueError as err:
        raise UserError(f"combine: peft refused: {models.first_line(err)}") from None
    model.set_adapter("default")  # first: deleting the active adapter makes peft warn
    for name in names:
        model.delete_adapter(name)
    report = CombineReport(
        str(out), method, numbers, density, [str(t.given) for t in targets], first.model.path
    )

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if first.recipe is not None:
            runs.write_recipe_copy(folder, dump_recipe(first.recipe))
        (folder / "combine.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        (folder / "README.md").write_text(combine_card(report), encoding="utf-8")

    runs.write_atomically(out, write)
    return report


def check_compatible(targets: list[Target]) -> None:
    """Refuse adapters that do not fit together, naming what differs."""
    first = targets[0]
    for t in targets:
        if t.adapter_dir is None:
            raise not_an_adapter(t, "combine needs")
    first_method = first.method
    first_config = read_adapter_config(first.adapter_dir)
    for t in targets[1:]:
        if t.model.path != first.model.path:
            raise UserError(
                f"{t.given}: trained on base model {t.model.path}, but {first.given} on "
                f"{first.model.path}; combine adapters of the same base model"
            )
        if t.method != first_method:
            raise UserError(
                f"{t.given}: a {t.method} adapter, but {first.given} is {first_method}; combine "
                "adapters of the same method"
            )
        config = read_adapter_config(t.adapter_dir)
        mine, theirs = target_list(config), target_list(first_config)
        if mine != theirs:
            raise UserError(
                f"{t.given}: targets {', '.join(mine)}, but {first.given} targets "
                f"{', '.join(theirs)}; combine adapters with the same target modules"
            )
    if first_method != "lora":
        raise UserError(
            "combine handles LoRA adapters (peft's weighted adapter merging); these are "
            f"{first_method}"
        )


def target_list(config: dict[str, Any]) -> list[str]:
    targets = config.get("target_modules") or []
    return sorted([targets] if isinstance(targets, str) else targets)


def combine_card(report: CombineReport) -> str:
    parts = ", ".join(f"`{s}` × {w:g}" for s, w in zip(report.sources, report.weights, strict=True))
    density = f", density {report.density:g}" if report.density is not None else ""
    return (
        "---\nlibrary_name: peft\n"
        f"base_model: {report.base_model}\n---\n\n"
        "# Combined LoRA adapter\n\n"
        f"Made by `finetune combine` with peft's `add_weighted_adapter` ({report.method}{density}) "
        f"from {parts}.\n\n"
        + (
            "Linear: the weighted sum of the adapters' updates (its rank is the sum of their "
            "ranks).\n\n"
            if report.method == "linear"
            else ""
        )
        + "`recipe.yaml` is the first source's recipe (it names the base model), so "
        "`finetune generate`, `eval`, `merge` and `export` accept this folder as a run.\n"
    )
