"""GGUF exports in llama.cpp itself (issue 18): the merged model and the LoRA adapter GGUF
load there, tokenize as the transformers tokenizer does, and answer as the model does.

These need llama-cpp-python (the `[llamacpp]` extra; `make test` installs it and sets
FINETUNE_REQUIRE_LLAMACPP=1 so that a missing build fails here instead of skipping).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import build_tokenizer, date_rows, run_main, with_llamacpp, write_jsonl

from finetune import export, inference, targets
from finetune.errors import UserError
from finetune.export import checks, gguf_file, gguf_vocab, llamacpp, merging
from finetune.recipe import load_recipe
from finetune.train import train

needs_llamacpp = pytest.mark.skipif(not with_llamacpp(), reason=llamacpp.INSTALL_HINT)


def make_run(root: Path, model_dir: Path, name: str, adapter: dict, lr: float = 5e-3) -> Path:
    data = write_jsonl(root / "train.jsonl", date_rows(24))
    recipe = {
        "model": {"path": str(model_dir)},
        "adapter": adapter,
        "data": {"path": str(data), "format": "instruction", "max_length": 64},
        "train": {"max_steps": 4, "lr": lr, "micro_batch_size": 4, "seed": 0},
        "output": {"dir": str(root / name)},
        "eval": {"max_examples": 2, "max_new_tokens": 4},
    }
    (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    train(load_recipe(root / f"{name}.yaml"))
    return root / name


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    # alpha 16 on r 4 with rsLoRA off: llama.cpp's scale alpha / rank is peft's exactly.
    adapter = {"method": "lora", "r": 4, "alpha": 16}
    return make_run(tmp_path_factory.mktemp("lora"), tiny_model_dir, "run", adapter)


def adapter_session(run: Path):
    target = targets.resolve_target(str(run))
    spec = target.model.model_copy(update={"quantization": "none", "dtype": "float32"})
    return inference.load(target, device="cpu", spec=spec)


def llama_answers(path: Path, session, lora: Path | None = None) -> llamacpp.Comparison:
    """An independent look, not the exporter's own report: llama.cpp against the adapter
    model in transformers on the probe prompts."""
    llm = llamacpp.load(path, lora=lora)
    try:
        texts = [inference.render_prompt(session.tokenizer, p) for p in checks.PROBE_PROMPTS]
        return llamacpp.compare(llm, session.model, session.tokenizer, texts)
    finally:
        llm.close()


def metadata(path: Path) -> dict:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    keys = ("general.type", "tokenizer.ggml.pre", "adapter.type", "adapter.lora.alpha")
    return {k: fields[k].contents() for k in keys if k in fields}


# ------------------------------------------------------------------------ pre-tokenizer


def test_pre_tokenizer_is_named_as_llamacpp_names_it():
    from tokenizers import normalizers

    tokenizer = build_tokenizer()
    # A vocabulary of our own: no chkhsh table knows it, but its pre-tokenizer is GPT-2's.
    assert gguf_vocab.pre_tokenizer(tokenizer) == "gpt-2"
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(UserError, match=r"llama.cpp does not know this tokenizer's pre-tokenizer"):
        gguf_vocab.pre_tokenizer(tokenizer)


# ------------------------------------------------------------------------ merged model


@needs_llamacpp
def test_merged_gguf_runs_in_llamacpp_as_in_transformers(lora_run, tmp_path):
    session = adapter_session(lora_run)
    reports = {}
    for gguf_type in ("f32", "f16", "q8_0"):
        path = tmp_path / f"{gguf_type}.gguf"
        reports[gguf_type] = export.export(str(lora_run), path, "gguf", gguf_type=gguf_type)
        check = reports[gguf_type].check
        assert check.runner.startswith("llama.cpp"), check
        assert check.tokens_identical and check.pre_tokenizer == "gpt-2"
        assert metadata(path)["tokenizer.ggml.pre"] == "gpt-2"
        found = llama_answers(path, session)
        assert found.tokens_identical and found.positions > 30
        assert found.max_logit_diff < checks.GGUF_TOLERANCE[gguf_type]
    # f32 and f16 answer exactly as transformers does, token for token.
    for gguf_type in ("f32", "f16"):
        assert reports[gguf_type].check.greedy_identical == len(checks.PROBE_PROMPTS)
    assert reports["f32"].check.max_logit_diff < 1e-3
    assert reports["q8_0"].size_bytes < reports["f32"].size_bytes / 2


@needs_llamacpp
def test_the_old_metadata_is_what_llamacpp_refuses(lora_run, tmp_path):
    """Issue 18: 'gpt2' is no pre-tokenizer llama.cpp knows; the check reports its reason."""
    import gguf

    session = adapter_session(lora_run)
    model = session.model.merge_and_unload()
    path = tmp_path / "old.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    gguf_file.add_hparams(writer, model.config, "old")
    tokens, types = gguf_vocab.vocabulary(session.tokenizer, model.config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")  # what finetune wrote before
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    spec = json.loads(session.tokenizer.backend_tokenizer.to_str())
    writer.add_token_merges([" ".join(m) for m in spec["model"]["merges"]])
    for name, tensor in gguf_file.model_tensors(model):
        gguf_file.add_tensor(writer, name, tensor, gguf.GGMLQuantizationType.F32)
    gguf_file.finish(writer)
    with pytest.raises(llamacpp.LoadFailed, match=r"unknown pre-tokenizer type: 'gpt2'"):
        llamacpp.load(path)


# ------------------------------------------------------------------------ adapter GGUF


@needs_llamacpp
def test_adapter_gguf_on_the_base_gguf_answers_as_the_merged_model(
    lora_run, tiny_model_dir, tmp_path, capsys
):
    status, _, err = run_main(
        capsys, "export", str(tiny_model_dir), "--format", "gguf", "--out", str(tmp_path / "b.gguf")
    )
    assert status == 0, err
    status, out, err = run_main(
        capsys,
        "export",
        str(lora_run),
        "--format",
        "gguf-adapter",
        "--out",
        str(tmp_path / "a.gguf"),
        "--base-gguf",
        str(tmp_path / "b.gguf"),
    )
    assert status == 0, err
    assert re.search(
        r"adapter GGUF on .*b.gguf checked with llama.cpp .*greedy answers identical "
        r"on 3/3",
        " ".join(out.split()),
    ), out
    facts = metadata(tmp_path / "a.gguf")
    assert facts["general.type"] == "adapter" and facts["adapter.type"] == "lora"
    assert facts["adapter.lora.alpha"] == 16.0
    # llama.cpp, base + adapter, against the merged model in transformers.
    merged = merging.build_merged(targets.resolve_target(str(lora_run)))
    found = llama_answers(tmp_path / "b.gguf", merged, lora=tmp_path / "a.gguf")
    assert found.tokens_identical and found.greedy_identical == found.prompts
    assert found.max_logit_diff < 0.5  # f16 base
    # Without the adapter llama.cpp answers as the base does: the adapter is what changed it.
    bare = llama_answers(tmp_path / "b.gguf", merged)
    assert bare.max_logit_diff > 10 * found.max_logit_diff


def test_without_llamacpp_the_export_says_which_check_it_ran(
    lora_run, tiny_model_dir, tmp_path, monkeypatch
):
    """As on a machine without the binding: the transformers round trip for the model, the
    weight updates rebuilt from the file for the adapter, and a note saying so."""
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    model = export.export(str(lora_run), tmp_path / "m.gguf", "gguf", gguf_type="f32")
    assert model.check.runner == "transformers" and model.check.max_logit_diff < 1e-4
    assert "llama.cpp is not installed" in model.check.note
    export.export(str(tiny_model_dir), tmp_path / "b.gguf", "gguf")
    adapter = export.export(
        str(lora_run), tmp_path / "a.gguf", "gguf-adapter", base_gguf=tmp_path / "b.gguf"
    )
    assert adapter.check.runner == "the gguf reader" and adapter.check.max_logit_diff < 1e-5
    assert "checked the weight updates" in adapter.check.note


@pytest.mark.parametrize(
    ("adapter", "pattern"),
    [
        ({"method": "ia3"}, r"a ia3 adapter; --format gguf-adapter writes plain LoRA"),
        ({"method": "dora", "r": 4, "alpha": 8}, r"a dora adapter; --format gguf-adapter"),
    ],
)
def test_adapters_llamacpp_cannot_hold_are_refused(
    adapter, pattern, tmp_path, tiny_model_dir, capsys
):
    run = make_run(tmp_path, tiny_model_dir, "run", adapter, lr=5e-2)
    out = tmp_path / "a.gguf"
    status, _, err = run_main(
        capsys, "export", str(run), "--format", "gguf-adapter", "--out", str(out)
    )
    assert status == 2 and len(err.splitlines()) == 1 and re.search(pattern, err), err
    assert not out.exists()


def test_adapter_without_a_base_gguf_says_how_to_make_one(lora_run, tmp_path, capsys):
    out = tmp_path / "a.gguf"
    status, _, err = run_main(
        capsys, "export", str(lora_run), "--format", "gguf-adapter", "--out", str(out)
    )
    assert status == 2 and len(err.splitlines()) == 1, err
    assert re.search(r"--base-gguf: .*not a GGUF file.*finetune export .* --format gguf", err)
    assert not out.exists()
