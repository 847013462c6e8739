"""merge, export (adapter, merged, gguf) and combine on tiny models: every output reproduces
the adapter model, and bad input is one line, exit code 2, nothing written."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from helpers import build_model, build_tokenizer, date_rows, run_main, with_llamacpp, write_jsonl

from finetune import export, inference, targets
from finetune.export import checks, gguf_vocab
from finetune.recipe import load_recipe
from finetune.train import train

ADAPTERS = {
    "lora": ({"method": "lora", "r": 4, "alpha": 8}, 5e-3),
    "dora": ({"method": "dora", "r": 4, "alpha": 8}, 5e-3),
    "ia3": ({"method": "ia3"}, 5e-2),
    "prefix": ({"method": "prefix", "num_virtual_tokens": 4}, 3e-2),
    "prompt": ({"method": "prompt", "num_virtual_tokens": 4}, 1e-1),
}


class Runs:
    """Tiny training runs made once per module, by name."""

    def __init__(self, root, model_dir):
        self.root, self.model_dir, self.made = root, model_dir, {}
        self.data = write_jsonl(root / "train.jsonl", date_rows(24))

    def get(self, name, method="lora", model=None, train_section=None, adapter=None):
        if name not in self.made:
            settings, lr = ADAPTERS[method]
            recipe = {
                "model": {"path": str(self.model_dir), **(model or {})},
                "adapter": {**settings, **(adapter or {})},
                "data": {"path": str(self.data), "format": "instruction", "max_length": 64},
                "train": {"max_steps": 4, "lr": lr, "micro_batch_size": 4, "seed": 0},
                "output": {"dir": str(self.root / name)},
                "eval": {"max_examples": 2, "max_new_tokens": 4},
            }
            recipe["train"].update(train_section or {})
            path = self.root / f"{name}.yaml"
            path.write_text(yaml.safe_dump(recipe))
            train(load_recipe(path))
            self.made[name] = self.root / name
        return self.made[name]


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model_dir):
    return Runs(tmp_path_factory.mktemp("runs"), tiny_model_dir)


def adapter_logits(run):
    session = inference.load(targets.resolve_target(str(run)), device="cpu")
    batch = checks.probe_batch(session.tokenizer)
    return checks.probe_logits(session.model, batch), batch


def expect_error(capsys, args, pattern, code=2):
    status, _, err = run_main(capsys, *args)
    assert status == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    return err


# ------------------------------------------------------------------------ merge


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merge_equals_adapter_and_loads_with_plain_transformers(method, made, tmp_path):
    from transformers import AutoModelForCausalLM

    run = made.get(method, method)
    report = export.merge(str(run), tmp_path / "merged")
    assert report.max_logit_diff < 1e-4
    folder = tmp_path / "merged"
    facts = json.loads((folder / "merge.json").read_text())
    assert facts["method"] == method and facts["max_logit_diff"] == report.max_logit_diff
    assert "max |logit difference|" in (folder / "README.md").read_text()
    expected, batch = adapter_logits(run)
    plain = AutoModelForCausalLM.from_pretrained(folder)
    got = checks.probe_logits(plain, batch)
    assert checks.max_logit_diff(expected, got, batch["attention_mask"]) < 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_merge_after_int8_training(made, tmp_path):
    pytest.importorskip("bitsandbytes")
    run = made.get(
        "int8", model={"quantization": "int8", "dtype": "float32"}, train_section={"lr": 1e-2}
    )
    plain = export.merge(str(run), tmp_path / "plain")
    matched = export.merge(str(run), tmp_path / "matched", match_quantized=True)
    for report in (plain, matched):
        assert report.trained_quantization == "int8"
        assert report.max_logit_diff < 1e-4  # the merge itself is exact in float32
        assert report.max_logit_diff_vs_trained is not None
    assert matched.folded_into.startswith("the dequantized int8 weights")
    # Folding into the weights the adapter was trained against lands closer to the model as
    # trained than folding into the original weights.
    assert matched.max_logit_diff_vs_trained < plain.max_logit_diff_vs_trained
    assert "--match-quantized" in (tmp_path / "matched" / "README.md").read_text()


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_merges_are_refused(method, made, tmp_path, capsys):
    run = made.get(method, method)
    err = expect_error(
        capsys,
        ["merge", str(run), "--out", str(tmp_path / "m")],
        rf"{method} tuning learns virtual tokens.*no weights to fold.*finetune generate.*"
        r"export --format adapter",
    )
    assert err and not (tmp_path / "m").exists()


def test_merge_check_failure_writes_nothing(made, tmp_path, capsys):
    run = made.get("lora", "lora")
    expect_error(
        capsys,
        [
            "merge",
            str(run),
            "--out",
            str(tmp_path / "m"),
            "--dtype",
            "bfloat16",
            "--tolerance",
            "0",
        ],
        r"merge check failed: .*nothing was written",
        code=1,
    )
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ export


def test_gguf_export_loads_back_with_matching_logits(made, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = made.get("lora", "lora")
    report = export.export(str(run), tmp_path / "model.gguf", "gguf", gguf_type="f32")
    assert report.check.max_logit_diff < 1e-3 and report.check.tokens_identical
    expected, batch = adapter_logits(run)
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="model.gguf", dtype=torch.float32
    )
    got = checks.probe_logits(reloaded, batch)
    assert checks.max_logit_diff(expected, got, batch["attention_mask"]) < 1e-4
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert tokenizer.chat_template == build_tokenizer().chat_template
    q8 = export.export(str(run), tmp_path / "q8.gguf", "gguf", gguf_type="q8_0")
    assert q8.size_bytes < report.size_bytes / 3
    assert q8.check.max_logit_diff < 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "q8.gguf"]


def test_export_adapter_copies_the_folder_with_a_model_card(made, tmp_path, capsys):
    run = made.get("prompt", "prompt")
    status, _, err = run_main(
        capsys, "export", str(run), "--format", "adapter", "--out", str(tmp_path / "a")
    )
    assert status == 0, err
    folder = tmp_path / "a"
    assert (folder / "adapter_config.json").is_file() and (folder / "recipe.yaml").is_file()
    assert "prompt adapter" in (folder / "README.md").read_text()
    assert targets.resolve_target(str(folder)).method == "prompt"


# ------------------------------------------------------------------------ combine


def test_combine_with_weights_one_zero_reproduces_the_first_adapter(made, tmp_path):
    first = made.get("lora", "lora")
    second = made.get("lora-b", "lora", train_section={"seed": 1, "lr": 1e-2})
    expected, batch = adapter_logits(first)
    mask = batch["attention_mask"]
    for method, density in (("linear", None), ("dare_linear", 1.0)):
        out = tmp_path / method
        export.combine(
            [str(first), str(second)], out, method=method, weights="1,0", density=density
        )
        assert (out / "adapter_config.json").is_file() and (out / "recipe.yaml").is_file()
        got, _ = adapter_logits(out)
        assert checks.max_logit_diff(expected, got, mask) < 1e-4, method
    other, _ = adapter_logits(second)
    assert checks.max_logit_diff(expected, other, mask) > 1e-3
    # TIES elects each weight's sign from all adapters, whatever their weights: it runs and
    # yields an adapter generate and eval accept, not a copy of the first.
    export.combine([str(first), str(second)], tmp_path / "ties", method="ties", weights="0.6,0.4")
    assert json.loads((tmp_path / "ties" / "combine.json").read_text())["density"] == 1.0


def test_combine_refuses_adapters_that_do_not_fit(made, tmp_path, capsys, tiny_model_dir):
    lora = made.get("lora", "lora")
    ia3 = made.get("ia3", "ia3")
    narrow = made.get("lora-q", "lora", adapter={"target_modules": ["q_proj"]})
    out = str(tmp_path / "c")
    expect_error(capsys, ["combine", str(lora), str(ia3), "--out", out], r"ia3 adapter.*method")
    expect_error(
        capsys, ["combine", str(lora), str(narrow), "--out", out], r"targets q_proj.*target modules"
    )
    other_base = tmp_path / "other-base"
    build_model(build_tokenizer(), seed=1).save_pretrained(other_base)
    build_tokenizer().save_pretrained(other_base)
    elsewhere = made.get("lora-other", "lora", model={"path": str(other_base)})
    expect_error(
        capsys, ["combine", str(lora), str(elsewhere), "--out", out], r"base model.*same base"
    )
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------ bad input


def test_bad_input_is_one_line_and_writes_nothing(made, tmp_path, capsys):
    run = made.get("lora", "lora")
    no_adapter = tmp_path / "unfinished"
    no_adapter.mkdir()
    (no_adapter / "recipe.yaml").write_text((run / "recipe.yaml").read_text())
    out = tmp_path / "out"
    expect_error(capsys, ["merge", str(no_adapter), "--out", str(out)], r"has no adapter/")

    small = tmp_path / "small-base"
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    model.config.hidden_size = 32  # a different model: same family, other shape
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(model.config).save_pretrained(small)
    tokenizer.save_pretrained(small)
    expect_error(
        capsys,
        ["merge", str(run), "--out", str(out), "--model", str(small)],
        r"hidden_size=64.*hidden_size=32.*base model the adapter was trained on",
    )
    expect_error(
        capsys,
        ["export", str(run), "--format", "onnx", "--out", str(out)],
        r"--format must be one of adapter, merged, gguf",
    )
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for force in ([], ["--force"]):  # someone's folder, not an earlier merge: never replaced
        args = ["merge", str(run), "--out", str(out), *force]
        expect_error(capsys, args, r"out exists and does not hold a model written by finetune")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "small-base", "unfinished"]


# ------------------------------------------------------------------------ embedded model


def report_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.slow
def test_embedded_model_trains_merges_and_exports_gguf(embedded_run, tmp_path):
    """SmolLM2-135M-Instruct: the session's trained run merged, exported as GGUF, loaded back."""
    from transformers import AutoModelForCausalLM

    run = str(embedded_run)
    merged = export.merge(run, tmp_path / "merged")
    assert merged.max_logit_diff < checks.MERGE_TOLERANCE["float32"]
    report = export.export(run, tmp_path / "model.gguf", "gguf")
    assert report.check.max_logit_diff < checks.GGUF_TOLERANCE["f16"]
    assert report.check.tokens_identical
    # The tokenizer fields come from the embedded GGUF; llama.cpp's own hash names it alike.
    assert report.check.pre_tokenizer == "smollm"
    assert gguf_vocab.pre_tokenizer(report_tokenizer(tmp_path / "merged")) == "smollm"
    assert 200e6 < report.size_bytes < 400e6  # 135M parameters in f16 plus the vocabulary
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="model.gguf", dtype=torch.float32
    )
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    session = inference.load(targets.resolve_target(run), device="cpu")
    batch = checks.probe_batch(session.tokenizer)
    diff = checks.max_logit_diff(
        checks.probe_logits(plain, batch),
        checks.probe_logits(reloaded, batch),
        batch["attention_mask"],
    )
    assert diff < checks.GGUF_TOLERANCE["f16"]
    if not with_llamacpp():
        return
    # In llama.cpp (the export's own check ran there): f16 answers the probes as the merged
    # model does, and the adapter GGUF applies to the embedded Q4_1 GGUF it was trained on.
    assert report.check.runner.startswith("llama.cpp")
    assert report.check.greedy_identical == report.check.prompts
    adapter = export.export(run, tmp_path / "adapter.gguf", "gguf-adapter")
    assert adapter.check.base_gguf.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert adapter.check.tokens_identical and adapter.size_bytes < report.size_bytes / 10
    assert adapter.check.max_logit_diff < checks.BASE_TOLERANCE["other"]
