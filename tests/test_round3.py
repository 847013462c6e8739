"""Red-team round 3 (issue 30): shared resources and outputs under concurrency and signals,
combine's weights, adapters that load as no-ops, dataset splits, bounded generation, and
text that the terminal cannot show. Real processes, real files, real peft."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli

from finetune.export import export

# ------------------------------------------------------------ item 7: the model cache


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model as a GGUF file: a model.path the cache converts."""
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    export(str(tiny_model_dir), out, "gguf", gguf_type="f32")
    return out


def start_generate(gguf: Path, cache: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "FINETUNE_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "finetune", "generate", str(gguf), "hi", "--max-new-tokens", "1"]
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_processes_convert_one_gguf_into_an_empty_cache(tiny_gguf, tmp_path):
    cache = tmp_path / "cache"
    procs = [start_generate(tiny_gguf, str(cache), tmp_path) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
    for code, err in results:
        assert code == 0 and "Traceback" not in err, err
    converted = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(converted) == 1 and (converted[0] / "config.json").is_file()
    assert not list(cache.glob(".convert-*")), "a temporary conversion was left behind"
    # Exactly one of them converted; the other waited and reused the result.
    assert sum("converting" in err for _, err in results) == 1


@pytest.mark.parametrize("kind", ["empty", "file", "unwritable"])
def test_a_bad_finetune_cache_is_one_line(kind, tiny_gguf, tmp_path):
    value = {"empty": "", "file": str(tmp_path / "f"), "unwritable": str(tmp_path / "ro")}[kind]
    (tmp_path / "f").write_text("x")
    (tmp_path / "ro").mkdir(mode=0o500)
    if kind == "unwritable" and os.access(tmp_path / "ro", os.W_OK):
        pytest.skip("running as root: every folder is writable")
    done = run_cli("generate", str(tiny_gguf), "hi", cwd=tmp_path, env={"FINETUNE_CACHE": value})
    code, err = done.returncode, done.stderr
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "FINETUNE_CACHE" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "ro"]  # nothing made in the cwd
