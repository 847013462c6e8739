"""GGUF files llama.cpp loads: a whole Llama-family model, or a LoRA adapter on its own.

Both follow llama.cpp's own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) and
use the `gguf` package where it has the piece: its writer and reader, its tensor-name map
(which names each tensor and says what kind it is), its quantizer; the tokenizer's fields
come from `gguf_vocab` (with `gguf.SpecialVocab`). What stays here is what only the
converters know: which hyperparameters the llama architecture takes, and the q/k row order
of llama.cpp's rotary kernel. What llama.cpp cannot be given faithfully is refused with a
`UserError` before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from finetune.errors import UserError
from finetune.export.gguf_vocab import CONVERTER_HINT, add_tokenizer, copy_tokenizer


def tensor_types(gguf_type: str) -> tuple[Any, Any]:
    """The ggml tensor type of 2-D weights and the file type that names it."""
    return {
        "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    }[gguf_type]


# ------------------------------------------------------------------------ architecture


def check_architecture(config: Any) -> None:
    """Refuse what the llama architecture in llama.cpp would run differently."""
    reasons = []
    if config.model_type != "llama":
        reasons.append(f"model_type {config.model_type}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        reasons.append("biases")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        reasons.append(f"rope {rope.get('rope_type')}")
    if head_dim(config) * config.num_attention_heads != config.hidden_size:
        reasons.append("head_dim * heads != hidden_size")
    if reasons:
        raise UserError(
            f"GGUF export handles plain Llama-family models, and this one has "
            f"{', '.join(reasons)}; {CONVERTER_HINT}"
        )


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def name_map(config: Any) -> gguf.TensorNameMap:
    """gguf's own map from transformers tensor names to llama.cpp's."""
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)


def llama_tensor(names: gguf.TensorNameMap, hf_name: str) -> tuple[gguf.MODEL_TENSOR, str] | None:
    """A transformers tensor's kind (a `gguf.MODEL_TENSOR`) and llama.cpp name, or None."""
    return names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))


def llama_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order for its rotary kernel (transformers reverses this on load)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def rotary_rows(kind: gguf.MODEL_TENSOR, weight: torch.Tensor, config: Any) -> torch.Tensor:
    """Permute the output rows of q and k (or of a LoRA B that writes into them)."""
    if kind == gguf.MODEL_TENSOR.ATTN_Q:
        return llama_permute(weight, config.num_attention_heads)
    if kind == gguf.MODEL_TENSOR.ATTN_K:
        return llama_permute(weight, config.num_key_value_heads)
    return weight


def is_tied_output(kind: gguf.MODEL_TENSOR, config: Any) -> bool:
    """lm_head when it shares the embedding: llama.cpp reuses token_embd when output is absent."""
    return kind == gguf.MODEL_TENSOR.OUTPUT and config.tie_word_embeddings


def model_tensors(model: Any) -> list[tuple[str, torch.Tensor]]:
    """The merged model's tensors under llama.cpp's names, q and k permuted for rotary."""
    config = model.config
    names = name_map(config)
    tensors = []
    for hf_name, tensor in model.state_dict().items():
        found = llama_tensor(names, hf_name)
        if found is None:
            raise UserError(
                f"GGUF export: {hf_name} has no llama.cpp tensor name; {CONVERTER_HINT}"
            )
        kind, name = found
        if not is_tied_output(kind, config):
            tensors.append((name, rotary_rows(kind, tensor, config)))
    return tensors


def add_hparams(writer: Any, config: Any, name: str) -> None:
    """The model's shape, as convert_hf_to_gguf.py writes it for the llama architecture."""
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def add_tensor(writer: Any, name: str, tensor: torch.Tensor, qtype: Any) -> None:
    """Norms and other vectors stay f32, as llama.cpp's converter keeps them."""
    data = tensor.detach().float().cpu().numpy()
    if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 == 0:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    else:  # q8_0 blocks are 32 wide; a narrower row falls back to f16, as the converter does
        writer.add_tensor(name, data.astype(np.float16))


def finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ------------------------------------------------------------------------ whole model


def write_model(
    model: Any,
    tokenizer: Any,
    path: Path,
    gguf_type: str,
    *,
    name: str = "model",
    source: Path | None = None,
) -> str:
    """Write a Llama-family model and its tokenizer as one GGUF file; returns the
    pre-tokenizer it names.

    Args:
        source: the GGUF the base model came from; its tokenizer fields are carried over.
    """
    config = model.config
    check_architecture(config)
    qtype, file_type = tensor_types(gguf_type)
    tensors = model_tensors(model)  # refuses unmapped tensors before the file exists
    writer = gguf.GGUFWriter(str(path), "llama")
    add_hparams(writer, config, name)
    writer.add_file_type(int(file_type))
    writer.add_vocab_size(config.vocab_size)
    if source is not None:
        pre = copy_tokenizer(writer, source, config.vocab_size)
    else:
        pre = add_tokenizer(writer, tokenizer, config.vocab_size)
    for tensor_name, tensor in tensors:
        add_tensor(writer, tensor_name, tensor, qtype)
    finish(writer)
    return pre


# ------------------------------------------------------------------------ LoRA adapter


def lora_tensors(peft_model: Any, alpha: float) -> list[tuple[str, torch.Tensor]]:
    """Each LoRA pair under llama.cpp's names (`<tensor>.lora_a`, `<tensor>.lora_b`).

    llama.cpp scales every pair by alpha / rank; peft's own scaling (rsLoRA, alpha_pattern)
    may differ, and the difference is folded into B so the product is peft's exactly.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    config = peft_model.base_model.model.config
    names = name_map(config)
    tensors = []
    for module_name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, LoraLinear) or "default" not in module.lora_A:
            raise UserError(
                f"GGUF adapter: {module_name} is a {type(module).__name__} LoRA layer; llama.cpp "
                "applies LoRA to Linear weights only; export --format gguf (merged) instead"
            )
        if module.use_dora.get("default") or getattr(module, "lora_bias", {}).get("default"):
            raise UserError(
                f"GGUF adapter: {module_name} has a DoRA magnitude or a LoRA bias, which llama.cpp "
                "adapters cannot hold; export --format gguf (merged) instead"
            )
        found = llama_tensor(names, f"{module_name}.weight")
        if found is None or is_tied_output(found[0], config):
            raise UserError(
                f"GGUF adapter: llama.cpp has no separate tensor for {module_name}; retrain "
                "without it in adapter.target_modules, or export --format gguf (merged)"
            )
        a = module.lora_A["default"].weight.detach().float()
        b = module.lora_B["default"].weight.detach().float()
        b = b * (module.scaling["default"] / (alpha / a.shape[0]))
        kind, name = found
        tensors += [(f"{name}.lora_a", a), (f"{name}.lora_b", rotary_rows(kind, b, config))]
    return tensors


def write_lora(peft_model: Any, path: Path, alpha: float, name: str = "adapter") -> None:
    """Write a LoRA adapter as convert_lora_to_gguf.py does: general.type=adapter,
    adapter.type=lora, adapter.lora.alpha, f32 A and B (small, and exact)."""
    config = peft_model.base_model.model.config
    check_architecture(config)
    tensors = lora_tensors(peft_model, alpha)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    for tensor_name, tensor in tensors:
        add_tensor(writer, tensor_name, tensor, gguf.GGMLQuantizationType.F32)
    finish(writer)


def base_facts(path: Path) -> dict[str, Any]:
    """What a base GGUF says about itself: architecture, shape, and its weights' type."""
    reader = gguf.GGUFReader(path)
    fields = reader.fields

    def value(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    weight_types = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    return {
        "type": value("general.type") or "model",
        "architecture": value("general.architecture"),
        "block_count": value("llama.block_count"),
        "embedding_length": value("llama.embedding_length"),
        "weight_types": sorted(weight_types),
    }
