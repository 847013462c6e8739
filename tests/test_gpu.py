"""The CUDA path (tests marked `gpu`) and the CPU side of how the tests treat GPUs.

Every test here marked `gpu` runs the real CLI in a subprocess with the GPUs the test run
was started with (conftest.py hides them from everything else), on a tiny Llama built in
process, and skips with one line where no CUDA device is visible. Their non-CUDA parts
(building the recipe, reading report.json, comparing) are run by the CPU tests below on CPU
runs, so a mistake there shows on any machine.
"""

from __future__ import annotations

import os

from helpers import GPUS_VAR, run_python

# ------------------------------------------------------------------ hiding the GPUs


def test_a_cpu_test_sees_no_gpu_in_process():
    import torch

    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert torch.cuda.device_count() == 0


def test_the_tests_hide_the_gpus_from_every_subprocess():
    """A fresh interpreter started as from a shell with a GPU (CUDA_VISIBLE_DEVICES=0) loads
    conftest; a child it starts as run_cli does sees no device, and gpu_env gives 0 back."""
    child = (
        "import os, torch; "
        "print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')), torch.cuda.device_count())"
    )
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import conftest, helpers\n"
        f"print(helpers.run_python({child!r}).stdout.strip())\n"
        "print(helpers.gpu_env()['CUDA_VISIBLE_DEVICES'])\n"
    )
    parent = run_python(code, env={"CUDA_VISIBLE_DEVICES": "0", GPUS_VAR: None})
    assert parent.returncode == 0, parent.stderr
    assert parent.stdout.splitlines() == ["'' 0", "0"]
    unset = run_python(code, env={"CUDA_VISIBLE_DEVICES": None, GPUS_VAR: None})
    assert unset.stdout.splitlines() == ["'' 0", "None"], unset.stderr
