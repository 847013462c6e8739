"""End to end on a tiny model: every adapter method trains, the run directory is complete,
and the saved adapter reloads with plain peft to the same logits."""

import json

import pytest
import torch

from finetune import runs
from finetune.cli import main
from finetune.errors import UserError
from finetune.recipe import load_recipe
from finetune.train import train

METHOD_SETTINGS = {
    "lora": {"method": "lora", "r": 4, "alpha": 8},
    "dora": {"method": "dora", "r": 4, "alpha": 8},
    "ia3": {"method": "ia3"},
    "prefix": {"method": "prefix", "num_virtual_tokens": 4},
    "prefix-projection": {"method": "prefix", "num_virtual_tokens": 4, "prefix_projection": True},
    "prompt": {"method": "prompt", "num_virtual_tokens": 4},
}
LR = {
    "lora": 5e-3,
    "dora": 5e-3,
    "ia3": 5e-2,
    "prefix": 3e-2,
    "prefix-projection": 3e-3,
    "prompt": 1e-1,
}
RUN_FILES = [
    "recipe.yaml",
    "adapter",
    "checkpoints",
    "metrics.jsonl",
    "tb",
    "report.md",
    "report.json",
    "loss.png",
    "memory.png",
]


def probe_logits(model, tokenizer):
    batch = tokenizer(
        ["Convert 3 March 2024 to ISO.", "May 2024"], return_tensors="pt", padding=True
    )
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_adapter_reloads_with_plain_peft_to_identical_logits(method, recipe_file, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = recipe_file(adapter=METHOD_SETTINGS[method], train={"lr": LR[method]})
    result = train(load_recipe(path))
    trained = result.prepared.model
    tokenizer = result.prepared.loaded.tokenizer
    expected = probe_logits(trained, tokenizer)
    # The loop recorded the widest micro-batch it trained on (padded: batches of 4 vary).
    width, logits = result.state.widest["masked"]
    assert 0 < logits < width <= 64

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, str(result.run_dir / "adapter"))
    assert torch.equal(probe_logits(reloaded, tokenizer), expected)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_cli_train_end_to_end(method, recipe_file, tmp_path, capsys):
    path = recipe_file(
        adapter=METHOD_SETTINGS[method],
        train={"lr": LR[method], "max_steps": 8, "save_every": 4, "eval_every": 4},
        data={"eval_fraction": 0.25},
    )
    main(["train", str(path)])  # the CLI's entry point, in this process
    run = tmp_path / "run"
    for name in RUN_FILES:
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-8"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 4, 8]
    report = json.loads((run / "report.json").read_text())
    assert report["adapter"]["method"] == METHOD_SETTINGS[method]["method"]
    assert 0 < report["adapter"]["trainable_parameters"] < report["adapter"]["total_parameters"]
    assert report["exact_match"]["examples"] == 6
    assert report["memory"]["measured"]["peak_bytes"] > 0
    assert report["memory"]["estimate"]["total_bytes"] > 0
    # What later commands read back, as one typed object.
    read = runs.read_report(run)
    assert read.quantization == report["model"]["quantization"]
    assert read.measured == report["memory"]["measured"]
    assert read.estimated_setup == report["memory"]["estimate"]["setup"]
    assert read.model_config == report["memory"]["model_config"]
    # The summary on screen is rendered from the report's data, without the plots' links.
    out = " ".join(capsys.readouterr().out.split())  # as rich wrapped it
    assert "Run report:" in out and "held-out loss" in out and "![" not in out
    assert "report.md, report.json, loss.png, memory.png, adapter/)" in out


def test_a_report_without_a_field_is_one_error_naming_it(tmp_path):
    """Renaming a key report.py writes breaks here, loudly, not in each reader."""
    (tmp_path / "report.json").write_text(json.dumps({"model": {"quantization": "none"}}))
    with pytest.raises(UserError, match=r"report.json: the run report has no memory.measured"):
        runs.read_report(tmp_path)
    assert runs.read_report(tmp_path / "elsewhere") is None  # no report: nothing to read


def test_int8_lora_trains_on_the_cpu(recipe_file):
    pytest.importorskip("bitsandbytes")
    path = recipe_file(
        model={"quantization": "int8", "dtype": "float32"}, train={"max_steps": 5, "lr": 1e-2}
    )
    result = train(load_recipe(path))
    layer = result.prepared.model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.int8
    assert result.history[-1]["loss"] < result.history[0]["loss"]


@pytest.mark.parametrize("method", ["lora", "prefix-projection"])
def test_resume_continues_exactly(method, recipe_file, tmp_path):
    """A run cut off after a checkpoint and resumed ends exactly where an uninterrupted run ends.
    (The prefix MLP is not part of the saved adapter: checkpoints keep it beside it.)"""
    import shutil

    common = {"max_steps": 6, "save_every": 3, "lr": LR[method], "grad_accum": 2}
    adapter = METHOD_SETTINGS[method]
    straight = train(
        load_recipe(recipe_file(adapter=adapter, train=common, output={"dir": str(tmp_path / "a")}))
    )
    cut = load_recipe(
        recipe_file("b.yaml", adapter=adapter, train=common, output={"dir": str(tmp_path / "b")})
    )
    train(cut)
    # What a kill right after the step-3 checkpoint leaves behind: no later checkpoint, no adapter.
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-6")
    shutil.rmtree(tmp_path / "b" / "adapter")
    resumed = train(cut, resume=True)
    assert [r["step"] for r in resumed.history] == list(range(1, 7))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    a = straight.prepared.model.state_dict()
    b = resumed.prepared.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_starts_a_new_run_from_adapter_weights(recipe_file, tmp_path):
    first = train(load_recipe(recipe_file(output={"dir": str(tmp_path / "first")})))
    second_recipe = recipe_file(
        "second.yaml",
        adapter={"init_from": str(tmp_path / "first" / "adapter")},
        train={"max_steps": 1},
        output={"dir": str(tmp_path / "second")},
    )
    second = train(load_recipe(second_recipe))
    # It starts from the trained weights, so its first loss is the first run's last level.
    assert second.history[0]["loss"] < first.history[0]["loss"]

    # Red-team 5: the run directory itself was "first/adapter_config.json not found; give
    # an adapter folder"; it now names the adapter folder to give.
    from finetune.adapters import check_init_from
    from finetune.errors import UserError

    spec = load_recipe(second_recipe).adapter.model_copy(
        update={"init_from": str(tmp_path / "first")}
    )
    with pytest.raises(UserError, match=r"is a run directory.*init_from=.*first/adapter$"):
        check_init_from(spec)


def test_estimate_of_a_run_matches_its_report(recipe_file, tmp_path, capsys):
    main(["train", str(recipe_file(train={"max_steps": 2}))])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    capsys.readouterr()
    main(["estimate", str(tmp_path / "run"), "--format", "json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["total_bytes"] == report["memory"]["estimate"]["total_bytes"]
    assert report["memory"]["estimate"]["setup"]["logit_positions"] is not None


def test_epochs_count_whole_micro_batches(recipe_file):
    from finetune.prepare import total_steps

    recipe = load_recipe(
        recipe_file(train={"max_steps": None, "epochs": 2, "micro_batch_size": 3, "grad_accum": 2})
    )
    # 10 items make 3 whole micro-batches an epoch (the 10th item waits for the next shuffle):
    # 6 micro-batches in two epochs, 3 optimizer steps of 2.
    assert total_steps(recipe, 10) == 3
    assert total_steps(recipe, 10, world_size=2) == 1  # 1 micro-batch of 6 an epoch


def test_runs_in_one_process_may_differ_in_precision(recipe_file, tmp_path):
    """accelerate's state is a process-wide singleton; a second run with another precision
    (a notebook, a sweep, this test session) must get its own, not an error."""
    from accelerate.state import AcceleratorState

    for i, precision in enumerate(("bf16", "no", "bf16")):
        path = recipe_file(
            f"{i}.yaml",
            train={"max_steps": 1, "mixed_precision": precision},
            output={"dir": str(tmp_path / str(i))},
        )
        result = train(load_recipe(path))
        assert result.state.step == 1
        assert AcceleratorState().mixed_precision == precision
