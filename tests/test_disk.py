"""A write that cannot happen (file size limit, full disk, read-only folder) ends in one line
naming the path and the fix, exit code 2, with every checkpoint already written intact and no
temporary file left. Tested for real: `ulimit -f` (RLIMIT_FSIZE) and a small tmpfs."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from finetune.recipe import load_recipe
from finetune.runs import list_checkpoints, read_checkpoint
from finetune.train import train

FIRST = {"max_steps": 4, "save_every": 2, "micro_batch_size": 3, "lr": 5e-3}


def run_cli_limited(*args: str, file_size: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        preexec_fn=limit,
        timeout=300,
    )


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its checksum (the metrics a resume rewrites excepted)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "metrics.jsonl" and "tb" not in p.parts
    }


def hidden_leftovers(run: Path) -> list[str]:
    return [p.name for p in run.rglob(".*")]


def assert_failed_cleanly(proc: subprocess.CompletedProcess, run: Path, before: dict) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, err[-2000:]
    assert "Traceback" not in err and err.count("error:") == 1, err
    err = err.splitlines()[-1]  # the one error line ends what the run printed
    assert hidden_leftovers(run) == []  # no temporary file or folder, no lock
    checkpoints = list_checkpoints(run)
    for checkpoint in checkpoints:
        read_checkpoint(checkpoint)  # still loadable
    now = snapshot(run)
    assert {k: now.get(k) for k in before if k != "recipe.yaml"} == {
        k: v for k, v in before.items() if k != "recipe.yaml"
    }  # everything written before is byte for byte the same
    return err


@pytest.fixture
def finished_run(recipe_file, tmp_path) -> tuple[Path, Path]:
    path = recipe_file(train=FIRST)
    train(load_recipe(path))
    return path, tmp_path / "run"


def test_file_size_limit_mid_run_keeps_the_last_checkpoint(finished_run):
    path, run = finished_run
    before = snapshot(run)
    proc = run_cli_limited("train", str(path), "--resume", "train.max_steps=8", file_size=16_000)
    err = assert_failed_cleanly(proc, run, before)
    assert f"{run / 'checkpoints' / 'step-6'}: cannot write, the file is larger than" in err
    assert "ulimit -f" in err and "the checkpoint step-4 is intact" in err

    resumed = run_cli_limited("train", str(path), "--resume", "train.max_steps=8")
    assert resumed.returncode == 0, resumed.stderr[-2000:]  # and the run carries on


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of its own (root only: mount needs CAP_SYS_ADMIN, which CI here has)."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def make(size_kb: int) -> Path:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        return mount

    yield make
    subprocess.run(["umount", str(mount)], capture_output=True)


def used_kb(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file()) // 1024


def test_full_disk_mid_run_keeps_the_last_checkpoint(finished_run, small_disk):
    import yaml

    path, original = finished_run
    disk = small_disk(used_kb(original) + 96)  # room for the run, not for two more checkpoints
    run = disk / "run"
    shutil.copytree(original, run)
    recipe = yaml.safe_load(path.read_text())
    recipe["output"]["dir"] = str(run)
    path.write_text(yaml.safe_dump(recipe))
    before = snapshot(run)
    proc = run_cli_limited("train", str(path), "--resume", "train.max_steps=40")
    err = assert_failed_cleanly(proc, run, before)
    assert ": cannot write, no space left on the disk; free some space, then continue" in err


def test_read_only_folder_refuses_in_one_line(finished_run, small_disk, tmp_path):
    import yaml

    path, original = finished_run
    disk = small_disk(used_kb(original) + 512)
    run = disk / "run"
    shutil.copytree(original, run)
    recipe = yaml.safe_load(path.read_text())
    recipe["output"]["dir"] = str(run)
    path.write_text(yaml.safe_dump(recipe))
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    before = snapshot(run)

    resumed = run_cli_limited("train", str(path), "--resume", "train.max_steps=8")
    err = assert_failed_cleanly(resumed, run, before)
    assert "cannot write, the filesystem is read-only; write somewhere writable" in err

    export = run_cli_limited("export", str(run), "--format", "adapter", "--out", str(disk / "x"))
    err = assert_failed_cleanly(export, run, before)
    assert f"{disk / 'x'}: cannot write, the filesystem is read-only" in err


def test_full_disk_during_gguf_export_names_the_output(finished_run, small_disk):
    _, run = finished_run
    disk = small_disk(32)  # smaller than the tiny model's f16 GGUF
    out = disk / "model.gguf"
    proc = run_cli_limited("export", str(run), "--format", "gguf", "--out", str(out))
    err = proc.stderr.strip()
    assert proc.returncode == 2, err[-2000:]
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert f"{out}: cannot write, no space left on the disk; free some space" in err
    assert list(disk.iterdir()) == []  # no temporary file, no half file
