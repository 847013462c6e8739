"""Data parallel on the CPU (gloo): two processes with the same global batch as one process
give the same run, and only the main process writes the run directory."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from helpers import ROOT
from safetensors.torch import load_file

from finetune.cli import main


def free_port() -> int:
    """A port nobody listens on now: each launcher gets its own, so that two tests running
    at once (make test runs two pytest-xdist workers) never meet on the default 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_match_one(launcher, recipe_file, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    # fp32: equality to 6 digits holds for the accumulation arithmetic; bf16 autocast (this
    # CPU's default) rounds differently shaped matmuls differently.
    common = {"max_steps": 4, "lr": 5e-3, "seed": 0, "mixed_precision": "no"}
    single = recipe_file(
        "one.yaml", train={**common, "micro_batch_size": 4}, output={"dir": str(tmp_path / "one")}
    )
    main(["train", str(single)])
    double = recipe_file(
        "two.yaml", train={**common, "micro_batch_size": 2}, output={"dir": str(tmp_path / "two")}
    )
    if launcher == "torchrun":
        command = [torchrun, "--master_port", str(free_port()), "--nproc_per_node", "2"]
        command += ["-m", "finetune", "train", str(double)]
    else:  # on a machine without GPUs, accelerate's multi-GPU launcher runs gloo on the CPU
        command = [
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--main_process_port",
            str(free_port()),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "finetune",
            "train",
            str(double),
        ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["training"]["steps"] == 4
    assert proc.stdout.count("run directory:") == 1  # one process reports


def test_sigterm_under_torchrun_stops_every_process_at_the_same_step(recipe_file, tmp_path):
    """A scheduler's SIGTERM reaches torchrun, which passes it to its workers, each at its own
    moment: they agree on one step, the main process checkpoints it, and --resume under
    torchrun finishes the run as one process would have run it."""
    import signal
    import time

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    # Enough steps that the signal lands mid-run on a busy machine (as the sharded test).
    common = {"max_steps": 150, "lr": 5e-3, "seed": 0, "log_every": 1, "mixed_precision": "no"}
    single = recipe_file(
        "one.yaml", train={**common, "micro_batch_size": 4}, output={"dir": str(tmp_path / "one")}
    )
    main(["train", str(single)])
    double = recipe_file(
        "two.yaml", train={**common, "micro_batch_size": 2}, output={"dir": str(tmp_path / "two")}
    )
    command = [torchrun, "--master_port", str(free_port()), "--nproc_per_node", "2"]
    command += ["-m", "finetune", "train", str(double)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "two" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "never reached step 3"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)

    assert (tmp_path / "two" / "report.json").exists(), err[-3000:]
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    step = report["interrupted"]["step"]
    assert report["interrupted"]["reason"] == "interrupted by SIGTERM", err[-3000:]
    assert 3 <= step < 150
    assert (tmp_path / "two" / "checkpoints" / f"step-{step}").is_dir()
    assert not (tmp_path / "two" / "adapter").exists()

    resumed = subprocess.run(
        [*command, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
