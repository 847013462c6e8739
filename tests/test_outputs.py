"""The one rule for outputs (finetune.outputs): what may be written, and what a run removes.

The end-to-end cases (train, merge, export, combine, estimate --plot over someone's files)
are in the bad-input corpus, with checksums before and after; these are the rule's own
cases, including the ones no test may run end to end (the root folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import run_main

from finetune import runs
from finetune.errors import UserError
from finetune.outputs import claim_output


def refusal(path, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        claim_output(path, option="--out", **{"kind": "folder", **kwargs})
    return str(info.value)


def test_root_home_and_system_folders_are_refused_even_with_force(tmp_path, monkeypatch):
    monkeypatch.chdir(os.sep)  # so that only /tmp itself is in question
    monkeypatch.setenv("HOME", "/nonexistent-home")
    # /tmp holds other people's files: an existing folder that is not an output.
    assert "does not hold" in refusal("/tmp", force=True, replaceable=lambda p: False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert "is the root folder" in refusal("/", force=True)
    assert "is the home folder" in refusal(str(tmp_path / "home"), force=True)
    assert "is the home folder" in refusal("~", force=True)


def test_the_current_directory_and_its_parents_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    assert "is the current directory" in refusal(".", force=True)
    assert "contains the current directory" in refusal("..", force=True)
    assert "contains the current directory" in refusal(str(tmp_path / "a"), force=True)


def test_inputs_are_never_outputs(tmp_path):
    source = tmp_path / "run"
    (source / "adapter").mkdir(parents=True)
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    assert "is this command's input" in refusal(source, inputs=[source])
    assert "holds this command's input" in refusal(tmp_path, inputs=[data], force=True)
    assert "lies inside this command's input" in refusal(source / "adapter" / "x", sealed=[source])
    # Beside an input (not sealed), a new folder is fine.
    assert claim_output(tmp_path / "new", option="--out", kind="folder", inputs=[data])


def test_existing_outputs_need_force_and_the_right_kind(tmp_path):
    earlier = tmp_path / "merged"
    earlier.mkdir()
    (earlier / "merge.json").write_text("{}")
    is_merge = lambda p: (p / "merge.json").is_file()  # noqa: E731
    assert "already exists; pass --force" in refusal(earlier, replaceable=is_merge)
    assert claim_output(earlier, option="--out", kind="folder", force=True, replaceable=is_merge)
    (tmp_path / "empty").mkdir()
    assert claim_output(tmp_path / "empty", option="--out", kind="folder")  # empty is new
    assert "is a folder; give a file name" in refusal(earlier, kind="file", force=True)
    picture = tmp_path / "a.png"
    picture.write_bytes(b"png")
    assert "is a file, not a folder" in refusal(picture, force=True)
    assert "already exists" in refusal(picture, kind="file")
    assert claim_output(picture, option="--plot", kind="file", force=True) == picture


def test_links_pipes_and_missing_folders(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert "is a symbolic link" in refusal(tmp_path / "link", force=True)
    os.mkfifo(tmp_path / "pipe")
    assert "not a regular file" in refusal(tmp_path / "pipe", kind="file", force=True)
    assert "does not exist; create it first" in refusal(tmp_path / "no" / "x.png", kind="file")
    (tmp_path / "f").write_text("")
    assert "is a file, so no folder" in refusal(tmp_path / "f" / "sub" / "run")
    assert "is empty" in refusal("  ")


def test_overwrite_removes_the_old_run_and_nothing_else(tmp_path, recipe_file, capsys):
    run = tmp_path / "run"
    assert run_main(capsys, "train", str(recipe_file()))[0] == 0
    (run / "my-notes.md").write_text("kept\n")
    (run / ".git").mkdir()
    (run / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    old_adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    args = ["train", str(recipe_file()), "output.overwrite=true", "train.seed=1"]
    assert run_main(capsys, *args)[0] == 0
    assert (run / "my-notes.md").read_text() == "kept\n"
    assert (run / ".git" / "HEAD").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() != old_adapter


def test_partial_writes_are_cleaned_but_other_dot_entries_kept(tmp_path):
    run = tmp_path / "run"
    for name in (".adapter.x1y2z3", ".git", "checkpoints/.step-4.ab12", "checkpoints/.cache"):
        (run / name).mkdir(parents=True)
    (run / ".report.md.tmp").write_text("half")
    (run / ".env").write_text("SECRET=1")
    runs.remove_partial_writes(run)
    left = sorted(str(p.relative_to(run)) for p in run.rglob(".*"))
    assert left == [".env", ".git", "checkpoints/.cache"]


def test_estimate_plot_replaces_only_with_force(tmp_path, capsys, tiny_model_dir):
    # The tiny model's config: the plot's path handling is the same for any model, and a
    # 7B preset's method comparison took 48-84 s of the suite.
    model = str(tiny_model_dir)
    picture = tmp_path / "cmp.png"
    picture.write_bytes(b"someone's picture")
    code, _, err = run_main(capsys, "estimate", model, "--plot", str(picture))
    assert code == 2 and "already exists" in err
    assert picture.read_bytes() == b"someone's picture"
    code, _, _ = run_main(capsys, "estimate", model, "--plot", str(picture), "--force")
    assert code == 0
    assert picture.read_bytes().startswith(b"\x89PNG")
    assert not list(Path(tmp_path).glob(".*"))  # no temporary file left beside it
