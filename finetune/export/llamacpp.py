"""llama.cpp itself, through llama-cpp-python (the optional `[llamacpp]` extra): the check
that an exported GGUF runs there as the model does in transformers.

llama.cpp runs in a child process (`llamacpp_child.py`), never in finetune's: a build of it
can kill its process on some CPUs (issue 28), and then the child dies, and finetune says so
in one line (`Crashed`) and goes on (see `gguf_check` for what it does then).

A GGUF that transformers reads back can still be one llama.cpp refuses or tokenizes
differently (issue 18: a pre-tokenizer name llama.cpp does not know). So the check loads the
file the way a user will, compares llama.cpp's token ids with the transformers tokenizer's,
its logits with the merged model's, and greedy answers token by token.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PINNED = "0.3.36"  # pyproject's [llamacpp] extra and the Makefile install this one
# make setup builds it portable (x86-64-v3, no AMX): a plain pip build is -march=native,
# which crashed on Sapphire Rapids (see the Makefile).
INSTALL_HINT = f"make setup builds llama-cpp-python=={PINNED} for this CPU class"
REBUILD = "rebuild it for this CPU: `make -B setup LLAMACPP_CMAKE_ARGS=...`, see the Makefile"
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


def runner() -> str:
    """How a check names what ran it: 'llama.cpp (llama-cpp-python 0.3.36)'."""
    return f"llama.cpp (llama-cpp-python {version()})"


class LoadFailed(Exception):
    """llama.cpp refused the file; the message is llama.cpp's own error line."""


class Crashed(Exception):
    """llama.cpp killed its process (a signal) or hung. The message names how, with the
    innermost Python frame the crash reached."""


class ChildFailed(Exception):
    """The llama.cpp process failed without a word on the file: a Python error in it (the
    message is its last line), or its request could not be written."""


CHILD = Path(__file__).with_name("llamacpp_child.py")
TIMEOUT = 1800  # seconds: a 7B f16 file loads and answers the probes in a few minutes


@dataclass
class Request:
    """What llama.cpp is asked, in one child process: token ids of `tokenize`, logits at
    every position of each id list in `score` and the greedy continuation of each, greedy
    answers (detokenized) to the `answer` prompts, and a chat completion of `chat`."""

    model: Path
    lora: Path | None = None
    tokenize: list[str] = field(default_factory=list)
    score: list[list[int]] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)
    chat: list[dict[str, str]] = field(default_factory=list)
    n_new: int = GREEDY_TOKENS
    stop: list[int] = field(default_factory=list)
    n_ctx: int = CONTEXT


@dataclass
class Reply:
    tokens: list[list[int]]
    logits: list[np.ndarray]
    greedy: list[list[int]]
    answers: list[str]
    chat: str | None
    system: str  # llama.cpp's system line: the CPU features it was built with


def run(request: Request, timeout: float = TIMEOUT) -> Reply:
    """Ask llama.cpp in a child process (`llamacpp_child.py`), so that a crash there ends that
    process, not finetune's.

    Raises:
        LoadFailed: llama.cpp refused the model or the adapter, with its reason.
        Crashed: the child was killed by a signal or hung past `timeout`.
        ChildFailed: the child failed with a Python error, or its files could not be written.
    """
    try:
        folder = tempfile.TemporaryDirectory(prefix="finetune-llamacpp-")
        ask = Path(folder.name) / "request.json"
        ask.write_text(json.dumps(request_fields(request)), encoding="utf-8")
    except OSError as err:
        where = getattr(err, "filename", None) or tempfile.gettempdir()
        raise ChildFailed(
            f"cannot write its request in {where} ({err.strerror or err}); set TMPDIR to a "
            "writable folder with space"
        ) from None
    with folder:
        prefix = str(Path(folder.name) / "reply")
        returncode, stderr = run_child([sys.executable, str(CHILD), str(ask), prefix], timeout)
        facts_path = Path(prefix + ".json")
        if not facts_path.is_file():  # the child writes it last: without it, no answer
            if returncode is None or returncode < 0:
                raise Crashed(how_it_died(returncode, stderr, timeout))
            raise ChildFailed(f"exit code {returncode}: {last_line(stderr) or 'no message'}")
        return read_reply(request, prefix, json.loads(facts_path.read_text(encoding="utf-8")))


def read_reply(request: Request, prefix: str, facts: dict[str, Any]) -> Reply:
    if facts["status"] == "refused":
        raise LoadFailed(facts["reason"])
    with np.load(prefix + ".npz", allow_pickle=False) as arrays:
        return Reply(
            tokens=[arrays[f"tokens_{i}"].tolist() for i in range(len(request.tokenize))],
            logits=[arrays[f"logits_{i}"] for i in range(len(request.score))],
            greedy=[arrays[f"greedy_{i}"].tolist() for i in range(len(request.score))],
            answers=facts["answers"],
            chat=facts.get("chat"),
            system=facts["system"],
        )


def request_fields(request: Request) -> dict[str, Any]:
    fields = {k: v for k, v in vars(request).items() if k not in ("model", "lora")}
    return {
        **fields,
        "model": str(request.model),
        "lora": str(request.lora) if request.lora else None,
        "threads": threads(),
    }


def run_child(command: list[str], timeout: float) -> tuple[int | None, str]:
    """(exit code, or None past the timeout; the child's stderr). Its stdout is dropped:
    llama.cpp's own chatter. An exception here (Ctrl-C, SIGTERM: `stopping.Terminated`)
    kills the child before it propagates, and on Linux the child is killed when this
    process dies in any way (SIGKILL included)."""
    try:
        done = subprocess.run(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
    except subprocess.TimeoutExpired as late:  # run() has killed it
        return None, (late.stderr or b"").decode("utf-8", "replace")
    return done.returncode, done.stderr.decode("utf-8", "replace")


def die_with_parent() -> None:
    """In the child, before it starts: SIGKILL it when its parent dies (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def how_it_died(returncode: int | None, stderr: str, timeout: float) -> str:
    """'was killed by SIGSEGV (segmentation fault)', with the innermost Python frame."""
    if returncode is None:
        how = f"did not answer within {timeout:.0f} s and was stopped"
    else:
        number = -returncode
        name = signal.Signals(number).name if number in signal.valid_signals() else str(number)
        said = signal.strsignal(number) or "a signal"
        how = f"was killed by {name} ({said[:1].lower()}{said[1:]})"
    # faulthandler prints the stack innermost frame first: the call into llama.cpp
    frames = [line.strip() for line in stderr.splitlines() if line.strip().startswith("File ")]
    return how + (f" ({frames[0][:200]})" if frames else "")


def last_line(stderr: str) -> str:
    """A Python error's own line ('OSError: [Errno 28] No space left on device')."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


PROBE_CHAT = [{"role": "user", "content": "Convert the 5th of January 2034 to ISO 8601."}]


@dataclass
class MachineCheck:
    """Whether llama.cpp runs on this machine: a chat completion on the embedded model."""

    works: bool
    detail: str  # the model's answer, or how llama.cpp died
    system: str = ""  # llama.cpp's system line (the CPU features it was built with)
    seconds: float = 0.0


@functools.cache
def machine_check() -> MachineCheck | None:
    """A chat completion (a few dozen tokens of prompt: a single short eval did not crash the
    broken build) on the embedded SmolLM2-135M-Instruct GGUF, in a child process. None when
    the embedded model or llama.cpp is not installed. Asked once per process."""
    from finetune import models
    from finetune.errors import UserError

    if not available():
        return None
    try:
        gguf = models.embedded_gguf_path()
    except UserError:
        return None
    start = time.perf_counter()
    try:
        reply = run(Request(gguf, chat=PROBE_CHAT, n_new=16), timeout=300)
    except Crashed as err:
        return MachineCheck(False, str(err))
    except ChildFailed as err:
        return MachineCheck(False, f"failed ({err})")
    except LoadFailed as err:
        return MachineCheck(False, f"refused the embedded model ({err})")
    return MachineCheck(True, (reply.chat or "").strip(), reply.system, time.perf_counter() - start)


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
    path: Path,
    lora: Path | None,
    model: Any,
    tokenizer: Any,
    texts: list[str],
    tokenize_only: list[str] = (),
    n_new: int = GREEDY_TOKENS,
) -> Comparison:
    """Compare llama.cpp running `path` (with `lora` on top) with a transformers model on
    already-rendered prompts: tokens (of `tokenize_only` too), logits at every position,
    greedy answers. llama.cpp runs in a child process (`run`).

    Tokenization first: if llama.cpp splits a prompt differently, logits mean nothing.

    Raises:
        LoadFailed: llama.cpp refused the model or the adapter.
        Crashed: llama.cpp killed its process.
        ChildFailed: the process running llama.cpp failed otherwise.
    """
    import torch

    stop = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    every = [*tokenize_only, *texts]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in every]
    scored_ids = ids[len(tokenize_only) :]
    request = Request(path, lora, every, scored_ids, n_new=n_new, stop=sorted(stop))
    reply = run(request)
    result = Comparison(len(texts), True, 0.0, 0)
    for text, mine, theirs in zip(every, ids, reply.tokens, strict=True):
        if theirs != mine:
            result.tokens_identical = False
            result.first_difference = first_difference(tokenizer, mine, theirs, text)
            return result
    scored = zip(texts, scored_ids, reply.logits, reply.greedy, strict=True)
    for text, prompt_ids, got, answer in scored:
        with torch.no_grad():
            expected = model(torch.tensor([prompt_ids])).logits[0].float().numpy()
        result.max_logit_diff = max(result.max_logit_diff, float(np.abs(expected - got).max()))
        result.positions += len(prompt_ids)
        result.top1_identical += int((expected.argmax(-1) == got.argmax(-1)).sum())
        mine = hf_greedy(model, prompt_ids, n_new, stop)
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
