"""The bad-input corpus: every broken recipe, dataset, model folder, checkpoint and command
line in `CASES` must end with exit code 2 and one line naming the file, row or field, with
no traceback and nothing written or changed in the output folder.

The broken files live in tests/bad_inputs/ (recipes resolve their paths relative to
themselves, so a recipe there reaches the datasets beside it); the few inputs that need
the tiny model (a corrupt safetensors file, a run with a corrupt checkpoint) are built
here. Placeholders in the arguments: <bad> is tests/bad_inputs, <model> the tiny model
folder, <tmp> this case's scratch folder, <run> the output folder (<tmp>/run).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.errors import UserError

BAD = Path(__file__).resolve().parent / "bad_inputs"


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    expect: str  # a regex the one stderr line must match
    why: str
    setup: Callable[[Path, Path, Path], None] | None = None  # (tmp, tiny model, trained run)
    trained: bool = False  # the setup copies the trained run (the resume-* cases do too)
    env: tuple[tuple[str, str], ...] = ()  # environment variables (placeholders expanded)


def run(recipe: str, *overrides: str, command: str = "train") -> tuple[str, ...]:
    """A command line over a recipe in tests/bad_inputs, with the tiny model and <run>."""
    return (command, f"<bad>/{recipe}", "model.path=<model>", "output.dir=<run>", *overrides)


def validate(recipe: str, *overrides: str) -> tuple[str, ...]:
    return run(recipe, *overrides, command="validate")


def data(path: str, *overrides: str, command: str = "train") -> tuple[str, ...]:
    return run("base.yaml", f"data.path={path}", *overrides, command=command)


def chat(path: str, *overrides: str, command: str = "validate") -> tuple[str, ...]:
    return run("chat.yaml", f"data.path={path}", *overrides, command=command)


# ----------------------------------------------------------------- inputs built per case


def copy_model(tiny: Path, target: Path) -> Path:
    shutil.copytree(tiny, target)
    return target


def corrupt_safetensors(tmp: Path, tiny: Path, trained: Path) -> None:
    weights = copy_model(tiny, tmp / "model") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def garbage_safetensors(tmp: Path, tiny: Path, trained: Path) -> None:
    (copy_model(tiny, tmp / "model") / "model.safetensors").write_bytes(b"\x00" * 64)


def pickle_weights_only(tmp: Path, tiny: Path, trained: Path) -> None:
    import torch
    from safetensors.torch import load_file

    folder = copy_model(tiny, tmp / "model")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def remote_code_model(tmp: Path, tiny: Path, trained: Path) -> None:
    folder = copy_model(tiny, tmp / "model")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom.CustomModel"}
    config["model_type"] = "tiny-custom"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text("raise SystemExit('custom code ran')\n")


def output_is_file(tmp: Path, tiny: Path, trained: Path) -> None:
    (tmp / "run").write_text("not a folder\n")


def existing_run(tmp: Path, tiny: Path, trained: Path) -> None:
    (tmp / "run").mkdir()
    (tmp / "run" / "recipe.yaml").write_text("precious: true\n")
    (tmp / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")


def user_folder(tmp: Path, tiny: Path, trained: Path) -> None:
    """A folder of someone's work that is no run: files and a subfolder."""
    victim = tmp / "victim"
    (victim / "notes").mkdir(parents=True)
    (victim / "thesis.tex").write_text("years of work\n")
    (victim / "notes" / "ideas.md").write_text("- one\n")
    (victim / "recipe.yaml").write_text("precious: true\n")  # a recipe alone is no run


def recipe_folder(tmp: Path, tiny: Path, trained: Path) -> None:
    """A user's recipe beside its data, as in recipes/."""
    (tmp / "recipes").mkdir()
    for name in ("base.yaml", "good.jsonl"):
        shutil.copy(BAD / name, tmp / "recipes" / name)


def cwd_with_files(tmp: Path, tiny: Path, trained: Path) -> None:
    """The tests run each case in <tmp>: give it something to lose."""
    (tmp / "work.txt").write_text("unsaved work\n")
    (tmp / "home").mkdir()
    (tmp / "home" / ".bashrc").write_text("alias ll='ls -l'\n")


def copy_run(tmp: Path, tiny: Path, trained: Path) -> None:
    shutil.copytree(trained, tmp / "run")


def run_with_edited_recipe(tmp: Path, tiny: Path, trained: Path) -> None:
    """A copy of the trained run whose own recipe.yaml was edited by hand: lr 0.5."""
    copy_run(tmp, tiny, trained)
    own = tmp / "run" / "recipe.yaml"
    own.write_text(re.sub(r"(?m)^  lr: .*$", "  lr: 0.5", own.read_text()))


def saved_dataset_dict(tmp: Path, tiny: Path, trained: Path | None) -> None:
    """A save_to_disk DatasetDict with a train and a test split."""
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in (BAD / "good.jsonl").read_text().splitlines()]
    splits = {"train": rows[:-2], "test": rows[-2:]}
    DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(tmp / "saved")
    if trained is not None:
        copy_run(tmp, tiny, trained)


def adapter_weights_renamed(tmp: Path, tiny: Path, trained: Path) -> None:
    """An adapter for another architecture's module names: peft loads it as a no-op."""
    from safetensors.torch import load_file, save_file

    copy_run(tmp, tiny, trained)
    path = tmp / "run" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k.replace("self_attn", "attention"): v for k, v in tensors.items()}, path)


def adapter_weights_nan(tmp: Path, tiny: Path, trained: Path) -> None:
    from safetensors.torch import load_file, save_file

    copy_run(tmp, tiny, trained)
    path = tmp / "run" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: v * float("nan") for k, v in tensors.items()}, path)


def adapter_weights_cut(tmp: Path, tiny: Path, trained: Path) -> None:
    copy_run(tmp, tiny, trained)
    path = tmp / "run" / "adapter" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:2000])


def adapter_weights_gone(tmp: Path, tiny: Path, trained: Path) -> None:
    copy_run(tmp, tiny, trained)
    (tmp / "run" / "adapter" / "adapter_model.safetensors").unlink()


def copy_two_runs(tmp: Path, tiny: Path, trained: Path) -> None:
    shutil.copytree(trained, tmp / "run")
    shutil.copytree(trained, tmp / "run2")


def run_beside_user_folder(tmp: Path, tiny: Path, trained: Path) -> None:
    copy_run(tmp, tiny, trained)
    user_folder(tmp, tiny, trained)


def run_and_junk_gguf(tmp: Path, tiny: Path, trained: Path) -> None:
    copy_run(tmp, tiny, trained)
    (tmp / "base.gguf").write_bytes(b"GGUF but not really\n" * 4)


def run_and_other_base_gguf(tmp: Path, tiny: Path, trained: Path) -> None:
    """A readable llama GGUF of another shape (7 blocks), not the tiny model."""
    copy_run(tmp, tiny, trained)
    readable_gguf(tmp, tiny, trained)


def readable_gguf(tmp: Path, tiny: Path, trained: Path | None) -> None:
    """tmp/base.gguf: a GGUF the parser reads (7 llama blocks, one tensor); the cache is
    only reached by a file that passes that check."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp / "base.gguf"), "llama")
    writer.add_block_count(7)
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def run_beside_user_file(tmp: Path, tiny: Path, trained: Path) -> None:
    copy_run(tmp, tiny, trained)
    (tmp / "thesis.gguf").write_text("years of work, not a GGUF\n")


def run_and_link(tmp: Path, tiny: Path, trained: Path) -> None:
    run_beside_user_folder(tmp, tiny, trained)
    (tmp / "link").symlink_to(tmp / "victim", target_is_directory=True)


def precious_png(tmp: Path, tiny: Path, trained: Path) -> None:
    (tmp / "precious.png").write_bytes(b"\x89PNG a picture someone made\n")


def model_config(tmp: Path, tiny: Path, trained: Path) -> None:
    (tmp / "cfg").mkdir()
    shutil.copy(tiny / "config.json", tmp / "cfg" / "config.json")


def fifo_data(tmp: Path, tiny: Path, trained: Path) -> None:
    os.mkfifo(tmp / "fifo.jsonl")  # opening it would wait for a writer forever


def deep_jsonl(tmp: Path, tiny: Path, trained: Path) -> None:
    """Row 2 is an array nested 200,000 levels deep: json raises RecursionError."""
    good = (BAD / "good.jsonl").read_text().splitlines()[0]
    deep = '{"prompt": "x", "response": ' + "[" * 200_000 + "]" * 200_000 + "}"
    (tmp / "deep.jsonl").write_text(f"{good}\n{deep}\n")


def deep_yaml(tmp: Path, tiny: Path, trained: Path) -> None:
    (tmp / "deep.yaml").write_text("data: " + "[" * 100_000 + "]" * 100_000 + "\n")


def random_gguf(tmp: Path, tiny: Path, trained: Path) -> None:
    (tmp / "random.gguf").write_bytes(bytes(range(256)) * 64)


def truncated_gguf(tmp: Path, tiny: Path, trained: Path) -> None:
    """The magic and version of a GGUF file, then the download stopped."""
    (tmp / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x05\x00")


def bert_folder(tmp: Path, tiny: Path, trained: Path) -> None:
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp / "bert"
    )


def long_prompts(tmp: Path, tiny: Path, trained: Path) -> None:
    """A copy of the trained run and data whose prompts fill its max_length of 64 tokens."""
    copy_run(tmp, tiny, trained)
    rows = [{"prompt": "Convert the date " * 40, "response": "2024-03-0" + str(i)} for i in (1, 2)]
    (tmp / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def checkpoint_file(name: str, content: bytes | None = None, keep: int | None = None):
    """A copy of the trained run whose latest checkpoint has `name` replaced or truncated."""

    def setup(tmp: Path, tiny: Path, trained: Path) -> None:
        shutil.copytree(trained, tmp / "run")
        latest = max((tmp / "run" / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
        target = latest / name
        target.write_bytes(content if content is not None else target.read_bytes()[:keep])

    return setup


def user_only_template(tmp: Path, tiny: Path, trained: Path) -> None:
    """The tiny model with a chat template that never renders an assistant turn."""
    folder = copy_model(tiny, tmp / "model")
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n{% endif %}"
        "{% endfor %}"
    )


def mystery_config(tmp: Path, tiny: Path, trained: Path) -> None:
    (tmp / "config.json").write_text(json.dumps({"model_type": "mystery", "hidden_size": 8}))


def links(tmp: Path, tiny: Path, trained: Path) -> None:
    """A link to itself, a link to nothing, a FIFO, and a recipe naming the loop relatively."""
    (tmp / "loop.jsonl").symlink_to("loop.jsonl")
    (tmp / "dangling.jsonl").symlink_to("gone.jsonl")
    os.mkfifo(tmp / "fifo")
    (tmp / "loop.yaml").write_text(
        (BAD / "base.yaml").read_text().replace("good.jsonl", "loop.jsonl")
    )


def damaged_config(**change: object):
    """A copy of the tiny model whose config.json has `change` applied."""

    def setup(tmp: Path, tiny: Path, trained: Path) -> None:
        folder = copy_model(tiny, tmp / "model")
        config = {**json.loads((folder / "config.json").read_text()), **change}
        (folder / "config.json").write_text(json.dumps(config))

    return setup


CASES = [
    # ------------------------------------------------------------------- estimate
    Case(
        "estimate-override-on-preset",
        ("estimate", "llama-2-7b", "nonsense.key=1"),
        r"nonsense\.key=1: dotted overrides change a recipe",
        "overrides apply to recipes and runs only; a preset refuses them",
    ),
    Case(
        "estimate-unknown-target",
        ("estimate", "smollm2-135m", "--targets", "q_proj,v_proj,typo_proj"),
        r"typo_proj match no Linear layer.*q_proj",
        "an unknown target module name is refused, naming the model's real ones",
    ),
    Case(
        "estimate-unbuildable-architecture",
        ("estimate", "<tmp>/config.json"),
        r"transformers cannot build model_type 'mystery'",
        "a model type transformers does not know",
        mystery_config,
    ),
    Case(
        "estimate-gpu-nan",
        ("estimate", "llama-2-7b", "--gpu", "nan"),
        r"--gpu must be a positive number of GB.*nan",
        "a GPU size that is not a number",
    ),
    Case(
        "estimate-gpu-zero",
        ("estimate", "llama-2-7b", "--gpu", "0"),
        r"--gpu must be a positive number of GB.*0",
        "a GPU of no memory",
    ),
    Case(
        "estimate-gpu-negative",
        ("estimate", "llama-2-7b", "--gpu", "-24"),
        r"--gpu must be a positive number of GB.*-24",
        "a negative GPU size",
    ),
    Case(
        "estimate-gpu-infinite",
        ("estimate", "llama-2-7b", "--gpu", "inf"),
        r"--gpu must be a positive number of GB.*inf",
        "an infinite GPU",
    ),
    Case(
        "estimate-fit-without-gpu",
        ("estimate", "llama-2-7b", "--fit"),
        r"--fit needs --gpu",
        "--fit has nothing to fit in without --gpu",
    ),
    Case(
        "estimate-sharding-one-process",
        ("estimate", "llama-2-7b", "--sharding", "fsdp"),
        r"--sharding fsdp splits the model over processes: give --processes 2 or more",
        "sharding over a single process has nothing to split",
    ),
    Case(
        "estimate-processes-zero",
        ("estimate", "llama-2-7b", "--processes", "0"),
        r"processes must be 1 to 8,192 \(got 0\)",
        "no process trains nothing",
    ),
    Case(
        "estimate-processes-huge",
        ("estimate", "llama-2-7b", "--processes", "1000000000", "--sharding", "fsdp"),
        r"processes must be 1 to 8,192 \(got 1,000,000,000\)",
        "a billion processes built a fake world for minutes and GBs before it was bounded",
    ),
    Case(
        "estimate-sharding-int8",
        ("estimate", "llama-2-7b", "--quant", "int8", "--processes", "4", "--sharding", "fsdp"),
        r"model.quantization int8 cannot be sharded",
        "what train refuses to shard, estimate refuses in train's words",
    ),
    # ------------------------------------------------------------------- recipes
    Case(
        "yaml-unclosed-brace",
        run("malformed.yaml"),
        r"malformed\.yaml: line \d+, column \d+: malformed YAML",
        "a flow mapping left open",
    ),
    Case(
        "yaml-bad-indent",
        run("bad_indent.yaml"),
        r"bad_indent\.yaml: line 3, column \d+: malformed YAML",
        "a key indented under a scalar",
    ),
    Case(
        "recipe-is-a-list",
        run("list.yaml"),
        r"list\.yaml: a recipe is a mapping of sections",
        "top level is a YAML list",
    ),
    Case(
        "recipe-is-a-scalar",
        run("scalar.yaml"),
        r"scalar\.yaml: a recipe is a mapping of sections",
        "top level is a string",
    ),
    Case(
        "recipe-empty",
        ("train", "<bad>/empty.yaml", "output.dir=<run>"),
        r"empty\.yaml: 'data' is required",
        "an empty file has no data section",
    ),
    Case(
        "recipe-missing",
        ("train", "<tmp>/nope.yaml"),
        r"nope\.yaml: recipe file not found",
        "a typo in the recipe path",
    ),
    Case(
        "recipe-is-a-folder",
        ("validate", "<bad>/not_a_dataset"),
        r"not_a_dataset: is a folder; give a recipe file",
        "a folder given where the recipe file goes",
    ),
    Case(
        "recipe-latin1",
        run("latin1_recipe.yaml"),
        r"latin1_recipe\.yaml: not UTF-8 text",
        "a recipe saved in latin-1",
    ),
    Case(
        "recipe-python-tag",
        run("python_tag.yaml"),
        r"python_tag\.yaml: line 2, column \d+: the YAML tag !!python/object/apply:os\.system "
        r"is not allowed",
        "a YAML tag that would run code: safe_load refuses it",
    ),
    Case(
        "unknown-section",
        run("unknown_section.yaml"),
        r"unknown_section\.yaml: unknown key 'adpater' \(did you mean 'adapter'\?\)",
        "a misspelt section",
    ),
    Case(
        "unknown-key",
        run("unknown_key.yaml"),
        r"unknown_key\.yaml: unknown key 'train\.learning_rate'",
        "a key from another tool",
    ),
    Case(
        "wrong-type-int",
        run("wrong_type.yaml"),
        r"wrong_type\.yaml: adapter\.r: .*'eight'",
        "a word where a number goes",
    ),
    Case(
        "section-is-a-scalar",
        run("section_is_scalar.yaml"),
        r"section_is_scalar\.yaml: adapter: .*'lora'",
        "adapter: lora instead of adapter: {method: lora}",
    ),
    Case(
        "no-data-path",
        run("no_data_path.yaml"),
        r"no_data_path\.yaml: 'data\.path' is required",
        "a data section without its path",
    ),
    Case(
        "eval-path-and-fraction",
        run("eval_path_and_fraction.yaml"),
        r"eval_path_and_fraction\.yaml: data: set data\.eval_path or data\.eval_fraction",
        "two evaluation sources",
    ),
    Case(
        "prompt-init-text-with-lora",
        run("prompt_init_with_lora.yaml"),
        r"prompt_init_with_lora\.yaml: .*adapter\.prompt_init_text needs adapter\.method: prompt",
        "an option of another method",
    ),
    Case(
        "prefix-init-text-with-prompt",
        run("prefix_init_with_prompt.yaml"),
        r"prefix_init_with_prompt\.yaml: .*adapter\.prefix_init_text needs adapter\.method: prefix",
        "an option of another method",
    ),
    Case(
        "init-text-with-random-init",
        run("init_text_with_random_init.yaml"),
        r"init_text_with_random_init\.yaml: .*adapter\.prefix_init_text is not used with "
        r"adapter\.virtual_init: random",
        "two options that contradict each other",
    ),
    Case(
        "prefix-projection-with-prompt",
        run("prefix_projection_with_prompt.yaml"),
        r"prefix_projection_with_prompt\.yaml: .*adapter\.prefix_projection applies to prefix",
        "an option of another method",
    ),
    Case(
        "negative-lr",
        run("base.yaml", "train.lr=-1e-4"),
        r"base\.yaml: train\.lr: .*greater than 0 \(got '-1e-4'\)",
        "a sign slip",
    ),
    Case(
        "lr-above-one",
        run("base.yaml", "train.lr=3"),
        r"base\.yaml: train\.lr: .*less than 1",
        "a learning rate of 3",
    ),
    Case(
        "zero-batch",
        run("base.yaml", "train.micro_batch_size=0"),
        r"base\.yaml: train\.micro_batch_size: .*greater than or equal to 1",
        "batch size 0",
    ),
    Case(
        "max-length-too-small",
        run("base.yaml", "data.max_length=2"),
        r"base\.yaml: data\.max_length: .*greater than or equal to 8",
        "out of range",
    ),
    Case(
        "dropout-out-of-range",
        run("base.yaml", "adapter.dropout=1.5"),
        r"base\.yaml: adapter\.dropout: .*less than 1",
        "a percentage written as a fraction's inverse",
    ),
    Case(
        "eval-fraction-one",
        run("base.yaml", "data.eval_fraction=1"),
        r"base\.yaml: data\.eval_fraction: .*less than 1",
        "all data held out",
    ),
    Case(
        "unknown-method",
        run("base.yaml", "adapter.method=lorra"),
        r"base\.yaml: adapter\.method: .*'lorra'",
        "a typo in a choice",
    ),
    Case(
        "dtype-not-offered",
        run("base.yaml", "model.dtype=float64"),
        r"base\.yaml: model\.dtype: .*'float64'",
        "a dtype outside the list",
    ),
    Case(
        "template-unknown-placeholder",
        run("template_unknown_placeholder.yaml"),
        r"data\.template: .*\{question\}.*\{prompt\}",
        "a placeholder other than {prompt}",
    ),
    Case(
        "template-without-prompt",
        run("base.yaml", "data.template=Answer the question."),
        r"base\.yaml: data: data\.template has no \{prompt\} placeholder",
        "the prompt would be silently dropped",
    ),
    # ----------------------------------------------------------------- overrides
    Case(
        "override-without-equals",
        run("base.yaml", "train.lr"),
        r"override 'train\.lr': write it as section\.key=value",
        "a forgotten '='",
    ),
    Case(
        "override-into-non-section",
        run("base.yaml", "data.path.name=x"),
        r"override 'data\.path\.name=x': 'path' is not a section",
        "a dotted key through a plain value",
    ),
    Case(
        "override-empty-key",
        run("base.yaml", "=3"),
        r"override '=3': write it as section\.key=value",
        "no key at all",
    ),
    Case(
        "override-unknown-key",
        run("base.yaml", "adapter.rank=4"),
        r"base\.yaml: unknown key 'adapter\.rank'",
        "a key that does not exist",
    ),
    # -------------------------------------------------------------- command lines
    Case(
        "cli-missing-recipe",
        ("train",),
        r"^error: .*(recipe|RECIPE)",
        "no recipe argument",
    ),
    Case(
        "cli-unknown-option",
        (*run("base.yaml"), "--resum"),
        r"^error: .*--resum",
        "a misspelt flag",
    ),
    Case(
        "cli-unknown-command",
        ("trian", "<bad>/base.yaml"),
        r"^error: .*trian",
        "a misspelt command",
    ),
    # ------------------------------------------------------------------ datasets
    Case(
        "data-missing",
        data("missing.jsonl"),
        r"data\.path: .*missing\.jsonl not found",
        "a file that is not there",
    ),
    Case(
        "jsonl-invalid-row",
        data("invalid_row.jsonl"),
        r"invalid_row\.jsonl:3: not valid JSON",
        "an unquoted value on line 3",
    ),
    Case(
        "jsonl-row-is-a-list",
        data("list_row.jsonl", command="validate"),
        r"list_row\.jsonl:2: each line must be a JSON object",
        "an array where an object goes",
    ),
    Case(
        "jsonl-latin1",
        data("latin1.jsonl"),
        r"latin1\.jsonl:3: not UTF-8",
        "latin-1 bytes on line 3",
    ),
    Case(
        "jsonl-utf16",
        data("utf16.jsonl", command="validate"),
        r"utf16\.jsonl: .*UTF-16.*UTF-8",
        "saved as UTF-16 (with a byte-order mark)",
    ),
    Case(
        "csv-utf16",
        data("utf16.csv"),
        r"utf16\.csv: .*UTF-16.*UTF-8",
        "a spreadsheet export in UTF-16",
    ),
    Case(
        "jsonl-only-blank-lines",
        data("blank_lines.jsonl"),
        r"blank_lines\.jsonl: the dataset is empty",
        "nothing but newlines",
    ),
    Case(
        "jsonl-misnamed-columns",
        data("misnamed_columns.jsonl", command="validate"),
        r"misnamed_columns\.jsonl row 1: no column 'prompt' \(found: question, answer\)",
        "question/answer instead of prompt/response",
    ),
    Case(
        "column-override-wrong",
        data("good.jsonl", "data.response_column=answer"),
        r"good\.jsonl row 1: no column 'answer' \(found: prompt, response\); "
        r"set data\.response_column",
        "a column setting that names no column",
    ),
    Case(
        "jsonl-empty-response",
        data("empty_response.jsonl"),
        r"empty_response\.jsonl row 2: column 'response' is empty",
        "an empty string",
    ),
    Case(
        "jsonl-blank-prompt",
        data("blank_prompt.jsonl", command="validate"),
        r"blank_prompt\.jsonl row 3: column 'prompt' is empty",
        "whitespace only",
    ),
    Case(
        "jsonl-null-response",
        data("null_response.jsonl"),
        r"null_response\.jsonl row 2: column 'response' is missing \(null\)",
        "a JSON null",
    ),
    Case(
        "jsonl-number-response",
        data("number_response.jsonl", command="validate"),
        r"number_response\.jsonl row 2: column 'response' must be a string, got int",
        "a number where text goes (mixed types in one column)",
    ),
    Case(
        "text-format-missing-column",
        data("good.jsonl", "data.format=text", command="validate"),
        r"good\.jsonl row 1: no column 'text' \(found: prompt, response\); set data\.text_column",
        "format text on instruction data",
    ),
    Case(
        "too-long-nothing-trained",
        data("too_long.jsonl", "data.max_length=16"),
        r"too_long\.jsonl row 1, 2: no trained tokens left .*data\.max_length=16",
        "prompts longer than max_length: the responses are cut away",
    ),
    Case(
        "eval-file-missing",
        data("good.jsonl", "data.eval_path=nope.jsonl"),
        r"data\.eval_path: .*nope\.jsonl not found",
        "an evaluation file that is not there",
    ),
    Case(
        "eval-file-invalid-row",
        data("good.jsonl", "data.eval_path=invalid_row.jsonl", command="validate"),
        r"invalid_row\.jsonl:3: not valid JSON",
        "the evaluation file is checked like the training file",
    ),
    Case(
        "data-unknown-extension",
        data("data.txt"),
        r"data\.path: .*data\.txt has an unknown extension",
        "a .txt file",
    ),
    Case(
        "data-folder-not-saved-dataset",
        data("not_a_dataset"),
        r"data\.path: .*not_a_dataset is a folder but not one saved with datasets' save_to_disk",
        "a folder of files",
    ),
    Case(
        "json-object-without-data",
        data("object_without_data.json", command="validate"),
        r"object_without_data\.json: a \.json dataset is a list of objects",
        'an object keyed "rows", not "data"',
    ),
    Case(
        "json-invalid",
        data("invalid.json"),
        r"invalid\.json:3: not valid JSON",
        "a double comma on line 3",
    ),
    Case(
        "json-list-of-strings",
        data("list_of_strings.json"),
        r"list_of_strings\.json: a \.json dataset is a list of objects",
        "strings instead of objects",
    ),
    Case(
        "csv-missing-columns",
        data("missing_columns.csv", command="validate"),
        r"missing_columns\.csv row 1: no column 'prompt' \(found: question, answer\)",
        "a CSV with other headers",
    ),
    Case(
        "csv-header-only",
        data("header_only.csv"),
        r"header_only\.csv: the dataset is empty",
        "a header and no rows",
    ),
    Case(
        "parquet-wrong-type",
        data("int_prompt.parquet"),
        r"int_prompt\.parquet row 1: column 'prompt' must be a string, got int",
        "an int64 prompt column",
    ),
    Case(
        "parquet-not-parquet",
        data("not_parquet.parquet", command="validate"),
        r"not_parquet\.parquet: cannot read",
        "a CSV renamed .parquet",
    ),
    # ---------------------------------------------------------------- chat data
    Case(
        "chat-wrong-role",
        chat("chat_wrong_role.jsonl"),
        r"chat_wrong_role\.jsonl row 2: turn 1 has role 'human'; use one of system, user, "
        r"assistant",
        "ShareGPT role names",
    ),
    Case(
        "chat-messages-not-list",
        chat("chat_not_list.jsonl"),
        r"chat_not_list\.jsonl row 1: column 'messages' must be a non-empty list of turns",
        "a transcript string",
    ),
    Case(
        "chat-messages-mixed-types",
        chat("chat_mixed_messages.jsonl", command="train"),
        r"chat_mixed_messages\.jsonl row 2: column 'messages' must be a non-empty list",
        "a list on row 1, a string on row 2",
    ),
    Case(
        "chat-no-assistant-turn",
        chat("chat_no_assistant.jsonl", command="train"),
        r"chat_no_assistant\.jsonl row 2: no assistant turn",
        "nothing to train on",
    ),
    Case(
        "chat-turn-missing-content",
        chat("chat_missing_content.jsonl"),
        r"chat_missing_content\.jsonl row 2: turn 2 \(assistant\) has no 'content'",
        "an assistant turn without content",
    ),
    Case(
        "chat-empty-list",
        chat("chat_empty_list.jsonl", command="train"),
        r"chat_empty_list\.jsonl row 1: column 'messages' must be a non-empty list",
        "no turns",
    ),
    Case(
        "chat-turn-is-string",
        chat("chat_turn_is_string.jsonl"),
        r"chat_turn_is_string\.jsonl row 1: turn 1 must be an object with 'role' and 'content'",
        "bare strings as turns",
    ),
    Case(
        "chat-sharegpt-column",
        chat("conversations.jsonl"),
        r"conversations\.jsonl row 1: no column 'messages' \(found: conversations\); "
        r"set data\.messages_column",
        "ShareGPT's column name",
    ),
    # ------------------------------------------------------------------ models
    Case(
        "model-missing",
        run("base.yaml", "model.path=<tmp>/no-model"),
        r"model\.path: .*no-model does not exist",
        "a typo in the model path",
    ),
    Case(
        "model-is-a-file",
        run("base.yaml", "model.path=<bad>/base.yaml"),
        r"model\.path: .*base\.yaml is a file",
        "a file where the model folder goes",
    ),
    Case(
        "model-no-config",
        run("base.yaml", "model.path=model_no_config"),
        r"model\.path: .*model_no_config has no config\.json",
        "a folder without config.json",
    ),
    Case(
        "model-no-weights",
        run("base.yaml", "model.path=model_no_weights"),
        r"model\.path: .*model_no_weights has a config\.json but no weights",
        "config.json alone",
    ),
    Case(
        "model-bad-config",
        run("base.yaml", "model.path=model_bad_config", command="validate"),
        r"model\.path: .*model_bad_config/config\.json is not valid JSON",
        "a config.json cut off mid-object",
    ),
    Case(
        "model-corrupt-safetensors",
        run("base.yaml", "model.path=<tmp>/model"),
        r"model\.path: .*model\.safetensors.*(corrupt|cannot read)",
        "a safetensors file cut short (an interrupted download)",
        corrupt_safetensors,
    ),
    Case(
        "model-garbage-safetensors",
        run("base.yaml", "model.path=<tmp>/model"),
        r"model\.path: .*model\.safetensors.*(corrupt|cannot read)",
        "zeros where the safetensors header goes",
        garbage_safetensors,
    ),
    Case(
        "model-pickle-weights-only",
        run("base.yaml", "model.path=<tmp>/model"),
        r"model\.path: .*pytorch_model\.bin.*safetensors",
        "pickled weights are not read (they can run code); convert to safetensors",
        pickle_weights_only,
    ),
    Case(
        "model-remote-code",
        run("base.yaml", "model.path=<tmp>/model"),
        r"model\.path: .*model needs its own custom code .*custom\.CustomModel.*"
        r"model\.trust_remote_code: true",
        "a folder whose config asks to run its own Python code",
        remote_code_model,
    ),
    # --------------------------------------------------------- output and resume
    Case(
        "output-dir-is-a-file",
        run("base.yaml"),
        r"output\.dir: .*run is a file",
        "output.dir names an existing file",
        output_is_file,
    ),
    Case(
        "output-dir-holds-a-run",
        run("base.yaml"),
        r"output\.dir: .*run already holds a run",
        "no overwrite without output.overwrite=true",
        existing_run,
    ),
    # ------------------------------------ data loss: outputs over what is not theirs
    Case(
        "output-dir-user-folder",
        run("base.yaml", "output.dir=<tmp>/victim"),
        r"output\.dir: .*victim exists and does not hold a finetune run; nothing in it",
        "output.dir names someone's folder: it used to be emptied",
        user_folder,
    ),
    Case(
        "output-dir-user-folder-overwrite",
        run("base.yaml", "output.dir=<tmp>/victim", "output.overwrite=true"),
        r"output\.dir: .*victim exists and does not hold a finetune run",
        "overwrite replaces runs only, never another folder",
        user_folder,
    ),
    Case(
        "output-dir-recipe-folder",
        ("train", "<tmp>/recipes/base.yaml", "model.path=<model>", "output.dir=<tmp>/recipes"),
        r"output\.dir: .*recipes holds this command's input .*base\.yaml",
        "output.dir is the recipe's own folder: recipe and data were deleted after loading",
        recipe_folder,
    ),
    Case(
        "output-dir-recipe-folder-overwrite",
        (
            "train",
            "<tmp>/recipes/base.yaml",
            "model.path=<model>",
            "output.dir=<tmp>/recipes",
            "output.overwrite=true",
        ),
        r"output\.dir: .*recipes holds this command's input",
        "the same with output.overwrite=true",
        recipe_folder,
    ),
    Case(
        "output-dir-data-folder",
        run("base.yaml", "data.path=<tmp>/recipes/good.jsonl", "output.dir=<tmp>/recipes"),
        r"output\.dir: .*recipes holds this command's input .*good\.jsonl",
        "output.dir holds the training data",
        recipe_folder,
    ),
    Case(
        "output-dir-empty",
        run("base.yaml", "output.dir="),
        r"base\.yaml: output\.dir: is empty; give a new folder such as runs/<name>",
        "output.dir= (empty) used to wipe the current directory",
        cwd_with_files,
    ),
    Case(
        "output-dir-current",
        run("base.yaml", "output.dir=.", "output.overwrite=true"),
        r"output\.dir: \. is the current directory",
        "output.dir=. names the folder the user works in",
        cwd_with_files,
    ),
    Case(
        "output-dir-parent-of-current",
        run("base.yaml", "output.dir=.."),
        r"output\.dir: \.\. contains the current directory",
        "a parent of the current directory",
        cwd_with_files,
    ),
    Case(
        "output-dir-home",
        run("base.yaml", "output.dir=~/"),
        r"output\.dir: ~/? is the home folder",
        "the home folder (HOME is <tmp>/home here)",
        cwd_with_files,
    ),
    Case(
        "export-adapter-over-own-checkpoints",
        ("export", "<run>", "--format", "adapter", "--out", "<run>/checkpoints", "--force"),
        r"--out: .*run/checkpoints lies inside this command's input .*run; writing there",
        "used to delete every checkpoint of the source run",
        copy_run,
        trained=True,
    ),
    Case(
        "merge-over-own-checkpoint",
        ("merge", "<run>", "--out", "<run>/checkpoints/step-2", "--force"),
        r"--out: .*step-2 lies inside this command's input",
        "used to replace a checkpoint with a merged model",
        copy_run,
        trained=True,
    ),
    Case(
        "export-adapter-into-own-adapter",
        ("export", "<run>", "--format", "adapter", "--out", "<run>/adapter/exported"),
        r"--out: .*adapter/exported lies inside this command's input",
        "used to write into the source adapter, with a nested temporary copy",
        copy_run,
        trained=True,
    ),
    Case(
        "export-adapter-is-the-run",
        ("export", "<run>", "--format", "adapter", "--out", "<run>", "--force"),
        r"--out: .*run is this command's input",
        "--out names the source run itself",
        copy_run,
        trained=True,
    ),
    Case(
        "export-force-over-user-folder",
        ("export", "<run>", "--format", "adapter", "--out", "<tmp>/victim", "--force"),
        r"--out: .*victim exists and does not hold an adapter folder",
        "--force replaces an earlier export, never someone's folder",
        run_beside_user_folder,
        trained=True,
    ),
    Case(
        "merge-force-over-user-folder",
        ("merge", "<run>", "--out", "<tmp>/victim", "--force"),
        r"--out: .*victim exists and does not hold a model written by finetune merge",
        "--force replaces an earlier merge, never someone's folder",
        run_beside_user_folder,
        trained=True,
    ),
    Case(
        "merge-out-symlink",
        ("merge", "<run>", "--out", "<tmp>/link", "--force"),
        r"--out: .*link is a symbolic link",
        "a link would be followed into what it points to",
        run_and_link,
        trained=True,
    ),
    Case(
        "gguf-out-is-a-folder",
        ("export", "<run>", "--format", "gguf", "--out", "<tmp>/victim", "--force"),
        r"--out: .*victim is a folder; give a file name",
        "a GGUF is a file",
        run_beside_user_folder,
        trained=True,
    ),
    Case(
        "gguf-force-over-user-file",
        ("export", "<run>", "--format", "gguf", "--out", "<tmp>/thesis.gguf", "--force"),
        r"--out: .*thesis.gguf exists and is not a GGUF file",
        "--force replaces an earlier GGUF export, never someone's file",
        run_beside_user_file,
        trained=True,
    ),
    Case(
        "gguf-adapter-out-is-a-folder",
        ("export", "<run>", "--format", "gguf-adapter", "--out", "<tmp>/victim", "--force"),
        r"--out: .*victim is a folder; give a file name",
        "an adapter GGUF is a file",
        run_beside_user_folder,
        trained=True,
    ),
    Case(
        "gguf-adapter-misspelt",
        ("export", "<run>", "--format", "gguf_adapter", "--out", "<tmp>/a.gguf"),
        r"--format must be one of adapter, merged, gguf, gguf-adapter .*did you mean "
        r"'gguf-adapter'",
        "the format name is checked before anything loads",
        copy_run,
        trained=True,
    ),
    Case(
        "gguf-adapter-without-base-gguf",
        ("export", "<run>", "--format", "gguf-adapter", "--out", "<tmp>/a.gguf"),
        r"--base-gguf: .*not a GGUF file.*finetune export .* --format gguf --out base.gguf",
        "llama.cpp applies an adapter GGUF to a base GGUF; a folder base has none yet",
        copy_run,
        trained=True,
    ),
    Case(
        "gguf-adapter-base-gguf-missing",
        (
            "export",
            "<run>",
            "--format",
            "gguf-adapter",
            "--out",
            "<tmp>/a.gguf",
            "--base-gguf",
            "<tmp>/missing.gguf",
        ),
        r"--base-gguf: .*missing.gguf not found",
        "a base GGUF that is not there",
        copy_run,
        trained=True,
    ),
    Case(
        "gguf-adapter-base-gguf-is-a-folder",
        (
            "export",
            "<run>",
            "--format",
            "gguf-adapter",
            "--out",
            "<tmp>/a.gguf",
            "--base-gguf",
            "<tmp>/victim",
        ),
        r"--base-gguf: .*victim is a folder",
        "a folder is no base GGUF",
        run_beside_user_folder,
        trained=True,
    ),
    Case(
        "gguf-adapter-base-gguf-garbage",
        (
            "export",
            "<run>",
            "--format",
            "gguf-adapter",
            "--out",
            "<tmp>/a.gguf",
            "--base-gguf",
            "<tmp>/base.gguf",
        ),
        r"--base-gguf: .*base.gguf is not a readable GGUF file",
        "bytes that only start like a GGUF",
        run_and_junk_gguf,
        trained=True,
    ),
    Case(
        "gguf-adapter-base-gguf-other-model",
        (
            "export",
            "<run>",
            "--format",
            "gguf-adapter",
            "--out",
            "<tmp>/a.gguf",
            "--base-gguf",
            "<tmp>/base.gguf",
        ),
        r"--base-gguf: .*base.gguf is not the base model .*block_count 7 \(want 2\)",
        "an adapter applied to another model's GGUF would load and answer nonsense",
        run_and_other_base_gguf,
        trained=True,
    ),
    Case(
        "gguf-adapter-out-is-the-base-gguf",
        (
            "export",
            "<run>",
            "--format",
            "gguf-adapter",
            "--out",
            "<tmp>/base.gguf",
            "--base-gguf",
            "<tmp>/base.gguf",
            "--force",
        ),
        r"--out: .*base.gguf is this command's input",
        "the base GGUF is a GGUF file, so --force alone would let it be replaced",
        run_and_other_base_gguf,
        trained=True,
    ),
    Case(
        "base-gguf-without-gguf-adapter",
        (
            "export",
            "<run>",
            "--format",
            "gguf",
            "--out",
            "<tmp>/m.gguf",
            "--base-gguf",
            "<tmp>/base.gguf",
        ),
        r"--base-gguf applies to --format gguf-adapter, not gguf",
        "an option that would be silently ignored",
        copy_run,
        trained=True,
    ),
    Case(
        "combine-into-a-source",
        ("combine", "<run>", "<tmp>/run2", "--out", "<tmp>/run2/adapter", "--force"),
        r"--out: .*run2/adapter (is|lies inside) this command's input",
        "combining into one of the adapters being combined",
        copy_two_runs,
        trained=True,
    ),
    Case(
        "estimate-plot-exists",
        ("estimate", "llama-2-7b", "--plot", "<tmp>/precious.png"),
        r"--plot: .*precious\.png already exists; pass --force to replace it",
        "used to replace the file without --force",
        precious_png,
    ),
    Case(
        "estimate-plot-no-folder",
        ("estimate", "llama-2-7b", "--plot", "<tmp>/no/such/dir/x.png"),
        r"--plot: .*x\.png: its folder .*no/such/dir does not exist; create it first",
        "used to end in a traceback after estimating",
    ),
    Case(
        "estimate-plot-is-the-input",
        ("estimate", "<tmp>/cfg/config.json", "--plot", "<tmp>/cfg/config.json", "--force"),
        r"--plot: .*config\.json is this command's input",
        "--force never replaces the command's own input",
        model_config,
    ),
    Case(
        "resume-nothing-there",
        (*run("base.yaml"), "--resume"),
        r"--resume: .*run holds no run to resume",
        "--resume on a fresh folder",
    ),
    Case(
        "resume-changed-adapter",
        (*run("base.yaml", "adapter.r=8"), "--resume"),
        r"--resume: adapter\.r is 8 but the run in .* was made with 4",
        "resuming with another adapter shape than the checkpoint's",
        checkpoint_file("state.json", keep=None),
    ),
    Case(
        "resume-changed-clipping",
        (*run("base.yaml", "train.max_grad_norm=0.5"), "--resume"),
        r"--resume: train\.max_grad_norm is 0\.5 but the run in .* was made with 1\.0",
        "round 4: fields outside a hand-made list (clipping, objective, beta) resumed silently",
        checkpoint_file("state.json", keep=None),
    ),
    Case(
        "resume-changed-precision-yaml12-no",
        (*run("base.yaml", "train.mixed_precision=no"), "--resume"),
        r"--resume: train\.mixed_precision is 'no' but the run in .* was made with 'auto'",
        "round 4: another precision mid-run was accepted; `no` stays the word, not false",
        checkpoint_file("state.json", keep=None),
    ),
    Case(
        "resume-hand-edited-run-recipe",
        ("train", "<run>/recipe.yaml", "train.max_steps=4", "--resume"),
        r"--resume: train\.lr is 0\.5 but the run in .*run was made with",
        "round 4: the check compared the recipe with the file the user had edited, so the run "
        "went on at the old lr while its record said 0.5; the checkpoint keeps its recipe",
        run_with_edited_recipe,
    ),
    Case(
        "resume-truncated-optimizer",
        (*run("base.yaml"), "--resume"),
        r"step-2: corrupt checkpoint .*delete it",
        "optimizer.pt cut short",
        checkpoint_file("optimizer.pt", keep=100),
    ),
    Case(
        "resume-truncated-adapter",
        (*run("base.yaml"), "--resume"),
        r"step-2: corrupt checkpoint .*delete it",
        "the checkpoint's adapter weights cut short",
        checkpoint_file("adapter/adapter_model.safetensors", keep=100),
    ),
    Case(
        "resume-garbage-state",
        (*run("base.yaml"), "--resume"),
        r"step-2: corrupt checkpoint .*delete it",
        "state.json overwritten with garbage",
        checkpoint_file("state.json", content=b"{not json"),
    ),
    Case(
        "resume-empty-scheduler",
        (*run("base.yaml"), "--resume"),
        r"step-2: corrupt checkpoint .*delete it",
        "a zero-byte scheduler.pt",
        checkpoint_file("scheduler.pt", content=b""),
    ),
    # ------------------------------------ issue 17: numbers without bounds or finiteness
    Case(
        "seed-above-torch",
        validate("base.yaml", "train.seed=18446744073709551616"),
        r"base\.yaml: train\.seed: .*less than or equal to 9223372036854775807",
        "torch.manual_seed refuses 2**64: used to be a traceback",
    ),
    Case(
        "seed-negative",
        validate("base.yaml", "train.seed=-1"),
        r"base\.yaml: train\.seed: .*greater than or equal to 0",
        "a negative seed",
    ),
    Case(
        "epochs-infinite",
        run("base.yaml", "train.max_steps=null", "train.epochs=.inf"),
        r"base\.yaml: train\.epochs: .*finite number",
        "used to be a traceback and a half-made run folder",
    ),
    Case(
        "epochs-huge",
        validate("base.yaml", "train.max_steps=null", "train.epochs=1e300"),
        r"base\.yaml: train\.epochs: .*less than or equal to",
        "finite but beyond any run",
    ),
    Case(
        "weight-decay-infinite",
        run("base.yaml", "train.weight_decay=.inf"),
        r"base\.yaml: train\.weight_decay: .*finite number",
        "used to save an adapter of non-finite tensors",
    ),
    Case(
        "alpha-infinite",
        run("base.yaml", "adapter.alpha=.inf"),
        r"base\.yaml: adapter\.alpha: .*finite number",
        "used to diverge at step 1 and list files it had not written",
    ),
    Case(
        "attn-flash-on-cpu",
        run("base.yaml", "model.attn_implementation=flash"),
        r"model\.attn_implementation flash runs on CUDA only",
        "flash-attention 2 has no CPU kernel: refused before the model loads",
    ),
    Case(
        "attn-flex-on-cpu",
        run("base.yaml", "model.attn_implementation=flex", "data.packing=true"),
        r"model\.attn_implementation flex cannot train on cpu",
        "torch's flex attention has no backward on the CPU: it failed in the first backward",
    ),
    Case(
        "attn-unknown",
        validate("base.yaml", "model.attn_implementation=flash_attention_3"),
        r"base\.yaml: model\.attn_implementation",
        "transformers' own names are not the recipe's",
    ),
    Case(
        "compile-not-a-boolean",
        validate("base.yaml", "train.compile=max-autotune"),
        r"base\.yaml: train\.compile",
        "a torch.compile mode where a switch belongs",
    ),
    Case(
        "compile-without-a-compiler",
        run("base.yaml", "train.compile=true"),
        r"train\.compile: torch\.compile needs a C\+\+ compiler",
        "inductor writes C++ on the CPU: it failed at the first step without g++",
        env=(("PATH", "<tmp>/no-compilers"),),
    ),
    Case(
        "compile-with-gradient-checkpointing",
        run("base.yaml", "train.compile=true", "train.gradient_checkpointing=true"),
        r"train\.compile with train\.gradient_checkpointing: .*set "
        r"train\.gradient_checkpointing=false",
        "torch stopped at the checkpoint call: nothing compiled (0.6 s), reported compiled",
    ),
    Case(
        "lr-nan",
        validate("base.yaml", "train.lr=.nan"),
        r"base\.yaml: train\.lr: .*finite number",
        "nan passes both gt=0 and lt=1 comparisons",
    ),
    Case(
        "max-grad-norm-nan",
        validate("base.yaml", "train.max_grad_norm=.nan"),
        r"base\.yaml: train\.max_grad_norm: .*finite number",
        "clipping to nan",
    ),
    Case(
        "dropout-nan",
        validate("base.yaml", "adapter.dropout=.nan"),
        r"base\.yaml: adapter\.dropout: .*finite number",
        "a nan dropout",
    ),
    Case(
        "eval-fraction-nan",
        validate("base.yaml", "data.eval_fraction=.nan"),
        r"base\.yaml: data\.eval_fraction: .*finite number",
        "a nan fraction",
    ),
    Case(
        "max-steps-huge",
        validate("base.yaml", "train.max_steps=100000000000000000000"),
        r"base\.yaml: train\.max_steps: .*less than or equal to",
        "a step count no run reaches",
    ),
    Case(
        "max-time-no-unit-word",
        validate("base.yaml", "train.max_time=2 hours"),
        r"base\.yaml: train\.max_time: .*'2 hours' is not a duration; give one such as 45m",
        "a budget written in words",
    ),
    Case(
        "max-time-zero",
        validate("base.yaml", "train.max_time=0m"),
        r"base\.yaml: train\.max_time: .*'0m' is not a duration",
        "a budget that allows no step",
    ),
    Case(
        "max-time-negative",
        run("base.yaml", "train.max_time=-5m"),
        r"base\.yaml: train\.max_time: .*'-5m' is not a duration",
        "a negative budget",
    ),
    Case(
        "generate-temperature-nan",
        ("generate", "<run>", "hello", "--temperature", "nan"),
        r"--temperature must be a finite number \(got nan\)",
        "used to reach torch's sampler",
        copy_run,
        trained=True,
    ),
    Case(
        "generate-top-p-inf",
        ("generate", "<run>", "hello", "--top-p", "inf"),
        r"--top-p must be a finite number",
        "an infinite nucleus mass",
        copy_run,
        trained=True,
    ),
    Case(
        "generate-seed-too-big",
        ("generate", "<run>", "hello", "--seed", "18446744073709551616"),
        r"--seed must be at most",
        "torch.manual_seed refuses 2**64",
        copy_run,
        trained=True,
    ),
    Case(
        "generate-empty-prompt",
        ("generate", "<run>", "", "--raw"),
        r"prompt 1 is empty; give some text",
        "an empty prompt used to be a traceback",
        copy_run,
        trained=True,
    ),
    Case(
        "merge-negative-tolerance",
        ("merge", "<run>", "--out", "<tmp>/merged", "--tolerance", "-1"),
        r"--tolerance must be at least 0 \(got -1\)",
        "used to run the whole merge, then advise float32",
        copy_run,
        trained=True,
    ),
    Case(
        "export-tolerance-nan",
        ("export", "<run>", "--format", "merged", "--out", "<tmp>/m", "--tolerance", "nan"),
        r"--tolerance must be a finite number",
        "nan accepts every difference",
        copy_run,
        trained=True,
    ),
    Case(
        "merge-bad-shard-size",
        ("merge", "<run>", "--out", "<tmp>/merged", "--max-shard-size", "2XB"),
        r"--max-shard-size '2XB': give a positive size such as 500MB",
        "used to fail only after the whole merge",
        copy_run,
        trained=True,
    ),
    Case(
        "combine-weights-nan",
        ("combine", "<run>", "<tmp>/run2", "--out", "<tmp>/c", "--weights", "nan,1"),
        r"--weights must be a finite number \(got nan\)",
        "used to write an adapter of nan tensors, exit 0",
        copy_two_runs,
        trained=True,
    ),
    Case(
        "combine-density-nan",
        (
            "combine",
            "<run>",
            "<tmp>/run2",
            "--out",
            "<tmp>/c",
            "--method",
            "ties",
            "--density",
            "nan",
        ),
        r"--density must be a finite number",
        "nan slips past 0 < density <= 1",
        copy_two_runs,
        trained=True,
    ),
    # ------------------------------------------ issue 17: loaders, path kinds, structure
    Case(
        "data-fifo",
        data("<tmp>/fifo.jsonl", command="validate"),
        r"data\.path: .*fifo\.jsonl is a FIFO \(named pipe\), not a regular file",
        "validate used to block forever",
        fifo_data,
    ),
    Case(
        "data-device",
        data("/dev/zero", command="validate"),
        r"data\.path: /dev/zero is a character device",
        "a device never ends",
    ),
    Case(
        "recipe-fifo",
        ("validate", "<tmp>/fifo.jsonl"),
        r"recipe: .*fifo\.jsonl is a FIFO",
        "a recipe path that is a pipe",
        fifo_data,
    ),
    Case(
        "jsonl-nested-200000",
        data("<tmp>/deep.jsonl", command="validate"),
        r"deep\.jsonl:2: JSON nested too deeply",
        "json raises RecursionError, not JSONDecodeError",
        deep_jsonl,
    ),
    Case(
        "recipe-nested-deep",
        ("validate", "<tmp>/deep.yaml"),
        r"deep\.yaml: nested too deeply to be a recipe",
        "YAML flow lists nested 100,000 deep",
        deep_yaml,
    ),
    Case(
        "unknown-key-with-newline",
        validate("base.yaml", "train.lr\nx=1"),
        r"base\.yaml: unknown key 'train\.lr\\nx'",
        "found by the property test: a key holding a newline made the error two lines",
    ),
    Case(
        "recipe-duplicate-section",
        validate("duplicate_data.yaml"),
        r"duplicate_data\.yaml: line 5, .*the key 'data' appears twice \(lines 3 and 5\)",
        "the first data: section used to be dropped without a word",
    ),
    Case(
        "gguf-random-bytes",
        run("base.yaml", "model.path=<tmp>/random.gguf", command="validate"),
        r"model\.path: .*random\.gguf is not a readable GGUF file",
        "used to be a traceback from the GGUF parser",
        random_gguf,
    ),
    Case(
        "gguf-truncated",
        run("base.yaml", "model.path=<tmp>/cut.gguf"),
        r"model\.path: .*cut\.gguf is not a readable GGUF file",
        "struct.error from a cut download",
        truncated_gguf,
    ),
    Case(
        "model-encoder-only",
        run("base.yaml", "model.path=<tmp>/bert"),
        r"model\.path: .*bert is a bert model, an encoder, not a decoder",
        "a BERT folder used to be fine-tuned as a causal LM without a word",
        bert_folder,
    ),
    Case(
        "target-modules-empty",
        run("base.yaml", "adapter.target_modules=[]"),
        r"base\.yaml: adapter\.target_modules: names no module; .*\[q_proj, v_proj\]",
        "used to be a traceback inside peft",
    ),
    Case(
        "target-modules-with-prompt",
        validate("base.yaml", "adapter.method=prompt", "adapter.target_modules=[q_proj]"),
        r"adapter\.target_modules applies to lora, dora and ia3; prompt tuning",
        "used to be ignored silently",
    ),
    Case(
        "target-modules-unknown",
        run("base.yaml", "adapter.target_modules=[nope_proj]"),
        r"adapter\.target_modules \['nope_proj'\] match no layer; the Linear layers of this "
        r"model are down_proj, .*q_proj",
        "used to list layer indices (0, 1, 10, ...) as module names",
    ),
    Case(
        "init-from-other-method-and-rank",
        run(
            "base.yaml",
            "adapter.method=dora",
            "adapter.r=2",
            "adapter.init_from=<run>/adapter",
            "output.dir=<tmp>/new",
        ),
        r"adapter\.init_from: .*adapter holds a lora adapter with method lora, but the recipe "
        r"says adapter\.method dora",
        "used to train LoRA r4 while recipe.yaml said DoRA r2",
        copy_run,
        trained=True,
    ),
    Case(
        "init-from-other-rank",
        run("base.yaml", "adapter.r=2", "adapter.init_from=<run>/adapter", "output.dir=<tmp>/n"),
        r"adapter\.init_from: .*with r 4, but the recipe says adapter\.r 2",
        "the rank of the adapter it starts from differs",
        copy_run,
        trained=True,
    ),
    # ------------------------------------------- issue 14: the data doctor and trackers
    Case(
        "held-out-is-training",
        data("good.jsonl", "data.eval_path=good.jsonl"),
        r"good\.jsonl: every held-out example is also in the training data",
        "evaluation would measure memory: an error before the model loads",
    ),
    Case(
        "template-trains-nothing",
        run("base.yaml", "data.template=chat", "model.path=<tmp>/model"),
        r"good\.jsonl row 1, 2, 3, 4, 5 and 3 more: no trained tokens left",
        "a chat template that never renders the assistant's answer",
        user_only_template,
    ),
    Case(
        "strict-duplicates",
        (*data("duplicates.jsonl", command="validate"), "--strict"),
        r"duplicates\.jsonl: duplicates: 1 exact.*row 3 repeats row 1.*--strict",
        "--strict makes a data warning an error",
    ),
    Case(
        "strict-duplicates-train",
        (*data("duplicates.jsonl"), "--strict"),
        r"duplicates\.jsonl: duplicates: 1 exact",
        "train --strict stops on the same warning",
    ),
    Case(
        "validate-plot-exists",
        (*validate("base.yaml"), "--plot", "<tmp>/precious.png"),
        r"--plot: .*precious\.png already exists; pass --force to replace it",
        "the length plot never replaces a file without --force",
        precious_png,
    ),
    Case(
        "validate-plot-is-the-data",
        (*validate("base.yaml"), "--plot", "<bad>/good.jsonl", "--force"),
        r"--plot: .*good\.jsonl is this command's input",
        "--force never replaces the recipe's own data",
    ),
    Case(
        "validate-plot-no-folder",
        (*validate("base.yaml"), "--plot", "<tmp>/no/dir/l.png"),
        r"--plot: .*l\.png: its folder .*no/dir does not exist",
        "a plot into a folder that is not there",
    ),
    Case(
        "report-to-unknown",
        validate("base.yaml", "train.report_to=[neptune]"),
        r"base\.yaml: train\.report_to\.0: .*'neptune'",
        "a tracker finetune does not offer",
    ),
    Case(
        "report-to-twice",
        validate("base.yaml", "train.report_to=[mlflow, mlflow]"),
        r"base\.yaml: train\.report_to: names a tracker twice",
        "the same tracker twice",
    ),
    Case(
        "eval-max-examples-negative",
        validate("base.yaml", "eval.max_examples=-1"),
        r"base\.yaml: eval\.max_examples: .*greater than or equal to 0",
        "0 skips exact match; below that means nothing",
    ),
    Case(
        "eval-responses-cut",
        ("eval", "<run>", "--data", "<tmp>/long.jsonl"),
        r"long\.jsonl row 1, 2: no trained tokens left .*data\.max_length=64",
        "used to report loss nan and exit 0 (train refuses the same data)",
        long_prompts,
        trained=True,
    ),
    # ------------------------------------------- issue 30, round 3: shared resources
    Case(
        "cache-env-empty",
        ("generate", "<tmp>/random.gguf", "hi"),
        r"FINETUNE_CACHE is set but empty; unset it",
        "an empty FINETUNE_CACHE used to mean the current directory",
        random_gguf,
        env=(("FINETUNE_CACHE", ""),),
    ),
    Case(
        "cache-env-file",
        ("generate", "<tmp>/base.gguf", "hi"),
        r"FINETUNE_CACHE=.*work\.txt is not a folder \(a file or a special file\); set",
        "a cache that is a file used to end in a traceback",
        lambda tmp, tiny, trained: (
            readable_gguf(tmp, tiny, trained),
            cwd_with_files(tmp, tiny, trained),
        ),
        env=(("FINETUNE_CACHE", "<tmp>/work.txt"),),
    ),
    Case(
        "cache-env-under-a-file",
        ("eval", "<tmp>/base.gguf", "--data", "<bad>/good.jsonl"),
        r"FINETUNE_CACHE=.*work\.txt/cache cannot be created",
        "a cache folder below a file",
        lambda tmp, tiny, trained: (
            readable_gguf(tmp, tiny, trained),
            cwd_with_files(tmp, tiny, trained),
        ),
        env=(("FINETUNE_CACHE", "<tmp>/work.txt/cache"),),
    ),
    Case(
        "combine-missing-folder",
        ("combine", "<run>", "<tmp>/nope", "--out", "<tmp>/c"),
        r"nope: not found; combine needs a run directory or an adapter folder",
        "a path that does not exist was called a model",
        copy_run,
        trained=True,
    ),
    Case(
        "merge-missing-folder",
        ("merge", "<tmp>/gone/run", "--out", "<tmp>/m"),
        r"gone/run: not found; merge needs a run directory or an adapter folder",
        "the same for merge",
    ),
    Case(
        "combine-weights-zero",
        ("combine", "<run>", "<tmp>/run2", "--out", "<tmp>/c", "--weights", "0,0"),
        r"--weights 0,0: all zero makes an adapter that changes nothing",
        "used to write an all-zero adapter, exit 0",
        copy_two_runs,
        trained=True,
    ),
    Case(
        "combine-weights-negative",
        ("combine", "<run>", "<tmp>/run2", "--out", "<tmp>/c", "--weights", "1,-0.5"),
        r"--weights must be at least 0 \(got -0\.5\)",
        "a negative weight flips an adapter's update",
        copy_two_runs,
        trained=True,
    ),
    Case(
        "combine-same-adapter-twice",
        ("combine", "<run>", "<run>", "--out", "<tmp>/c"),
        r"run: the same adapter as .*run; combine different adapters, or pass --weights",
        "used to give twice the adapter's update",
        copy_run,
        trained=True,
    ),
    Case(
        "combine-copy-of-an-adapter",
        ("combine", "<run>", "<tmp>/run2", "--out", "<tmp>/c"),
        r"run2: the same adapter as .*run; combine different adapters",
        "a copied run is the same adapter under another name",
        copy_two_runs,
        trained=True,
    ),
    Case(
        "resume-copied-run-elsewhere",
        ("train", "<tmp>/run2/recipe.yaml", "output.dir=<run>", "--resume"),
        r"--resume: .*run2/recipe\.yaml is the recipe of the run in .*run2, but output\.dir=.*"
        r"names another folder",
        "a run's own recipe resumes that run, not the folder its output.dir names",
        copy_two_runs,
        trained=True,
    ),
    Case(
        "train-copied-run-again",
        ("train", "<tmp>/run2/recipe.yaml"),
        r"run2/recipe\.yaml is the recipe of the run in .*run2, which it would replace; "
        r"continue that run with `finetune train .*run2/recipe\.yaml --resume`",
        "used to name (and, with --resume, rewrite) the folder the run was copied from",
        copy_two_runs,
        trained=True,
    ),
    Case(
        "estimate-plot-over-the-runs-own",
        ("estimate", "<run>", "--plot", "<run>/loss.png", "--force"),
        r"--plot: .*run/loss\.png lies inside the run directory .*run, whose files only its run "
        r"writes",
        "used to replace the run's own loss plot",
        copy_run,
        trained=True,
    ),
    Case(
        "validate-plot-into-a-run",
        (*validate("base.yaml", "output.dir=<tmp>/new"), "--plot", "<run>/memory.png"),
        r"--plot: .*run/memory\.png lies inside the run directory",
        "a new file inside another run's record",
        copy_run,
        trained=True,
    ),
    Case(
        "adapter-matches-no-module",
        ("eval", "<run>", "--data", "<bad>/good.jsonl", "--base"),
        r"adapter_model\.safetensors: 16 of its 28 tensors match no module of the base model",
        "used to print base = adapter: the renamed tensors were dropped silently",
        adapter_weights_renamed,
        trained=True,
    ),
    Case(
        "merge-adapter-matches-no-module",
        ("merge", "<run>", "--out", "<tmp>/m"),
        r"adapter_model\.safetensors: .* match no module of the base model",
        "used to write the base as 'merged', self-check difference 0",
        adapter_weights_renamed,
        trained=True,
    ),
    Case(
        "adapter-nan",
        ("eval", "<run>", "--data", "<bad>/good.jsonl"),
        r"adapter_model\.safetensors: tensor .* holds NaN or infinite values",
        "used to evaluate to loss nan, exit 0",
        adapter_weights_nan,
        trained=True,
    ),
    Case(
        "adapter-truncated",
        ("generate", "<run>", "hi"),
        r"adapter_model\.safetensors: not a readable safetensors file, truncated or corrupt",
        "used to end in a safetensors traceback",
        adapter_weights_cut,
        trained=True,
    ),
    Case(
        "adapter-weights-missing",
        ("merge", "<run>", "--out", "<tmp>/m"),
        r"adapter_model\.safetensors: missing \(the folder holds nothing\)",
        "used to end in a peft traceback",
        adapter_weights_gone,
        trained=True,
    ),
    Case(
        "data-path-dataset-dict",
        data("<tmp>/saved", command="validate"),
        r"data\.path: .*saved is a DatasetDict with splits train, test; name one, such as "
        r".*saved:train",
        "used to read the train split and ignore the test split without a word",
        saved_dataset_dict,
    ),
    Case(
        "eval-path-unknown-split",
        data("<tmp>/saved:train", "data.eval_path=<tmp>/saved:validation", command="validate"),
        r"data\.eval_path: .*saved has no split 'validation' \(it has train, test\)",
        "a split the saved dataset does not have",
        saved_dataset_dict,
    ),
    Case(
        "eval-data-dataset-dict",
        ("eval", "<run>", "--data", "<tmp>/saved"),
        r"--data: .*saved is a DatasetDict with splits train, test; name one",
        "used to score the train split as held-out data",
        saved_dataset_dict,
        trained=True,
    ),
    Case(
        "split-of-a-plain-dataset",
        data("<bad>/good.jsonl:test", command="validate"),
        r"data\.path: .*good\.jsonl is a file, without splits; drop ':test'",
        "a split named for a file that has none",
    ),
    Case(
        "generate-prompt-beyond-context",
        ("generate", "<run>", "many words " * 300),
        r"prompt 1 is [\d,]+ tokens, which fills the model's context of 512 tokens",
        "used to run on for minutes with nothing printed",
        copy_run,
        trained=True,
    ),
    Case(
        "generate-max-new-tokens-beyond-context",
        ("generate", "<run>", "hi", "--max-new-tokens", "1000000"),
        r"--max-new-tokens 1,000,000 is more than the model's context of 512 tokens",
        "used to run on for minutes with nothing printed",
        copy_run,
        trained=True,
    ),
    Case(
        "estimate-r-beyond-recipe-bound",
        ("estimate", "smollm2-135m", "--r", "1000000"),
        r"--r 1000000: adapter\.r: Input should be less than or equal to 4096 \(got 1000000\)",
        "used to end in a pydantic traceback; train refuses adapter.r the same way",
    ),
    Case(
        "estimate-targets-empty",
        ("estimate", "smollm2-135m", "--targets", ""),
        r"--targets '': adapter\.target_modules: names no module",
        "used to end in a peft traceback",
    ),
    Case(
        "estimate-batch-zero",
        ("estimate", "smollm2-135m", "--batch", "0"),
        r"--batch 0: train\.micro_batch_size: Input should be greater than or equal to 1",
        "in train's words for the recipe field it stands for",
    ),
    Case(
        "estimate-seq-negative",
        ("estimate", "smollm2-135m", "--seq", "-1"),
        r"--seq -1: data\.max_length: Input should be greater than or equal to 8",
        "in train's words for the recipe field it stands for",
    ),
    Case(
        "special-tokens-in-text",
        (*data("special_tokens.jsonl", command="validate"), "--strict"),
        r"special_tokens\.jsonl: special tokens in text: 1 of 8 examples \(e\.g\. special_tokens"
        r"\.jsonl row 5 holds <\|im_(end|start)\|>\)",
        "a literal <|im_end|> in a response used to pass every data check",
    ),
    Case(
        "eval-max-new-tokens-beyond-context",
        ("eval", "<run>", "--data", "<bad>/good.jsonl", "--max-new-tokens", "1000000"),
        r"--max-new-tokens 1,000,000 is more than the model's context of 512 tokens",
        "exact match would generate far past the context for every example",
        copy_run,
        trained=True,
    ),
    Case(
        "chat-system-beyond-context",
        ("chat", "<run>", "--system", "many words " * 300),
        r"--system is [\d,]+ tokens, which fills the model's context of 512 tokens",
        "every turn would be skipped for a system message no conversation fits beside",
        copy_run,
        trained=True,
    ),
    Case(
        "combine-run-and-its-own-adapter",
        ("combine", "<run>", "<run>/adapter", "--out", "<tmp>/c"),
        r"run/adapter: the same adapter as .*run; combine different adapters",
        "one adapter by two names",
        copy_run,
        trained=True,
    ),
    Case(
        "export-into-another-runs-checkpoints",
        ("export", "<run>", "--format", "adapter", "--out", "<tmp>/run2/checkpoints/x"),
        r"--out: .*run2/checkpoints/x lies inside the run directory .*run2, whose files only",
        "an output inside another run's folder becomes part of that run's record",
        copy_two_runs,
        trained=True,
    ),
    # ------------------------------------------------- text that is not text (issue 30)
    Case(
        "text-lone-surrogate",
        data("lone_surrogate.jsonl", command="validate"),
        r"lone_surrogate\.jsonl row 2: column 'response' holds a lone surrogate .*U\+D800",
        "a legal JSON escape that encodes no character: refused before the tokenizer",
    ),
    Case(
        "text-escape-in-chat-turn",
        chat("chat_escape_sequence.jsonl"),
        r"row 2: messages\[1\]\.content holds a control character \(U\+001B\)",
        "an ESC sequence in a chat message would run in the terminal when the row is shown",
    ),
    Case(
        "text-bidi-column-name",
        data("bidi_column_name.jsonl", command="validate"),
        r"the column name 'prompt\\u202e' holds an invisible formatting character",
        "a column name that displays as another name (right-to-left override inside it)",
    ),
    Case(
        "text-control-in-template",
        validate("base.yaml", "data.template=Q: {prompt}\x07\nA: "),
        r"base\.yaml: data\.template holds a control character \(U\+0007\)",
        "recipe strings follow the same rule as data",
    ),
    Case(
        "text-control-in-prompt",
        ("generate", "<model>", "say \x1b]0;pwned\x07 hi"),
        r"prompt 1 holds a control character \(U\+001B\)",
        "generate's prompts follow the same rule",
    ),
    # ------------------------------------------------------------ CSV structure (issue 30)
    Case(
        "csv-nul-in-field",
        data("nul_in_field.csv", command="validate"),
        r"nul_in_field\.csv row 2: column 'prompt' holds a NUL character",
        "a NUL byte inside a quoted field was read silently",
    ),
    Case(
        "csv-duplicate-columns",
        data("duplicate_columns.csv", command="validate"),
        r"duplicate_columns\.csv: the header names column 'prompt' more than once",
        "the csv module kept the last of two 'prompt' columns without a word",
    ),
    Case(
        "csv-empty-header",
        data("empty_header.csv", command="validate"),
        r"empty_header\.csv: the first line is empty",
        "the first data row was taken for the header",
    ),
    Case(
        "csv-binary",
        data("binary.csv", command="validate"),
        r"binary\.csv:\d+: not UTF-8 text",
        "random bytes named .csv",
    ),
    # ------------------------------------------------------ links that lead nowhere (issue 30)
    Case(
        "path-relative-link-loop-in-recipe",
        ("validate", "<tmp>/loop.yaml", "model.path=<model>", "output.dir=<run>"),
        r"data\.path: .*loop\.jsonl is a symbolic link loop",
        "Path.resolve raised RuntimeError: Symlink loop on a recipe-relative path",
        setup=links,
    ),
    Case(
        "path-dangling-link",
        data("<tmp>/dangling.jsonl", command="validate"),
        r"dangling\.jsonl not found, a link to gone\.jsonl, which does not exist",
        "a dangling link is named as one, with where it points",
        setup=links,
    ),
    Case(
        "path-fifo-as-target",
        ("generate", "<tmp>/fifo", "hi"),
        r"target: .*fifo is a FIFO",
        "a FIFO given as the run or model must not be opened (it would wait forever)",
        setup=links,
    ),
    Case(
        "path-output-through-loop",
        run("base.yaml", "output.dir=<tmp>/loop.jsonl/run"),
        r"output\.dir: .*loop\.jsonl/run is a symbolic link loop",
        "an output folder under a link loop ended in OSError ELOOP",
        setup=links,
    ),
    Case(
        "path-plot-not-utf8",
        ("estimate", "<model>", "--seq", "16", "--plot", "<tmp>/\udcffplot.png"),
        r"--plot: .*plot\.png' holds the byte 0xff, which is not UTF-8 text; .*UTF-8 name",
        "round 4: merge --out with the byte 0xff merged, then tokenizers' save failed with a "
        "traceback (and the output claim's lock name before it)",
    ),
    Case(
        "path-plot-name-too-long",
        ("estimate", "<model>", "--seq", "16", "--plot", "<tmp>/" + "p" * 300 + ".png"),
        r"--plot: .* has a name of 304 bytes; file systems allow 255",
        "ENAMETOOLONG from lstat ended in a traceback",
    ),
    Case(
        "path-target-too-long",
        ("generate", "<tmp>/" + "/".join(["d" * 250] * 17), "hi"),
        r"target: .*\.\.\..* is \d+ bytes long; paths are limited to 4095",
        "a path over PATH_MAX: refused before any system call, shortened in the message",
    ),
    # ------------------------------------------------------------------ YAML (issue 30)
    Case(
        "yaml-alias-laughs-in-field",
        validate("alias_laughs.yaml"),
        r"alias_laughs\.yaml:.* expands to more than 100,000 values",
        "aliases of aliases under adapter.target_modules made validate spin past a minute",
    ),
    Case(
        "yaml-11-words-as-columns",
        validate("yaml11_column.yaml"),
        r"good\.jsonl row 1: no column 'on' \(found: prompt, response\)",
        "`on` and 2024 are read as the column names written, not True and 2024",
    ),
    Case(
        "yaml-bare-true-where-text-belongs",
        validate("base.yaml", "data.template=true"),
        r"data\.template: .*YAML reads the bare word as a boolean, so quote it",
        "a boolean where text belongs is explained, not blamed",
    ),
    Case(
        "kto-csv-label-word",
        data("kto_yes.csv", "data.format=kto", "train.objective=kto", command="validate"),
        r"kto_yes\.csv row 2: column 'label' must be true or false .*got 'yes'; write true or",
        "round 4: every CSV label was refused with 'write a JSON boolean', which no CSV holds; "
        "true/false are read now, other words still refused",
    ),
    Case(
        "reference-cached-with-orpo",
        data(
            "kto_yes.csv",
            "data.format=preference",
            "train.objective=orpo",
            "train.reference=cached",
            command="validate",
        ),
        r"train\.reference cached applies to train\.objective dpo or kto; orpo has no "
        r"reference model; set train\.reference: forward",
        "issue 31: ORPO scores no reference, so there is nothing to cache",
    ),
    Case(
        "estimate-reference-cached-sft",
        ("estimate", "<bad>/base.yaml", "model.path=<model>", "--reference", "cached"),
        r"--reference cached applies to --objective dpo or kto \(sft has no reference\); "
        r"use --reference forward",
        "issue 31: the estimate's --reference names the objectives that have a reference",
    ),
    Case(
        "override-key-not-utf8",
        validate("base.yaml", "tr\udcffin.lr=1"),
        r"override key 'tr\\udcffin\.lr' holds the byte 0xff, which is not UTF-8",
        "round 4: pydantic's 'Input should be a valid string' named neither override nor byte",
    ),
    Case(
        "override-hash-in-path",
        validate("base.yaml", "data.path=<bad>/good.jsonl #missing"),
        r"good\.jsonl #missing.*not found",
        "round 4: YAML read ` #2` as a comment, so a path typed with it named another file "
        "(output.dir=runs/exp #2 with output.overwrite=true replaced runs/exp)",
    ),
    Case(
        "override-braces-as-column",
        validate("base.yaml", "data.prompt_column={prompt}"),
        r"good\.jsonl row 1: no column '\{prompt\}' \(found: prompt, response\)",
        "round 4: `{prompt}` was read as a YAML mapping and refused as 'not a valid string'",
    ),
    # ------------------------------------------- estimate on a config that is no sane decoder
    Case(
        "config-string-for-number",
        ("estimate", "<tmp>/model"),
        r"model\.path: .*config\.json cannot be read as a llama config .*hidden_size.*got str",
        "transformers' StrictDataclassFieldValidationError ended estimate in a traceback",
        setup=damaged_config(hidden_size="64"),
    ),
    Case(
        "config-dropout-out-of-range",
        ("estimate", "<tmp>/model"),
        r"attention_dropout is 1\.5; a dropout is in \[0, 1\)",
        "accepted silently by estimate and train",
        setup=damaged_config(attention_dropout=1.5),
    ),
    Case(
        "config-100000-layers",
        ("estimate", "<tmp>/model"),
        r"num_hidden_layers is 100,000; no decoder has more than 1,024",
        "estimate never answered",
        setup=damaged_config(num_hidden_layers=100_000),
    ),
    Case(
        "config-zero-heads-train",
        run("base.yaml", "model.path=<tmp>/model"),
        r"model\.path: .*config\.json: num_attention_heads is 0; it must be at least 1",
        "train refuses what estimate refuses, with the same line (ZeroDivisionError before)",
        setup=damaged_config(num_attention_heads=0),
    ),
    Case(
        "config-bert-estimate",
        ("estimate", "<tmp>/bert"),
        r"model\.path: .*bert is a bert model, an encoder, not a decoder",
        "estimate dry-ran a BERT config and crashed inside it; train refused it in one line",
        setup=bert_folder,
    ),
    Case(
        "estimate-recipe-targets-unknown",
        run("base.yaml", "adapter.target_modules=[foo_proj]", command="estimate"),
        r"adapter\.target_modules \['foo_proj'\] match no layer",
        "estimate named the recipe's own field as the --targets option nobody passed",
    ),
    # ------------------------------------------------------------ preference data (issue 31)
    Case(
        "pref-chosen-equals-rejected",
        run("pref.yaml", "data.path=pref_same.jsonl"),
        r"pref_same\.jsonl row 2: columns 'chosen' and 'rejected' are identical, so there is "
        r"no preference to learn; fix or remove the row",
        "a pair with nothing to prefer trains nothing (by hand too: a turn list equal to a string)",
    ),
    Case(
        "pref-empty-side",
        run("pref.yaml", "data.path=pref_empty_side.jsonl"),
        r"pref_empty_side\.jsonl row 2: column 'chosen' is empty; fill it or remove the row",
        "an empty response (by hand too: an empty turn list, null)",
    ),
    Case(
        "pref-whitespace-side",
        run("pref.yaml", "data.path=pref_blank_side.jsonl"),
        r"pref_blank_side\.jsonl row 2: column 'rejected' is empty; fill it or remove the row",
        "a side of spaces, tab and newline is empty (by hand too: NBSP and ideographic space, "
        "a turn whose content is blank)",
    ),
    Case(
        "pref-missing-rejected-column",
        run("pref.yaml", "data.path=pref_no_rejected.jsonl"),
        r"pref_no_rejected\.jsonl row 1: no column 'rejected' \(found: prompt, chosen\); set "
        r"data\.rejected_column",
        "the column is named with the ones found and the setting that maps it (by hand: a CSV)",
    ),
    Case(
        "kto-label-number-in-jsonl",
        run(
            "pref.yaml",
            "data.path=kto_label_number.jsonl",
            "data.format=kto",
            "train.objective=kto",
        ),
        r"kto_label_number\.jsonl row 2: column 'label' must be true or false .*got 1; write a "
        r"JSON boolean",
        "1 is not read as true: a JSON label is a boolean (by hand too: 0, 1.0, null)",
    ),
    Case(
        "kto-label-string-in-jsonl",
        run(
            "pref.yaml",
            "data.path=kto_label_string.jsonl",
            "data.format=kto",
            "train.objective=kto",
        ),
        r"kto_label_string\.jsonl row 2: column 'label' must be true or false .*got 'true'; "
        r"write a JSON boolean",
        "in JSON the word is text, unlike a CSV cell (by hand too: 'false')",
    ),
    Case(
        "pref-prompt-ends-with-assistant",
        run("pref.yaml", "data.path=pref_assistant_prompt.jsonl"),
        r"pref_assistant_prompt\.jsonl row 2: column 'prompt' ends with an assistant turn; "
        r"move it to the response",
        "a turn-list prompt whose last turn is the assistant's (by hand too: a chosen side with "
        "a user turn)",
    ),
    Case(
        "pref-prompt-unknown-role",
        run("pref.yaml", "data.path=pref_bad_role.jsonl"),
        r"pref_bad_role\.jsonl row 2: turn 1 has role 'customer'; use one of system, user, "
        r"assistant",
        "a role the chat template does not know (by hand too: a turn without a role)",
    ),
    Case(
        "pref-truncation-makes-sides-equal",
        run("pref.yaml", "data.path=pref_long_tail.jsonl", "data.max_length=32"),
        r"pref_long_tail\.jsonl row 1: columns 'chosen' and 'rejected' are identical after "
        r"truncation to data\.max_length=32; raise data\.max_length",
        "the sides differ only past the override's length (by hand: 30 to 40)",
    ),
    Case(
        "pref-with-prefix-tuning",
        run("pref.yaml", "adapter.method=prefix", "adapter.num_virtual_tokens=4"),
        r"pref\.yaml: train\.objective dpo cannot train adapter\.method prefix: .*use lora, "
        r"dora or ia3",
        "virtual tokens change the model at step 0, so the reference is not the policy "
        "(by hand too: prompt tuning)",
    ),
    Case(
        "dpo-on-instruction-data",
        run("base.yaml", "train.objective=dpo"),
        r"base\.yaml: train\.objective dpo trains on data\.format preference, not "
        r"instruction; set data\.format: preference",
        "a preference objective on data without pairs",
    ),
    Case(
        "pref-beta-zero",
        run("pref.yaml", "train.beta=0"),
        r"pref\.yaml: train\.beta: Input should be greater than 0 \(got 0\)",
        "beta 0 makes every DPO loss log 2 (by hand too: -1, -0.0, 1e-400)",
    ),
    Case(
        "pref-beta-nan",
        run("pref.yaml", "train.beta=nan"),
        r"pref\.yaml: train\.beta: Input should be a finite number \(got 'nan'\)",
        "nan would make every loss nan (by hand too: inf, .nan)",
    ),
    Case(
        "kto-micro-batch-of-one",
        run(
            "pref.yaml",
            "data.path=kto_good.jsonl",
            "data.format=kto",
            "train.objective=kto",
            "train.micro_batch_size=1",
        ),
        r"pref\.yaml: train\.objective kto needs train\.micro_batch_size of at least 2",
        "KTO's KL term pairs a prompt with another row's completion (by hand too: with "
        "grad_accum 4)",
    ),
]


# ---------------------------------------------------------------------------- running


def snapshot(path: Path) -> dict[str, str] | None:
    """Hashes of every file under `path` (or of `path` itself), and its folders and links;
    None when it does not exist."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return None
    found = {}
    for p in sorted(path.rglob("*")):
        if p.is_symlink():
            found[str(p.relative_to(path))] = f"link to {p.readlink()}"
        elif p.is_file():
            found[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            found[str(p.relative_to(path))] = "folder"
    return found


CORPUS_BEFORE = snapshot(BAD)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A real two-step run with a checkpoint after each step, for the resume cases."""
    folder = tmp_path_factory.mktemp("trained") / "run"
    args = [f"model.path={tiny_model_dir}", f"output.dir={folder}", "train.save_every=1"]
    main(["train", str(BAD / "base.yaml"), *args])
    assert (folder / "checkpoints" / "step-2" / "optimizer.pt").is_file()
    return folder


def expand(arg: str, tmp: Path, model: Path) -> str:
    return (
        arg.replace("<bad>", str(BAD))
        .replace("<model>", str(model))
        .replace("<run>", str(tmp / "run"))
        .replace("<tmp>", str(tmp))
    )


# Cases that do not end cleanly yet, with the reason; strict, so a fix turns them into
# failures that ask for the mark to go.
KNOWN: dict[str, str] = {}


OUTCOMES: dict[str, bool] = {}  # case id -> ended cleanly, filled as the cases run


def params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN[case.id])] if case.id in KNOWN else []
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", params())
def test_bad_input_ends_cleanly(case, capsys, tmp_path, tiny_model_dir, request, monkeypatch):
    needs_run = case.trained or "resume-" in case.id
    trained = request.getfixturevalue("trained_run") if needs_run else None
    if case.setup is not None:
        case.setup(tmp_path, tiny_model_dir, trained)
    # Each case runs inside its scratch folder, with its home there: a case that names the
    # current directory or the home folder can only ever reach that folder.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name, value in case.env:
        monkeypatch.setenv(name, expand(value, tmp_path, tiny_model_dir))
    capsys.readouterr()
    before = snapshot(tmp_path)
    args = [expand(a, tmp_path, tiny_model_dir) for a in case.args]
    OUTCOMES[case.id] = False
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, f"exit {exit_info.value.code}: {err}"
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert re.search(case.expect, err), err
    assert snapshot(tmp_path) == before, "a file or folder changed"
    OUTCOMES[case.id] = True


def test_the_corpus_is_large_and_documented():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    assert all(c.why and c.expect for c in CASES)
    files = {a.split("/", 1)[1].split("=")[-1] for c in CASES for a in c.args if "<bad>/" in a}
    files |= {a.split("=", 1)[1] for c in CASES for a in c.args if a.startswith("data.path=")}
    files = {f.split(":")[0] for f in files}  # a saved dataset's split: saved:test
    missing = [f for f in files if not (BAD / f).exists() and "missing" not in f and "<" not in f]
    assert not missing, missing


def test_nothing_was_written_beside_the_corpus(capsys):
    assert snapshot(BAD) == CORPUS_BEFORE
    if OUTCOMES:
        clean = sum(OUTCOMES.values())
        not_clean = ", ".join(sorted(k for k, ok in OUTCOMES.items() if not ok))
        with capsys.disabled():
            print(f"\nbad-input corpus: {clean} of {len(OUTCOMES)} cases end cleanly", end="")
            print(f" (not yet: {not_clean})" if not_clean else "")


# ------------------------------------------------------- the same line on CUDA (issue 29)

# Train cases whose input is refused before the model loads: on CUDA the fit check comes
# after them. (output.dir is claimed before the pre-flight and the command line is parsed
# before it, so those cases cannot meet the fit check.)
BEFORE_FIT = [
    c
    for c in CASES
    if c.args[:1] == ("train",)
    and not (c.trained or "resume-" in c.id or c.id.startswith(("output-dir-", "cli-")))
    and not c.expect.startswith(r"output\.dir")  # claimed by train, not by the pre-flight
    and not c.id.endswith("-on-cpu")  # refused off CUDA only
    and not c.env  # preflight_on_cuda runs in this process's environment
]
# A GPU budget no run fits: the refusal would come first if any input check came after it.
NO_GPU_MEMORY = 1


def preflight_on_cuda(args: list[str]) -> None:
    """`finetune train ARGS` up to the model loading, as on a GPU with NO_GPU_MEMORY free."""
    from finetune.adapters import check_init_from
    from finetune.prepare import prepare
    from finetune.recipe import load_recipe

    recipe, *rest = args[1:]
    overrides = [a for a in rest if not a.startswith("--")]
    spec = load_recipe(Path(recipe), overrides)
    check_init_from(spec.adapter)
    prepare(spec, device="cuda", strict="--strict" in rest, gpu_free_bytes=NO_GPU_MEMORY)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in BEFORE_FIT])
def test_a_bad_input_is_named_before_the_cuda_fit_check(case, tmp_path, tiny_model_dir):
    if case.setup is not None:
        case.setup(tmp_path, tiny_model_dir, None)
    args = [expand(a, tmp_path, tiny_model_dir) for a in case.args]
    with pytest.raises(UserError) as raised:
        preflight_on_cuda(args)
    assert re.search(case.expect, str(raised.value)), str(raised.value)


def test_a_good_recipe_meets_the_cuda_fit_check(tiny_model_dir, tmp_path):
    """The other half: with the same budget a good recipe is refused by the fit check."""
    args = run("base.yaml", "model.path=<model>", "output.dir=<run>")
    with pytest.raises(UserError, match=r"this run needs about .* GB of GPU memory"):
        preflight_on_cuda([expand(a, tmp_path, tiny_model_dir) for a in args])
