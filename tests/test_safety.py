"""Safe by default: no model code runs unless the recipe says so, weights are read as
safetensors only, checkpoint state is unpickled with weights_only, and recipes are data.

Each test plants a payload that would create a marker file if it ever ran, and checks the
marker is absent afterwards.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import date_rows, write_jsonl

from finetune.cli import main
from finetune.errors import UserError
from finetune.models import load_model, load_tokenizer
from finetune.recipe import ModelSection, Recipe, load_recipe

BAD = Path(__file__).resolve().parent / "bad_inputs"


class Payload:
    """Unpickling this creates `marker` (through `open(marker, "w")`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_payload_really_runs_when_unpickled_unsafely(tmp_path):
    # Proves the payload used below is live, so its absence later means something.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))  # unsafe on purpose
    assert marker.exists()


# ------------------------------------------------------------------- remote code


def test_trust_remote_code_is_off_by_default():
    recipe = Recipe.model_validate({"data": {"path": "x.jsonl"}})
    assert recipe.model.trust_remote_code is False
    assert ModelSection().trust_remote_code is False


def test_from_pretrained_gets_no_remote_code_and_safetensors_only(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen: dict[str, dict] = {}
    real_model = AutoModelForCausalLM.from_pretrained.__func__
    real_tokenizer = AutoTokenizer.from_pretrained.__func__

    def spy(name, real):
        def call(cls, *args, **kwargs):
            seen[name] = kwargs
            return real(cls, *args, **kwargs)

        return classmethod(call)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy("model", real_model))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy("tokenizer", real_tokenizer))
    load_model(ModelSection(path=str(tiny_model_dir)), device="cpu")
    assert seen["model"]["trust_remote_code"] is False
    assert seen["model"]["use_safetensors"] is True
    assert seen["tokenizer"]["trust_remote_code"] is False


def custom_code_folder(tiny: Path, target: Path, model_type: str) -> Path:
    """The tiny model, with config.json pointing at a module that drops a marker on import."""
    shutil.copytree(tiny, target)
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "custom.CustomConfig",
        "AutoModelForCausalLM": "custom.CustomModel",
    }
    (target / "config.json").write_text(json.dumps(config))
    marker = target.parent / "custom-code-ran"
    (target / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'tiny-custom'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    return target


def test_custom_code_is_refused_without_the_flag(tiny_model_dir, tmp_path):
    folder = custom_code_folder(tiny_model_dir, tmp_path / "model", "tiny-custom")
    with pytest.raises(UserError, match=r"needs its own custom code .*model\.trust_remote_code"):
        load_model(ModelSection(path=str(folder)), device="cpu")
    with pytest.raises(UserError, match="trust_remote_code"):
        load_tokenizer(folder)
    assert not (tmp_path / "custom-code-ran").exists()


def test_custom_code_beside_a_known_architecture_does_not_run(tiny_model_dir, tmp_path):
    folder = custom_code_folder(tiny_model_dir, tmp_path / "model", "llama")
    loaded = load_model(ModelSection(path=str(folder)), device="cpu")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert any("did not run" in note for note in loaded.notes)
    assert not (tmp_path / "custom-code-ran").exists()


# ---------------------------------------------------------------------- weights


def test_pickled_weights_are_never_read(tiny_model_dir, tmp_path):
    """A malicious pytorch_model.bin beside the safetensors file is ignored."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "bin-ran"
    torch.save({"model.embed_tokens.weight": Payload(marker)}, folder / "pytorch_model.bin")
    load_model(ModelSection(path=str(folder)), device="cpu")
    assert not marker.exists()
    (folder / "model.safetensors").unlink()
    with pytest.raises(
        UserError, match=r"only pickled weights \(pytorch_model\.bin\).*safetensors"
    ):
        load_model(ModelSection(path=str(folder)), device="cpu")
    assert not marker.exists()


# ------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """A 2-step run with a checkpoint at step 2, and its recipe."""
    folder = tmp_path_factory.mktemp("safety")
    data = write_jsonl(folder / "train.jsonl", date_rows(8))
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "model": {"path": str(tiny_model_dir)},
                "adapter": {"r": 4},
                "data": {"path": str(data), "template": "{prompt} ", "max_length": 64},
                "train": {"max_steps": 2, "micro_batch_size": 2, "save_every": 2},
                "output": {"dir": str(folder / "run")},
            }
        )
    )
    main(["train", str(recipe)])
    return recipe, folder / "run"


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_torch.pt"])
def test_checkpoint_state_is_not_unpickled_unsafely(trained_run, tmp_path, capsys, name):
    recipe, run = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    marker = tmp_path / "checkpoint-ran"
    torch.save({"state": Payload(marker)}, copy / "checkpoints" / "step-2" / name)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(recipe), f"output.dir={copy}", "--resume"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "step-2: corrupt checkpoint" in err
    assert not marker.exists()


def test_init_from_does_not_unpickle_adapter_weights(trained_run, tmp_path):
    """adapter.init_from reads adapter_model.safetensors; a planted .bin never runs."""
    recipe, run = trained_run
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "adapter", adapter)
    marker = tmp_path / "adapter-ran"
    torch.save({"x": Payload(marker)}, adapter / "adapter_model.bin")
    from finetune.prepare import prepare

    spec = load_recipe(recipe, [f"adapter.init_from={adapter}"])
    prepare(spec, device="cpu")
    assert not marker.exists()


# ---------------------------------------------------------------------- recipes


@pytest.mark.parametrize(
    "payload",
    [
        '!!python/object/apply:os.system ["touch {marker}"]',
        "!!python/name:os.system",
        '!!python/object/new:subprocess.Popen [["touch", "{marker}"]]',
        '!!python/module:os ""',
    ],
)
def test_recipes_cannot_run_code(tmp_path, capsys, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "yaml-ran"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"data: {payload.format(marker=marker)}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(recipe)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "evil.yaml: line 1, column 7: the YAML tag !!python/" in err
    assert not marker.exists()


def test_recipes_cannot_name_code_to_import(tmp_path):
    # No `_component_: dotted.path` escape hatch: unknown keys are errors.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {path: x.jsonl}\nmodel: {_component_: os.system}\n")
    with pytest.raises(UserError, match=r"unknown key 'model\._component_'"):
        load_recipe(recipe)


def test_a_trusted_custom_model_is_not_refused_by_the_cuda_fit_check(tiny_model_dir, tmp_path):
    """transformers cannot build a model of its own code on meta, so the fit check cannot
    be made: with model.trust_remote_code the run goes on with a note (it used to be
    refused on CUDA only); without it, the remote-code refusal stands."""
    from finetune.memory.fit import check_recipe_fits_device

    folder = custom_code_folder(tiny_model_dir, tmp_path / "model", "tiny-custom")
    data = write_jsonl(tmp_path / "train.jsonl", date_rows(4))
    sections = {
        "model": {"path": str(folder), "trust_remote_code": True},
        "data": {"path": str(data)},
    }
    recipe = Recipe.model_validate(sections)
    note = check_recipe_fits_device(recipe, "cuda", free_bytes=1)
    assert note and "not checked" in note and "tiny-custom" in note
    sections["model"]["trust_remote_code"] = False
    with pytest.raises(UserError, match="tiny-custom"):
        check_recipe_fits_device(Recipe.model_validate(sections), "cuda", free_bytes=1)
