"""Builders shared by the tests: a tiny tokenizer and model, data rows, a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]
CORPUS = [
    "Convert 3 March 2024 to ISO. 2024-03-03",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "system user assistant You are a helpful assistant. What is the answer? Yes no maybe",
    "January February March April May June July August September October November December",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def date_rows(n: int, offset: int = 0) -> list[dict]:
    months = ["January", "February", "March", "April", "May", "June"]
    rows = []
    for i in range(offset, offset + n):
        day, month = 1 + i % 28, 1 + i % 6
        rows.append(
            {
                "prompt": f"Convert {day} {months[month - 1]} 2024 to ISO.",
                "response": f"2024-{month:02d}-{day:02d}",
            }
        )
    return rows


# The original CUDA_VISIBLE_DEVICES while the tests hide the GPUs (see conftest.py); UNSET
# when it was not set (every GPU visible).
GPUS_VAR, UNSET = "FINETUNE_TEST_GPUS", "<unset>"


def hide_gpus() -> None:
    """Hide every GPU from this process and its subprocesses, keeping the original value.

    Kept only the first time, so a process started by the tests (a pytest-xdist worker)
    still knows what the user's shell had.
    """
    if GPUS_VAR not in os.environ:
        os.environ[GPUS_VAR] = os.environ.get("CUDA_VISIBLE_DEVICES", UNSET)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def share_cores_between_workers() -> None:
    """Under pytest-xdist, give each worker its share of the cores, for it and its
    subprocesses. torch sizes its thread pool by the cores it sees; two workers on two
    cores then run four spinning threads, and a compute-heavy test took 3.6x as long as
    alone (the embedded model's training: 298 s against 82 s). A value the user set wins.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))


def gpu_env() -> dict[str, str | None]:
    """run_cli's `env` for a `gpu` test: the GPUs the tests were started with (None unsets)."""
    original = os.environ.get(GPUS_VAR, UNSET)
    return {"CUDA_VISIBLE_DEVICES": None if original == UNSET else original}


def cli_env(env: dict | None = None) -> dict[str, str]:
    """A subprocess's environment: this one, offline, wide, with `env` on top (None unsets)."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return {name: value for name, value in full.items() if value is not None}


def run_python(code: str, env: dict | None = None, timeout: int = 120):
    """Run `python -c CODE` in a subprocess with run_cli's environment."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=cli_env(env),
        timeout=timeout,
    )


@cache
def gpu_skip_reason() -> str | None:
    """None when a subprocess with the original devices sees a CUDA GPU, else why not (one
    line). Asked once per session, in a subprocess: this process has them hidden."""
    probe = run_python("import torch; print(torch.cuda.device_count())", env=gpu_env())
    count = probe.stdout.strip().splitlines()[-1:] if probe.returncode == 0 else []
    if count and count[0].isdigit() and int(count[0]) > 0:
        return None
    shown = os.environ.get(GPUS_VAR, UNSET)
    return f"no CUDA GPU visible (CUDA_VISIBLE_DEVICES={shown}): tests marked gpu need one"


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run `python -m finetune ARGS` in a subprocess, offline, and return the completed process.

    `env` adds to the environment; a None value unsets that variable (see gpu_env)."""
    full_env = cli_env(env)
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=full_env,
        timeout=timeout,
    )


def run_in_terminal(*args: str, keys: bytes = b"", timeout: int = 120) -> tuple[int, str]:
    """Run `python -m finetune ARGS` attached to a real pseudo-terminal, as a user at a
    keyboard would: `keys` are typed once it starts. Returns (exit code, all it displayed)."""
    import pty
    import select
    import time

    leader, follower = pty.openpty()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "xterm", "COLUMNS": "120"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune", *args],
        stdin=follower, stdout=follower, stderr=follower, cwd=ROOT, env=env, close_fds=True,
    )  # fmt: skip
    os.close(follower)
    os.write(leader, keys)  # the terminal buffers them until the program reads
    shown, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([leader], [], [], 0.2)[0]:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the program closed the terminal: it has ended
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
    os.close(leader)
    return proc.wait(timeout=10), shown.decode(errors="replace")


def run_main(capsys, *args):
    """Run the CLI in-process: (exit code, stdout, stderr); main() returns on success."""
    capsys.readouterr()  # drop what building the runs printed
    code = 0
    from finetune.cli import main

    try:
        main(list(args))
    except SystemExit as exit_info:
        code = exit_info.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def tiny_recipe(model_dir: Path, data: Path, out: Path) -> dict:
    """The recipe the tests train the tiny model with: LoRA r4, six steps of four examples."""
    return {
        "model": {"path": str(model_dir)},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"path": str(data), "format": "instruction", "max_length": 64},
        "train": {"max_steps": 6, "lr": 5e-3, "micro_batch_size": 4, "seed": 0},
        "output": {"dir": str(out)},
    }


def with_llamacpp() -> bool:
    """Run the llama.cpp tests: the binding is installed, or `make test` demands it
    (FINETUNE_REQUIRE_LLAMACPP=1), so that a missing build fails instead of skipping."""
    from finetune.export import llamacpp

    return llamacpp.available() or os.environ.get("FINETUNE_REQUIRE_LLAMACPP") == "1"
