"""The real embedded model, SmolLM2-135M-Instruct, for a few steps (marked slow; runs in CI)."""

import json

import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow


def test_embedded_model_trains_a_few_steps(embedded_run):
    run = embedded_run
    report = json.loads((run / "report.json").read_text())
    assert report["model"]["path"] == "smollm2-135m-instruct"
    assert report["adapter"]["total_parameters"] > 134_000_000
    assert report["training"]["steps"] == 4
    assert report["training"]["final_loss"] < report["training"]["first_loss"]
    assert report["exact_match"]["examples"] == 4
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]


def test_validate_shows_the_trained_tokens_of_the_embedded_model(cli):
    proc = cli("validate", str(ROOT / "recipes" / "quickstart.yaml"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train: 500 examples" in proc.stdout
    assert "0 truncated" in proc.stdout
    # The answer and the end-of-turn token are trained; the question is not.
    shown = proc.stdout.split("between ⟦ and ⟧:", 1)[1]
    assert "⟦2010-03-24<|im_end|>" in shown
    assert "⟦" not in shown.split("assistant")[0]
