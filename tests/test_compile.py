"""train.compile: the compiled step trains the same model as the eager one, reports its
compile time apart, and refuses what it cannot do in one line."""

import json
import shutil

import pytest

from finetune.cli import main


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
