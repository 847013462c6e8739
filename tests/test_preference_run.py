"""Preference data and runs through the CLI, in-process, on the tiny model: bad rows refused
in one line, the validate display, DPO learning on a toy task, exact --resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import build_tokenizer, run_main, write_jsonl

from finetune import reference_cache, runs
from finetune.data import PairExample
from finetune.recipe import DataSection

MONTHS = ["January", "February", "March", "April", "May", "June"]
MONTHS_PROMPT = "Convert 1 January 2024 to ISO."


def date_pairs(n: int, offset: int = 0) -> list[dict]:
    """Chosen: the correct ISO date; rejected: day and month swapped (a wrong date)."""
    rows = []
    for i in range(offset, offset + n):
        day, month = 1 + i % 28, 1 + i % 6
        wrong = f"2024-{day:02d}-{month:02d}" if day != month else f"2023-{month:02d}-{day:02d}"
        rows.append(
            {
                "prompt": f"Convert {day} {MONTHS[month - 1]} 2024 to ISO.",
                "chosen": f"2024-{month:02d}-{day:02d}",
                "rejected": wrong,
            }
        )
    return rows


def recipe(tmp_path: Path, model_dir: Path, rows: list[dict], **train) -> Path:
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", date_pairs(8, 24))
    spec = {
        "model": {"path": str(model_dir)},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {
            "path": str(data),
            "format": "preference",
            "max_length": 64,
            "eval_path": str(held),
        },
        "train": {
            "objective": "dpo",
            "max_steps": 6,
            "lr": 5e-3,
            "micro_batch_size": 4,
            "seed": 0,
            "report_to": [],
            **train,
        },
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_chosen_and_rejected_share_the_prompt_tokens_and_only_responses_train():
    tokenizer = build_tokenizer()
    spec = DataSection(path="unused", format="preference", max_length=64)
    from finetune.data.pairs import tokenize_pairs

    messages = {
        "prompt": [{"role": "user", "content": "Convert 3 March 2024 to ISO."}],
        "chosen": [{"role": "assistant", "content": "2024-03-03"}],
        "rejected": [{"role": "assistant", "content": "2024-03-30"}],
        "_row": 2,
    }
    plain = {**date_pairs(1)[0], "_row": 1}
    data = tokenize_pairs([plain, messages], spec, tokenizer, "p.jsonl")
    for pair in data.examples:
        assert isinstance(pair, PairExample)
        assert pair.chosen != pair.rejected
        rendered = tokenizer.decode(pair.prompt + pair.chosen)
        assert rendered.endswith("<|im_end|>\n") and "<|im_start|>assistant\n" in rendered
    # a string prompt and a turn list render the same conversation
    assert (
        data.examples[0].prompt
        == tokenizer(
            "<|im_start|>user\nConvert 1 January 2024 to ISO.<|im_end|>\n<|im_start|>assistant\n",
            add_special_tokens=False,
        )["input_ids"]
    )
    sides = data.chosen_sides.examples[1]
    assert sides.labels[: len(data.examples[1].prompt)] == [-100] * len(data.examples[1].prompt)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "row 2: columns 'chosen' and "),
        ({"prompt": "p", "chosen": "a", "rejected": ""}, "row 2: column 'rejected' is empty"),
        ({"prompt": "p", "chosen": "a"}, "row 2: column 'rejected' is missing"),
        ({"prompt": "x " * 80, "chosen": "a", "rejected": "b"}, "is cut away entirely"),
        (
            {"prompt": MONTHS_PROMPT, "chosen": "2024-01-01 yes", "rejected": "2024-01-01 no"},
            "identical after truncation",
        ),
    ],
)
def test_bad_pairs_are_refused_in_one_line(capsys, tmp_path, tiny_model_dir, row, message):
    path = recipe(tmp_path, tiny_model_dir, [date_pairs(1)[0], row], max_steps=1)
    code, _, err = run_main(capsys, "validate", str(path), "data.max_length=32")
    assert code == 2
    assert "pairs.jsonl row 2" in err and message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_kto_label_must_be_boolean(capsys, tmp_path, tiny_model_dir):
    rows = [{"prompt": "p", "completion": "a", "label": True}]
    rows.append({"prompt": "q", "completion": "b", "label": "yes"})
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    path = recipe(tmp_path, tiny_model_dir, [], objective="kto")
    code, _, err = run_main(
        capsys, "validate", str(path), f"data.path={data}", "data.format=kto", "data.eval_path=null"
    )
    assert code == 2
    assert "kto.jsonl row 2: column 'label' must be true or false" in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.objective=sft"], "data.format preference needs a preference objective"),
        (["train.objective=kto"], "train.objective kto trains on data.format kto"),
        (["train.label_smoothing=0.1"], "train.label_smoothing applies to train.objective dpo"),
        (["adapter.method=prefix"], "cannot train adapter.method prefix"),
        (["data.packing=true"], "data.packing cannot be used with train.objective dpo"),
        (["train.dpo_loss=hinge"], "train.dpo_loss"),
        (
            ["train.objective=orpo", "train.dpo_sft_weight=1"],
            "train.dpo_sft_weight applies to train.objective dpo, not orpo",
        ),
        (["train.dpo_sft_weight=-1"], "train.dpo_sft_weight"),
        (["train.dpo_sft_weight=.nan"], "train.dpo_sft_weight"),
        (
            ["train.objective=orpo", "train.reference=cached"],
            "train.reference cached applies to train.objective dpo or kto; orpo has no",
        ),
    ],
)
def test_bad_objective_settings_are_refused(capsys, tmp_path, tiny_model_dir, overrides, message):
    path = recipe(tmp_path, tiny_model_dir, date_pairs(8))
    code, _, err = run_main(capsys, "validate", str(path), *overrides)
    assert code == 2
    assert message in err


def test_validate_shows_both_sides_and_flags_duplicates_and_overlap(
    capsys, tmp_path, tiny_model_dir
):
    rows = date_pairs(8) + date_pairs(1) + date_pairs(1, 24)  # a repeat, and a held-out pair
    path = recipe(tmp_path, tiny_model_dir, rows)
    code, out, _ = run_main(capsys, "validate", str(path))
    assert code == 0
    assert "chosen: " in out and "rejected: " in out
    assert "⟦2024-01-01" in out and "⟦2024-01-01" in out.split("rejected: ")[0]
    assert "⟦2023-01-01" in out.split("rejected: ")[1]
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    assert "warning" in lines["duplicates"]
    assert "warning" in lines["train/held-out overlap"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_dpo_raises_the_held_out_reward_margin_and_resume_repeats_the_losses(
    capsys, tmp_path, tiny_model_dir
):
    """A few DPO steps with LoRA on the toy dates: held-out reward margin and reward accuracy
    go up from 0; a run stopped at step 2 and resumed gives the uninterrupted losses."""
    # A constant schedule: the run stopped by max_steps=2 then has the same learning rates.
    options = {"save_every": 2, "lr": 2e-2, "schedule": "constant", "max_steps": 4}
    path = recipe(tmp_path, tiny_model_dir, date_pairs(24), **options)
    code, _, err = run_main(capsys, "train", str(path))
    assert code == 0, err
    records = metrics(tmp_path / "run")
    evals = [r for r in records if "eval_loss" in r]
    steps = [r for r in records if "loss" in r and "eval_loss" not in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_reward_margin"] == 0.0
    assert evals[-1]["eval_reward_margin"] > 0.01
    assert evals[-1]["eval_reward_accuracy"] > 0.5
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    for key in ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"):
        assert key in steps[-1]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Held-out preference" in report and "reward accuracy" in report

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    again = recipe(resumed, tiny_model_dir, date_pairs(24), **options)
    assert run_main(capsys, "train", str(again), "train.max_steps=2")[0] == 0
    code, _, err = run_main(capsys, "train", str(again), "--resume")
    assert code == 0, err
    continued = [r for r in metrics(resumed / "run") if "loss" in r and "eval_loss" not in r]
    assert [r["step"] for r in continued] == [1, 2, 3, 4]
    for ours, theirs in zip(continued, steps, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-6)
        assert ours["reward_margin"] == pytest.approx(theirs["reward_margin"], abs=1e-6)


def kto_rows(n: int) -> list[dict]:
    return [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in date_pairs(n)
        for side in ("chosen", "rejected")
    ]


@pytest.mark.parametrize(
    ("objective", "reference"),
    [("dpo", "forward"), ("orpo", "forward"), ("kto", "forward"), ("dpo", "cached"),
     ("kto", "cached")],
)  # fmt: skip
def test_a_preference_runs_estimate_is_within_5pct_of_its_measured_peak(
    capsys, tmp_path, tiny_model_dir, objective, reference
):
    """The report's dry run models the preference step (both sides of each pair, the
    reference's forward without gradients or its cached log-probabilities, KTO's KL
    sequences): within the estimate's goal of the live-tensor peak the CPU run measures,
    as for the token loss."""
    rows = kto_rows(8) if objective == "kto" else date_pairs(16)
    overrides = {"data.format": "kto"} if objective == "kto" else {}
    options = {"objective": objective, "max_steps": 2, "reference": reference}
    path = recipe(tmp_path, tiny_model_dir, rows, **options)
    code, _, err = run_main(
        capsys,
        "train",
        str(path),
        "data.eval_path=null",
        *(f"{k}={v}" for k, v in overrides.items()),
    )
    assert code == 0, err
    memory = json.loads((tmp_path / "run" / "report.json").read_text())["memory"]
    assert memory["estimate"]["setup"]["objective"] == objective
    assert memory["estimate"]["setup"]["reference"] == reference
    measured = memory["measured"]["peak_bytes"]
    print(objective, reference, memory["estimate"]["allocated_bytes"], measured)
    assert memory["estimate"]["allocated_bytes"] == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize(
    ("suffix", "cell", "ok"),
    [(".csv", "true", True), (".csv", "FALSE", True), (".csv", " True ", True),
     (".csv", "yes", False), (".csv", "1", False), (".jsonl", "true", False)],
)  # fmt: skip
def test_a_kto_label_in_a_csv_is_the_word(capsys, tmp_path, tiny_model_dir, suffix, cell, ok):
    """Round 4: a CSV cell is text, so every KTO label in a CSV was refused with 'write a JSON
    boolean', which no CSV can hold. In a CSV the words true and false are the labels; in
    JSON a boolean is still required."""
    rows = [{"prompt": "p", "completion": "a", "label": cell}, {"prompt": "q", "completion": "b"}]
    rows[1]["label"] = "false"
    if suffix == ".csv":
        lines = [
            "prompt,completion,label",
            *(f"{r['prompt']},{r['completion']},{r['label']}" for r in rows),
        ]
        (data := tmp_path / "kto.csv").write_text("\n".join(lines) + "\n")
    else:
        rows[1]["label"] = False
        data = write_jsonl(tmp_path / "kto.jsonl", rows)
    path = recipe(tmp_path, tiny_model_dir, [], objective="kto")
    code, _, err = run_main(
        capsys, "validate", str(path), f"data.path={data}", "data.format=kto", "data.eval_path=null"
    )
    assert (code == 0) == ok, err
    if not ok:
        assert f"kto{suffix} row 1: column 'label' must be true or false" in err, err


def step_losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run) if "loss" in r and "eval_loss" not in r]


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_cached_reference_gives_the_forward_references_losses_and_resume_reuses_it(
    capsys, tmp_path, tiny_model_dir, objective
):
    """train.reference cached: the reference's log-probabilities computed once before the
    first step give the same step losses as its forward pass in every step (fp32); a
    resumed run reads the saved file instead of computing it again."""
    rows = kto_rows(8) if objective == "kto" else date_pairs(16)
    extra = ["data.format=kto"] if objective == "kto" else []
    options = {"objective": objective, "max_steps": 4, "save_every": 2, "schedule": "constant"}
    path = recipe(tmp_path, tiny_model_dir, rows, **options)
    forward, cached = tmp_path / "forward", tmp_path / "cached"
    common = [str(path), "data.eval_path=null", *extra]
    assert run_main(capsys, "train", *common, f"output.dir={forward}")[0] == 0
    code, _, err = run_main(
        capsys, "train", *common, f"output.dir={cached}", "train.reference=cached"
    )
    assert code == 0, err
    assert not (forward / "reference_logps.safetensors").exists()
    assert step_losses(cached) == pytest.approx(step_losses(forward), abs=1e-6)
    assert len(step_losses(cached)) == 4
    if objective == "dpo":  # no reference forward in the step: its temporaries are gone
        peaks = [peak_bytes(run) for run in (cached, forward)]
        assert peaks[0] < peaks[1]

    resumed = tmp_path / "resumed"
    args = [*common, f"output.dir={resumed}", "train.reference=cached"]
    assert run_main(capsys, "train", *args, "train.max_steps=2")[0] == 0
    cache = resumed / "reference_logps.safetensors"
    written = cache.stat().st_mtime_ns
    code, _, err = run_main(capsys, "train", *args, "--resume")
    assert code == 0, err
    assert cache.stat().st_mtime_ns == written  # read, not computed again
    notes = json.loads((resumed / "report.json").read_text())["notes"]
    assert "reference log-probabilities read from reference_logps.safetensors" in notes
    assert step_losses(resumed) == pytest.approx(step_losses(forward), abs=1e-6)
    # A cache of other data (another fingerprint or example count) is not used.
    fingerprint = runs.data_fingerprint(tmp_path / "pairs.jsonl")
    assert reference_cache.read(resumed, fingerprint, len(rows)) is not None
    assert reference_cache.read(resumed, "0" * 64, len(rows)) is None
    assert reference_cache.read(resumed, fingerprint, len(rows) + 1) is None


def peak_bytes(run: Path) -> int:
    return json.loads((run / "report.json").read_text())["memory"]["measured"]["peak_bytes"]


def test_the_estimate_shows_what_the_reference_pass_costs(capsys, tmp_path, tiny_model_dir):
    """finetune estimate of a DPO recipe: the reference's forward costs memory that cached
    log-probabilities save (two dry runs), in every format; the comparison leaves out
    prefix and prompt tuning, which train refuses with a preference objective."""
    path = recipe(tmp_path, tiny_model_dir, date_pairs(8))
    code, out, err = run_main(capsys, "estimate", str(path), "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    costs = data["reference_pass"]
    assert costs["reference_forward_bytes"] > 0
    assert costs["forward_total_bytes"] == data["total_bytes"]
    assert (
        costs["cached_total_bytes"]
        == costs["forward_total_bytes"] - costs["reference_forward_bytes"]
    )
    assert not any(row["method"].startswith(("prefix", "prompt")) for row in data["comparison"])
    code, out, _ = run_main(
        capsys, "estimate", str(path), "--reference", "cached", "--format", "json"
    )
    assert code == 0
    assert json.loads(out)["total_bytes"] == costs["cached_total_bytes"]
    for fmt in ("table", "markdown"):
        code, out, _ = run_main(capsys, "estimate", str(path), "--format", fmt)
        assert code == 0 and "reference forward: +" in out and "prefix, prompt: not shown" in out
    code, out, _ = run_main(
        capsys, "estimate", str(path), "train.objective=sft", "data.format=chat"
    )
    assert code == 0 and "reference forward" not in out and "not shown" not in out
    code, _, err = run_main(
        capsys, "estimate", str(path), "--objective", "orpo", "--reference", "cached"
    )
    assert code == 2
    assert "--reference cached applies to --objective dpo or kto" in err
