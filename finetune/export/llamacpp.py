"""llama.cpp itself, through llama-cpp-python (the optional `[llamacpp]` extra): the check
that an exported GGUF runs there as the model does in transformers.

A GGUF that transformers reads back can still be one llama.cpp refuses or tokenizes
differently (issue 18: a pre-tokenizer name llama.cpp does not know). So the check loads the
file the way a user will, compares llama.cpp's token ids with the transformers tokenizer's,
its logits with the merged model's, and greedy answers token by token.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PINNED = "0.3.36"  # pyproject's [llamacpp] extra and the Makefile install this one
INSTALL_HINT = f"pip install 'llama-cpp-python=={PINNED}' (or pip install -e '.[llamacpp]')"
GREEDY_TOKENS = 12  # as many as the quickstart recipe's eval.max_new_tokens
CONTEXT = 512


def threads() -> int:
    """Half the cores this process may use (at most 8). ggml's OpenMP threads spin at every
    barrier: on a 2-core machine with anything else running, 2 threads made a 27-token
    prompt take 7 s of CPU instead of 0.1 s (llama-cpp-python defaults to every core)."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return max(1, min(8, (len(usable) if usable else os.cpu_count() or 1) // 2))


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str:
    from importlib.metadata import version as installed

    return installed("llama_cpp_python")


class LoadFailed(Exception):
    """llama.cpp refused the file; the message is llama.cpp's own error line."""


@contextlib.contextmanager
def collected_errors() -> Iterator[list[str]]:
    """llama.cpp reports why it refused a file only to its log; collect its error lines
    (and keep its chatter off the terminal) while loading."""
    import llama_cpp
    from llama_cpp import _logger

    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        # GGML_LOG_LEVEL_ERROR in ggml.h (llama_cpp._logger's table predates the renumbering)
        if level == 4:
            errors.append(text.decode("utf-8", "replace").strip())

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield errors
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def load(path: Path, lora: Path | None = None, n_ctx: int = CONTEXT) -> Any:
    """Load a GGUF (and a LoRA GGUF on top of it) with every position's logits kept.

    Raises:
        LoadFailed: llama.cpp refused the model or the adapter, with its reason.
    """
    from llama_cpp import Llama

    with collected_errors() as errors:
        try:
            return Llama(
                model_path=str(path),
                lora_path=str(lora) if lora else None,
                n_ctx=n_ctx,
                n_threads=threads(),
                n_threads_batch=threads(),
                logits_all=True,
                verbose=False,
            )
        except (ValueError, RuntimeError) as err:
            # "llama_model_load: error loading model: ...": the reason, without the function
            reason = errors[0].split(": ", 1)[-1] if errors else str(err)
            raise LoadFailed(reason) from None


def tokenize(llm: Any, text: str) -> list[int]:
    """Token ids as llama.cpp splits `text` (special tokens parsed, no BOS added)."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))


def logits(llm: Any, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids`."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm: Any, ids: list[int], n: int, stop: set[int]) -> list[int]:
    """Up to `n` argmax tokens after `ids`, ending at a stop token (not included)."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stop:
            break
        out.append(token)
        llm.eval([token])
    return out


@dataclass
class Comparison:
    """How llama.cpp's run of a GGUF compares with the transformers model, prompt by prompt."""

    prompts: int
    tokens_identical: bool
    max_logit_diff: float
    greedy_identical: int
    positions: int = 0
    top1_identical: int = 0  # positions whose argmax token is the same in both
    first_difference: str = ""
    answers: list[dict[str, Any]] = field(default_factory=list)


def compare(
    llm: Any,
    model: Any,
    tokenizer: Any,
    texts: list[str],
    tokenize_only: list[str] = (),
    n_new: int = GREEDY_TOKENS,
) -> Comparison:
    """Compare llama.cpp (`llm`) with a transformers model on already-rendered prompts:
    tokens (of `tokenize_only` too), logits at every position, greedy answers.

    Tokenization first: if llama.cpp splits a prompt differently, logits mean nothing.
    """
    import torch

    stop = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    result = Comparison(len(texts), True, 0.0, 0)
    for text in [*tokenize_only, *texts]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        theirs = tokenize(llm, text)
        if theirs != ids:
            result.tokens_identical = False
            result.first_difference = first_difference(tokenizer, ids, theirs, text)
            return result
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].float().numpy()
        got = logits(llm, ids)
        result.max_logit_diff = max(result.max_logit_diff, float(np.abs(expected - got).max()))
        result.positions += len(ids)
        result.top1_identical += int((expected.argmax(-1) == got.argmax(-1)).sum())
        mine = hf_greedy(model, ids, n_new, stop)
        answer = greedy(llm, ids, n_new, stop)
        result.greedy_identical += mine == answer
        result.answers.append({"prompt": text, "transformers": mine, "llama.cpp": answer})
    return result


def hf_greedy(model: Any, ids: list[int], n: int, stop: set[int]) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=next(iter(stop), 0),
        )[0, len(ids) :].tolist()
    cut = next((i for i, t in enumerate(out) if t in stop), len(out))
    return out[:cut]


def first_difference(tokenizer: Any, ids: list[int], theirs: list[int], text: str) -> str:
    pairs = enumerate(zip(ids, theirs, strict=False))
    at = next((i for i, (a, b) in pairs if a != b), min(len(ids), len(theirs)))
    return (
        f"{text[:40]!r}: transformers {ids[at : at + 4]} "
        f"({tokenizer.decode(ids[at : at + 4])!r}), llama.cpp {theirs[at : at + 4]}"
    )
