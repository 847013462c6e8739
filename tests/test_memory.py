"""Memory estimator (the dry run): exact counts, saved activations, parameter, gradient and
optimizer bytes against real tensors, the CLI. Tiny models, CPU, offline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from finetune.errors import UserError
from finetune.memory import Setup
from finetune.memory.arch import to_hf_config
from finetune.memory.dryrun import dry_run, estimate_from_config
from finetune.memory.measure import saved_tensors
from finetune.memory.presets import get_preset
from finetune.positions import trained_positions_loss

METHODS = ("lora", "dora", "ia3", "prefix", "prompt")


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=500,
        tie_word_embeddings=True,
    )


def peft_config(method: str, setup: Setup):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    task = TaskType.CAUSAL_LM
    if method in ("lora", "dora"):
        return LoraConfig(
            task_type=task, r=setup.r, target_modules="all-linear", use_dora=method == "dora"
        )
    if method == "ia3":
        return IA3Config(task_type=task, target_modules="all-linear")
    if method == "prefix":
        return PrefixTuningConfig(
            task_type=task,
            num_virtual_tokens=setup.virtual_tokens,
            prefix_projection=setup.prefix_projection,
        )
    return PromptTuningConfig(task_type=task, num_virtual_tokens=setup.virtual_tokens)


def peft_model(config, method: str, setup: Setup, dtype=torch.float32, device=None):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if device == "meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return get_peft_model(model, peft_config(method, setup))


# Exact counts published by the model authors (model cards, safetensors index totals).
PUBLISHED_COUNTS = {
    "llama-2-7b": 6_738_415_616,
    "mistral-7b": 7_241_732_096,
    "llama-3.2-1b": 1_235_814_400,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name", list(PUBLISHED_COUNTS))
def test_preset_counts_equal_the_published_ones(name):
    setup = Setup(method="full", dtype="bfloat16", batch=1, seq=8)
    assert dry_run(to_hf_config(get_preset(name)), setup).total_params == PUBLISHED_COUNTS[name]


@pytest.mark.parametrize(
    ("method", "projection"), [(m, False) for m in METHODS] + [("prefix", True)]
)
def test_trainable_count_equals_peft_on_tiny_llama(method, projection):
    setup = Setup(method=method, r=4, virtual_tokens=7, prefix_projection=projection)
    model = peft_model(tiny_config(), method, setup)
    trainable, total = model.get_nb_trainable_parameters()
    run = dry_run(tiny_config(), setup)
    assert run.trainable_params == trainable
    assert run.total_params == total


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix", "prompt", "full"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_saved_activations_equal_autograd(method, dtype, attn):
    """The bytes autograd saves for backward in one real forward (tiny GQA Llama, every
    storage once, parameters excluded) equal the dry run's, for every method, dtype and
    attention (eager with prefix tuning included: the analytic model missed it)."""
    setup = Setup(
        method=method, dtype=dtype, batch=2, seq=16, virtual_tokens=10, attn=attn, device="cpu"
    )
    # Exact but for prefix and prompt tuning, where the dry run holds 80 bytes more (peft's
    # virtual-token indices, 10 int64), under 0.03%.
    saved = dry_run(tiny_config(), setup).saved_for_backward_bytes
    assert saved == pytest.approx(saved_in_one_forward(setup), abs=80)


@pytest.mark.parametrize("method", ["lora", "prefix", "full"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_saved_activations_under_bf16_autocast_equal_autograd(method, attn):
    """The same under real CPU autocast (the CPU default where it has bf16 instructions)
    against the dry run's emulation: 16-bit copies of inputs and weights, SDPA's inputs and
    eager attention's matmuls cast. Eager attention under emulated autocast used to crash
    the dry run (and with it `finetune estimate` of such a recipe)."""
    setup = Setup(
        method=method,
        dtype="float32",
        autocast="bfloat16",
        master_weights=method == "full",
        batch=2,
        seq=16,
        virtual_tokens=10,
        attn=attn,
        device="cpu",
    )
    saved = dry_run(tiny_config(), setup).saved_for_backward_bytes
    assert saved == pytest.approx(saved_in_one_forward(setup), abs=80)


def saved_in_one_forward(setup: Setup) -> int:
    """Bytes autograd saves in one real forward of the tiny model as `setup` says, padded
    as a batch of 2 is by default (Setup.masked), under autocast if `setup.autocast`."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        config,
        dtype=getattr(torch, setup.dtype),
        attn_implementation=setup.attn,
    )
    if setup.method != "full":
        model = get_peft_model(model, peft_config(setup.method, setup))
    model.train()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    autocast = getattr(torch, setup.autocast) if setup.autocast else None
    with (
        saved_tensors(model) as found,
        torch.autocast("cpu", dtype=autocast, enabled=autocast is not None),
    ):  # the loss the training loop (and the dry run) takes
        shift = setup.virtual_tokens if setup.method == "prompt" else 0
        trained_positions_loss(model, batch, 15, shift)
    return sum(found.values())


@pytest.mark.parametrize("method", METHODS)
def test_parameter_and_optimizer_bytes_equal_allocated_tiny(method):
    check_allocated(tiny_config(), Setup(method=method, dtype="float32", device="cpu", seq=8))


def check_allocated(config, setup: Setup) -> None:
    """Parameters and buffers and, after a real AdamW step, its states: as the dry run
    holds them at its peak (gradients are split there: some are freed or not yet made)."""
    model = peft_model(config, setup.method, setup)
    est = estimate_from_config(config, setup)
    tensors = [*model.parameters(), *model.buffers()]  # buffers: the rotary frequencies
    params = sum(t.numel() * t.element_size() for t in tensors)
    weights = sum(
        est.components[k]
        for k in (
            "frozen base weights",
            "quantization scales",
            "kept/upcast in higher precision",
            "trainable parameters",
        )
    )
    assert weights == params
    ids = torch.randint(0, config.vocab_size, (setup.batch, setup.seq))
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=1e-3)
    optim.step()
    state = sum(t.numel() * t.element_size() for s in optim.state.values() for t in s.values())
    assert state == est.components["optimizer states"]


def test_headline_84_gb_and_13_gb():
    out = run_cli("llama-2-7b", "--method", "full", "--dtype", "float16", "--format", "json")
    data = json.loads(out.stdout)
    assert any("= 84 GB at 7B nominal" in line for line in data["headline"])
    assert abs(data["full_fp16_budget_bytes"] - 80.86e9) < 0.01e9  # exact 6.74B params
    # pure fp16 AdamW: m and v in fp16, 4 B/param (the budget's 8 assumes fp32 states);
    # on CUDA torch's default (foreach) step holds whole-model fp16 temporaries beside them
    states = data["components"]["optimizer states"]
    assert 4 * data["total_params"] <= states < 4.01 * data["total_params"]
    assert data["components"]["optimizer step temporaries"] >= 2 * data["total_params"]
    lora = json.loads(
        run_cli("llama-2-7b", "--method", "lora", "--quant", "int8", "--format", "json").stdout
    )
    assert any("= 13 GB at 7B nominal" in line for line in lora["headline"])
    assert set(lora["components"]) >= {"frozen base weights", "activations", "logits and loss"}
    assert lora["total_bytes"] == sum(lora["components"].values())


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune", "estimate", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["llama-2-7c"], "llama-2-7b"),
        (["llama-2-7b", "--batch", "0"], "batch"),
        (["llama-2-7b", "--seq", "-3"], "seq"),
        (["llama-2-7b", "--method", "fancy"], "method"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, needle):
    result = run_cli(*args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert needle in result.stderr


def test_cli_bad_config_files(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    result = run_cli(str(bad))
    assert result.returncode == 2 and "malformed JSON" in result.stderr
    bad.write_text(json.dumps({"model_type": "mystery", "hidden_size": 8}))
    result = run_cli(str(bad))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "transformers cannot build model_type 'mystery'" in result.stderr


def test_cli_config_folder_gpu_fit_and_plot(tmp_path):
    (tmp_path / "config.json").write_text(tiny_config().to_json_string())
    plot = tmp_path / "cmp.png"
    result = run_cli(str(tmp_path), "--gpu", "0.5", "--plot", str(plot), "--format", "markdown")
    assert result.returncode == 0, result.stderr
    assert "| activations |" in result.stdout and "fits" in result.stdout
    assert plot.stat().st_size > 1000
    big = run_cli("llama-2-7b", "--method", "full", "--gpu", "24")
    assert "does not fit" in big.stdout and "fits with" in big.stdout


def test_setup_rejects_bad_shapes():
    with pytest.raises(UserError, match="batch"):
        Setup(batch=0)
    with pytest.raises(UserError, match="match no Linear layer"):
        dry_run(to_hf_config(get_preset("smollm2-135m")), Setup(targets=("qkv",)))


PEAK_PROBE = """
import torch
from finetune.memory.measure import PeakMemory
with PeakMemory("cpu") as peak:
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    block += 1
    peak.update()
print(peak.peak_bytes, peak.baseline_bytes, "resident" in peak.metric)
"""


def test_peak_memory_cpu_sees_an_allocation():
    # A fresh process: in a long-lived one the C allocator may hand back pages freed by
    # earlier work, which never show up as resident-memory growth (docs/memory.md).
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    peak, baseline, named = int(out[0]), int(out[1]), out[2] == "True"
    assert peak >= 60 * 2**20
    assert named and baseline > 0


def test_a_signal_raised_inside_a_free_reaches_the_next_op():
    """A second Ctrl-C can land in the tracker's weakref callback, where Python would print
    the exception and drop it; the tracker raises it at the next torch op instead."""
    from finetune.memory.tracker import MemoryTracker

    class Signalled(BaseException):
        pass

    def signal_arrives(cdata):
        raise Signalled

    tracker = MemoryTracker(record_events=False)
    with tracker:
        doomed = torch.ones(1000)
        forget, tracker._forget = tracker._forget, signal_arrives
        del doomed  # its weakref callback runs now and "receives" the signal
        tracker._forget = forget
        with pytest.raises(Signalled):
            torch.ones(3) + 1


def test_a_signal_raised_inside_the_last_free_reaches_the_end_of_tracking():
    from finetune.memory.tracker import MemoryTracker

    class Signalled(BaseException):
        pass

    def signal_arrives(cdata):
        raise Signalled

    tracker = MemoryTracker(record_events=False)
    with pytest.raises(Signalled), tracker:
        doomed = torch.ones(1000)
        tracker._forget = signal_arrives
        del doomed  # no torch op follows inside the tracked block
