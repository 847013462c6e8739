"""Sharded training (FSDP2) on the CPU (gloo), and several machines on the loopback address.

Two sharded processes with the same global batch as one process give the same run: the
per-step losses, with clipping and accumulation on, and the final adapter, saved whole and
loaded by plain peft. A sharded checkpoint holds whole optimizer states, --resume gives them
back to each shard, and a SIGTERM to the launcher stops every process at one step.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import torch
from helpers import ROOT, gpu_env, run_cli, run_python
from safetensors.torch import load_file
from test_distributed import free_port, losses

from finetune.cli import main

FSDP_CPU = ROOT / "recipes" / "accelerate" / "fsdp-cpu.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# fp32 for equality to 6 digits (see test_distributed); a clipping norm below the tiny
# model's LoRA gradient norms (0.6-0.8), so every step clips; two micro-batches per step.
COMMON = {
    "lr": 5e-3,
    "seed": 0,
    "mixed_precision": "no",
    "grad_accum": 2,
    "max_grad_norm": 0.3,
    "log_every": 1,
}


def launcher(port: int | None = None) -> list[str]:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    port = port or free_port()
    return [accelerate, "launch", "--config_file", str(FSDP_CPU), "--main_process_port", str(port)]


def train_sharded(recipe, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [*launcher(), "-m", "finetune", "train", str(recipe), *extra]
    return subprocess.run(
        command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def one_and_two(recipe_file, tmp_path, train, adapter=None):
    """Recipes for one process (micro-batch 4) and two (micro-batch 2): the same global batch."""
    made = []
    for name, micro in (("one", 4), ("two", 2)):
        sections = {"train": {**COMMON, **train, "micro_batch_size": micro}}
        sections["output"] = {"dir": str(tmp_path / name)}
        if adapter:
            sections["adapter"] = adapter
        made.append(recipe_file(f"{name}.yaml", **sections))
    return made


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize(
    ("adapter", "clip"),
    [
        ({"method": "lora"}, 0.3),
        ({"method": "dora"}, 0.3),
        # IA3's gradients are small (0.03 here): a norm below them, so that it clips too.
        ({"method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"]}, 0.02),
    ],
    ids=["lora", "dora", "ia3"],
)
def test_two_sharded_processes_match_one(adapter, clip, recipe_file, tiny_model_dir, tmp_path):
    train = {"max_steps": 3, "max_grad_norm": clip}
    single, double = one_and_two(recipe_file, tmp_path, train, adapter)
    main(["train", str(single)])
    proc = train_sharded(double)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Sharded indeed: each process holds half of every layer (the tiny model's sizes divide).
    assert "sharded (FSDP2) over 2 processes" in proc.stderr, proc.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert two == pytest.approx(one, rel=1e-5)
    records = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    norms = [json.loads(line)["grad_norm"] for line in records if '"grad_norm"' in line]
    assert min(norms) > clip  # every step was clipped
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert max_diff(a, b) < 1e-5

    # Whole, not one process's shard: plain peft loads it onto the tiny base.
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, tmp_path / "two" / "adapter")
    assert max_diff(get_peft_model_state_dict(loaded), b) == 0.0

    # Memory per process: each process measured its own live-tensor peak; the report's
    # estimate (a dry run of fully_shard over a fake world of two) is one process's.
    memory = json.loads((tmp_path / "two" / "report.json").read_text())["memory"]
    assert memory["estimate"]["setup"]["processes"] == 2
    assert memory["estimate"]["setup"]["sharding"] == "fsdp"
    estimate = memory["estimate"]["allocated_bytes"]
    each = memory["measured"]["per_process_peak_bytes"]
    # Within 2% of the process that got the widest micro-batch; all within 10%: a rank may
    # hold one more collective buffer, released by gloo's thread on its own schedule
    # (docs/memory.md, "Per process under sharding"; benchmarks/memory_sharded.py). On a
    # loaded machine (the suite's two workers) both ranks can: 81 and 95 kB over the
    # estimate were seen, under the gathered weights the estimate holds (328 kB here).
    assert len(each) == 2
    close = min(abs(estimate - peak) / peak for peak in each) < 0.02
    gathered = memory["estimate"]["components"]["gathered weights (sharding)"]
    late_buffers = all(0 <= peak - estimate <= gathered for peak in each)
    assert close or late_buffers, (estimate, each, gathered)
    for peak in each:
        assert estimate == pytest.approx(peak, rel=0.10), (estimate, each)
    alone = json.loads((tmp_path / "one" / "report.json").read_text())["memory"]
    weights = memory["estimate"]["components"]["frozen base weights"]
    assert weights < 0.6 * alone["estimate"]["components"]["frozen base weights"]


def test_four_sharded_processes_match_one(recipe_file, tmp_path):
    """One process at micro-batch 4 against four at micro-batch 1, accumulation 2, clipping
    every step: the same global batch, so the same losses and adapter."""
    made = []
    for name, micro in (("one", 4), ("four", 1)):
        train = {**COMMON, "max_steps": 3, "micro_batch_size": micro}
        made.append(recipe_file(f"{name}.yaml", train=train, output={"dir": str(tmp_path / name)}))
    main(["train", str(made[0])])
    command = [*launcher(), "--num_processes", "4", "-m", "finetune", "train", str(made[1])]
    proc = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sharded (FSDP2) over 4 processes" in proc.stderr, proc.stderr[-3000:]
    assert losses(tmp_path / "four") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "four" / "adapter" / "adapter_model.safetensors")
    assert max_diff(a, b) < 1e-5
    memory = json.loads((tmp_path / "four" / "report.json").read_text())["memory"]
    assert len(memory["measured"]["per_process_peak_bytes"]) == 4


def test_sharded_checkpoint_is_whole_and_resume_continues(recipe_file, tmp_path):
    """Stopped by max_steps at step 2, resumed to step 4 (a constant schedule, so the shorter
    run's learning rates are the longer run's): the losses are one uninterrupted process's,
    and the sharded checkpoint's optimizer states are one process's, whole."""
    train = {"max_steps": 4, "save_every": 2, "schedule": "constant"}
    single, double = one_and_two(recipe_file, tmp_path, train)
    main(["train", str(single)])
    proc = train_sharded(double, "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]

    saved = torch.load(tmp_path / "two" / "checkpoints" / "step-2" / "optimizer.pt")
    reference = torch.load(tmp_path / "one" / "checkpoints" / "step-2" / "optimizer.pt")
    assert saved["state"].keys() == reference["state"].keys()
    for index, states in reference["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert saved["state"][index][key].shape == states[key].shape
            assert torch.allclose(saved["state"][index][key], states[key], rtol=1e-4, atol=1e-9)

    resumed = train_sharded(double, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert max_diff(a, b) < 1e-5


def test_sigterm_to_the_sharded_launcher_stops_every_process_at_one_step(recipe_file, tmp_path):
    """As test_sigterm_under_torchrun...: accelerate launch passes a SIGTERM to its workers,
    which agree on a step; the checkpoint then holds every shard's state, whole. Enough
    steps that the signal lands mid-run on a busy machine too: 30 steps of two processes
    could end (4 s) before a loaded CI machine's test saw step 3 and signalled."""
    single, double = one_and_two(recipe_file, tmp_path, {"max_steps": 150})
    main(["train", str(single)])
    command = [*launcher(), "-m", "finetune", "train", str(double)]
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "two" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= 3):
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

    resumed = train_sharded(double, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


SHARDED_WORKER = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}


@pytest.mark.parametrize(
    ("setting", "env", "words"),
    [
        ({"model": {"quantization": "int8"}}, {}, "model.quantization int8 cannot be sharded"),
        ({"adapter": {"method": "prompt"}}, {}, "adapter.method prompt is not supported under"),
        ({}, {"FSDP_VERSION": "1"}, "FSDP_VERSION is 1: finetune shards with FSDP2 only"),
        # Red-team 5: WORLD_SIZE no number was a ValueError traceback; WORLD_SIZE 2 with no
        # launcher (no MASTER_ADDR) was accelerate's ValueError traceback after the model
        # loaded; FSDP_VERSION " 2" was refused as "FSDP_VERSION is  2".
        ({}, {"WORLD_SIZE": "two"}, "WORLD_SIZE is 'two', not a number of processes"),
        ({}, {}, "WORLD_SIZE is 2 but no launcher started this process"),
        ({}, {"FSDP_VERSION": " 2"}, "WORLD_SIZE is 2 but no launcher started this process"),
    ],
    ids=["int8", "prompt", "fsdp1", "world-size-word", "no-launcher", "version-spaced"],
)
def test_what_cannot_shard_is_refused_before_the_model_loads(
    setting, env, words, recipe_file, tmp_path
):
    """What a worker of a sharded launch sees (accelerate's variables, WORLD_SIZE 2): one
    line, exit 2, before the process group or the model, and no run directory."""
    recipe = recipe_file(**setting)
    proc = run_cli("train", str(recipe), env={**SHARDED_WORKER, "RANK": "0", **env})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert words in proc.stderr
    assert not (tmp_path / "run").exists()


def test_reshard_after_forward_reads_as_accelerate_reads_it(monkeypatch):
    """Red-team 5: FSDP_RESHARD_AFTER_FORWARD=0 (or no) resharded: only "false" was false."""
    from finetune import sharding
    from finetune.errors import UserError

    for name, value in SHARDED_WORKER.items():
        monkeypatch.setenv(name, value)
    for value, wanted in (("0", False), ("no", False), ("False ", False), ("1", True)):
        monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", value)
        assert sharding.requested().reshard_after_forward is wanted, value
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "1")  # was read as false, the offload ignored
    with pytest.raises(UserError, match="fsdp_offload_params: true is not supported"):
        sharding.requested()
    monkeypatch.delenv("FSDP_OFFLOAD_PARAMS")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "sometimes")
    with pytest.raises(UserError, match="FSDP_RESHARD_AFTER_FORWARD is 'sometimes'"):
        sharding.requested()


def test_a_layer_class_to_wrap_that_the_model_lacks_is_refused(recipe_file, tmp_path):
    """Red-team 5: fsdp_transformer_layer_cls_to_wrap naming no class of the model sharded
    the whole model as one unit, silently (accelerate's own wrap policy refuses it)."""
    recipe = recipe_file(train={**COMMON, "max_steps": 2, "micro_batch_size": 2})
    command = [*launcher(), "--fsdp_transformer_layer_cls_to_wrap", "NoSuchLayer"]
    proc = subprocess.run(
        [*command, "-m", "finetune", "train", str(recipe)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stderr[-3000:]
    said = "FSDP_TRANSFORMER_CLS_TO_WRAP: no module of LlamaForCausalLM is a NoSuchLayer"
    assert said in proc.stderr and "LlamaDecoderLayer" in proc.stderr, proc.stderr[-3000:]
    # Refused when the model loads, before the run directory is written: a folder left
    # holding recipe.yaml alone would refuse the corrected command ("not a finetune run").
    assert not (tmp_path / "run").exists()


def test_nested_classes_to_wrap_are_sharded_children_first(recipe_file, tmp_path):
    """Red-team 5: fsdp_transformer_layer_cls_to_wrap Linear (peft's lora Linear holds torch
    Linears) sharded parents before children: a TypeError traceback inside torch's FSDP."""
    recipe = recipe_file(train={**COMMON, "max_steps": 2, "micro_batch_size": 2})
    command = [*launcher(), "--fsdp_transformer_layer_cls_to_wrap", "Linear"]
    proc = subprocess.run(
        [*command, "-m", "finetune", "train", str(recipe)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_sharded_nf4_base_packs_its_weights_in_the_compute_dtype():
    """peft's FSDP+QLoRA recipe: bnb_4bit_quant_storage is the compute dtype when sharded."""
    from finetune.models import quantization_config

    sharded = quantization_config("nf4", torch.bfloat16, True, sharded=True)
    alone = quantization_config("nf4", torch.bfloat16, True)
    assert sharded.bnb_4bit_quant_storage == torch.bfloat16
    assert alone.bnb_4bit_quant_storage == torch.uint8


# ------------------------------------------------------------------ several machines


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp"])
def test_two_nodes_on_the_loopback_match_one_process(sharded, recipe_file, tmp_path):
    """recipes/accelerate/ddp-multinode.yaml's layout on one machine: two torchrun launchers
    (--nnodes 2, node ranks 0 and 1, one process each) meeting at 127.0.0.1."""
    single, double = one_and_two(recipe_file, tmp_path, {"max_steps": 3})
    main(["train", str(single)])
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    port = str(free_port())
    env = {**ENV, **({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"} if sharded else {})}
    nodes = [start_node(torchrun, rank, port, double, env) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]

    assert ("sharded (FSDP2) over 2 processes" in outputs[0][1]) == sharded
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert max_diff(a, b) < 1e-5
    assert "run directory:" not in outputs[1][0]  # the second node writes and reports nothing


def test_resume_refuses_a_node_that_sees_another_checkpoint(recipe_file, tmp_path):
    """The second node's output.dir is not the first node's (not shared, never copied): it
    finds no checkpoint where the first finds step 2, and both refuse before writing."""
    _, double = one_and_two(recipe_file, tmp_path, {"max_steps": 4, "save_every": 2})
    main(["train", str(double), "train.max_steps=2"])  # the run to resume, at step 2
    elsewhere = tmp_path / "elsewhere.yaml"  # the same recipe but for output.dir
    elsewhere.write_text(double.read_text().replace(str(tmp_path / "two"), str(tmp_path / "x")))
    before = (tmp_path / "two" / "metrics.jsonl").read_bytes()
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    port = str(free_port())
    nodes = [start_node(torchrun, rank, port, recipe, ENV, "--resume") for rank, recipe in
             ((0, double), (1, elsewhere))]  # fmt: skip
    errors = [node.communicate(timeout=600)[1] for node in nodes]

    for node, err in zip(nodes, errors, strict=True):
        assert node.returncode != 0
        assert "--resume: the processes found different checkpoints" in err, err[-3000:]
        assert "(step 0 on some, 2 on others)" in err
    assert (tmp_path / "two" / "metrics.jsonl").read_bytes() == before
    assert not (tmp_path / "x").exists()


def start_node(torchrun: str, rank: int, port: str, recipe, env: dict, *extra: str) -> Any:
    """One machine's launcher: node `rank` of two, one process, rendezvous on the loopback."""
    command = [torchrun, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1"]
    command += ["--master_addr", "127.0.0.1", "--master_port", port]
    command += ["-m", "finetune", "train", str(recipe), *extra]
    pipe = subprocess.PIPE
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=pipe, stderr=pipe, text=True)


# ------------------------------------------------------------------ GPUs


def gpu_count() -> int:
    probe = run_python("import torch; print(torch.cuda.device_count())", env=gpu_env())
    last = probe.stdout.strip().splitlines()[-1:] if probe.returncode == 0 else []
    return int(last[0]) if last and last[0].isdigit() else 0


@pytest.mark.gpu
def test_qlora_sharded_over_two_gpus(recipe_file, tiny_model_dir, tmp_path):
    """An nf4 base sharded over two GPUs (recipes/accelerate/fsdp.yaml): trains, and the
    adapter it saves is whole. Skipped with fewer than two GPUs."""
    if gpu_count() < 2:
        pytest.skip("needs two CUDA GPUs: an nf4 base sharded over two processes")
    recipe = recipe_file(
        model={"quantization": "nf4", "dtype": "bfloat16"},
        train={"max_steps": 3, "micro_batch_size": 2},
    )
    config = ROOT / "recipes" / "accelerate" / "fsdp.yaml"
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    command = [accelerate, "launch", "--config_file", str(config)]
    command += ["--main_process_port", str(free_port()), "-m", "finetune", "train", str(recipe)]
    env = {**ENV, **{k: v for k, v in gpu_env().items() if v is not None}}
    if gpu_env()["CUDA_VISIBLE_DEVICES"] is None:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sharded (FSDP2) over 2 processes" in proc.stderr
    assert all(loss == loss for loss in losses(tmp_path / "run"))  # finite, not NaN
    # Whole: plain peft loads it onto the unquantized tiny base, every tensor as saved.
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter")
    assert max_diff(get_peft_model_state_dict(loaded), saved) == 0.0
