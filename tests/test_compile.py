"""train.compile: the compiled step trains the same model as the eager one, reports its
compile time apart, and refuses what it cannot do in one line."""

import json
import shutil

import pytest
from helpers import run_main

from finetune.cli import main
from finetune.memory import dryrun
from finetune.memory.estimate import Setup


def run_losses(recipe_file, tmp_path, name: str, compile_: bool) -> tuple[list[float], dict]:
    path = recipe_file(
        f"{name}.yaml",
        train={"max_steps": 4, "compile": compile_, "mixed_precision": "no"},
        output={"dir": str(tmp_path / name)},
    )
    main(["train", str(path)])
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    report = json.loads((tmp_path / name / "report.json").read_text())
    return [r["loss"] for r in records if "loss" in r], report


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs g++")
def test_compiled_steps_give_the_eager_losses(recipe_file, tmp_path):
    eager, _ = run_losses(recipe_file, tmp_path, "eager", False)
    compiled, report = run_losses(recipe_file, tmp_path, "compiled", True)
    assert len(eager) == len(compiled) == 4
    assert compiled == pytest.approx(eager, rel=1e-4)
    training = report["training"]
    assert 0 < training["compile_s"] < training["train_time_s"]
    assert any("compiled by torch.compile" in note for note in report["notes"])
    assert report["memory"]["measured"]["tracked_steps"][0] == 1  # eager, then compiled


def test_compile_without_a_cpp_compiler_is_one_line(recipe_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    path = recipe_file(train={"compile": True})
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "train.compile" in err and "C++ compiler" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("attn", ["flex", "flash"])
def test_cuda_attention_kernels_off_cuda_are_one_line(attn, recipe_file, tmp_path, capsys):
    """flex (torch has no flex-attention backward on the CPU) and flash (CUDA and the
    flash-attn package) are refused before the model loads, nothing written."""
    path = recipe_file(model={"attn_implementation": attn}, data={"packing": True})
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert f"model.attn_implementation {attn}" in err and "CUDA" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs g++")
def test_evaluation_and_generation_leave_the_recompile_limit_to_the_steps(recipe_file, tmp_path):
    """Exact match before and after training (generation: a KV cache, a layer index per
    call) and the held-out loss (no grad) run eagerly, so torch's recompile limit (8)
    is not spent before training and the steps' layers stay compiled. DoRA's grad-mode
    branch was the quickest to spend it."""
    from torch._dynamo.utils import counters

    from finetune import compiling

    counters.clear()
    path = recipe_file(
        adapter={"method": "dora"},
        data={"eval_fraction": 0.25},
        train={"max_steps": 3, "compile": True, "mixed_precision": "no", "eval_every": 1},
        eval={"max_examples": 4, "max_new_tokens": 6},
    )
    main(["train", str(path)])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["exact_match"]["after"] is not None and report["eval"]["step"] == 3
    assert not compiling.recompile_limit_hit(), [m[:80] for m in counters["unimplemented"]]
    assert compiling.RECOMPILE_LIMIT_NOTE not in report["notes"]
    assert counters["stats"]["unique_graphs"] >= 1  # the steps did compile


def test_flex_is_estimated_without_a_mask_and_validate_names_what_this_machine_lacks(
    recipe_file, capsys
):
    """`estimate --attn flex` models flex as flash (no [seq x seq] mask or scores), below
    sdpa's masked figure; `validate` passes a flash recipe (it may train on a GPU) and
    notes in one line that train would stop on this CPU."""
    code, out, err = run_main(capsys, "estimate", "smollm2-135m", "--attn", "flex")
    assert code == 0, err
    config = dryrun.build_config(
        {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 256}
    )  # fmt: skip
    peaks = {
        attn: dryrun.dry_run(
            config, Setup(method="lora", dtype="bfloat16", batch=4, seq=256, attn=attn, masked=True)
        ).peak_bytes
        for attn in ("flex", "flash", "sdpa")
    }
    assert peaks["flex"] == peaks["flash"] < peaks["sdpa"]
    code, out, err = run_main(
        capsys, "validate", str(recipe_file(model={"attn_implementation": "flash"}))
    )
    assert code == 0, err
    notes = [line for line in out.splitlines() if "train would stop" in line]
    assert len(notes) == 1 and "flash runs on CUDA only" in notes[0]
