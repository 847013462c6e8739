"""finetune generate and chat on a run (every adapter kind), an adapter folder and a model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, date_rows, run_in_terminal, run_main, write_jsonl

from finetune import evaluate, inference, targets
from finetune.recipe import load_recipe
from finetune.train import train

SETTINGS = {
    "lora": ({"method": "lora", "r": 4, "alpha": 8}, 5e-3),
    "prefix": ({"method": "prefix", "num_virtual_tokens": 4}, 3e-2),
    "prompt": ({"method": "prompt", "num_virtual_tokens": 4}, 1e-1),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("gen")
    data = write_jsonl(root / "train.jsonl", date_rows(16))
    runs = {}
    for method, (adapter, lr) in SETTINGS.items():
        recipe = {
            "model": {"path": str(tiny_model_dir)},
            "adapter": adapter,
            "data": {"path": str(data), "format": "instruction", "max_length": 64},
            "train": {"max_steps": 3, "lr": lr, "micro_batch_size": 4, "seed": 0},
            "output": {"dir": str(root / method)},
            "eval": {"max_examples": 1, "max_new_tokens": 2},
        }
        (root / f"{method}.yaml").write_text(yaml.safe_dump(recipe))
        train(load_recipe(root / f"{method}.yaml"))
        runs[method] = root / method
    return runs


@pytest.mark.parametrize("method", list(SETTINGS))
def test_generate_is_greedy_through_the_chat_template(method, made, capsys):
    code, out, err = run_main(
        capsys,
        "generate",
        str(made[method]),
        "Convert 3 March 2024 to ISO.",
        "--max-new-tokens",
        "5",
    )
    assert code == 0, err
    session = inference.load(targets.resolve_target(str(made[method])), device="cpu")
    prompt = session.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Convert 3 March 2024 to ISO."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    expected = evaluate.generate(session.model, session.tokenizer, [prompt], 5)[0]
    assert out.strip() == expected.strip()


PROBES = ["Convert 3 March 2024 to ISO.", "Convert 17 June 2024 to ISO.", "the quick brown fox"]


def forward_greedy(model, tokenizer, prompt: str, n: int) -> str:
    """Greedy decoding the slow way: the whole sequence through the model's forward pass at
    every token, no cache, no generate(). What the adapter's logits say the answer is."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            token = int(
                model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
            )
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def own_generation_steps(model) -> list:
    """The instance-level prepare_inputs_for_generation of the peft model and its base."""
    owners = (model, model.base_model)
    return [owner.__dict__.get("prepare_inputs_for_generation") for owner in owners]


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_tokens_steer_generation_as_the_forward_pass_says(method, made):
    """Issue 28: on transformers 5.24+ with peft 0.21.2, generate() dropped the prefix (every
    answer the base model's) and re-inserted prompt tuning's virtual tokens at every step.
    Greedy generation (as generate, chat and exact match run it, several prompts padded into
    one batch) must equal greedy decoding through the adapter's own forward pass, and the
    adapter must change some answer, or this would pass with the adapter ignored."""
    session = inference.load(targets.resolve_target(str(made[method])), device="cpu")
    model, tokenizer = session.model, session.tokenizer
    prompts = [inference.render_prompt(tokenizer, p) for p in PROBES]
    before = own_generation_steps(model)
    generated = evaluate.generate(model, tokenizer, prompts, 6)
    assert own_generation_steps(model) == before  # the bridge leaves nothing behind
    adapter = [forward_greedy(model, tokenizer, p, 6) for p in prompts]
    with model.disable_adapter():
        base = [forward_greedy(model, tokenizer, p, 6) for p in prompts]
    assert generated == adapter
    assert adapter != base, "the trained adapter changes no answer: the test shows nothing"


def test_generate_accepts_adapter_folders_and_models_and_samples(made, tiny_model_dir, capsys):
    code, out, err = run_main(
        capsys, "generate", str(made["lora"] / "adapter"), "a", "b", "--max-new-tokens", "3"
    )
    assert code == 0, err
    assert out.count("> ") == 2
    code, out, err = run_main(
        capsys, "generate", str(tiny_model_dir), "hello", "--sample", "--temperature", "0.7",
        "--top-p", "0.9", "--seed", "1", "--raw", "--max-new-tokens", "3",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_main(capsys, "generate", str(tiny_model_dir), "x", "--temperature", "0")
    assert code == 2 and "--temperature must be above 0" in err


def test_chat_loop_reads_turns_from_stdin(made):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", "chat", str(made["lora"]), "--max-new-tokens", "4"],
        input="Convert 3 March 2024 to ISO.\n/reset\nAnd 4 May 2024?\n/exit\nnever read\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # finetune's own note goes to stderr: stdout holds only what the model said
    assert "(conversation reset)" not in proc.stdout
    assert proc.stderr.count("(conversation reset)") == 1


def test_chat_edits_lines_with_the_arrow_keys(made):
    """Typed `/xit`, then three left arrows and `e`: with line editing the line is `/exit`
    and the chat ends without a reply; without it the escape codes reach the model, which
    answers before Ctrl-D ends the chat."""
    left = b"\x1b[D"
    code, shown = run_in_terminal(
        "chat", str(made["lora"]), "--max-new-tokens", "2", keys=b"/xit" + left * 3 + b"e\r\x04"
    )
    assert code == 0, shown[-2000:]
    assert "you>" in shown and "model>" not in shown, shown[-2000:]


def test_chat_loop_keeps_the_conversation(made):
    lines = iter(["Convert 3 March 2024 to ISO.", "", "And 4 May 2024?"])
    shown = []
    replies = inference.chat_loop(
        str(made["lora"]), lambda: next(lines, None), shown.append, max_new_tokens=4
    )
    assert replies == 2 and len(shown) == 2
    session = inference.load(targets.resolve_target(str(made["lora"])), device="cpu")
    messages = [
        {"role": "user", "content": "Convert 3 March 2024 to ISO."},
        {"role": "assistant", "content": shown[0]},
        {"role": "user", "content": "And 4 May 2024?"},
    ]
    prompt = session.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert evaluate.generate(session.model, session.tokenizer, [prompt], 4)[0] == shown[1]


@pytest.mark.parametrize("attn", ["flash", "flex"])
def test_a_run_trained_with_a_cuda_kernel_generates_evaluates_and_merges_here(
    attn, made, tmp_path, capsys
):
    """A run trained on a GPU with flash or flex attention names a kernel this CPU cannot
    train with; generate, eval and merge use sdpa here (the same function) and print
    what the run trained with sdpa prints."""
    run = tmp_path / f"{attn}-run"
    shutil.copytree(made["lora"], run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["attn_implementation"] = attn
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    data = write_jsonl(tmp_path / "held.jsonl", date_rows(3, offset=40))
    commands = [
        ("generate", "Convert 3 March 2024 to ISO.", "--max-new-tokens", "5"),
        ("eval", "--data", str(data), "--max-new-tokens", "4", "--json"),
    ]
    for command, *args in commands:
        printed = []
        for target in (made["lora"], run):
            code, out, err = run_main(capsys, command, str(target), *args)
            assert code == 0, err
            printed.append(out.replace(str(target), "RUN"))
        assert printed[0] == printed[1]
    code, _, err = run_main(capsys, "merge", str(run), "--out", str(tmp_path / "merged"))
    assert code == 0, err
    assert (tmp_path / "merged" / "config.json").is_file()
