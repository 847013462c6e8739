"""The estimate against runs measured on a GPU (an H200: benchmarks/gpu_cases/), re-estimated
here by benchmarks/memory_gpu.py from each run's recorded setup. The dry run is
deterministic, so the bounds cannot flake; a change to the estimator that moves a case
past them fails here."""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "benchmarks" / "gpu_cases"


def memory_gpu():
    spec = importlib.util.spec_from_file_location("memory_gpu", ROOT / "benchmarks/memory_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# The goal: 3% of max allocated, 5% of max reserved, in every case. int8 on CUDA keeps the
# input columns holding an outlier (|x| >= 6) for backward, which depends on weights and
# data the dry run does not have (docs/memory.md, Known gaps): 0.44 GB of the 7B body's
# 14.44 GB with random weights (-3.1%); half a point more is allowed there, no more.
ALLOCATED, ALLOCATED_INT8_ON_CUDA, RESERVED = 0.03, 0.035, 0.05


@pytest.fixture(scope="module")
def rows():
    bench = memory_gpu()
    cases = bench.find_cases([CASES / "reports"], [CASES / "models"])
    assert len(cases) == 8
    return bench, [bench.estimate(case) for case in cases]


def test_every_measured_gpu_case_is_within_the_goal(rows):
    _, rows = rows
    for row in rows:
        int8 = row.case.setup["quant"] == "int8"
        limit = ALLOCATED_INT8_ON_CUDA if int8 else ALLOCATED
        assert abs(row.allocated_error) <= limit, (row.case.name, row.allocated_error)
        assert abs(row.reserved_error) <= RESERVED, (row.case.name, row.reserved_error)
    assert statistics.median(abs(r.allocated_error) for r in rows) <= 0.02


def test_the_summary_lines_have_the_documented_form(rows):
    bench, rows = rows
    line = bench.summary("allocated", [r.allocated_error for r in rows])
    form = r"allocated: median \|error\| \d+\.\d%, worst [+-]\d+\.\d% over 8 cases"
    assert re.fullmatch(form, line)
    table = bench.table(rows)
    assert len(table) == 2 + 8
    # a markdown table: every line has the header's 8 columns
    assert all(line.startswith("|") and line.count("|") == 9 for line in table)


def report_files(tmp_path, **files):
    folder = tmp_path / "reports"
    folder.mkdir()
    for name, text in files.items():
        (folder / f"{name}.json").write_text(text)
    return folder


CUDA_RUN, LORA = {"device": "cuda:0", "peak_bytes": 1}, {"method": "lora"}
FOLDERS = {
    "missing": lambda tmp: tmp / "missing",
    "file": lambda tmp: (tmp / "file").write_text("not a folder") and tmp / "file",
    "reports": lambda tmp: CASES / "reports",
    "models": lambda tmp: CASES / "models",
    "empty": lambda tmp: (tmp / "empty").mkdir() or tmp / "empty",
    "truncated": lambda tmp: report_files(tmp, x='{"memory": {"measured": '),
    "no-model": lambda tmp: report_files(
        tmp, y=json.dumps({"memory": {"measured": CUDA_RUN, "estimate": {"setup": LORA}}})
    ),
}


@pytest.mark.parametrize(
    ("cases", "models", "expect"),
    [
        ("missing", "models", r"--cases .*missing does not exist; give a folder of finetune"),
        ("file", "models", r"--cases .*file is not a folder; give a folder of finetune"),
        ("reports", "missing", r"--models .*missing does not exist; give a folder of model"),
        ("truncated", "models", r"x\.json: not a readable finetune report \(JSONDecodeError"),
        ("no-model", "models", r"y\.json: not a readable finetune report \(no field 'model'\)"),
        ("reports", "empty", r"\.json: no config folder 'llama7b' under any --models DIR"),
    ],
)
def test_bad_folders_and_reports_end_in_one_line(tmp_path, capsys, cases, models, expect):
    argv = ["--cases", str(FOLDERS[cases](tmp_path)), "--models", str(FOLDERS[models](tmp_path))]
    code = memory_gpu().main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and re.search(expect, err), err
