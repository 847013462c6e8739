"""The architecture numbers the estimator needs, read from a transformers config.

`Architecture` is a plain frozen dataclass: hidden width, MLP width, layers, heads, vocabulary
and the few layout facts (bias, tied embeddings, fused projections, norms per layer) that
decide the exact parameter count. `Linear` lists every projection in one decoder layer so
parameter counts, adapter counts, quantization and activations all read the same list.
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
# Layouts counted exactly (checked against transformers on the meta device).
KNOWN_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi3")
# Model types whose decoder layer has two extra norms around attention and MLP.
FOUR_NORM_TYPES = ("gemma2", "gemma3_text")
# Feed-forward projections: IA3 scales their input instead of their output (peft's mapping).
FEEDFORWARD_NAMES = ("down_proj", "fc2", "w2", "c_proj")


@dataclass(frozen=True)
class Linear:
    """One projection in a decoder layer: module name, widths and whether it has a bias."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


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

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of k and v: grouped-query attention shares kv_heads among heads."""
        return self.kv_heads * self.head_dim

    def linears(self) -> list[Linear]:
        """The projections of one decoder layer, named as transformers names the modules."""
        h, i = self.hidden, self.intermediate
        if self.fused:  # phi3: one qkv_proj and one gate_up_proj
            return [
                Linear("qkv_proj", h, self.q_width + 2 * self.kv_width, self.qkv_bias),
                Linear("o_proj", self.q_width, h, self.o_bias),
                Linear("gate_up_proj", h, 2 * i, self.mlp_bias),
                Linear("down_proj", i, h, self.mlp_bias),
            ]
        return [
            Linear("q_proj", h, self.q_width, self.qkv_bias),
            Linear("k_proj", h, self.kv_width, self.qkv_bias),
            Linear("v_proj", h, self.kv_width, self.qkv_bias),
            Linear("o_proj", self.q_width, h, self.o_bias),
            Linear("gate_proj", h, i, self.mlp_bias),
            Linear("up_proj", h, i, self.mlp_bias),
            Linear("down_proj", i, h, self.mlp_bias),
        ]

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def lm_head_params(self) -> int:
        """Zero when the output head shares the embedding matrix."""
        return 0 if self.tie_word_embeddings else self.vocab * self.hidden

    def norm_params(self) -> int:
        """Every RMSNorm weight: per layer plus the final norm."""
        return (self.layers * self.norms_per_layer + 1) * self.hidden

    def linear_params(self) -> int:
        """All decoder-layer projection parameters (the part quantization applies to)."""
        return self.layers * sum(lin.params for lin in self.linears())

    def total_params(self) -> int:
        """Exact parameter count, equal to instantiating the model in transformers."""
        return (
            self.embedding_params()
            + self.lm_head_params()
            + self.norm_params()
            + self.linear_params()
        )

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
    )


def class_default(model_type: str, field: str, fallback: Any) -> Any:
    """The default of `field` in transformers' config class for `model_type`, if it has one."""
    try:
        from transformers import AutoConfig

        return getattr(AutoConfig.for_model(model_type), field, fallback)
    except (ValueError, KeyError):
        return fallback
