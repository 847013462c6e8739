"""A model's config.json with any numeric field given a wrong type or an absurd value:
`estimate` answers quickly or refuses in one line, and whatever `train` refuses (its model
folder check) `estimate` refuses with the same line. Generated over every numeric field of
the tiny model's config.
"""

from __future__ import annotations

import json
import shutil
import signal
import time

import pytest
from helpers import run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.errors import UserError
from finetune.models import check_model_folder

PROPERTY = settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
BAD_VALUES = st.sampled_from(
    ["64", -1, 0, 10**5, 1.5, None, [], True, -0.5, 2**40, float("nan"), float("inf")]
)


@pytest.fixture(scope="module")
def numeric_fields(tiny_model_dir) -> list[str]:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    return sorted(k for k, v in config.items() if isinstance(v, (int, float)) and v is not True)


def _hung(*_: object) -> None:
    raise TimeoutError("estimate ran past 60 seconds")


@PROPERTY
@given(data=st.data(), value=BAD_VALUES)
def test_estimate_refuses_what_train_refuses_with_the_same_line(
    tmp_path_factory, tiny_model_dir, numeric_fields, capsys, data, value
):
    field = data.draw(st.sampled_from(numeric_fields))
    folder = tmp_path_factory.mktemp("model")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    try:
        check_model_folder(folder)
        train_says = None
    except UserError as err:
        train_says = str(err)
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(60)
    start = time.monotonic()
    try:
        code, _, err = run_main(capsys, "estimate", str(folder), "--seq", "16")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert code in (0, 2), err
    assert "Traceback" not in err
    if train_says is not None:
        assert code == 2 and err == f"error: {train_says}", (train_says, err)
    if code == 2:
        assert len(err.splitlines()) == 1 and f"{folder}" in err
    assert time.monotonic() - start < 60


@pytest.mark.parametrize(
    "change, expect",
    [
        ({"num_hidden_layers": 100_000}, "no decoder has more than 1,024"),
        ({"pad_token_id": 100_000}, "pad_token_id is 100,000, outside the vocabulary"),
        ({"hidden_size": 2**40}, "hidden_size is 1,099,511,627,776; no decoder is that wide"),
        ({"num_attention_heads": 0}, "num_attention_heads is 0"),
        ({"hidden_size": "64"}, "expected int, got str"),
        ({"attention_dropout": 1.5}, "a dropout is in \\[0, 1\\)"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps is nan; a config number must be finite"),
        ({"num_key_value_heads": 3}, "must divide num_attention_heads"),
        ({"attention_dropout": None}, "attention_dropout is null; LlamaConfig expects a number"),
        ({"rms_norm_eps": None}, "rms_norm_eps. expected float, got NoneType"),
        ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "an encoder"),
    ],
)
def test_named_config_damage(tmp_path, tiny_model_dir, capsys, change, expect):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = {**json.loads((folder / "config.json").read_text()), **change}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=expect):
        check_model_folder(folder)
    code, _, err = run_main(capsys, "estimate", str(folder), "--seq", "16")
    assert code == 2 and len(err.splitlines()) == 1, err
