"""GGUF files llama.cpp loads: a whole Llama-family model, or a LoRA adapter on its own.

Both follow llama.cpp's own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) and
use the `gguf` package's helpers where it has them: the tensor-name map, `SpecialVocab` for
merges, special tokens and the chat template. What llama.cpp cannot be given faithfully is
refused with a `UserError` before anything is written.
"""

from __future__ import annotations

import json
import tempfile
from hashlib import sha256
from pathlib import Path
from typing import Any

import torch

from finetune.errors import UserError

GGUF_TYPES = ("f16", "f32", "q8_0")
CONVERTER_HINT = "export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py"
# Added tokens the converter makes CONTROL although the tokenizer does not mark them special
# (`does_token_look_special` in llama.cpp's conversion/base.py).
LOOKS_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


def tensor_types(gguf_type: str) -> tuple[Any, Any]:
    """The ggml tensor type of 2-D weights and the file type that names it."""
    import gguf

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


def name_map(config: Any) -> Any:
    """gguf's own map from transformers tensor names to llama.cpp's."""
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)


def llama_name(names: Any, hf_name: str) -> str | None:
    return names.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def llama_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order for its rotary kernel (transformers reverses this on load)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def rotary_rows(name: str, weight: torch.Tensor, config: Any) -> torch.Tensor:
    """Permute the output rows of q and k (or of a LoRA B that writes into them)."""
    if ".attn_q." in name:
        return llama_permute(weight, config.num_attention_heads)
    if ".attn_k." in name:
        return llama_permute(weight, config.num_key_value_heads)
    return weight


def model_tensors(model: Any) -> list[tuple[str, torch.Tensor]]:
    """The merged model's tensors under llama.cpp's names, q and k permuted for rotary."""
    config = model.config
    names = name_map(config)
    tensors = []
    for hf_name, tensor in model.state_dict().items():
        name = llama_name(names, hf_name)
        if name is None:
            raise UserError(
                f"GGUF export: {hf_name} has no llama.cpp tensor name; {CONVERTER_HINT}"
            )
        if name == "output.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when output is absent
        tensors.append((name, rotary_rows(name, tensor, config)))
    return tensors


def add_hparams(writer: Any, config: Any, name: str) -> None:
    """The model's shape, as convert_hf_to_gguf.py writes it for the llama architecture."""
    import gguf

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
    import gguf
    import numpy as np

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


# ------------------------------------------------------------------------ tokenizer


def pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (`tokenizer.ggml.pre`).

    First as llama.cpp's converter decides it: the hash of the token ids of a fixed text,
    looked up in the converter's table. A tokenizer of one's own (a new vocabulary) has a
    hash no table knows; when its pre-tokenizer is exactly GPT-2's (byte-level with the
    GPT-2 regex, no normalizer, merges applied), llama.cpp's "gpt-2" splits it the same way.

    Raises:
        UserError: neither; llama.cpp would split text differently from transformers.
    """
    from finetune.llama_pre import CHKTXT, PRE_BY_CHKHSH

    digest = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if digest in PRE_BY_CHKHSH:
        return PRE_BY_CHKHSH[digest]
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    gpt2 = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    if gpt2 and spec.get("normalizer") is None and not spec["model"].get("ignore_merges"):
        return "gpt-2"
    raise UserError(
        f"GGUF export: llama.cpp does not know this tokenizer's pre-tokenizer (chkhsh "
        f"{digest[:16]}…, {pre.get('type', 'none')}), so it would split text differently; "
        f"{CONVERTER_HINT} after adding the tokenizer to convert_hf_to_gguf_update.py"
    )


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types, as the converter's `get_vocab_base` makes them."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise UserError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style, as SmolLM and Llama 3 "
            f"use); {CONVERTER_HINT}"
        )
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = dict.fromkeys(by_id, int(TokenType.NORMAL))
    for added in spec.get("added_tokens", []):
        text = added["content"]
        special = added["special"] or text in LOOKS_SPECIAL
        special = special or (text.startswith("<|") and text.endswith("|>"))
        by_id[added["id"]] = text
        types[added["id"]] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
    tokens, token_types = [], []
    for i in range(max(vocab_size, max(by_id) + 1)):
        # embedding rows beyond the tokenizer: llama.cpp's placeholder convention
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        token_types.append(types.get(i, int(TokenType.UNUSED)))
    return tokens, token_types


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> str:
    """Write the tokenizer as convert_hf_to_gguf.py's `_set_vocab_gpt2` does; returns the
    pre-tokenizer name."""
    import gguf

    pre = pre_tokenizer(tokenizer)
    tokens, token_types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    # SpecialVocab reads add_bos from a post-processor; without one, say what encoding does.
    probe = tokenizer("a")["input_ids"]
    special.add_special_token.setdefault("bos", bool(probe) and probe[0] == tokenizer.bos_token_id)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    return pre


def copy_tokenizer(writer: Any, source: Path, vocab_size: int) -> str:
    """Carry every tokenizer field over from the GGUF the base model came from: the training
    never changed the vocabulary, and the source says best how llama.cpp should read it."""
    from gguf import GGUFReader, GGUFValueType

    fields = GGUFReader(source).fields
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        raise UserError(
            f"GGUF export: the base model's GGUF {source} has "
            f"{len(tokens.data) if tokens else 0} tokens, the model {vocab_size}; "
            f"{CONVERTER_HINT}"
        )
    for key, field in fields.items():
        if key.startswith("tokenizer."):
            array = field.types[0] == GGUFValueType.ARRAY
            sub = field.types[-1] if array else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)
    return str(fields["tokenizer.ggml.pre"].contents()) if "tokenizer.ggml.pre" in fields else ""


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
    import gguf

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
        name = llama_name(names, f"{module_name}.weight")
        if name is None or (name == "output.weight" and config.tie_word_embeddings):
            raise UserError(
                f"GGUF adapter: llama.cpp has no separate tensor for {module_name}; retrain "
                "without it in adapter.target_modules, or export --format gguf (merged)"
            )
        a = module.lora_A["default"].weight.detach().float()
        b = module.lora_B["default"].weight.detach().float()
        b = b * (module.scaling["default"] / (alpha / a.shape[0]))
        tensors += [(f"{name}.lora_a", a), (f"{name}.lora_b", rotary_rows(name, b, config))]
    return tensors


def write_lora(peft_model: Any, path: Path, alpha: float, name: str = "adapter") -> None:
    """Write a LoRA adapter as convert_lora_to_gguf.py does: general.type=adapter,
    adapter.type=lora, adapter.lora.alpha, f32 A and B (small, and exact)."""
    import gguf

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
    from gguf import GGUFReader

    reader = GGUFReader(path)
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
