"""Reliability: a run killed with SIGKILL anywhere resumes to the same result, divergence
stops cleanly or skips, and checkpoints are pruned only after a new one is complete."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_main
from safetensors.torch import load_file

from finetune.cli import main
from finetune.memory.render import METHODS_LEFT_OUT
from finetune.recipe import load_recipe
from finetune.report import exact_match_section, write_report
from finetune.runs import (
    MetricsWriter,
    exact_match_record,
    read_exact_match,
    read_records,
    read_report,
)
from finetune.train import train

STEPS = 12
TRAIN = {
    "max_steps": STEPS,
    "save_every": 4,
    "grad_accum": 2,
    "micro_batch_size": 3,
    "lr": 5e-3,
    "log_every": 1,
}


def start(recipe: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "finetune", "train", str(recipe), *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r["loss"] for r in records if "loss" in r]


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL the process as soon as `ready()` is true; False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.0005)
    proc.kill()
    raise AssertionError("kill point never reached")


def steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def checkpoint_names(run: Path, hidden: bool = False) -> list[str]:
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return [p.name for p in folder.iterdir() if p.name.startswith(".") == hidden]


KILL_POINTS = {
    "before the first checkpoint": lambda run: steps_logged(run) >= 2 and not checkpoint_names(run),
    "just after a checkpoint": lambda run: "step-4" in checkpoint_names(run),
    "during a checkpoint write": lambda run: bool(checkpoint_names(run, hidden=True)),
    "mid run, after two checkpoints": lambda run: steps_logged(run) >= 9,
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """An uninterrupted run, in a subprocess like the killed ones."""
    import yaml
    from helpers import date_rows, write_jsonl

    folder = tmp_path_factory.mktemp("reference")
    data = write_jsonl(folder / "train.jsonl", date_rows(30))
    recipe = {
        "model": {"path": str(tiny_model_dir)},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"path": str(data), "template": "{prompt} ", "max_length": 64},
        "train": TRAIN,
        "output": {"dir": str(folder / "run")},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    finish(start(path))
    return recipe, folder / "run"


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_matches_an_uninterrupted_run(point, reference, tmp_path):
    import yaml

    recipe, reference_run = reference
    run = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output": {"dir": str(run)}}))
    for _attempt in range(5):  # a checkpoint write lasts milliseconds: try until we land in one
        proc = start(path, "output.overwrite=true")
        assert kill_when(proc, lambda: KILL_POINTS[point](run)), "run ended before the kill"
        if point != "during a checkpoint write" or checkpoint_names(run, hidden=True):
            break
    else:
        pytest.fail("never caught a checkpoint write in progress")
    assert not (run / "adapter").exists()  # the run really was cut short
    finish(start(path, "--resume"))

    assert losses(run) == losses(reference_run)  # bitwise, per step
    ours = load_file(run / "adapter" / "adapter_model.safetensors")
    theirs = load_file(reference_run / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) == 0.0
    assert checkpoint_names(run, hidden=True) == []  # leftovers of the killed write are gone
    # The widest micro-batches the loop recorded before the kill come back with the
    # checkpoint: the report estimates the same shapes as the uninterrupted run's.
    assert read_report(run).estimated_setup == read_report(reference_run).estimated_setup


def poisoned_model(tiny_model_dir: Path, tmp_path: Path, token: str) -> tuple[Path, int]:
    """A copy of the tiny model whose embedding row for `token` is NaN: any batch holding that
    token has a NaN loss, the others are fine (like a corrupt row in real weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    token_id = tokenizer(token, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        model.get_input_embeddings().weight[token_id] = float("nan")
    folder = tmp_path / "poisoned"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, token_id


def poisoned_data(tmp_path: Path) -> Path:
    from helpers import date_rows, write_jsonl

    rows = date_rows(12)
    rows[5]["prompt"] = "Convert ☃ " + rows[5]["prompt"]  # only this row holds the poisoned token
    return write_jsonl(tmp_path / "train.jsonl", rows)


def test_divergence_stops_naming_the_step_and_keeps_the_checkpoint(
    capsys, recipe_file, tiny_model_dir, tmp_path
):
    model, _ = poisoned_model(tiny_model_dir, tmp_path, "☃")
    path = recipe_file(
        model={"path": str(model)},
        data={"path": str(poisoned_data(tmp_path)), "shuffle": False},
        train={"micro_batch_size": 2, "max_steps": 6, "save_every": 1},
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert "error: training diverged at step 3" in err  # rows 5-6 form the third micro-batch
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    report = json.loads((run / "report.json").read_text())
    assert report["stopped"].startswith("training diverged at step 3")
    weights = load_file(run / "checkpoints" / "step-2" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_skip_goes_past_the_bad_batch(recipe_file, tiny_model_dir, tmp_path):
    model, _ = poisoned_model(tiny_model_dir, tmp_path, "☃")
    path = recipe_file(
        model={"path": str(model)},
        data={"path": str(poisoned_data(tmp_path)), "shuffle": False},
        train={"micro_batch_size": 2, "max_steps": 9, "on_nonfinite": "skip"},
    )
    result = train(load_recipe(path))
    assert result.stopped is None and result.state.step == 9
    # 6 micro-batches an epoch, unshuffled: the bad one is the 3rd of each epoch.
    assert [r["step"] for r in result.history if r.get("skipped")] == [3, 9]
    final = result.prepared.model
    assert all(torch.isfinite(p).all() for p in final.parameters() if p.requires_grad)


def test_keep_last_prunes_old_checkpoints(recipe_file, tmp_path):
    path = recipe_file(train={"max_steps": 6, "save_every": 1, "keep_last": 2})
    train(load_recipe(path))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-5", "step-6"]


# ------------------------------------------------------------------ Ctrl-C and SIGTERM


def signal_when(proc: subprocess.Popen, ready, signum: int, twice: bool = False) -> str:
    """Send `signum` (twice: a second one 50 ms later) once `ready()`; return stderr."""
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, "the run ended before the signal point"
        assert time.monotonic() < deadline, "signal point never reached"
        time.sleep(0.0005)
    proc.send_signal(signum)
    if twice:
        time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return err


SIGNAL_POINTS = {
    "before the first checkpoint": lambda run: steps_logged(run) >= 2 and not checkpoint_names(run),
    "just after a checkpoint": lambda run: "step-4" in checkpoint_names(run),
    "mid run, after two checkpoints": lambda run: steps_logged(run) >= 9,
}
SIGNAL_CASES = [
    (signal.SIGINT, "before the first checkpoint"),
    (signal.SIGINT, "just after a checkpoint"),
    (signal.SIGINT, "mid run, after two checkpoints"),
    (signal.SIGTERM, "before the first checkpoint"),
    (signal.SIGTERM, "mid run, after two checkpoints"),
]


@pytest.mark.parametrize(("signum", "point"), SIGNAL_CASES, ids=lambda v: getattr(v, "name", v))
def test_signal_saves_stops_and_resumes_exactly(signum, point, reference, tmp_path):
    import yaml

    recipe, reference_run = reference
    run = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output": {"dir": str(run)}}))
    proc = start(path, "output.overwrite=true")
    err = signal_when(proc, lambda: SIGNAL_POINTS[point](run), signum)

    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err
    report = json.loads((run / "report.json").read_text())
    step = report["interrupted"]["step"]
    assert report["interrupted"]["reason"] == f"interrupted by {signum.name}"
    assert 0 < step < STEPS
    assert f"step-{step}" in checkpoint_names(run)  # a checkpoint at the step it stopped
    assert f"continue with: finetune train {path} output.overwrite=true --resume" in err
    assert not (run / "adapter").exists()
    assert checkpoint_names(run, hidden=True) == [] and not (run / ".lock").exists()
    # No seven dry runs while a scheduler waits to kill the process; the resumed run has them.
    assert METHODS_LEFT_OUT in (run / "report.md").read_text()
    assert "| method |" not in (run / "report.md").read_text()

    finish(start(path, "--resume"))
    assert losses(run) == losses(reference_run)  # bitwise, per step
    assert "| method |" in (run / "report.md").read_text()
    ours = load_file(run / "adapter" / "adapter_model.safetensors")
    theirs = load_file(reference_run / "adapter" / "adapter_model.safetensors")
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in theirs) == 0.0


def test_second_ctrl_c_stops_at_once_and_leaves_only_complete_checkpoints(reference, tmp_path):
    import yaml

    from finetune.runs import list_checkpoints, read_checkpoint

    recipe, reference_run = reference
    run = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output": {"dir": str(run)}}))
    proc = start(path)
    err = signal_when(proc, lambda: steps_logged(run) >= 5, signal.SIGINT, twice=True)

    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    for checkpoint in list_checkpoints(run):
        read_checkpoint(checkpoint)  # every checkpoint there is complete and loads
    finish(start(path, "--resume"))
    assert losses(run) == losses(reference_run)
    assert checkpoint_names(run, hidden=True) == []


def test_max_time_stops_with_a_checkpoint_and_resume_carries_on(recipe_file, tmp_path):
    """The budget includes loading the model; the run stops before the step that would
    overrun it, and --resume carries on exactly as a run without a budget. A constant
    schedule makes the learning rate independent of max_steps, so the resumed run may be
    given its end after the budget decided where the first part stopped."""
    long = {**TRAIN, "max_steps": 5000, "save_every": 0, "schedule": "constant"}
    budget = recipe_file("budget.yaml", train={**long, "max_time": "10s"})

    started = time.monotonic()
    result = train(load_recipe(budget))
    took = time.monotonic() - started
    assert result.interrupted == "stopped by train.max_time (10s)" and result.exit_code == 0
    stopped_at = result.state.step
    assert 0 < stopped_at < 5000 and took < 10 + 10  # near the budget, not 5000 steps later
    run = tmp_path / "run"
    assert checkpoint_names(run) == [f"step-{stopped_at}"]
    assert not (run / "adapter").exists()

    end = f"train.max_steps={stopped_at + 3}"
    train(load_recipe(budget, ["train.max_time=1h", end]), resume=True)
    whole = recipe_file("whole.yaml", train=long, output={"dir": str(tmp_path / "whole")})
    train(load_recipe(whole, [end]))
    assert losses(run) == losses(tmp_path / "whole")
    assert (run / "adapter").is_dir()


def test_a_paused_run_keeps_its_exact_match_before_training(recipe_file, tmp_path):
    """Exact match before training is measured once, by the first session; the paused
    run's report has it (after: not yet), and so has the resumed run's, samples included."""
    long = {**TRAIN, "max_steps": 5000, "save_every": 0, "schedule": "constant"}
    path = recipe_file(
        train={**long, "max_time": "8s"},
        data={"eval_fraction": 0.25},
        eval={"max_examples": 3, "max_new_tokens": 4},
    )
    paused = train(load_recipe(path))
    assert paused.interrupted and paused.exact_match_after is None
    first = exact_match_section(paused)
    assert first["before"] is not None and first["after"] is None
    assert len(first["samples_before"]) == 3
    write_report(paused, 1.0)
    shown = (tmp_path / "run" / "report.md").read_text()
    assert "| after training | n/a (not at the end yet) |" in shown
    end = f"train.max_steps={paused.state.step + 2}"
    resumed = exact_match_section(train(load_recipe(path, ["train.max_time=1h", end]), resume=True))
    assert resumed["before"] == first["before"] and resumed["after"] is not None
    assert resumed["samples_before"] == first["samples_before"]


def test_lines_that_are_not_records_are_passed_over_and_a_restart_records_afresh(tmp_path):
    """A resume read metrics.jsonl's lines as records: a number, an object without a step
    or with a text step ended in a traceback. A run that starts over from step 0 (no
    complete checkpoint) wrote its step-0 records a second time."""
    good = [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.0}]
    lines = ["42", '{"foo": 1}', '{"step": "x", "loss": 1}', '{"step": true}', "[1]", "{"]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join([json.dumps(good[0]), *lines, json.dumps(good[1])]) + "\n")
    assert read_records(tmp_path) == good
    MetricsWriter(tmp_path, True, resume_step=1, report_to=[])
    assert read_records(tmp_path) == good
    MetricsWriter(tmp_path, True, resume_step=0, report_to=[])
    assert metrics.read_text() == ""


def test_an_exact_match_record_edited_out_of_shape_is_passed_over(tmp_path):
    """metrics.jsonl is text people edit: a record missing a field or holding another
    type is not read back as the exact match before training (a traceback at resume)."""
    sample = {"prompt": "p", "reference": "r", "prediction": "x"}
    good = exact_match_record("before", 0, 0.5, correct=1, total=2, samples=[sample])
    bad = [
        {"step": 0, "exact_match_before": "half"},
        {"step": 0, "exact_match_before": 0.5, "exact_match": {"correct": 1}},
        {**good, "exact_match": {**good["exact_match"], "samples": [{"prompt": 1}]}},
        {**good, "exact_match": [1, 2]},
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in [good, *bad]))
    assert read_exact_match(tmp_path, "before") == good
    metrics.write_text("".join(json.dumps(r) + "\n" for r in bad))
    assert read_exact_match(tmp_path, "before") is None


# ------------------------------------------------------------------ one run per directory


def test_one_run_per_directory_and_readers_work_while_it_trains(capsys, reference, tmp_path):
    import yaml
    from helpers import run_cli, run_main

    recipe, _ = reference
    run = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    long = {**TRAIN, "max_steps": 100_000, "save_every": 2}
    path.write_text(yaml.safe_dump({**recipe, "train": long, "output": {"dir": str(run)}}))
    proc = start(path)
    try:
        deadline = time.monotonic() + 120
        while "step-2" not in checkpoint_names(run):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        holder = f"is in use by another finetune run (process {proc.pid} on "
        for extra in (["--resume"], ["output.overwrite=true"]):
            code, _, err = run_main(capsys, "train", str(path), *extra)
            assert code == 2 and holder in err and err.count("\n") == 0, err
        assert "step-2" in checkpoint_names(run)  # the refused runs deleted nothing

        # A reader loads a complete checkpoint while the run goes on writing newer ones.
        adapter = run / "checkpoints" / "step-2" / "adapter"
        answer = run_cli("generate", str(adapter), "Convert 1 May 2020 to ISO 8601", "--raw")
        assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr[-2000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    assert (run / ".lock").exists()  # what the killed run left: stale, as the kernel knows
    latest = max(int(name.removeprefix("step-")) for name in checkpoint_names(run))
    code, _, err = run_main(capsys, "train", str(path), "--resume", f"train.max_steps={latest + 1}")
    assert code == 0, err
    assert (run / "adapter").is_dir() and not (run / ".lock").exists()


def test_the_lock_goes_with_a_run_that_fails_before_writing(capsys, recipe_file, tmp_path):
    from helpers import run_main, write_jsonl

    broken = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "a", "response": "b"}, {"x": 1}])
    path = recipe_file(data={"path": str(broken)})
    code, _, err = run_main(capsys, "train", str(path))
    assert code == 2 and "broken.jsonl" in err and "row 2" in err, err  # found after the lock
    assert not (tmp_path / "run").exists()  # neither the folder nor its lock is left behind


# ------------------------------------------------------------------ --resume refuses, loses nothing


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def resume_refused(capsys, recipe: Path, run: Path, pattern: str, *overrides: str) -> None:
    """`finetune train RECIPE OVERRIDES --resume` ends in one line matching `pattern`, exit 2,
    and the run directory is byte for byte as it was."""
    import re

    before = snapshot(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        main(["train", str(recipe), *overrides, "--resume"])
    err = capsys.readouterr().err.strip()
    assert ended.value.code == 2 and len(err.splitlines()) == 1, err
    assert re.search(pattern, err), err
    assert snapshot(run) == before


@pytest.fixture
def finished_run(recipe_file, tmp_path):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path / "run"
    recipe = recipe_file(train={"max_steps": 4, "save_every": 2}, output={"dir": str(run)})
    train(load_recipe(recipe))
    return recipe, run


def test_resume_never_retrains_a_finished_adapter_without_a_checkpoint(capsys, finished_run):
    """Issue 30: checkpoints/ deleted to save space, then --resume to train longer: it started
    from step 0 and replaced the finished adapter. Also with the folder gone entirely."""
    import shutil

    recipe, run = finished_run
    for step in (run / "checkpoints").iterdir():
        shutil.rmtree(step)
    pattern = r"--resume: .*holds a trained adapter/ but no checkpoint .*adapter\.init_from="
    resume_refused(capsys, recipe, run, pattern, "train.max_steps=8")
    (run / "checkpoints").rmdir()
    resume_refused(capsys, recipe, run, pattern)


def test_resume_of_a_finished_run_changes_nothing_unless_it_is_made_longer(capsys, finished_run):
    recipe, run = finished_run
    resume_refused(capsys, recipe, run, r"is at step 4 of 4; nothing to continue.*max_steps")
    code, _, err = run_main(capsys, "train", str(recipe), "train.max_steps=6", "--resume")
    assert code == 0, err
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").open()]
    assert [s for s in steps if s] == list(range(1, 7))


@pytest.mark.parametrize(
    ("override", "field"),
    [("train.lr=0.001", "train.lr"), ("train.schedule=constant", "train.schedule"),
     ("train.weight_decay=0.5", "train.weight_decay")],
)  # fmt: skip
def test_resume_refuses_optimizer_settings_the_checkpoint_would_ignore(
    capsys, recipe_file, tmp_path, override, field
):
    """The restored optimizer and scheduler keep the old lr (issue 30: train.lr=1e-5 was
    recorded in recipe.yaml and ignored)."""
    import shutil

    run = tmp_path / "run"
    recipe = recipe_file(train={"max_steps": 4, "save_every": 2}, output={"dir": str(run)})
    train(load_recipe(recipe))
    shutil.rmtree(run / "checkpoints" / "step-4")
    resume_refused(capsys, recipe, run, rf"--resume: {field} is .* was made with", override)


def test_resume_refuses_other_data_under_the_same_path(capsys, recipe_file, tmp_path):
    """Issue 30: a different dataset under the same path continued 'at the exact data
    position' (loss 0.6 -> 4.3). One changed character in one row is enough to refuse."""
    import shutil

    run = tmp_path / "run"
    recipe = recipe_file(train={"max_steps": 4, "save_every": 2}, output={"dir": str(run)})
    train(load_recipe(recipe))
    shutil.rmtree(run / "checkpoints" / "step-4")
    data = Path(load_recipe(recipe).data.path)
    rows = data.read_text().splitlines()
    rows[3] = rows[3].replace("2024", "2025", 1)
    data.write_text("\n".join(rows) + "\n")
    resume_refused(capsys, recipe, run, r"--resume: data\.path .* is not the data step-2 was")


def changed(value):
    """Another value of the same JSON type: what a user's edit to that field looks like."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value * 2 + 1
    if isinstance(value, list):
        return [*value, "x"]
    return f"{value}-x" if value is not None else "x"


def every_field(recipe: dict):
    for section in ("model", "adapter", "data", "train"):
        for key in recipe[section]:
            yield section, key


def test_resume_refuses_every_field_but_the_few_that_may_change(tmp_path, recipe_file):
    """Issue 30 round 4: the fields that had to match were listed one by one, so a DPO run
    resumed with train.objective=orpo, another beta or clipping norm was accepted silently.
    Every field of model, adapter, data and train, changed alone, is refused but those in
    RESUME_MAY_CHANGE (a field added later is checked by default)."""
    from types import SimpleNamespace

    import yaml

    from finetune.errors import UserError
    from finetune.runs import RESUME_MAY_CHANGE, check_resumable

    before = load_recipe(recipe_file()).model_dump(mode="json")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "recipe.yaml").write_text(yaml.safe_dump(before))
    for section, key in every_field(before):
        now = json.loads(json.dumps(before))
        now[section][key] = changed(now[section][key])
        recipe = SimpleNamespace(model_dump=lambda mode, now=now: now)
        if key in RESUME_MAY_CHANGE[section]:
            check_resumable(recipe, tmp_path / "old")
            continue
        with pytest.raises(UserError, match=rf"--resume: {section}\.{key} is .* was made with"):
            check_resumable(recipe, tmp_path / "old")
    assert {"objective", "beta", "max_grad_norm", "mixed_precision"} <= set(before["train"])


@pytest.mark.parametrize(
    ("field", "value"), [("train.lr", 0.5), ("train.max_grad_norm", 0.25), ("adapter.alpha", 64.0)]
)
def test_resume_checks_the_checkpoint_not_a_hand_edited_recipe(capsys, finished_run, field, value):
    """Round 4: editing the run's own recipe.yaml (lr 0.005 -> 0.5) and resuming with it
    passed the check, which compared the recipe with that same file: the run trained on at
    the old lr while its record said 0.5. Each checkpoint keeps the recipe it was made with."""
    import yaml

    _, run = finished_run
    own = run / "recipe.yaml"
    fields = yaml.safe_load(own.read_text())
    section, key = field.split(".")
    fields[section][key] = value
    own.write_text(yaml.safe_dump(fields, sort_keys=False))
    pattern = rf"--resume: {section}\.{key} is {value} but the run in .* was made with"
    resume_refused(capsys, own, run, pattern, "train.max_steps=6")


def test_resume_names_the_kind_of_entry_in_the_way(tmp_path):
    """Red-team 5: a file where adapter/ belongs was called "not a regular file", and a
    dangling link the same; each refusal says what the entry is."""
    from finetune.errors import UserError
    from finetune.runs.layout import refuse_entries_of_the_wrong_kind

    cases = {
        "adapter": (
            lambda p: p.write_text("x"),
            "is a file, where the run keeps its adapter folder",
        ),
        "checkpoints": (lambda p: p.symlink_to(tmp_path / "gone"), "which does not exist"),
        "metrics.jsonl": (lambda p: p.mkdir(), "is a folder, where the run keeps its metrics"),
        "loss.png": (lambda p: os.mkfifo(p), "FIFO"),
    }
    for name, (make, words) in cases.items():
        run = tmp_path / f"run-{name}"
        run.mkdir()
        make(run / name)
        with pytest.raises(UserError, match=words):
            refuse_entries_of_the_wrong_kind(run)


def test_a_checkpoint_written_over_a_dangling_link_or_a_link_to_a_folder(tmp_path):
    """Red-team 5: checkpoints/step-2 a dangling link, then --resume from step-1: writing
    step-2 again ended in a NotADirectoryError traceback after the training; a link to a
    folder was replaced but left its `.previous.partial` link behind."""
    from finetune.runs.layout import write_atomically

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes").write_text("mine")
    for name, points_to in (("step-2", tmp_path / "gone"), ("adapter", theirs)):
        target = tmp_path / name
        target.symlink_to(points_to)
        write_atomically(target, lambda tmp: (tmp / "adapter_config.json").write_text("{}"))
        assert target.is_dir() and not target.is_symlink()
        assert (target / "adapter_config.json").is_file()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert (theirs / "notes").read_text() == "mine"  # what a link named is never touched


def test_a_lock_name_taken_by_a_link_or_a_fifo_is_refused_and_nothing_is_written(tmp_path):
    """Red-team 5: `.lock` a link to the user's file: --resume overwrote that file with the
    lock's owner and deleted the link; a dangling link or a FIFO was a traceback."""
    from finetune.errors import UserError
    from finetune.runs.lock import RunLock

    theirs = tmp_path / "theirs.txt"
    theirs.write_text("mine")
    makers = {
        "file-link": lambda p: p.symlink_to(theirs),
        "dangling": lambda p: p.symlink_to(tmp_path / "nowhere" / "x"),
        "fifo": os.mkfifo,
    }
    for name, make in makers.items():
        run = tmp_path / name
        run.mkdir()
        make(run / ".lock")
        lock = RunLock(run)
        lock.clear_stale()
        with pytest.raises(UserError, match=r"\.lock is .*where finetune keeps the run's lock"):
            lock.acquire()
        assert (run / ".lock").is_symlink() or (run / ".lock").exists()
    assert theirs.read_text() == "mine"
