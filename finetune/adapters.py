"""A closed registry from adapter method to a builder of peft's own config; attach; count.

Never reimplement an adapter: every method here is one of peft's configs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.recipe import AdapterSection

ConfigBuilder = Callable[[AdapterSection, Any], Any]


def _lora(spec: AdapterSection, tokenizer_path: Any) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        use_dora=spec.method == "dora",
    )


def _ia3(spec: AdapterSection, tokenizer_path: Any) -> Any:
    from peft import IA3Config, TaskType

    targets = spec.target_modules
    # IA3 scales the *input* of feed-forward layers and the output of the others; peft
    # needs to know which targets are feed-forward. down_proj is the usual one (Llama).
    if targets == "all-linear":
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules="all-linear")
    feedforward = [t for t in targets if t in ("down_proj", "fc2", "w2", "c_proj")]
    return IA3Config(
        task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=feedforward
    )


def _prefix(spec: AdapterSection, tokenizer_path: Any) -> Any:
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=spec.num_virtual_tokens,
        prefix_projection=spec.prefix_projection,
    )


def _prompt(spec: AdapterSection, tokenizer_path: Any) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    if spec.prompt_init_text:
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


REGISTRY: dict[str, ConfigBuilder] = {
    "lora": _lora,
    "dora": _lora,
    "ia3": _ia3,
    "prefix": _prefix,
    "prompt": _prompt,
}

# Methods whose weights live beside Linear layers and can be folded into the base.
MERGEABLE = frozenset({"lora", "dora", "ia3"})


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({self.percent:.3f}%)"


def build_config(spec: AdapterSection, tokenizer_path: Path | str | None = None) -> Any:
    """Build peft's config for `spec.method`."""
    return REGISTRY[spec.method](spec, tokenizer_path)


def attach(
    model: Any,
    spec: AdapterSection,
    *,
    quantized: bool,
    gradient_checkpointing: bool,
    tokenizer_path: Path | str | None = None,
) -> Any:
    """Wrap `model` in a peft model for `spec` (or load `spec.init_from`'s weights).

    Raises:
        UserError: target modules that match nothing, or an adapter folder that won't load.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        # Upcasts norms/embeddings to fp32 for stable training and enables input grads.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if spec.init_from:
        return load_init_adapter(model, spec)
    if spec.target_modules == "all-linear" and spec.method in MERGEABLE:
        spec = spec.model_copy(update={"target_modules": linear_module_names(model)})
    try:
        return get_peft_model(model, build_config(spec, tokenizer_path))
    except ValueError as err:
        if "not found in the base model" in str(err) or "Target modules" in str(err):
            raise UserError(
                f"adapter.target_modules {spec.target_modules} match no layer; the Linear "
                f"layers of this model are {', '.join(linear_module_names(model))} "
                "(or use all-linear)"
            ) from None
        raise


def linear_module_names(model: Any) -> list[str]:
    """Short names of every Linear layer except the output head: what "all-linear" means.

    Resolved here rather than by peft because peft saves IA3's expanded "all-linear" targets
    as full paths, which its own subset check then rejects when the adapter is reloaded.
    """
    import torch

    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    return sorted(names)


def load_init_adapter(model: Any, spec: AdapterSection) -> Any:
    from peft import PeftModel

    check_init_from(spec)
    return PeftModel.from_pretrained(model, str(spec.init_from), is_trainable=True)


# peft's names for the methods, as adapter_config.json records them.
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}


def check_init_from(spec: AdapterSection) -> None:
    """The adapter in `adapter.init_from` must be the one the recipe describes.

    Its weights are loaded as they are, so a different method, rank or target list would
    train that adapter while the run's recipe.yaml records another.

    Raises:
        UserError: no readable adapter_config.json, or a method, r or target that differs.
    """
    import json

    from finetune.inputs import require_file

    if not spec.init_from:
        return
    path = Path(spec.init_from) / "adapter_config.json"
    require_file(path, "adapter.init_from", "an adapter folder (with adapter_config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        kind = PEFT_TYPES.get(str(config.get("peft_type", "")).upper(), config.get("peft_type"))
    except (ValueError, UnicodeDecodeError, RecursionError, AttributeError):
        raise UserError(f"adapter.init_from: {path} is not a valid adapter config") from None
    method = "dora" if kind == "lora" and config.get("use_dora") else kind
    found = {"method": method}
    if method in ("lora", "dora"):
        found["r"] = config.get("r")
    if method in MERGEABLE and isinstance(spec.target_modules, list):  # all-linear: any
        targets = config.get("target_modules")
        found["target_modules"] = sorted(targets) if isinstance(targets, list) else targets
    targets = sorted(spec.target_modules) if isinstance(spec.target_modules, list) else None
    wanted = {"method": spec.method, "r": spec.r, "target_modules": targets}
    for key, value in found.items():
        if value != wanted[key]:
            raise UserError(
                f"adapter.init_from: {spec.init_from} holds a {method} adapter with {key} "
                f"{value}, but the recipe says adapter.{key} {wanted[key]}; set adapter.{key} "
                "to match, or start without init_from"
            )


def count_parameters(model: Any) -> ParameterCount:
    """Trainable and total parameters as peft counts them (4-bit weights unpacked)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParameterCount(trainable, total)


def gradient_checkpointing_allowed(method: str) -> tuple[bool, str]:
    """Whether gradient checkpointing can be used with `method`, and why not."""
    if method == "prefix":
        return False, (
            "prefix tuning passes its prefix as past key values, which peft cannot recompute "
            "under gradient checkpointing; turned it off"
        )
    return True, ""
