"""Property: `finetune validate` on any recipe and any data file either succeeds or ends with
exit code 2 and one line on stderr: never a traceback, another exit code, or a hang.

Recipes are drawn from the schema itself: every field of every section gets, at random,
nothing, its default, one of its choices, or an arbitrary value (ints of any size, floats
including nan, inf and huge ones, strings, lists, nulls, booleans). The data file holds
arbitrary bytes, or rows that are almost right, under every supported extension.
"""

from __future__ import annotations

import signal
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.cli import main
from finetune.recipe import Recipe

# One validate should take a second or two; this is far above that and far below forever.
HANG_SECONDS = 30
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2**63, 2**64, 1e308, -0.0, 0.5, 1.0]),
    TEXT,
    st.lists(TEXT, max_size=3),
    st.dictionaries(TEXT, st.integers(), max_size=2),
)
ROW = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(TEXT, st.integers(), st.none()),
        "response": st.one_of(TEXT, st.integers(), st.none(), st.lists(TEXT, max_size=2)),
        "text": TEXT,
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "assistant", "system", "bot"]), "content": TEXT}
            ),
            max_size=3,
        ),
    },
)


def choices(annotation: typing.Any) -> list[typing.Any]:
    """The values a Literal (possibly inside a union) allows."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [c for arg in typing.get_args(annotation) for c in choices(arg)]


def field_values(field: typing.Any) -> st.SearchStrategy:
    options = [ANY_VALUE]
    if field.default is not None and not callable(field.default):
        options.append(st.just(field.default))
    if choices(field.annotation):
        options.append(st.sampled_from(choices(field.annotation)))
    return st.one_of(*options)


def section(model: type) -> st.SearchStrategy:
    fields = {name: field_values(f) for name, f in model.model_fields.items()}
    return st.fixed_dictionaries({}, optional=fields)


RECIPE = st.fixed_dictionaries(
    {name: section(f.annotation) for name, f in Recipe.model_fields.items() if name != "data"},
)
DATA_BYTES = st.one_of(
    st.binary(max_size=300),
    st.lists(ROW, min_size=1, max_size=4).map(
        lambda rows: "".join(yaml.safe_dump(r, default_flow_style=True) for r in rows).encode()
    ),
    st.lists(ROW, min_size=1, max_size=4).map(
        lambda rows: "\n".join(__import__("json").dumps(r) for r in rows).encode()
    ),
)


def _hang(signum: int, frame: typing.Any) -> None:
    raise TimeoutError(f"validate ran longer than {HANG_SECONDS} s")


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    recipe=RECIPE,
    data_fields=section(Recipe.model_fields["data"].annotation),
    data_bytes=DATA_BYTES,
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]),
    real_model=st.booleans(),
    real_data=st.booleans(),
)
def test_validate_succeeds_or_fails_in_one_line(
    capsys,
    tiny_model_dir,
    monkeypatch,
    recipe,
    data_fields,
    data_bytes,
    suffix,
    real_model,
    real_data,
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub-like model.path must never go online
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / f"data{suffix}"
        data_file.write_bytes(data_bytes)
        recipe = {**recipe, "data": dict(data_fields)}
        if real_data or "path" not in recipe["data"]:
            recipe["data"]["path"] = str(data_file)
        if real_model or "path" not in recipe.get("model", {}):
            # Never the embedded default: converting it takes half a minute.
            recipe["model"] = {**recipe.get("model", {}), "path": str(tiny_model_dir)}
        recipe_file = Path(tmp) / "recipe.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        capsys.readouterr()
        previous = signal.signal(signal.SIGALRM, _hang)
        signal.alarm(HANG_SECONDS)
        try:
            main(["validate", str(recipe_file)])
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err.strip()
    assert code in (0, 2), f"exit {code}: {err}"
    assert "Traceback" not in err, err
    if code == 2:
        assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize("value", ["nan", ".inf", "-.inf", "1e400"])
def test_no_float_field_takes_a_non_finite_value(value, tmp_path):
    """Every float field of every section, by the schema's own list of fields."""
    from finetune.errors import UserError
    from finetune.recipe import validate

    for name, info in Recipe.model_fields.items():
        for key, field in info.annotation.model_fields.items():
            if float not in (field.annotation, *typing.get_args(field.annotation)):
                continue
            raw = {"data": {"path": "x.jsonl"}, name: {key: yaml.safe_load(value)}}
            with pytest.raises(UserError, match=f"{name}.{key}"):
                validate(raw, source="r.yaml")
