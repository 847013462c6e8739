"""Architecture numbers of well-known decoders, so estimates work offline.

Numbers are copied from each model's published config.json (hub revision of the base
model; instruct variants share the architecture). The parameter totals are checked by a
test against transformers' own instantiation on the meta device.
"""

from __future__ import annotations

from finetune.errors import UserError
from finetune.memory.arch import Architecture


def _llama(
    h: int,
    i: int,
    n: int,
    heads: int,
    kv: int,
    hd: int,
    vocab: int,
    tied: bool,
    model_type: str = "llama",
    **extra: object,
) -> Architecture:
    return Architecture(
        model_type=model_type,
        hidden=h,
        intermediate=i,
        layers=n,
        heads=heads,
        kv_heads=kv,
        head_dim=hd,
        vocab=vocab,
        tie_word_embeddings=tied,
        **extra,  # type: ignore[arg-type]
    )


PRESETS: dict[str, Architecture] = {
    "llama-2-7b": _llama(4096, 11008, 32, 32, 32, 128, 32000, False, context=4096),
    "llama-2-13b": _llama(5120, 13824, 40, 40, 40, 128, 32000, False, context=4096),
    "llama-2-70b": _llama(8192, 28672, 80, 64, 8, 128, 32000, False, context=4096),
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, 128, 128256, False, context=131072),
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, 64, 128256, True, context=131072),
    "llama-3.2-3b": _llama(3072, 8192, 28, 24, 8, 128, 128256, True, context=131072),
    "mistral-7b": _llama(4096, 14336, 32, 32, 8, 128, 32000, False, "mistral", context=32768),
    "qwen2.5-0.5b": _llama(
        896, 4864, 24, 14, 2, 64, 151936, True, "qwen2", qkv_bias=True, context=32768
    ),
    "qwen2.5-1.5b": _llama(
        1536, 8960, 28, 12, 2, 128, 151936, True, "qwen2", qkv_bias=True, context=32768
    ),
    "qwen2.5-7b": _llama(
        3584, 18944, 28, 28, 4, 128, 152064, False, "qwen2", qkv_bias=True, context=131072
    ),
    "gemma-2-2b": _llama(
        2304,
        9216,
        26,
        8,
        4,
        256,
        256000,
        True,
        "gemma2",
        norms_per_layer=4,
        hidden_act="gelu_pytorch_tanh",
        context=8192,
    ),
    "phi-3-mini": _llama(
        3072, 8192, 32, 32, 32, 96, 32064, False, "phi3", fused=True, context=4096
    ),
    "smollm2-135m": _llama(576, 1536, 30, 9, 3, 64, 49152, True, context=8192),
    "smollm2-360m": _llama(960, 2560, 32, 15, 5, 64, 49152, True, context=8192),
    "smollm2-1.7b": _llama(2048, 8192, 24, 32, 32, 64, 49152, True, context=8192),
}
# context: each model's max_position_embeddings as its config.json on the hub records it
# (SmolLM2's is 8,192; without it transformers' Llama default, 2,048, was recorded).
# Other names for the same architectures (instruct variants, the embedded model).
ALIASES = {
    "smollm2-135m-instruct": "smollm2-135m",
    "smollm2-1.7b-instruct": "smollm2-1.7b",
    "llama-3.1-8b-instruct": "llama-3.1-8b",
    "mistral-7b-v0.1": "mistral-7b",
    "phi-3-mini-4k": "phi-3-mini",
}


def preset_names() -> list[str]:
    """Every preset name, in the order shown to users."""
    return list(PRESETS)


def is_preset(name: str) -> bool:
    return name.lower() in PRESETS or name.lower() in ALIASES


def get_preset(name: str) -> Architecture:
    """The architecture of preset `name` (case-insensitive, aliases allowed).

    Raises:
        UserError: unknown name; the message lists the closest preset names.
    """
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise UserError(f"unknown preset '{name}'; closest: {', '.join(closest_names(name))}")
    arch = PRESETS[key]
    return Architecture(**{**arch.to_dict(), "name": key})


def closest_names(name: str, n: int = 3) -> list[str]:
    """Up to `n` preset names closest to `name`, best first (always at least one)."""
    import difflib

    names = [*PRESETS, *ALIASES]
    return difflib.get_close_matches(name.lower(), names, n=n, cutoff=0.0)


def nominal_params(name: str) -> float | None:
    """The size in a model's name ('7b' -> 7e9, '135m' -> 1.35e8), the unit of rules of thumb."""
    import re

    match = re.search(r"(\d+(?:\.\d+)?)([bm])\b", name.lower())
    if not match:
        return None
    return float(match.group(1)) * (1e9 if match.group(2) == "b" else 1e6)
