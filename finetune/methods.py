"""The adapter methods: one table of what finetune knows about each, read by every stage.

A row says how peft names the method, how to build peft's own config for it, whether its
weights fold into the base model, whether it feeds virtual tokens instead of adapting
modules, whether gradient checkpointing can run with it, and what it trains with when
the recipe leaves `train.lr` or `train.epochs` unset. Adding a method is adding a row.

The estimator's "full" fine-tuning is no adapter method: the functions at the end take
any method name and answer for "full" too.

Never reimplement an adapter: every builder returns one of peft's configs. peft is
imported inside the builders, so reading the table (the recipe does) stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# (the recipe's adapter section, the base model's model_type, the tokenizer's folder) ->
# peft's config. The section is typed Any: the recipe imports this module, not the reverse.
ConfigBuilder = Callable[[Any, "str | None", Any], Any]


def _lora(spec: Any, model_type: str | None, tokenizer_path: Any) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        use_dora=spec.method == "dora",
    )


def _ia3(spec: Any, model_type: str | None, tokenizer_path: Any) -> Any:
    """IA3 scales the input of feed-forward layers and the output of the others: peft is
    told which targets are feed-forward."""
    from peft import IA3Config, TaskType

    targets = spec.target_modules
    if targets == "all-linear":  # peft picks the feed-forward layers by model type itself
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules="all-linear")
    return IA3Config(
        task_type=TaskType.CAUSAL_LM,
        target_modules=targets,
        feedforward_modules=feedforward_targets(targets, model_type),
    )


def feedforward_targets(targets: list[str], model_type: str | None) -> list[str]:
    """The targets IA3 scales at the input (feed-forward layers) rather than the output,
    by peft's own table for the model type; none for a model type peft does not list.

    peft's table names some layers by a dotted path (gpt2's mlp.c_proj); our targets are
    short names, and peft's subset check compares names, so the short name is kept.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING

    names = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type or "", [])
    short = {name.rsplit(".", 1)[-1] for name in names}
    return [t for t in targets if t in short]


def _prefix(spec: Any, model_type: str | None, tokenizer_path: Any) -> Any:
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=spec.num_virtual_tokens,
        prefix_projection=spec.prefix_projection,
    )


def _prompt(spec: Any, model_type: str | None, tokenizer_path: Any) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    if spec.prompt_init_text and spec.virtual_init == "text":
        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=spec.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=spec.prompt_init_text,
            tokenizer_name_or_path=str(tokenizer_path),
        )
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=spec.num_virtual_tokens
    )


@dataclass(frozen=True)
class Method:
    """What finetune knows about one adapter method.

    Attributes:
        name: the recipe's `adapter.method`.
        peft_type: peft's name, as adapter_config.json records it (DoRA is LoRA with
            `use_dora`).
        build: the builder of peft's config for this method.
        lr: `train.lr` when the recipe leaves it unset.
        projection_lr: the same with `adapter.prefix_projection`, where it differs: the
            MLP's weights move the whole prefix at once and diverge at the prefix's own lr.
        epochs: `train.epochs` when the recipe leaves it (and `train.max_steps`) unset.
        mergeable: its weights live beside Linear layers and fold into the base.
        virtual_tokens: it feeds virtual tokens in front of the sequence and adapts no
            module (no `target_modules`, no packing, nothing to merge).
        tokens_in_input: its virtual tokens are input positions (prompt tuning), so the
            last one predicts the first label; prefix tuning's are past keys and values.
        init_text_field: the adapter field its virtual tokens start from, else None.
        no_checkpointing: why gradient checkpointing is turned off with it ("" when it is
            allowed).
    """

    name: str
    peft_type: str
    build: ConfigBuilder
    lr: float
    epochs: float
    projection_lr: float | None = None
    mergeable: bool = False
    virtual_tokens: bool = False
    tokens_in_input: bool = False
    init_text_field: str | None = None
    no_checkpointing: str = ""

    @property
    def gradient_checkpointing(self) -> bool:
        return not self.no_checkpointing

    def default_lr(self, projection: bool = False) -> float:
        """`train.lr` when unset, for a prefix with or without the MLP reparametrisation."""
        return self.projection_lr if projection and self.projection_lr else self.lr


# Learning rates and epochs: prompt and prefix tuning move a few virtual tokens through a
# frozen model: they need far larger steps than LoRA, and about twice the passes over the
# data to reach the same exact match (measured on the quickstart and orders tasks:
# BENCHMARKS.md, "Every adapter method"); IA3, a few thousand scales, needs the two passes
# too (85.0% after one on the quickstart, 90.0% after two). LoRA and DoRA keep the common
# 2e-4, safe on large models (small ones like 1e-3).
# With prefix_projection the prefix's lr (1e-2) diverges on the quickstart (held-out loss
# 0.58 at step 0, 4.0 at step 20; 0% exact match after 124 steps).
PROJECTION_LR = 1e-3
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", "LORA", _lora, lr=2e-4, epochs=1.0, mergeable=True),
        Method("dora", "LORA", _lora, lr=2e-4, epochs=1.0, mergeable=True),
        Method("ia3", "IA3", _ia3, lr=3e-3, epochs=2.0, mergeable=True),
        Method(
            "prefix",
            "PREFIX_TUNING",
            _prefix,
            lr=1e-2,
            epochs=2.0,
            projection_lr=PROJECTION_LR,
            virtual_tokens=True,
            init_text_field="prefix_init_text",
            no_checkpointing="prefix tuning passes its prefix as past key values, which peft "
            "cannot recompute under gradient checkpointing; turned it off",
        ),
        Method(
            "prompt",
            "PROMPT_TUNING",
            _prompt,
            lr=1e-1,
            epochs=2.0,
            virtual_tokens=True,
            tokens_in_input=True,
            init_text_field="prompt_init_text",
        ),
    )
}

MERGEABLE = frozenset(name for name, m in METHODS.items() if m.mergeable)
VIRTUAL_TOKEN_METHODS = frozenset(name for name, m in METHODS.items() if m.virtual_tokens)
# peft's type name -> ours (the first method of a type: LORA is lora, DoRA is told by use_dora).
PEFT_TYPES = {m.peft_type: name for name, m in reversed(METHODS.items())}


def method_of_config(config: dict[str, Any]) -> str | None:
    """Our method name for an adapter_config.json's contents, or None for a peft type
    finetune does not handle."""
    kind = PEFT_TYPES.get(str(config.get("peft_type", "")).upper())
    return "dora" if kind == "lora" and config.get("use_dora") else kind


def build_config(spec: Any, model_type: str | None = None, tokenizer_path: Any = None) -> Any:
    """peft's config for the recipe's adapter section `spec`, for a base of `model_type`."""
    return METHODS[spec.method].build(spec, model_type, tokenizer_path)


def allows_gradient_checkpointing(method: str) -> bool:
    """Whether gradient checkpointing can run with `method` (full fine-tuning: yes)."""
    found = METHODS.get(method)
    return found is None or found.gradient_checkpointing


def input_virtual_tokens(method: str, num_virtual_tokens: int) -> int:
    """How many positions `method` puts in front of every sequence (prompt tuning's virtual
    tokens; 0 for every other method and full fine-tuning)."""
    found = METHODS.get(method)
    return num_virtual_tokens if found is not None and found.tokens_in_input else 0


def adapts_modules(method: str) -> bool:
    """Whether `method` is an adapter on named modules (`adapter.target_modules`)."""
    found = METHODS.get(method)
    return found is not None and not found.virtual_tokens
