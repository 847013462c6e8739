"""Checks at the door that are not one bad input each: --help text, import-time noise,
path kinds and the command-line number rule."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import ROOT

from finetune.errors import UserError
from finetune.inputs import check_number, parse_size, path_kind


def test_help_keeps_defaults_written_in_brackets(capsys):
    """Rich used to read "[default: 8]" as markup and drop it: "LoRA/DoRA rank ."."""
    from finetune.cli import main

    try:
        main(["estimate", "--help"])
    except SystemExit as exit_info:
        assert not exit_info.code
    out = " ".join(capsys.readouterr().out.split())
    assert "LoRA/DoRA rank [default: 8]." in out
    assert "Sequence length [default: 512]." in out


def test_importing_peft_after_the_cli_setup_prints_nothing():
    """bitsandbytes' notice about an optional hub kernel used to precede every error; the
    CLI's entry point silences it before anything imports peft."""
    code = (
        "from finetune.noise import silence_third_party; silence_third_party(); "
        "import finetune.models, peft, bitsandbytes"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "gemm_4bit_forward" not in done.stderr


def test_path_kinds(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "file").write_text("x")
    assert path_kind(tmp_path / "pipe", "f") == "a FIFO (named pipe)"
    assert path_kind(tmp_path / "file", "f") == "file"
    assert path_kind(tmp_path, "f") == "folder"
    assert path_kind(tmp_path / "file" / "below", "f") == "missing"
    assert path_kind(tmp_path / "none", "f") == "missing"
    with pytest.raises(UserError, match="has a name of 300 bytes; file systems allow 255"):
        path_kind(tmp_path / ("a" * 300), "f")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_command_line_numbers_are_finite(value):
    with pytest.raises(UserError, match="--x must be a finite number"):
        check_number("--x", value, ge=0)


def test_command_line_bounds():
    assert check_number("--x", 0.5, gt=0, le=1) == 0.5
    with pytest.raises(UserError, match="--x must be above 0"):
        check_number("--x", 0, gt=0)
    with pytest.raises(UserError, match="--x must be at most 1"):
        check_number("--x", 1.5, le=1)


@pytest.mark.parametrize("text", ["2XB", "0GB", "-5GB", "nanGB", "", "GB"])
def test_bad_shard_sizes(text):
    with pytest.raises(UserError, match="--max-shard-size"):
        parse_size(text, "--max-shard-size")


def test_shard_sizes():
    assert parse_size("2GB", "--max-shard-size") == 2_000_000_000
    assert parse_size("500MB", "--max-shard-size") == 500_000_000
