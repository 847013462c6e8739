"""A tokenizer's GGUF fields, as llama.cpp's convert_hf_to_gguf.py writes them for byte-level
BPE (GPT-2 style) vocabularies, or carried over from the GGUF the base model came from.

The gguf package writes merges, special token ids, add_bos/add_eos and the chat template
(`gguf.SpecialVocab`). The rest follows convert_hf_to_gguf.py, which is not part of the gguf
package: the pre-tokenizer name (`llama_pre`, generated from its table), and the token list
with its types (`get_vocab_base`). `gguf.BpeVocab` does not fit that: it marks special tokens
already in the BPE vocabulary NORMAL (SmolLM2's `<|im_start|>` would be split as text),
never USER_DEFINED, and has no placeholders for embedding rows beyond the tokenizer.
"""

from __future__ import annotations

import json
import tempfile
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from finetune.errors import UserError
from finetune.export.llama_pre import CHKTXT, PRE_BY_CHKHSH

CONVERTER_HINT = "export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py"
# Added tokens the converter makes CONTROL although the tokenizer does not mark them special
# (`does_token_look_special` in llama.cpp's conversion/base.py).
LOOKS_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


def pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (`tokenizer.ggml.pre`).

    First as llama.cpp's converter decides it: the hash of the token ids of a fixed text,
    looked up in the converter's table. A tokenizer of one's own (a new vocabulary) has a
    hash no table knows; when its pre-tokenizer is exactly GPT-2's (byte-level with the
    GPT-2 regex, no normalizer, merges applied), llama.cpp's "gpt-2" splits it the same way.

    Raises:
        UserError: neither; llama.cpp would split text differently from transformers.
    """
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
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise UserError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style, as SmolLM and Llama 3 "
            f"use); {CONVERTER_HINT}"
        )
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = dict.fromkeys(by_id, int(gguf.TokenType.NORMAL))
    for added in spec.get("added_tokens", []):
        text = added["content"]
        special = added["special"] or text in LOOKS_SPECIAL
        special = special or (text.startswith("<|") and text.endswith("|>"))
        by_id[added["id"]] = text
        types[added["id"]] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    tokens, token_types = [], []
    for i in range(max(vocab_size, max(by_id) + 1)):
        # embedding rows beyond the tokenizer: llama.cpp's placeholder convention
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        token_types.append(types.get(i, int(gguf.TokenType.UNUSED)))
    return tokens, token_types


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> str:
    """Write the tokenizer as convert_hf_to_gguf.py's `_set_vocab_gpt2` does; returns the
    pre-tokenizer name."""
    pre = pre_tokenizer(tokenizer)
    tokens, token_types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    # SpecialVocab learns add_bos only from tokenizer_config.json's add_bos_token or a
    # post-processor, and transformers writes neither for a tokenizer that adds no BOS:
    # say what encoding does, rather than leave llama.cpp to its per-vocabulary default.
    probe = tokenizer("a")["input_ids"]
    special.add_special_token.setdefault("bos", bool(probe) and probe[0] == tokenizer.bos_token_id)
    special.add_to_gguf(writer, quiet=True)
    return pre


def copy_tokenizer(writer: Any, source: Path, vocab_size: int) -> str:
    """Carry every tokenizer field over from the GGUF the base model came from: the training
    never changed the vocabulary, and the source says best how llama.cpp should read it."""
    fields = gguf.GGUFReader(source).fields
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        raise UserError(
            f"GGUF export: the base model's GGUF {source} has "
            f"{len(tokens.data) if tokens else 0} tokens, the model {vocab_size}; "
            f"{CONVERTER_HINT}"
        )
    for key, field in fields.items():
        if key.startswith("tokenizer."):
            array = field.types[0] == gguf.GGUFValueType.ARRAY
            sub = field.types[-1] if array else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)
    return str(fields["tokenizer.ggml.pre"].contents()) if "tokenizer.ggml.pre" in fields else ""
