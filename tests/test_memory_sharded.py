"""Memory per process under sharding: the tracker follows FSDP2, the dry run shards with
torch's own fully_shard over a fake world, `finetune estimate --processes/--sharding`.

The estimate against each process's measurement of a real two-process sharded run is in
tests/test_fsdp.py (it needs a launcher); benchmarks/memory_sharded.py has the table.
"""

from __future__ import annotations

import pytest
import torch
from helpers import run_cli

from finetune.errors import UserError
from finetune.memory import dryrun, sharded
from finetune.memory.estimate import Setup
from finetune.memory.render import measured_lines
from finetune.memory.tracker import MemoryTracker

# Four layers whose sizes divide by 2 and 4, so every process holds an equal shard.
CONFIG = dict(
    model_type="llama",
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)


def setup(**change) -> Setup:
    base = dict(dtype="float32", batch=2, seq=64, device="cpu", masked=False, r=8)
    return Setup(**{**base, **change})


@pytest.fixture(scope="module")
def config():
    return dryrun.build_config(dict(CONFIG))


def test_a_storage_resized_in_place_is_freed_and_allocated_again():
    """FSDP2 frees and regathers whole parameters with UntypedStorage.resize_, which no op
    at the dispatch level shows; the tracker sees each resize while it is active, and only
    then."""
    tensor = torch.empty(1000, dtype=torch.float32)
    tracker = MemoryTracker()
    tracker.track(tensor, "weights")
    with tracker:
        tensor.untyped_storage().resize_(2000)
        assert tracker.current["weights"] == 2000  # resized while alive: still weights
        tensor.untyped_storage().resize_(0)
        assert tracker.total_bytes == 0  # freed in place
        tensor.untyped_storage().resize_(4000)  # grown from nothing: gathered for compute
        assert tracker.current["gathered weights"] == 4000
    assert tracker.peak_bytes == 4000
    assert "resize_" not in vars(torch.UntypedStorage)  # torch's own method again
    tensor.untyped_storage().resize_(0)
    assert tracker.current["gathered weights"] == 4000  # not watched outside the tracker


def test_a_sharded_parameter_counts_as_the_shard_this_process_holds():
    from torch.distributed.tensor import Shard, distribute_tensor

    with sharded.fake_world(4) as mesh:
        whole = torch.empty(64, 32, device="meta")
        shard = distribute_tensor(whole, mesh, [Shard(0)], src_data_rank=None)
        tracker = MemoryTracker()
        tracker.track(shard, "weights")
        assert tracker.current["weights"] == 64 * 32 * 4 // 4


def test_sharding_divides_what_each_process_holds(config):
    one = dryrun.estimate_from_config(config, setup())
    two = dryrun.estimate_from_config(config, setup(processes=2, sharding="fsdp"))
    four = dryrun.estimate_from_config(config, setup(processes=4, sharding="fsdp"))
    for name in ("frozen base weights", "trainable parameters", "optimizer states"):
        assert two.components[name] == pytest.approx(one.components[name] / 2, rel=0.01)
        assert four.components[name] == pytest.approx(one.components[name] / 4, rel=0.01)
    # The layer being computed and the root (embeddings, head) are whole while in use.
    assert two.components["gathered weights (sharding)"] > 0
    assert four.allocated_bytes < two.allocated_bytes < one.allocated_bytes
    # Data parallelism: every process holds the whole model, as one process does, and DDP's
    # gradient buckets, the trainable gradients once more (fp32 adapter: 4 B each).
    plain = dryrun.estimate_from_config(config, setup(processes=2))
    buckets = plain.components["gradients"] - one.components["gradients"]
    assert buckets == 4 * one.trainable_params
    assert plain.allocated_bytes <= one.allocated_bytes + buckets


def test_the_fake_world_leaves_nothing_behind(config):
    import sys

    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    check, excepthook = FSDPParamGroup._validate_no_meta_params, sys.excepthook
    dryrun.estimate_from_config(config, setup(processes=2, sharding="fsdp"))
    assert not dist.is_initialized()
    assert not hasattr(torch, "meta")
    assert FSDPParamGroup._validate_no_meta_params is check
    assert sys.excepthook is excepthook  # torch's "[rank0]:" prefix wrapper is gone


def test_a_process_in_a_process_group_dry_runs_in_a_child(config):
    """A sharded run writing its report already belongs to a process group, where torch
    allows no second default group: the dry run runs in a child, with the same result."""
    import torch.distributed as dist

    alone = dryrun.dry_run(config, setup(processes=2, sharding="fsdp"))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        child = dryrun.dry_run(config, setup(processes=2, sharding="fsdp"))
        # A refusal made in the child reaches the caller as the same one line.
        with pytest.raises(UserError, match="match no Linear layer"):
            dryrun.dry_run(config, setup(processes=2, sharding="fsdp", targets=("nope",)))
    finally:
        dist.destroy_process_group()
    assert child.peak_bytes == alone.peak_bytes
    assert child.breakdown == alone.breakdown


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"processes": 1, "sharding": "fsdp"}, "give --processes 2 or more"),
        ({"processes": 0}, "processes must be 1 to 8,192"),
        ({"processes": 8_193}, "processes must be 1 to 8,192"),
        ({"processes": 2, "sharding": "zero3"}, "sharding must be one of none, fsdp"),
        ({"processes": 2, "sharding": "fsdp", "quant": "int8"}, "int8 cannot be sharded"),
        ({"processes": 2, "sharding": "fsdp", "method": "prompt"}, "prompt is not supported"),
        ({"processes": 2, "sharding": "fsdp", "objective": "dpo"}, "dpo is not supported"),
        ({"processes": 2, "sharding": "fsdp", "autocast": "float16"}, "fp16 is not supported"),
    ],
)
def test_what_train_refuses_to_shard_the_estimate_refuses_in_its_words(change, says):
    with pytest.raises(UserError, match=says):
        setup(**change)


def test_the_report_shows_each_process_beside_the_estimate(config):
    est = dryrun.estimate_from_config(config, setup(processes=2, sharding="fsdp"))
    peak = est.allocated_bytes
    measured = {
        "metric": "peak bytes of live tensors (MemoryTracker)",
        "peak_bytes": peak,
        "per_process_peak_bytes": [peak, peak * 2],
    }
    lines = measured_lines(est, measured)
    assert "rank 0" in lines[1] and "(+0.0%)" in lines[1]
    assert "rank 1" in lines[1] and "(-50.0%)" in lines[1]
    assert "2 processes, sharding fsdp" in lines[1]


def test_estimate_takes_processes_and_sharding(tiny_model_dir):
    proc = run_cli(
        "estimate", str(tiny_model_dir), "--processes", "2", "--sharding", "fsdp", "--seq", "32"
    )
    assert proc.returncode == 0, proc.stderr
    assert "per process of 2, FSDP2 full shard" in " ".join(proc.stdout.split())
    assert "gathered weights" in proc.stdout
    assert proc.stderr == ""

    for args, says in (
        (["--sharding", "fsdp"], "give --processes 2 or more"),
        (["--processes", "2", "--sharding", "fsdp", "--quant", "int8"], "int8 cannot be sharded"),
        (["--processes", "-3"], "processes must be 1 to 8,192"),
    ):
        proc = run_cli("estimate", str(tiny_model_dir), *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert says in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
