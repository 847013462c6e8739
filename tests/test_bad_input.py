"""Every user error ends in one line naming the file, row or field, exit code 2, and nothing
written or overwritten in the output folder."""

import hashlib
import json

import pytest
import yaml
from helpers import run_cli, write_jsonl

from finetune.cli import main


def run_main(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err.strip()


def snapshot(folder):
    if not folder.exists():
        return None
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def expect_error(capsys, tmp_path, args, pattern):
    before = snapshot(tmp_path / "run")
    code, err = run_main(capsys, *args)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    import re

    assert re.search(pattern, err), err
    assert snapshot(tmp_path / "run") == before
    return err


def test_unknown_key(capsys, tmp_path, recipe_file):
    path = recipe_file(trian={"lr": 1})
    expect_error(
        capsys,
        tmp_path,
        ["train", str(path)],
        r"recipe\.yaml: unknown key 'trian' \(did you mean 'train'\?\)",
    )


def test_wrong_type(capsys, tmp_path, recipe_file):
    path = recipe_file(train={"micro_batch_size": "four"})
    expect_error(capsys, tmp_path, ["train", str(path)], r"train\.micro_batch_size: .*'four'")


def test_unknown_override_key(capsys, tmp_path, recipe_file):
    args = ["train", str(recipe_file()), "adapter.rank=4"]
    expect_error(capsys, tmp_path, args, r"unknown key 'adapter\.rank'")


def test_missing_dataset_file(capsys, tmp_path, recipe_file):
    path = recipe_file(data={"path": str(tmp_path / "missing.jsonl")})
    expect_error(capsys, tmp_path, ["train", str(path)], r"data\.path: .*missing\.jsonl not found")


def test_invalid_json_row(capsys, tmp_path, recipe_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    path = recipe_file(data={"path": str(bad)})
    expect_error(capsys, tmp_path, ["train", str(path)], r"bad\.jsonl:2: not valid JSON")


def test_missing_column(capsys, tmp_path, recipe_file):
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}])
    path = recipe_file(data={"path": str(data)})
    expect_error(
        capsys,
        tmp_path,
        ["validate", str(path)],
        r"q\.jsonl row 1: no column 'prompt' \(found: question, answer\); set data\.prompt_column",
    )


def test_empty_dataset(capsys, tmp_path, recipe_file):
    (tmp_path / "empty.jsonl").write_text("")
    path = recipe_file(data={"path": str(tmp_path / "empty.jsonl")})
    expect_error(capsys, tmp_path, ["train", str(path)], r"empty\.jsonl: the dataset is empty")


def test_all_examples_masked(capsys, tmp_path, recipe_file):
    rows = [{"prompt": "word " * 50, "response": "x"} for _ in range(3)]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    path = recipe_file(data={"path": str(data), "max_length": 12, "template": "{prompt}"})
    expect_error(
        capsys, tmp_path, ["train", str(path)], r"long\.jsonl row 1, 2, 3: no trained tokens"
    )


def test_validate_fails_on_one_masked_example(capsys, tmp_path, recipe_file):
    rows = [{"prompt": "hi", "response": "ok"}, {"prompt": "word " * 50, "response": "x"}]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    path = recipe_file(data={"path": str(data), "max_length": 12, "template": "{prompt}"})
    expect_error(
        capsys, tmp_path, ["validate", str(path)], r"mixed\.jsonl row 2: no trained tokens"
    )


def test_model_path_missing(capsys, tmp_path, recipe_file):
    path = recipe_file(model={"path": str(tmp_path / "no-model")})
    expect_error(capsys, tmp_path, ["train", str(path)], r"model\.path: .*no-model does not exist")


def test_model_folder_without_config(capsys, tmp_path, recipe_file):
    (tmp_path / "empty-model").mkdir()
    path = recipe_file(model={"path": str(tmp_path / "empty-model")})
    expect_error(capsys, tmp_path, ["train", str(path)], r"empty-model has no config\.json")


@pytest.mark.parametrize("command", ["train", "generate"])
def test_a_cache_folder_that_is_a_file_is_named_not_the_model(command, tmp_path, recipe_file):
    """torch reads TORCHINDUCTOR_CACHE_DIR when it loads (a new process): a file there
    was blamed on model.path; the line names the file and the variables to check."""
    (tmp_path / "notes.txt").write_text("kept\n")
    path = recipe_file()
    model = yaml.safe_load(path.read_text())["model"]["path"]
    args = [str(path)] if command == "train" else [model, "hi"]
    done = run_cli(command, *args, env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "notes.txt")})
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1 and "model.path" not in line
    assert "notes.txt" in line and "TORCHINDUCTOR_CACHE_DIR" in line
    assert (tmp_path / "notes.txt").read_text() == "kept\n" and not (tmp_path / "run").exists()


def test_only_paths_outside_the_model_folder_are_blamed_on_the_environment(tmp_path):
    """A hub-cache snapshot's files are links into ../../blobs: still the model's own, as
    is a relative name (relative to what the library opened it from)."""
    from finetune.models import outside_model

    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "abc").write_text("{}")
    snapshot = tmp_path / "snapshots" / "main"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(tmp_path / "blobs" / "abc")
    inside = OSError(5, "Input/output error", str(snapshot / "config.json"))
    assert outside_model(inside, snapshot) is None
    assert outside_model(OSError(5, "EIO", "model.safetensors"), snapshot) is None
    cache = tmp_path / "notes.txt"
    assert outside_model(OSError(17, "File exists", str(cache)), snapshot) == str(cache)


def test_hub_id_offline(capsys, tmp_path, recipe_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = recipe_file(model={"path": "some-org/some-model-that-is-not-cached"})
    expect_error(
        capsys,
        tmp_path,
        ["train", str(path)],
        r"model\.path: .some-org/some-model-that-is-not-cached. .*(offline|HF_HUB_OFFLINE)",
    )


def test_existing_run_is_not_overwritten(capsys, tmp_path, recipe_file):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("precious: true\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    expect_error(
        capsys,
        tmp_path,
        ["train", str(recipe_file())],
        r"output\.dir: .*already holds a run; pass --resume .* output\.overwrite=true",
    )


def test_resume_without_checkpoint(capsys, tmp_path, recipe_file):
    expect_error(
        capsys,
        tmp_path,
        ["train", str(recipe_file()), "--resume"],
        r"--resume: .*holds no run to resume",
    )


def test_recipe_file_missing(capsys, tmp_path):
    expect_error(
        capsys,
        tmp_path,
        ["train", str(tmp_path / "nope.yaml")],
        r"nope\.yaml: recipe file not found",
    )


def test_a_real_process_prints_one_line_and_exits_2(cli, recipe_file):
    proc = cli("train", str(recipe_file(adapter={"method": "lorra"})))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "adapter.method" in proc.stderr and "Traceback" not in proc.stderr
