"""The recipe schema: shipped recipes load, typos are caught with suggestions, overrides work."""

from pathlib import Path

import pytest
import yaml

from finetune.errors import UserError
from finetune.recipe import Recipe, apply_override, dump_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


def test_some_recipes_are_shipped():
    assert len(SHIPPED) >= 4, SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert Path(recipe.data.path).is_file(), recipe.data.path
    assert recipe.output.dir.startswith("runs/")


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, "data: {path: x.jsonl}\nadpater: {r: 4}\n")
    with pytest.raises(UserError, match=r"unknown key 'adpater' \(did you mean 'adapter'\?\)"):
        load_recipe(path)


def test_unknown_nested_key_suggests(tmp_path):
    path = write(tmp_path, "data: {path: x.jsonl}\ntrain: {learning_rate: 0.1, lr: 0.1}\n")
    with pytest.raises(UserError, match=r"train.learning_rate"):
        load_recipe(path)


def test_wrong_type_names_the_field(tmp_path):
    path = write(tmp_path, "data: {path: x.jsonl}\ntrain: {lr: fast}\n")
    with pytest.raises(UserError, match=r"train\.lr: .*fast"):
        load_recipe(path)


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "data:\n  path: [unclosed\n")
    with pytest.raises(UserError, match=r"r\.yaml: line \d+"):
        load_recipe(path)


def test_missing_data_section(tmp_path):
    with pytest.raises(UserError, match="'data' is required"):
        load_recipe(write(tmp_path, "train: {lr: 0.1}\n"))


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "data: {path: x.jsonl}\n")
    recipe = load_recipe(path, ["train.lr=1e-4", "adapter.r=16", "data.train_on_prompt=true"])
    assert recipe.train.lr == 1e-4 and recipe.adapter.r == 16 and recipe.data.train_on_prompt
    with pytest.raises(UserError, match="adapter.rr"):
        load_recipe(path, ["adapter.rr=16"])
    with pytest.raises(UserError, match="section.key=value"):
        load_recipe(path, ["train.lr"])


def test_override_cannot_descend_into_a_value():
    raw = {"train": {"lr": 0.1}}
    with pytest.raises(UserError, match="'lr' is not a section"):
        apply_override(raw, "train.lr.x=1")


def test_relative_paths_follow_the_recipe_file(tmp_path):
    (tmp_path / "d").mkdir()
    path = write(tmp_path, "data: {path: d/train.jsonl}\n")
    assert load_recipe(path).data.path == str(tmp_path / "d" / "train.jsonl")


def test_contradictory_options_are_refused(tmp_path):
    path = write(tmp_path, "data: {path: x.jsonl, eval_path: y.jsonl, eval_fraction: 0.1}\n")
    with pytest.raises(UserError, match="eval_path or data.eval_fraction"):
        load_recipe(path)


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, "data: {path: x.jsonl}\n"))
    again = Recipe.model_validate(yaml.safe_load(dump_recipe(recipe)))
    # Every field round-trips; only the loaded one knows which file it came from.
    assert again.model_dump() == recipe.model_dump()
    assert again.input_paths()[0] == tmp_path / "x.jsonl" != recipe.input_paths()[0]


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prefix", "prompt"])
def test_unset_lr_and_epochs_follow_the_method_and_the_run_says_so(method, tmp_path):
    from finetune.methods import METHODS

    recipe = load_recipe(
        write(tmp_path, f"data: {{path: x.jsonl}}\nadapter: {{method: {method}}}\n")
    )
    lr, epochs = METHODS[method].lr, METHODS[method].epochs
    assert (recipe.train.lr, recipe.train.epochs) == (lr, epochs)
    assert recipe.method_default_notes() == [
        f"train.lr {lr:g}: the {method} default (set train.lr to choose another)",
        f"train.epochs {epochs:g}: the {method} default (set train.epochs to choose another)",
    ]
    with_steps = load_recipe(
        write(tmp_path, f"data: {{path: x.jsonl}}\nadapter: {{method: {method}}}\n"),
        ["train.max_steps=5"],
    )
    assert [n.split()[0] for n in with_steps.method_default_notes()] == ["train.lr"]
    # The resolved recipe a run writes holds the value; loading it back changes nothing.
    again = load_recipe(write(tmp_path, dump_recipe(recipe)))
    assert again.train.lr == recipe.train.lr and again.method_default_notes() == []


def test_a_set_lr_is_kept_whatever_the_method(tmp_path):
    text = "data: {path: x.jsonl}\nadapter: {method: prompt}\ntrain: {lr: 1.0e-4}\n"
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.train.lr == 1e-4
    assert not [n for n in recipe.method_default_notes() if n.startswith("train.lr")]
    overridden = load_recipe(write(tmp_path, "data: {path: x.jsonl}\n"), ["train.lr=0.05"])
    assert overridden.train.lr == 0.05


def test_prefix_projection_takes_its_own_lr_default(tmp_path):
    from finetune.methods import METHODS, PROJECTION_LR

    text = "data: {path: x.jsonl}\nadapter: {method: prefix, prefix_projection: true}\n"
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.train.lr == PROJECTION_LR < METHODS["prefix"].lr
    assert recipe.method_default_notes()[0] == (
        f"train.lr {PROJECTION_LR:g}: the prefix (with prefix_projection) default "
        "(set train.lr to choose another)"
    )
    set_lr = load_recipe(write(tmp_path, text), ["train.lr=0.02"])
    assert set_lr.train.lr == 0.02


def test_paths_typed_on_the_command_line_follow_the_shell(tmp_path, monkeypatch):
    """Issue 30: `finetune validate recipes/quickstart.yaml data.eval_path=recipes/data/...`
    run from the project root looked in recipes/recipes/data/...: a path typed at the shell
    is relative to where the command runs. One copied from the recipe (that exists only
    beside it) still works; one found nowhere is named as typed, from the current folder."""
    folder = tmp_path / "recipes"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text("{}\n")
    (tmp_path / "held.jsonl").write_text("{}\n")
    (tmp_path / "init").mkdir()
    recipe = folder / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"path": "data/train.jsonl"}}))
    monkeypatch.chdir(tmp_path)
    loaded = load_recipe(
        "recipes/r.yaml",
        ["data.eval_path=held.jsonl", "adapter.init_from=init", "model.path=org/some-model"],
    )
    assert loaded.data.eval_path == str(tmp_path / "held.jsonl")
    assert loaded.adapter.init_from == str(tmp_path / "init")
    assert loaded.model.path == "org/some-model"  # a hub id, not a path here
    assert loaded.data.path == str(folder / "data" / "train.jsonl")  # from the file
    copied = load_recipe("recipes/r.yaml", ["data.path=data/train.jsonl"])
    assert copied.data.path == str(folder / "data" / "train.jsonl")
    missing = load_recipe("recipes/r.yaml", ["data.eval_path=nowhere.jsonl"])
    assert missing.data.eval_path == str(tmp_path / "nowhere.jsonl")
