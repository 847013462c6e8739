"""Fit: the search for the largest setting that fits, the verdict before training, and the
method comparison's labelled rows (tiny configs, real dry runs, no mocks)."""

from __future__ import annotations

import pytest

from finetune.errors import UserError
from finetune.memory import dryrun
from finetune.memory.dryrun import compare_methods
from finetune.memory.estimate import Setup
from finetune.memory.fit import (
    FitSearch,
    check_gpu_gb,
    check_recipe_fits_device,
    device_verdict,
    fit_advice,
    fit_lines,
    largest_fitting,
    refusal,
)
from finetune.memory.render import budget_line

TINY = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 64,
    "intermediate_size": 160,
    "vocab_size": 500,
    "max_position_embeddings": 1024,
}


def tiny_estimate(**change):
    config = dryrun.build_config(dict(TINY))
    setup = Setup(**{"seq": 64, "dtype": "float32", **change})
    return dryrun.estimate_from_config(config, setup, "tiny")


@pytest.mark.parametrize("answer", [1, 2, 3, 7, 64, 100, 1000])
def test_largest_fitting_finds_the_boundary_in_few_calls(answer):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= answer

    assert largest_fitting(fits, 1, 1024) == answer
    assert len(calls) <= 2 * answer.bit_length() + 2


def test_largest_fitting_edges_and_quantum():
    assert largest_fitting(lambda n: False, 1, 100) == 0
    assert largest_fitting(lambda n: True, 1, 100) == 100  # the cap
    assert largest_fitting(lambda n: n <= 1000, 64, 4096, 64) == 960


def test_fit_search_on_a_tiny_model_is_the_boundary():
    est = tiny_estimate(batch=1)
    # A budget that fits batch 3 but not batch 4, read from dry runs of both.
    search = FitSearch(est, 1.0)
    three = search.estimate(Setup(**{**vars(est.setup), "batch": 3})).verdict_bytes
    four = search.estimate(Setup(**{**vars(est.setup), "batch": 4})).verdict_bytes
    assert three < four
    search = FitSearch(est, (three + four) / 2)
    assert search.largest_batch() == 3
    seq = search.longest_seq()
    assert 64 <= seq <= 1024 and seq % 64 == 0
    assert search.fits(seq=seq) and (seq == 1024 or not search.fits(seq=seq + 64))
    lines = fit_lines(est, (three + four) / 2, search)
    assert "largest micro-batch at seq 64: 3" in lines[1]
    assert "reserved" in lines[0] and "CUDA context" in lines[0]


def test_fit_advice_uses_reserved_plus_context_and_names_a_change():
    est = tiny_estimate(batch=8, seq=256)
    assert fit_advice(est, est.verdict_bytes)[0].startswith("fits")
    lines = fit_advice(est, est.verdict_bytes - 1)
    assert lines[0].startswith("does not fit") and "CUDA context" in lines[0]
    assert lines[-1].startswith("fits with --")


def test_train_is_told_the_change_as_recipe_overrides_that_validate():
    """`finetune train`'s refusal names the change as overrides of the recipe's fields (it
    has no --grad-ckpt or --batch), and each of them is a field the recipe takes."""
    from finetune.memory.fit import RECIPE_FIELDS, as_recipe_overrides, candidate_changes
    from finetune.recipe import Recipe

    est = tiny_estimate(batch=8, seq=256)
    advice = fit_advice(est, est.verdict_bytes - 1, spell=as_recipe_overrides)[-1]
    assert advice.startswith("fits with train.") and "--" not in advice
    setup = Setup(**{**vars(est.setup), "method": "full", "batch": 4, "seq": 512})
    for label, change in candidate_changes(setup):
        for override in as_recipe_overrides(label, change).split():
            field, _ = override.split("=")
            section, key = field.split(".")
            assert key in Recipe.model_fields[section].annotation.model_fields, override
    assert set(RECIPE_FIELDS) >= {k for _, c in candidate_changes(setup) for k in c}


def test_device_verdict_is_pure_and_names_the_shortfall():
    assert device_verdict(10, 10).fits
    short = device_verdict(30 * 10**9, 24 * 10**9)
    assert not short.fits and short.shortfall_bytes == 6 * 10**9
    line = refusal(short, "try --grad-ckpt")
    assert "6.0 GB short" in line and "--grad-ckpt" in line and "--force" in line
    assert "\n" not in line


def test_the_device_check_is_a_no_op_on_the_cpu_and_with_force():
    check_recipe_fits_device(recipe=None, device="cpu")  # never reads the recipe
    check_recipe_fits_device(recipe=None, device="cuda", force=True)


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -24.0, float("inf")])
def test_gpu_must_be_finite_and_positive(bad):
    with pytest.raises(UserError, match="--gpu must be a positive number"):
        check_gpu_gb(bad)
    check_gpu_gb(24.0)
    check_gpu_gb(None)


def test_comparison_rows_say_what_they_are_and_mixed_precision_differs():
    est = tiny_estimate(dtype="bfloat16")
    rows = dict(compare_methods(est.arch, est.setup, est.config))
    pure = rows["full, pure bf16 (weights, gradients, AdamW states bf16)"]
    mixed = rows["full, mixed precision (fp32 master weights, gradients, AdamW; bf16 autocast)"]
    params = pure.trainable_params
    assert mixed.trainable_params == params
    # Pure bf16: 2 B weights + 2 B gradients + 4 B AdamW states per parameter.
    assert pure.components["trainable parameters"] == 2 * params
    assert pure.components["optimizer states"] >= 4 * params
    # Mixed precision: fp32 master weights, fp32 gradients, fp32 m and v: 16 B/param.
    assert mixed.components["master weights"] == 4 * params
    assert mixed.components["trainable parameters"] == 0
    assert mixed.components["optimizer states"] >= 8 * params
    assert mixed.allocated_bytes > pure.allocated_bytes
    assert not any("12 B/param" in label for label in rows)
    line = budget_line(est)
    assert "12 B/param" in line and "not a dry run" in line


def test_mixed_precision_keeps_16_bit_copies_for_backward():
    """Autocast's 16-bit weight copies are saved for backward; fp32 weights are not."""
    config = dryrun.build_config(dict(TINY))
    shape = {"method": "full", "seq": 64, "dtype": "bfloat16"}
    pure = dryrun.dry_run(config, Setup(**shape))
    mixed = dryrun.dry_run(config, Setup(**shape, master_weights=True))
    linear = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 160) + 500 * 64  # layers + head
    assert mixed.saved_for_backward_bytes - pure.saved_for_backward_bytes >= 2 * linear
