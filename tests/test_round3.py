"""Red-team round 3 (issue 30): shared resources and outputs under concurrency and signals,
combine's weights, adapters that load as no-ops, dataset splits, bounded generation, and
text that the terminal cannot show. Real processes, real files, real peft."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from finetune import export as exports
from finetune.errors import UserError
from finetune.export import export

# ------------------------------------------------------------ item 7: the model cache


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model as a GGUF file: a model.path the cache converts."""
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    export(str(tiny_model_dir), out, "gguf", gguf_type="f32")
    return out


def start_generate(gguf: Path, cache: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "FINETUNE_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "finetune", "generate", str(gguf), "hi", "--max-new-tokens", "1"]
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_processes_convert_one_gguf_into_an_empty_cache(tiny_gguf, tmp_path):
    cache = tmp_path / "cache"
    procs = [start_generate(tiny_gguf, str(cache), tmp_path) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
    for code, err in results:
        assert code == 0 and "Traceback" not in err, err
    converted = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(converted) == 1 and (converted[0] / "config.json").is_file()
    assert not list(cache.glob(".convert-*")), "a temporary conversion was left behind"
    # Exactly one of them converted; the other waited and reused the result.
    assert sum("converting" in err for _, err in results) == 1


@pytest.mark.parametrize("kind", ["empty", "file", "unwritable"])
def test_a_bad_finetune_cache_is_one_line(kind, tiny_gguf, tmp_path):
    value = {"empty": "", "file": str(tmp_path / "f"), "unwritable": str(tmp_path / "ro")}[kind]
    (tmp_path / "f").write_text("x")
    (tmp_path / "ro").mkdir(mode=0o500)
    if kind == "unwritable" and os.access(tmp_path / "ro", os.W_OK):
        pytest.skip("running as root: every folder is writable")
    done = run_cli("generate", str(tiny_gguf), "hi", cwd=tmp_path, env={"FINETUNE_CACHE": value})
    code, err = done.returncode, done.stderr
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "FINETUNE_CACHE" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "ro"]  # nothing made in the cwd


# ------------------------------------------------------------ item 4: combine's weights


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model_dir):
    from test_export import Runs

    return Runs(tmp_path_factory.mktemp("runs"), tiny_model_dir)


def lora_deltas(adapter_dir: Path, base: Path) -> dict[str, torch.Tensor]:
    """Each LoRA module's update delta_W, as plain peft computes it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    return {
        name: module.get_delta_weight("default").detach()
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def test_linear_combine_is_the_weighted_sum_of_the_updates(made, tiny_model_dir, tmp_path):
    first = made.get("lora", "lora")
    second = made.get("lora-b", "lora", train_section={"seed": 1, "lr": 1e-2})
    one, two = (lora_deltas(r / "adapter", tiny_model_dir) for r in (first, second))
    for weights, scale in (("0.7,0.3", (0.7, 0.3)), (None, (0.5, 0.5))):
        out = tmp_path / f"c{weights}"
        exports.combine([str(first), str(second)], out, weights=weights)
        got = lora_deltas(out, tiny_model_dir)
        assert got.keys() == one.keys()
        for name in one:
            want = scale[0] * one[name] + scale[1] * two[name]
            assert torch.allclose(got[name], want, atol=1e-6), name


def test_one_adapter_many_times_is_that_adapter_not_a_multiple(made, tiny_model_dir, tmp_path):
    first = made.get("lora", "lora")
    copies = [str(first)] * 5
    with pytest.raises(UserError, match="the same adapter as"):
        exports.combine(copies, tmp_path / "refused")
    exports.combine(copies, tmp_path / "avg", weights=",".join(["0.2"] * 5))
    want = lora_deltas(first / "adapter", tiny_model_dir)
    got = lora_deltas(tmp_path / "avg", tiny_model_dir)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name


@pytest.mark.parametrize("weights", ["0,0", "-1,2", "0.5,-0.0001", "inf,1", "1,nan"])
def test_weights_that_mean_nothing_or_flip_an_adapter_are_refused(weights, made, tmp_path):
    first = made.get("lora", "lora")
    second = made.get("lora-b", "lora", train_section={"seed": 1, "lr": 1e-2})
    with pytest.raises(UserError, match="--weights"):
        exports.combine([str(first), str(second)], tmp_path / "c", weights=weights)
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------ item 2: a copied run


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_advice_for_a_copied_unfinished_run_resumes_the_copy(made, tmp_path, capsys):
    import re
    import shlex

    from helpers import run_main

    original = made.get("saved", "lora", train_section={"save_every": 2})
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(copy / "adapter")  # as if it had stopped after the checkpoint at step 2
    shutil.rmtree(copy / "checkpoints" / "step-4")
    before = snapshot(original)
    status, _, err = run_main(capsys, "generate", str(copy), "hi")
    assert status == 2
    advice = re.search(r"`(finetune train [^`]+)`", err).group(1)
    status, _, err = run_main(capsys, *shlex.split(advice)[1:])
    assert status == 0, err
    assert (copy / "adapter" / "adapter_config.json").is_file()
    assert snapshot(original) == before, "the original run was rewritten"
    # The copy's record now names the copy.
    assert f"dir: {copy}" in (copy / "recipe.yaml").read_text()


def test_resume_of_a_runs_recipe_into_another_folder_is_refused(made, tmp_path, capsys):
    from helpers import run_main

    original = made.get("saved", "lora", train_section={"save_every": 2})
    before = snapshot(original)
    recipe = str(original / "recipe.yaml")
    other = f"output.dir={tmp_path / 'other'}"
    status, _, err = run_main(capsys, "train", recipe, other, "--resume")
    assert status == 2 and "names another folder; drop output.dir" in err, err
    assert snapshot(original) == before and not (tmp_path / "other").exists()


# ------------------------------------------------------------ item 9: claimed outputs


def start(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "finetune", *args]
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_two_merges_into_one_out_one_wins_one_is_refused(made, tmp_path):
    run = made.get("lora", "lora")
    procs = [start("merge", str(run), "--out", str(tmp_path / "m"), cwd=tmp_path) for _ in "ab"]
    results = sorted((p.wait(timeout=300), p.stderr.read().decode()) for p in procs)
    (ok, _), (refused, err) = results
    assert ok == 0 and refused == 2, results
    assert len(err.strip().splitlines()) == 1 and "--out" in err, err
    assert (tmp_path / "m" / "merge.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_legal_250_byte_out_name_is_written(made, tmp_path):
    run = made.get("lora", "lora")
    out = tmp_path / ("é" * 100 + "x" * 50)  # 250 bytes in UTF-8
    exports.merge(str(run), out)
    assert (out / "merge.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def wait_for_partial(folder: Path, proc: subprocess.Popen) -> None:
    import time

    deadline = time.monotonic() + 120
    while not any(".partial" in p.name for p in folder.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.005)


@pytest.fixture(scope="module")
def wide_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter folder on a 100 MB base: its merge and GGUF writes take long enough
    to be stopped in the middle (the tiny model's take milliseconds)."""
    from helpers import build_tokenizer
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("wide")
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = LlamaForCausalLM.from_pretrained(root / "base")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    lora.base_model_name_or_path = str(root / "base")
    get_peft_model(base, lora).save_pretrained(root / "adapter")
    return root / "adapter"


@pytest.mark.parametrize("args", [("merge",), ("export", "--format", "gguf")])
def test_sigterm_while_writing_leaves_nothing_and_sigkill_leftovers_go(
    args, wide_adapter, tmp_path
):
    import signal

    source = str(wide_adapter)
    out = tmp_path / ("m.gguf" if "gguf" in args else "m")
    proc = start(*args, source, "--out", str(out), cwd=tmp_path)
    wait_for_partial(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, proc.stderr.read().decode()
    assert list(tmp_path.iterdir()) == []
    proc = start(*args, source, "--out", str(out), cwd=tmp_path)
    wait_for_partial(tmp_path, proc)
    proc.kill()
    proc.wait()
    assert any(".partial" in p.name for p in tmp_path.iterdir())  # SIGKILL cleans nothing
    done = run_cli(*args, source, "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


# ------------------------------------------------------------ item 6: adapters that do nothing


def break_adapter(adapter: Path, how: str) -> None:
    """Damage an adapter's weights file the ways a user meets: a file for another model,
    bad values, a cut download, a lost file, half the tensors."""
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    first = sorted(tensors)[0]
    if how == "renamed":
        tensors = {k.replace("layers.", "blocks."): v for k, v in tensors.items()}
    elif how in ("nan", "inf"):
        tensors[first] = tensors[first].clone()
        tensors[first].view(-1)[3] = float(how)
    elif how == "half":
        tensors = {k: v for i, (k, v) in enumerate(sorted(tensors.items())) if i % 2}
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    else:
        save_file(tensors, path)


BROKEN = ["renamed", "nan", "inf", "half", "truncated", "missing", "empty"]
ON_LOAD = {
    "generate": lambda run, tmp: ("generate", run, "hi", "--max-new-tokens", "2"),
    "eval": lambda run, tmp: ("eval", run, "--data", str(tmp / "d.jsonl"), "--base"),
    "merge": lambda run, tmp: ("merge", run, "--out", str(tmp / "m")),
    "combine": lambda run, tmp: ("combine", run, run, "--weights", "1,1", "--out", str(tmp / "c")),
}


@pytest.mark.parametrize("command", sorted(ON_LOAD))
@pytest.mark.parametrize("how", BROKEN)
def test_a_broken_adapter_is_one_line_naming_its_file(how, command, made, tmp_path, capsys):
    from helpers import date_rows, run_main, write_jsonl

    run = tmp_path / "run"
    shutil.copytree(made.get("lora", "lora"), run)
    break_adapter(run / "adapter", how)
    write_jsonl(tmp_path / "d.jsonl", date_rows(4))
    status, _, err = run_main(capsys, *ON_LOAD[command](str(run), tmp_path))
    assert status == 2 and len(err.splitlines()) == 1, err
    assert "adapter_model.safetensors" in err and "Traceback" not in err, err
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()


# ------------------------------------------------------------ item 5: dataset splits


@pytest.fixture
def saved_dict(tmp_path) -> Path:
    """A save_to_disk DatasetDict whose splits hold different rows."""
    from datasets import Dataset, DatasetDict
    from helpers import date_rows

    folder = tmp_path / "saved"
    splits = {"train": date_rows(12), "test": date_rows(4, offset=100)}
    DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(folder))
    return folder


def prompts(rows):
    return [r["prompt"] for r in rows]


def test_a_split_is_named_or_refused_with_the_list(saved_dict):
    from datasets import load_from_disk

    from finetune.data import load_rows

    saved = load_from_disk(str(saved_dict))
    for split in ("train", "test"):
        rows = load_rows(f"{saved_dict}:{split}", "data.eval_path")
        assert prompts(rows) == saved[split]["prompt"]
    for given, words in (
        (str(saved_dict), r"DatasetDict with splits train, test; name one, such as .*saved:train"),
        (f"{saved_dict}:validation", r"has no split 'validation' \(it has train, test\)"),
    ):
        with pytest.raises(UserError, match=f"--data: .*{words}"):
            load_rows(given, "--data")


def test_eval_scores_the_split_it_is_given(saved_dict, made, capsys):
    import json

    from helpers import run_main

    run = made.get("lora", "lora")
    status, out, err = run_main(capsys, "eval", str(run), "--data", f"{saved_dict}:test", "--json")
    assert status == 0, err
    assert json.loads(out)["examples"] == 4
    status, _, err = run_main(capsys, "eval", str(run), "--data", str(saved_dict))
    assert status == 2 and "splits train, test" in err, err


def test_a_path_with_a_colon_that_exists_is_that_path(tmp_path):
    from helpers import date_rows, write_jsonl

    from finetune.data import load_rows

    path = write_jsonl(tmp_path / "a:b.jsonl", date_rows(3))
    assert len(load_rows(str(path))) == 3


# ------------------------------------------------------------ item 10: bounded generation


def test_generation_is_bounded_by_the_models_context(made, capsys):
    from helpers import run_main

    run = str(made.get("lora", "lora"))  # the tiny model's context is 512 tokens
    status, _, err = run_main(capsys, "generate", run, "word " * 2000)
    assert status == 2 and re.search(r"prompt 1 is [\d,]+ tokens, which fills the model", err)
    status, _, err = run_main(capsys, "generate", run, "hi", "--max-new-tokens", "1000000")
    assert status == 2 and "more than the model's context of 512 tokens" in err, err
    status, _, err = run_main(capsys, "chat", run, "--max-new-tokens", "513")
    assert status == 2 and "give at most 512" in err, err
    status, _, err = run_main(capsys, "generate", run, "word " * 95, "--raw")
    assert status == 0 and re.search(r"--max-new-tokens lowered to \d+: the prompt", err), err


def test_preset_contexts_are_the_models_own():
    from finetune.memory.arch import to_hf_config
    from finetune.memory.presets import PRESETS

    assert to_hf_config(PRESETS["smollm2-135m"]).max_position_embeddings == 8192
    assert all(arch.context >= 4096 for arch in PRESETS.values())


# ------------------------------------------------------------ estimate options as recipe fields

EDGES = [-(2**63), -1, 0, 1, 7, 8, 4096, 4097, 10**6, 2**31, 2**64]


@pytest.mark.parametrize("option", ["r", "virtual_tokens", "batch", "seq"])
def test_estimate_refuses_what_train_refuses_with_the_same_words(option, capsys):
    from helpers import run_main
    from pydantic import ValidationError

    from finetune.memory.command import OPTION_FIELDS
    from finetune.recipe import Recipe
    from finetune.recipe.load import describe_errors

    section, field = OPTION_FIELDS[option]
    method = ["--method", "prompt"] if option == "virtual_tokens" else []
    for value in EDGES:
        raw = {"data": {"path": "d.jsonl"}, "adapter": {}}
        raw.setdefault(section, {})[field] = value
        if method:
            raw["adapter"]["method"] = "prompt"
        try:
            Recipe.model_validate(raw)
            continue  # train accepts it; estimate dry-runs it (slow), not repeated here
        except ValidationError as err:
            words = describe_errors(err)
        flag = "--" + option.replace("_", "-")
        status, _, err = run_main(capsys, "estimate", "smollm2-135m", *method, flag, str(value))
        assert status == 2 and err == f"error: {flag} {value}: {words}", err


# ------------------------------------------------------------ text the terminal cannot hold


def run_with(args: list, env: dict, stdin: bytes = b"", cwd: Path | None = None):
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    command = [sys.executable, "-m", "finetune", *args]
    return subprocess.run(command, input=stdin, capture_output=True, env=full, cwd=cwd, timeout=300)


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_narrow_output_encodings_end_without_a_traceback(encoding, made, tmp_path):
    run = str(made.get("lora", "lora"))
    env = {"PYTHONIOENCODING": encoding}
    cases = [
        (["generate", run, "Grüße → 日本", "--max-new-tokens", "4"], 0),
        (["validate", str(tmp_path / "rezept→日本.yaml")], 2),
        (["eval", run, "--data", str(tmp_path / "données→.jsonl")], 2),
    ]
    for args, code in cases:
        done = run_with(args, env)
        err = done.stderr.decode(encoding)
        assert done.returncode == code and "Traceback" not in err, err
        assert code == 0 or len(err.strip().splitlines()) == 1, err


def test_bytes_that_are_not_utf8_are_named(made):
    run = str(made.get("lora", "lora"))
    binary = bytes(range(128, 256)) * 4 + b"\n"
    cases = [
        (["chat", run], binary, r"chat input line 1 is not UTF-8 text \(byte 0x80"),
        ([b"generate", run.encode(), b"ok \xff\xfe"], b"", r"prompt 1 is not UTF-8 text"),
        (["chat", run, "--system", b"\xc3(".decode("utf-8", "surrogateescape")], b"", "--system"),
    ]
    for args, stdin, words in cases:
        done = run_with(args, {"LANG": "C.UTF-8"}, stdin)
        err = done.stderr.decode(errors="replace")
        assert done.returncode == 2 and len(err.strip().splitlines()) == 1, err
        assert re.search(words, err), err


# ------------------------------------------------------------ special tokens in the text


@pytest.mark.parametrize("field", ["prompt", "response", "chat", "text"])
def test_every_special_token_in_any_field_is_flagged(field, tmp_path):
    import random

    from helpers import build_tokenizer, date_rows, write_jsonl

    from finetune import doctor
    from finetune.data import prepare
    from finetune.doctor.rows import special_token_texts
    from finetune.recipe import Recipe

    tok = build_tokenizer()
    specials = special_token_texts(tok)
    assert specials
    rng = random.Random(field)
    for token in specials:
        rows = date_rows(8)
        hit = rng.randrange(len(rows))
        for i, row in enumerate(rows):
            text = row["response"]
            if i == hit:
                cut = rng.randrange(len(text) + 1)
                text = text[:cut] + token + text[cut:]
            key = "prompt" if field == "prompt" and i == hit else "response"
            if key == "prompt":
                row["prompt"], text = row["prompt"] + token, row["response"]
            row["response"] = text
            if field == "chat":
                rows[i] = {
                    "messages": [
                        {"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": row["response"]},
                    ]
                }
            elif field == "text":
                rows[i] = {"text": row["prompt"] + " " + row["response"]}
        fmt = {"chat": "chat", "text": "text"}.get(field, "instruction")
        path = write_jsonl(tmp_path / "d.jsonl", rows)
        recipe = Recipe.model_validate({"data": {"path": str(path), "format": fmt}})
        found = doctor.diagnose(recipe, tok, prepare(recipe.data, tok, seed=0)).findings
        finding = {f.name: f for f in found}["special tokens in text"]
        assert finding.level == "warning" and f"row {hit + 1} holds {token}" in finding.example


def test_force_replaces_an_output_and_leaves_no_temporary(made, tmp_path):
    run = made.get("lora", "lora")
    out = tmp_path / "m"
    exports.merge(str(run), out)
    (tmp_path / ".m.previous.partial").mkdir()  # a replacement killed between its renames
    (tmp_path / ".m.abcd1234.partial").mkdir()  # a write killed by SIGKILL
    exports.merge(str(run), out, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert (out / "merge.json").is_file()
