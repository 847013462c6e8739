"""YAML structures a recipe may not be: aliases that expand past a bound (billion laughs,
in any field, any width and depth), nesting past a bound, a file too large to be a recipe;
and YAML 1.1's guesses, which must not be blamed on the user: a column named `on`, `yes`,
`2024` or `007` is the text written, and a bare `true` where text belongs is explained.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.errors import UserError
from finetune.recipe import load_recipe

BAD = Path(__file__).resolve().parent / "bad_inputs"
PROPERTY = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
BASE = f"data: {{path: {BAD / 'good.jsonl'}}}\nmodel: {{path: set-by-the-test}}\n"
# Where the expansion lands: a list field, a string field, an unknown key, a whole section.
FIELDS = ["adapter.target_modules", "data.template", "train.trackers", "train.bogus", "eval"]


def laughs(width: int, depth: int, field: str) -> str:
    """`depth` levels of anchors, each a list of `width` aliases of the one before."""
    lines = ["x-anchors:", f"  - &l0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, depth):
        lines.append(f"  - &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    section, _, key = field.partition(".")
    use = f"{section}: {{{key}: *l{depth - 1}}}" if key else f"{section}: *l{depth - 1}"
    return "\n".join(lines) + "\n" + use + "\n"


@PROPERTY
@given(width=st.integers(2, 12), depth=st.integers(2, 12), field=st.sampled_from(FIELDS))
def test_aliases_that_expand_past_the_bound_are_refused_at_once(
    tmp_path_factory, width, depth, field
):
    path = tmp_path_factory.mktemp("y") / "r.yaml"
    path.write_text(BASE + laughs(width, depth, field))
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "\n" not in message and len(message) < 1500  # bounded: six problems, each value cut
    if width**depth > 100_000:
        assert "expands to more than 100,000 values" in message


@pytest.mark.parametrize("depth", [70, 500, 100_000])
def test_deep_nesting_is_refused(tmp_path, depth):
    path = tmp_path / "r.yaml"
    path.write_text(BASE + "train: {trackers: " + "[" * depth + "]" * depth + "}\n")
    with pytest.raises(UserError, match="nested"):
        load_recipe(path)


def test_a_huge_file_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(BASE + "data: {template: '" + "x" * 2_000_000 + "'}\n")
    with pytest.raises(UserError, match="too large to be a recipe"):
        load_recipe(path)


# Words YAML 1.1 reads as something else: booleans, octal, hex, sexagesimal, floats, dates.
WORDS = ["on", "off", "yes", "no", "On", "NO", "y", "2024", "007", "0x1F", "1_000", "1:20"]
WORDS += [".inf", "3.0", "1e5", "2024-03-01"]


@PROPERTY
@given(word=st.sampled_from(WORDS), key=st.sampled_from(["prompt_column", "response_column"]))
def test_a_column_named_like_a_yaml_11_value_is_that_text(tmp_path_factory, word, key):
    path = tmp_path_factory.mktemp("y") / "r.yaml"
    path.write_text(BASE.replace("}\n", f", {key}: {word}}}\n", 1))
    assert getattr(load_recipe(path).data, key) == word
    # ...and the same typed as an override.
    assert getattr(load_recipe(path, [f"data.{key}={word}"]).data, key) == word


@pytest.mark.parametrize("word, read", [("true", "a boolean"), ("null", "nothing")])
def test_a_bare_word_yaml_reads_as_no_text_is_explained(tmp_path, word, read):
    path = tmp_path / "r.yaml"
    path.write_text(BASE.replace("}\n", f", prompt_column: {word}}}\n", 1))
    with pytest.raises(UserError, match=f"data.prompt_column: .*reads the bare word as {read}"):
        load_recipe(path)


def test_booleans_still_read_as_booleans_where_one_belongs(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(BASE.replace("}\n", ", packing: yes}\n", 1))
    assert load_recipe(path).data.packing is True


def text_fields() -> list[str]:
    """Every recipe field that holds text: paths, column names, the template, max_time."""
    from finetune.recipe.load import is_text_field
    from finetune.recipe.schema import Recipe

    names = [
        f"{section}.{key}"
        for section, field in Recipe.model_fields.items()
        for key in getattr(field.annotation, "model_fields", {})
    ]
    return [name for name in names if is_text_field(name.split("."))]


# Text YAML would read as something else: a comment cut off, a mapping, a list, an anchor.
NOT_AS_YAML = ["runs/exp #2", "{prompt}", "Q: {prompt}", "[a, b]", "&x", "a, {b: c} # d"]


@pytest.mark.parametrize("field", text_fields())
@given(
    text=st.sampled_from(NOT_AS_YAML)
    | st.from_regex(r"[a-z]{1,4}( #|: |\{|\[)[a-z]{0,4}", fullmatch=True)
)
@PROPERTY
def test_an_override_of_a_text_field_is_the_text_typed(field, text):
    """Round 4: `output.dir=runs/exp #2 output.overwrite=true` replaced runs/exp (YAML read
    ` #2` as a comment); `data.template={prompt}` was a mapping, refused as 'not a valid
    string'. A text field's override is the text as typed, unless YAML reads it as a
    quoted string, null, a boolean or a number (explained or used as written later)."""
    from finetune.recipe.load import apply_override

    raw: dict = {}
    apply_override(raw, f"{field}={text}")
    section, key = field.split(".")
    assert raw[section][key] == text


@pytest.mark.parametrize(
    ("text", "read"), [("'a #b'", "a #b"), ("null", None), ("~", None), ("true", True), ("7", 7)]
)
def test_an_override_yaml_reads_on_purpose_keeps_that_reading(text, read):
    from finetune.recipe.load import apply_override

    raw: dict = {}
    apply_override(raw, f"data.eval_path={text}")
    assert raw["data"]["eval_path"] == read
