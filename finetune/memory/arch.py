"""A model's headline numbers, for naming it in an estimate and for the presets.

`Architecture` is a plain frozen dataclass: hidden width, MLP width, layers, heads,
vocabulary and the few layout facts (biases, tied embeddings, norms per layer) a preset
needs to become a transformers config (`to_hf_config`). Nothing is counted from it: the
dry run counts the model transformers builds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from finetune.errors import UserError

# Fields without which no decoder can be counted; the rest have safe defaults.
REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)
# Model types whose decoder layer has two extra norms around attention and MLP.
FOUR_NORM_TYPES = ("gemma2", "gemma3_text")


@dataclass(frozen=True)
class Architecture:
    """A decoder-only transformer as the estimator sees it (all widths in elements)."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    fused: bool = False
    norms_per_layer: int = 2
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    name: str = ""
    context: int = 0  # max_position_embeddings; 0: transformers' default for the type

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers config dict for this architecture (enough for AutoConfig.for_model)."""
        config: dict[str, Any] = {
            "model_type": self.model_type,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "attention_dropout": self.attention_dropout,
        }
        if self.context:
            config["max_position_embeddings"] = self.context
        if self.model_type in ("llama", "mistral"):
            config["attention_bias"] = self.qkv_bias
            config["mlp_bias"] = self.mlp_bias
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_hf_config(arch: Architecture) -> Any:
    """Build a `transformers.PretrainedConfig` for `arch` (for meta-device instantiation)."""
    from transformers import AutoConfig

    fields = arch.to_hf_dict()
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def from_config(config: Any, name: str = "") -> Architecture:
    """Read an `Architecture` from a transformers config object or a config.json dict.

    Raises:
        UserError: required fields are missing (named in the message) or not positive.
    """
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if isinstance(raw.get("text_config"), dict):  # multimodal wrappers: the language model
        raw = {**raw["text_config"], "model_type": raw["text_config"].get("model_type", "")}
    missing = [f for f in REQUIRED if not isinstance(raw.get(f), int)]
    if missing:
        label = name or "config"
        raise UserError(
            f"{label}: the memory estimator needs {', '.join(missing)} "
            f"(model_type {raw.get('model_type', 'unknown')!r}); add them to the config"
        )
    heads = raw["num_attention_heads"]
    model_type = str(raw.get("model_type") or "llama")
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    bad = [f for f in REQUIRED if raw[f] <= 0]
    if bad:
        raise UserError(f"{name or 'config'}: {', '.join(bad)} must be positive")
    tied = raw.get("tie_word_embeddings")
    if tied is None:
        tied = class_default(model_type, "tie_word_embeddings", False)
    return Architecture(
        model_type=model_type,
        hidden=raw["hidden_size"],
        intermediate=raw["intermediate_size"],
        layers=raw["num_hidden_layers"],
        heads=heads,
        kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        vocab=raw["vocab_size"],
        tie_word_embeddings=bool(tied),
        qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
        o_bias=model_type != "qwen2" and bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        fused=model_type == "phi3",
        norms_per_layer=4 if model_type in FOUR_NORM_TYPES else 2,
        hidden_act=str(raw.get("hidden_act") or raw.get("hidden_activation") or "silu"),
        attention_dropout=float(raw.get("attention_dropout") or 0.0),
        name=name or str(raw.get("_name_or_path") or model_type),
        context=context if isinstance(context := raw.get("max_position_embeddings"), int) else 0,
    )


def class_default(model_type: str, field: str, fallback: Any) -> Any:
    """The default of `field` in transformers' config class for `model_type`, if it has one."""
    try:
        from transformers import AutoConfig

        return getattr(AutoConfig.for_model(model_type), field, fallback)
    except (ValueError, KeyError):
        return fallback
