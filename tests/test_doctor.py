"""The data doctor (issue 14): every check fires on data built to break it and stays quiet on
the quickstart data; errors and --strict stop validate and train; the length plot; and the
experiment trackers store what metrics.jsonl holds.

The checks run on data tokenized by finetune.data with the tiny tokenizer (no model loads);
the command-line tests use the tiny model.
"""

from __future__ import annotations

import copy
import json

import pytest
from helpers import ROOT, build_tokenizer, date_rows, run_main, write_jsonl

from finetune import doctor
from finetune.data import prepare
from finetune.recipe import Recipe, load_recipe

TOK = build_tokenizer()
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def findings(tmp_path, rows, eval_rows=None, tokenizer=None, **data) -> dict:
    """The doctor's findings on `rows` (and held-out `eval_rows`), by check name."""
    section = {"path": str(write_jsonl(tmp_path / "train.jsonl", rows)), "max_length": 64}
    if eval_rows is not None:
        section["eval_path"] = str(write_jsonl(tmp_path / "test.jsonl", eval_rows))
    recipe = Recipe.model_validate({"data": {**section, **data}})
    tok = tokenizer or TOK
    splits = prepare(recipe.data, tok, seed=0)
    return {f.name: f for f in doctor.diagnose(recipe, tok, splits).findings}


def fired(found: dict) -> dict:
    return {name: f.level for name, f in found.items() if f.level != "ok"}


def with_template(template: str):
    tok = copy.deepcopy(TOK)
    tok.chat_template = template
    return tok


# ------------------------------------------------------------------ quiet on good data


def test_quickstart_data_passes_every_check(tiny_model_dir):
    """The shipped quickstart recipe and data, tokenized with the tiny ChatML tokenizer."""
    recipe = load_recipe(QUICKSTART, [f"model.path={tiny_model_dir}"])
    splits = prepare(recipe.data, TOK, recipe.train.seed)
    found = doctor.diagnose(recipe, TOK, splits).findings
    assert len(found) == len(doctor.CHECKS)
    assert [f.name for f in found if f.level != "ok"] == []
    assert {f.name: f.summary for f in found}["train/held-out overlap"].startswith("60 held-out")


def test_packing_keeps_every_example_whole(tmp_path):
    found = findings(tmp_path, date_rows(24), packing=True, template="Q: {prompt}\nA: ")
    assert found["packing"].level == "ok"
    assert "none split" in found["packing"].summary


# --------------------------------------------------------------- each warning fires


def test_cut_responses_count_the_tokens_lost(tmp_path):
    rows = [*date_rows(8), {"prompt": "Convert it.", "response": "2024-03-03 " * 30}]
    found = findings(tmp_path, rows, template="Q: {prompt}\nA: ", max_length=48)
    assert fired(found) == {"responses cut": "warning", "length outliers": "warning"}
    cut = found["responses cut"]
    assert cut.count == 1 and "row 9" in cut.example
    # Every token past max_length of the trained response is lost; the prompt fits.
    full = len(TOK("2024-03-03 " * 30, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    prompt = len(TOK("Q: Convert it.\nA: ", add_special_tokens=False)["input_ids"])
    assert f"loses {prompt + full - 48} of {full}" in cut.summary


def test_doubled_bos_from_a_template_that_writes_it(tmp_path):
    from tokenizers import processors

    tok = copy.deepcopy(TOK)  # a tokenizer that adds BOS itself, as Llama's does
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    found = findings(tmp_path, date_rows(6), tokenizer=tok, template="<s>Q: {prompt}\nA: ")
    assert fired(found) == {"doubled BOS": "warning"}
    assert found["doubled BOS"].count == 6
    quiet = findings(tmp_path, date_rows(6), tokenizer=tok, template="Q: {prompt}\nA: ")
    assert fired(quiet) == {}


def test_missing_eos_under_a_chat_template_without_end_of_turn(tmp_path):
    tok = with_template(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    found = findings(tmp_path, date_rows(6), tokenizer=tok)
    assert fired(found) == {"EOS after response": "warning"}
    assert found["EOS after response"].count == 6


def test_template_that_trains_everything_or_nothing(tmp_path):
    only_assistant = with_template(
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}<|im_end|>"
        "{% endif %}{% endfor %}"
    )
    found = findings(tmp_path, date_rows(6), tokenizer=only_assistant)
    assert fired(found) == {"template masking": "warning"}
    assert "every token trained" in found["template masking"].summary

    only_user = with_template(
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}<|im_end|>"
        "{% endif %}{% endfor %}"
    )
    found = findings(tmp_path, date_rows(6), tokenizer=only_user)
    assert fired(found) == {"zero trained tokens": "error", "template masking": "error"}
    assert "no token of any example is trained" in found["template masking"].line("x")


def test_duplicates_exact_and_up_to_case_and_spacing(tmp_path):
    rows = date_rows(6)
    rows += [dict(rows[1]), {"prompt": "  " + rows[2]["prompt"].upper(), "response": "2024-03-03"}]
    found = findings(tmp_path, rows)
    assert fired(found) == {"duplicates": "warning"}
    assert found["duplicates"].summary == "1 exact, 1 differing only in case or spacing"
    assert found["duplicates"].example == "train.jsonl row 7 repeats row 2"


def test_held_out_overlap_warns_and_an_identical_set_is_an_error(tmp_path):
    rows = date_rows(12)
    leaked = [rows[0], {"prompt": rows[1]["prompt"], "response": "other"}, *date_rows(2, 20)]
    found = findings(tmp_path, rows, eval_rows=leaked)
    assert fired(found) == {"train/held-out overlap": "warning"}
    assert found["train/held-out overlap"].summary == "1 identical, 1 same prompt, of 4"
    found = findings(tmp_path, rows, eval_rows=rows[:3])
    assert fired(found) == {"train/held-out overlap": "error"}


def test_empty_looking_fields(tmp_path):
    rows = [*date_rows(6), {"prompt": "\u200b\u200b", "response": "x"}]
    rows.append({"prompt": "Convert 9 May 2024.", "response": "NaN"})
    found = findings(tmp_path, rows)
    assert fired(found) == {"empty fields": "warning"}
    assert found["empty fields"].count == 2


def test_response_column_that_is_the_prompt_column(tmp_path):
    found = findings(tmp_path, date_rows(6), response_column="prompt")
    assert fired(found) == {"response repeats prompt": "warning"}
    assert found["response repeats prompt"].summary == "6 of 6 responses"


def test_length_outliers(tmp_path):
    rows = [*date_rows(10), {"prompt": "the quick brown fox " * 30, "response": "2024-03-03"}]
    found = findings(tmp_path, rows, max_length=512)
    assert fired(found) == {"length outliers": "warning"}
    assert "row 11" in found["length outliers"].example


# ----------------------------------------------------------------- the command line


def test_validate_table_strict_and_plot(capsys, tmp_path, recipe_file):
    rows = [*date_rows(8), date_rows(1)[0]]
    recipe = recipe_file(data={"path": str(write_jsonl(tmp_path / "d.jsonl", rows))})
    code, out, err = run_main(capsys, "validate", str(recipe), "--plot", str(tmp_path / "l.png"))
    assert code == 0, err
    assert "duplicates" in out and "d.jsonl row 9 repeats row 1" in out
    assert "Fix: remove the repeated rows" in out
    assert (tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = run_main(capsys, "validate", str(recipe), "--strict")
    assert code == 2
    assert "duplicates: 1 exact" in err and "--strict makes data warnings errors" in err


def test_train_notes_warnings_once_skips_exact_match_and_fills_trackers(
    capsys, tmp_path, recipe_file, monkeypatch
):
    """One short run: a data warning is said once and reported, eval.max_examples 0 skips
    generation, and every tracker that is installed stores what metrics.jsonl holds."""
    import importlib.util

    trackers = ["tensorboard"]
    trackers += [n for n in ("wandb", "mlflow") if importlib.util.find_spec(n) is not None]
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rows = [*date_rows(12), date_rows(1)[0]]
    recipe = recipe_file(
        data={
            "path": str(write_jsonl(tmp_path / "d.jsonl", rows)),
            "eval_path": str(write_jsonl(tmp_path / "e.jsonl", date_rows(4, 40))),
        },
        train={"max_steps": 3, "eval_every": 2, "report_to": trackers},
        eval={"max_examples": 0},
    )
    code, _, err = run_main(capsys, "train", str(recipe))
    assert code == 0, err
    run = tmp_path / "run"
    assert err.count("data check:") == 1 and "duplicates" in err
    assert "exact-match generation skipped" in err
    report = json.loads((run / "report.json").read_text())
    assert any("duplicates" in n for n in report["notes"])
    assert any("exact-match generation skipped" in n for n in report["notes"])
    assert report.get("exact_match") is None
    expected = metrics_by_key(run)
    assert {"loss", "eval_loss", "grad_norm"} <= set(expected)
    for name in trackers:
        assert READERS[name](run) == expected, name


def metrics_by_key(run) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {key: [(step, value), ...]}, the numbers trackers receive."""
    found: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                found.setdefault(key, []).append((record["step"], pytest.approx(float(value))))
    return found


def read_tensorboard(run) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def read_wandb(run) -> dict:
    """The offline run's transaction log, read back by wandb's own inspector."""
    import subprocess
    import sys

    (log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)]
    lines = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    found: dict[str, list] = {}
    for line in lines.splitlines():
        record = json.loads(line)
        if record.get("type") != "history":
            continue
        items = record["history"]["item"]
        for key, value in items.items():
            if not key.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                found.setdefault(key, []).append((items["_step"], value))
    return found


def read_mlflow(run) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run / "mlruns").as_uri())
    (stored,) = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])
    history = client.get_metric_history
    return {
        key: sorted((m.step, m.value) for m in history(stored.info.run_id, key))
        for key in stored.data.metrics
    }


READERS = {"tensorboard": read_tensorboard, "wandb": read_wandb, "mlflow": read_mlflow}


@pytest.mark.slow
def test_quickstart_passes_strict_validate_with_the_embedded_tokenizer(cli):
    proc = cli("validate", str(QUICKSTART), "--strict", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data checks" in proc.stdout
    assert "warning" not in proc.stdout and "error" not in proc.stdout
