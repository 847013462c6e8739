"""llama.cpp's side of a check, run in a child process by `finetune.export.llamacpp.run`.

The only module that imports llama_cpp. A native build of llama.cpp can kill its process
(SIGSEGV in ggml's AMX code on Sapphire Rapids; SIGILL on a CPU without the instructions it
was built for), so it never runs inside finetune's process: the parent reads what this
leaves behind, or how it died.

Run as a script, by path: `python llamacpp_child.py REQUEST.json OUT_PREFIX`. It imports
nothing of finetune (importing the package would bring in torch for nothing). It writes
OUT_PREFIX.npz (token ids, logits, greedy continuations) and, last, OUT_PREFIX.json
(status, answers, the chat reply, llama.cpp's system line); exit code 0, or 3 when llama.cpp
refuses the model (the reason in the JSON).
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import os
import sys
from typing import Any

import numpy as np

LOAD_REFUSED = 3
CALLBACKS: list[Any] = []  # ctypes callbacks must outlive every call into llama.cpp that logs


def load(request: dict[str, Any], errors: list[str]) -> Any:
    import llama_cpp

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        # GGML_LOG_LEVEL_ERROR in ggml.h (llama_cpp._logger's table predates the renumbering)
        if level == 4:
            errors.append(text.decode("utf-8", "replace").strip())

    CALLBACKS.append(collect)
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    return llama_cpp.Llama(
        model_path=request["model"],
        lora_path=request.get("lora"),
        n_ctx=request["n_ctx"],
        n_threads=request["threads"],
        n_threads_batch=request["threads"],
        logits_all=True,
        verbose=False,
    )


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


def serve(request: dict[str, Any], llm: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    import llama_cpp

    n_new, stop = request["n_new"], set(request["stop"])
    arrays: dict[str, np.ndarray] = {}
    for i, text in enumerate(request["tokenize"]):
        arrays[f"tokens_{i}"] = np.array(tokenize(llm, text), dtype=np.int64)
    for i, ids in enumerate(request["score"]):
        arrays[f"logits_{i}"] = logits(llm, ids)
        arrays[f"greedy_{i}"] = np.array(greedy(llm, ids, n_new, stop), dtype=np.int64)
    answers = []
    for prompt in request["answer"]:
        new = greedy(llm, tokenize(llm, prompt), n_new, stop)
        answers.append(llm.detokenize(new).decode("utf-8", "replace"))
    facts: dict[str, Any] = {"status": "ok", "answers": answers}
    if request.get("chat"):
        llm.reset()
        reply = llm.create_chat_completion(
            messages=request["chat"], max_tokens=n_new, temperature=0.0
        )
        facts["chat"] = reply["choices"][0]["message"]["content"]
    facts["system"] = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    return arrays, facts


def write_json(path: str, facts: dict[str, Any]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as out:
        json.dump(facts, out)
    os.replace(path + ".tmp", path)  # the parent takes a JSON file as the sign of a clean end


def main(request_path: str, prefix: str) -> int:
    faulthandler.enable()  # a crash prints the Python stack to stderr, which the parent keeps
    with open(request_path, encoding="utf-8") as source:
        request = json.load(source)
    errors: list[str] = []
    try:
        llm = load(request, errors)
    except (ValueError, RuntimeError) as err:
        # "llama_model_load: error loading model: ...": the reason, without the function
        reason = errors[0].split(": ", 1)[-1] if errors else str(err)
        write_json(prefix + ".json", {"status": "refused", "reason": reason})
        return LOAD_REFUSED
    try:
        arrays, facts = serve(request, llm)
    finally:
        llm.close()
    np.savez(prefix + ".npz", **arrays)
    write_json(prefix + ".json", facts)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
