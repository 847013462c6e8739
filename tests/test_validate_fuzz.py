"""Property: `finetune validate` on any recipe and any data file either succeeds or ends with
exit code 2 and one line on stderr: never a traceback, another exit code, or a hang.

Recipes are drawn from the schema itself: every field of every section gets, at random,
nothing, its default, one of its choices, or an arbitrary value (ints of any size, floats
including nan, inf and huge ones, strings, lists, nulls, booleans). The data file holds
arbitrary bytes, or rows that are almost right, under every supported extension.
"""

from __future__ import annotations

import json
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
    if not field.is_required() and field.default is not None:
        options.append(st.just(field.default))
    if choices(field.annotation):
        options.append(st.sampled_from(choices(field.annotation)))
    return st.one_of(*options)


# Every (section, field) of the schema. A recipe changes a few of them at once, so most
# examples get past the schema and reach the data, the tokenizer and the model.
FIELDS = [
    (name, key, field)
    for name, info in Recipe.model_fields.items()
    for key, field in info.annotation.model_fields.items()
]


@st.composite
def recipes(draw: st.DrawFn) -> dict[str, typing.Any]:
    raw: dict[str, typing.Any] = {"data": {}}
    chosen = draw(st.lists(st.sampled_from(range(len(FIELDS))), max_size=4, unique=True))
    for index in chosen:
        name, key, field = FIELDS[index]
        raw.setdefault(name, {})[key] = draw(field_values(field))
    if draw(st.integers(0, 9)) == 0:  # now and then a whole section of the wrong type
        raw[draw(st.sampled_from(list(Recipe.model_fields)))] = draw(ANY_VALUE)
    return raw


WORDS = TEXT.filter(str.strip)
GOOD_ROW = st.fixed_dictionaries({"prompt": WORDS, "response": WORDS})


def jsonl(rows: list[dict[str, typing.Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# (extension, bytes): arbitrary bytes under any extension, rows that are almost right
# (mixed types, missing columns), or rows that are right, so examples get past the data too.
DATA = st.one_of(
    st.tuples(st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]), st.binary(max_size=300)),
    st.tuples(st.just(".jsonl"), st.lists(ROW, min_size=1, max_size=4).map(jsonl)),
    st.tuples(st.just(".jsonl"), st.lists(GOOD_ROW, min_size=1, max_size=4).map(jsonl)),
    st.tuples(
        st.just(".json"), st.lists(GOOD_ROW, min_size=1, max_size=4).map(lambda r: json.dumps(r))
    ).map(lambda pair: (pair[0], pair[1].encode())),
)


def place(recipe: dict[str, typing.Any], name: str, path: str, always: bool) -> None:
    """Point `name`.path at `path` unless the example drew a path of its own."""
    if isinstance(recipe.get(name), dict) and (always or "path" not in recipe[name]):
        recipe[name]["path"] = path
    elif name not in recipe:
        recipe[name] = {"path": path}


def _hang(signum: int, frame: typing.Any) -> None:
    raise TimeoutError(f"validate ran longer than {HANG_SECONDS} s")


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    recipe=recipes(),
    data=DATA,
    real_model=st.booleans(),
    real_data=st.booleans(),
)
def test_validate_succeeds_or_fails_in_one_line(
    capsys, tiny_model_dir, monkeypatch, recipe, data, real_model, real_data
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub-like model.path must never go online
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / f"data{data[0]}"
        data_file.write_bytes(data[1])
        place(recipe, "data", str(data_file), real_data)
        # Never the embedded default model: converting it takes half a minute.
        place(recipe, "model", str(tiny_model_dir), real_model)
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
