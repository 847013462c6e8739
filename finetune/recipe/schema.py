"""The whole recipe: its sections, the defaults its adapter method sets, and the checks
across sections (each message names the fields that clash)."""

from __future__ import annotations

from pathlib import Path

from pydantic import PrivateAttr, model_validator

from finetune.inputs import split_path
from finetune.methods import METHODS, VIRTUAL_TOKEN_METHODS
from finetune.recipe.sections import (
    AdapterSection,
    DataSection,
    EvalSection,
    ModelSection,
    OutputSection,
    Section,
    TrainSection,
)


class Recipe(Section):
    model: ModelSection = ModelSection()
    adapter: AdapterSection = AdapterSection()
    data: DataSection
    train: TrainSection = TrainSection()
    output: OutputSection = OutputSection()
    eval: EvalSection = EvalSection()
    # The file this recipe was loaded from (None when built in code): an input of the run,
    # so the run may not be written over it.
    _source: Path | None = PrivateAttr(None)
    # Defaults this recipe took from its adapter method (said by the run), e.g. "train.lr".
    _method_defaults: list[str] = PrivateAttr(default_factory=list)

    def input_paths(self) -> list[Path]:
        """Every file or folder the run reads: recipe, data, local model, initial adapter."""
        found = [self._source, split_path(self.data.path)[0]]
        found += [split_path(self.data.eval_path)[0]] if self.data.eval_path else []
        found += [Path(self.adapter.init_from)] if self.adapter.init_from else []
        if Path(self.model.path).expanduser().exists():
            found.append(Path(self.model.path).expanduser())
        return [p for p in found if p is not None]

    def sealed_paths(self) -> list[Path]:
        """Input folders a run may not be written into: the adapter it starts from."""
        return [Path(self.adapter.init_from)] if self.adapter.init_from else []

    @model_validator(mode="after")
    def _method_defaults_for_unset(self) -> Recipe:
        unset = [k for k in ("lr", "epochs") if k not in self.train.model_fields_set]
        if "epochs" in unset and self.train.max_steps:
            unset.remove("epochs")  # max_steps decides; epochs would be a note about nothing
        method = METHODS[self.adapter.method]
        lr = method.default_lr(self.adapter.prefix_projection)
        defaults = {"lr": lr, "epochs": method.epochs}
        for key in unset:
            setattr(self.train, key, defaults[key])
        self._method_defaults = [f"train.{key}" for key in unset]
        return self

    def method_default_notes(self) -> list[str]:
        """One line per default taken from the adapter method, for the run's notes."""
        method = self.adapter.method
        if method == "prefix" and self.adapter.prefix_projection:
            method = "prefix (with prefix_projection)"
        return [
            f"{key} {getattr(self.train, key.split('.')[1]):g}: the {method} "
            f"default (set {key} to choose another)"
            for key in self._method_defaults
        ]

    @model_validator(mode="after")
    def _compatible(self) -> Recipe:
        method = self.adapter.method
        if method == "prompt" and self.adapter.prefix_projection:
            raise ValueError("adapter.prefix_projection applies to prefix tuning, not prompt")
        if self.data.packing and method in VIRTUAL_TOKEN_METHODS:
            raise ValueError(
                f"data.packing cannot be used with adapter.method {method}: its virtual "
                "tokens would be shared by every packed example; set data.packing: false"
            )
        if method in VIRTUAL_TOKEN_METHODS and self.adapter.target_modules != "all-linear":
            # The default all-linear is accepted: a resolved recipe writes every default out.
            raise ValueError(
                f"adapter.target_modules applies to lora, dora and ia3; {method} tuning adds "
                "virtual tokens and adapts no module; remove adapter.target_modules"
            )
        check_objective(self)
        if method != "prompt" and self.adapter.prompt_init_text:
            raise ValueError("adapter.prompt_init_text needs adapter.method: prompt")
        if method != "prefix" and self.adapter.prefix_init_text:
            raise ValueError("adapter.prefix_init_text needs adapter.method: prefix")
        init_text = self.adapter.prompt_init_text or self.adapter.prefix_init_text
        if self.adapter.virtual_init == "random" and init_text:
            raise ValueError(
                f"adapter.{method}_init_text is not used with adapter.virtual_init: random; "
                "remove one of them"
            )
        return self


# The data format each objective trains on.
OBJECTIVE_FORMATS = {"dpo": "preference", "orpo": "preference", "kto": "kto"}


def check_objective(recipe: Recipe) -> None:
    """The objective, its data format, its parameters and the adapter agree."""
    t, d, method = recipe.train, recipe.data, recipe.adapter.method
    wanted = OBJECTIVE_FORMATS.get(t.objective)
    if wanted and d.format != wanted:
        raise ValueError(
            f"train.objective {t.objective} trains on data.format {wanted}, not {d.format}; "
            f"set data.format: {wanted} (columns {preference_columns(wanted)})"
        )
    if not wanted and d.format in ("preference", "kto"):
        choices = "dpo or orpo" if d.format == "preference" else "kto"
        raise ValueError(
            f"data.format {d.format} needs a preference objective; set train.objective: {choices}"
        )
    if wanted and d.packing:
        raise ValueError(
            f"data.packing cannot be used with train.objective {t.objective}: each response is "
            "scored as a whole sequence; set data.packing: false"
        )
    if wanted and d.train_on_prompt:
        raise ValueError(
            f"data.train_on_prompt cannot be used with train.objective {t.objective}: only "
            "responses are compared; set data.train_on_prompt: false"
        )
    if t.label_smoothing and not (t.objective == "dpo" and t.dpo_loss == "robust"):
        raise ValueError(
            "train.label_smoothing applies to train.objective dpo with train.dpo_loss robust; "
            "set train.dpo_loss: robust or remove train.label_smoothing"
        )
    if t.dpo_sft_weight and t.objective != "dpo":
        raise ValueError(
            f"train.dpo_sft_weight applies to train.objective dpo, not {t.objective}; remove "
            "train.dpo_sft_weight (orpo has its own token loss)"
        )
    if t.reference == "cached" and t.objective not in ("dpo", "kto"):
        raise ValueError(
            f"train.reference cached applies to train.objective dpo or kto; {t.objective} has "
            "no reference model; set train.reference: forward"
        )
    if t.objective == "kto" and t.micro_batch_size < 2:
        # The KL term is estimated from other rows' completions within the micro-batch.
        raise ValueError(
            "train.objective kto needs train.micro_batch_size of at least 2: its KL term pairs "
            "each prompt with another row's completion; raise train.micro_batch_size"
        )
    if t.objective in ("dpo", "kto", "orpo") and method in VIRTUAL_TOKEN_METHODS:
        # The reference is the model with the adapter off; virtual tokens started from text
        # are no no-op, so the policy would start away from its reference (rewards not 0).
        raise ValueError(
            f"train.objective {t.objective} cannot train adapter.method {method}: its virtual "
            "tokens change the model from step 0, so the reference (the adapter disabled) "
            "would not be the policy training starts from, and preference accuracy is "
            "measured against it; use lora, dora or ia3"
        )


def preference_columns(data_format: str) -> str:
    return (
        "prompt, chosen, rejected" if data_format == "preference" else "prompt, completion, label"
    )


def field_help(section: str, key: str) -> str:
    """The description of `section.key`, as written on the schema."""
    model = Recipe.model_fields[section].annotation
    return model.model_fields[key].description or ""
