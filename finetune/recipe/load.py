"""Reading a recipe: the YAML file, dotted overrides, validation into one line per error,
paths made absolute, and the resolved copy a run writes beside itself."""

from __future__ import annotations

import os
import re
import reprlib
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune.errors import UserError, closest
from finetune.inputs import check_tree_text, dangling, refuse_special, require_clean_text
from finetune.recipe.schema import Recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe file, apply dotted overrides, validate, and resolve relative paths.

    Raises:
        UserError: the file is missing or malformed, a key is unknown, a value is invalid.
    """
    path = Path(path)
    kind = refuse_special(path, "recipe", "a recipe file (.yaml)")
    if kind == "folder":
        raise UserError(f"{path}: is a folder; give a recipe file (.yaml)")
    if kind == "missing":
        raise UserError(f"{path}: recipe file not found{dangling(path)}")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise UserError(
            f"{path}: {path.stat().st_size:,} bytes, too large to be a recipe (at most "
            f"{MAX_RECIPE_BYTES:,}); a recipe names its data, it does not hold it"
        )
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=RecipeLoader)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        if isinstance(err, yaml.constructor.ConstructorError) and "for the tag" in problem:
            # !!python/object/apply:os.system and friends: safe_load never builds objects.
            tag = problem.split("tag", 1)[1].strip().strip("'")
            tag = tag.replace("tag:yaml.org,2002:", "!!")
            raise UserError(
                f"{path}:{where}: the YAML tag {tag} is not allowed; a recipe is plain data "
                "(mappings, lists, strings, numbers) and never runs code"
            ) from None
        raise UserError(f"{path}:{where}: malformed YAML: {problem}") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a recipe; fix the file") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (model, adapter, data, ...)")
    for item in overrides:
        anchor_shell_path(raw, apply_override(raw, item), path.parent)
    check_recipe_text(raw, path)
    recipe = resolve_paths(validate(raw, source=str(path)), path.parent)
    recipe._source = resolved(path)
    return recipe


def check_recipe_text(raw: dict[Any, Any], path: Path) -> None:
    """Every string value of the recipe (overrides applied) is valid text; a column name
    must also display as itself (no bidi or zero-width controls).

    Raises:
        UserError: one line naming the field and the character.
    """
    for section, values in raw.items():
        where = f"{path}: {section}"
        # Keys are the schema's to judge: no valid key holds such a character, and the
        # unknown-key message shows it escaped.
        check_tree_text(values, where, keys=False)
        if isinstance(values, dict):
            for key, value in values.items():
                if str(key).endswith("_column") and isinstance(value, str):
                    require_clean_text(value, f"{where}.{key}", name=True)


# Bounds on what a recipe may expand to. A real recipe is a few hundred nodes, six levels
# deep; YAML aliases can make a 1 kB file expand to a billion strings ("billion laughs"),
# which pydantic and its messages then walk for minutes.
MAX_RECIPE_BYTES = 1_000_000
MAX_NODES = 100_000
MAX_DEPTH = 64


class YamlInt(int):
    """An integer as YAML 1.1 read it, with the text it was written as: where the recipe
    expects a string (a column named 2024, a template 007), the text is used instead."""

    text: str


class YamlFloat(float):
    """A float as YAML read it, with its text (see YamlInt)."""

    text: str


class RecipeLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping, refuses documents whose
    aliases expand past MAX_NODES or nest past MAX_DEPTH, and reads booleans as YAML 1.2
    does: only true and false (a column named `on`, `yes` or `no` stays a string).

    PyYAML keeps the last of two `data:` sections and drops the first without a word.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        check_expansion(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: let SafeLoader say so
                break
            if first != line:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key '{key}' appears twice (lines {first} and {line}); keep one",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        number = YamlInt(super().construct_yaml_int(node))
        number.text = node.value
        return number

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        number = YamlFloat(super().construct_yaml_float(node))
        number.text = node.value
        return number


RecipeLoader.add_constructor("tag:yaml.org,2002:int", RecipeLoader.construct_yaml_int)
RecipeLoader.add_constructor("tag:yaml.org,2002:float", RecipeLoader.construct_yaml_float)
# YAML 1.2 booleans and no timestamps: `on`/`yes`/`no`/`off` and 2024-03-01 stay strings
# (a bool or date field still takes them: pydantic reads "yes" as true, "2024-03-01" as text).
RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if not tag.endswith(("bool", "timestamp"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand past MAX_NODES nodes or nest past MAX_DEPTH,
    counting each alias as the copy it becomes, in time linear in the file.

    Raises:
        yaml.constructor.ConstructorError: said as malformed YAML with its line.
    """
    sizes: dict[int, tuple[int, int]] = {}  # node id: (expanded nodes, depth)

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:
        if depth > MAX_DEPTH:
            refuse(node, f"nested more than {MAX_DEPTH} levels deep")
        if id(node) in sizes:
            return sizes[id(node)]
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        total, deepest = 1, 0
        for child in children:
            size, child_depth = measure(child, depth + 1)
            total, deepest = total + size, max(deepest, child_depth + 1)
            if total > MAX_NODES:
                refuse(node, f"expands to more than {MAX_NODES:,} values (aliases of aliases?)")
        sizes[id(node)] = (total, deepest)
        return total, deepest

    measure(root, 0)


def refuse(node: yaml.Node, problem: str) -> None:
    raise yaml.constructor.ConstructorError(
        None, None, f"{problem}; a recipe is a few sections of plain values", node.start_mark
    )


def validate(raw: dict[str, Any], source: str) -> Recipe:
    """Validate a plain mapping into a `Recipe`, turning pydantic's errors into one line.

    A number where a string belongs (a column named 2024) is used as the text it was
    written as, then validation runs again: YAML's guess is not the user's mistake."""
    for _ in range(MAX_DEPTH):
        try:
            return Recipe.model_validate(raw)
        except ValidationError as err:
            if not use_written_text(raw, err):
                raise UserError(f"{source}: {describe_errors(err)}") from None
    raise AssertionError("unreachable: each pass replaces at least one number")


def has_item(node: Any, part: Any) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def use_written_text(raw: Any, err: ValidationError) -> bool:
    """Replace, in `raw`, each number a string field refused by the text it was written as.
    Returns whether anything was replaced."""
    replaced = False
    for error in err.errors():
        value = error.get("input")
        if error["type"] != "string_type" or not isinstance(value, (YamlInt, YamlFloat)):
            continue
        node, parent, key = raw, None, None
        for part in error["loc"]:  # skipping the union labels pydantic adds ('list[str]')
            if has_item(node, part):
                node, parent, key = node[part], node, part
        if node is value and parent is not None:
            parent[key] = value.text
            replaced = True
    return replaced


# A value shown in a message: bounded, however long the string or deep the list (a
# 4,096-byte path, a list of a billion strings built from YAML aliases).
SHORT = reprlib.Repr()
SHORT.maxstring, SHORT.maxother, SHORT.maxlist, SHORT.maxlevel = 100, 100, 4, 2
# At most this many problems in the one line; the rest are counted.
MAX_SHOWN = 6


def short(value: Any) -> str:
    text = SHORT.repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def describe_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'{suggest_key(e['loc'])}")
        elif e["type"] == "missing":
            parts.append(f"'{loc}' is required")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            if e["type"] == "string_type" and (got is None or isinstance(got, bool)):
                read = "nothing (null)" if got is None else "a boolean"
                msg += f"; YAML reads the bare word as {read}, so quote it"
            shown = f" (got {short(got)})" if loc and not isinstance(got, dict) else ""
            parts.append(f"{loc + ': ' if loc else ''}{msg}{shown}")
    more = f"; and {len(parts) - MAX_SHOWN} more" if len(parts) > MAX_SHOWN else ""
    return "; ".join(parts[:MAX_SHOWN]) + more


def suggest_key(loc: tuple[Any, ...]) -> str:
    """Suggest the closest valid key for an unknown one at `loc`."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return ""
        model = field.annotation
    return closest(str(loc[-1]), list(model.model_fields))


def apply_override(raw: dict[str, Any], item: str) -> list[str]:
    """Apply one `section.key=value` override; the value is parsed as YAML (1e-4, true, [a, b]).
    Returns the key's parts."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise UserError(f"override '{item}': write it as section.key=value, e.g. train.lr=1e-4")
    # Before pydantic sees it: a key with a byte that is not UTF-8 was "Input should be a
    # valid string", naming neither the override nor the byte. (Other odd characters reach
    # the unknown-key message, which shows them escaped.)
    if any("\ud800" <= char <= "\udfff" for char in key):
        require_clean_text(key, f"override key {key.strip()!a}", name=True)
    try:
        value = yaml.load(text, Loader=RecipeLoader) if text.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = text
    if is_text_field(parts) and not read_as_typed(value, text):
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override '{item}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value
    return parts


# The words YAML reads as null: `data.eval_path=null` unsets a field on purpose.
NULL_WORDS = {"null", "Null", "NULL", "~"}


def is_text_field(parts: list[str]) -> bool:
    """Whether `section.key` is a field that holds text (str, or str or None): a path, a
    column name, a template."""
    section = Recipe.model_fields.get(parts[0]) if len(parts) == 2 else None
    model = section.annotation if section is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return False
    field = model.model_fields.get(parts[1])
    if field is None:
        return False
    kinds = typing.get_args(field.annotation) or (field.annotation,)
    kinds = {typing.get_args(k)[0] if typing.get_origin(k) is Annotated else k for k in kinds}
    return str in kinds and kinds <= {str, type(None)}


def read_as_typed(value: Any, text: str) -> bool:
    """Whether YAML's reading of an override's text is what the user typed for a text field.

    Not when YAML made a structure of it (`{prompt}` a mapping, `a: b` one too), dropped a
    part (`runs/exp #2` is `runs/exp` once ` #2` is read as a comment: a fresh run aimed at
    exp #2 replaced exp) or read an anchor as null (`&x`). A quoted string, a null word,
    a boolean and a number stay YAML's: they are explained or used as written later."""
    typed = text.strip()
    if isinstance(value, dict | list):
        return False
    if value is None:
        return typed in NULL_WORDS
    return not isinstance(value, str) or value == typed or typed[:1] in ("'", '"')


# Paths a recipe names relative to its own folder; typed on the command line, relative to
# where the command runs (the shell completed them from there).
INPUT_PATHS = {("data", "path"), ("data", "eval_path"), ("adapter", "init_from"), ("model", "path")}


def anchor_shell_path(raw: dict[str, Any], parts: list[str], recipe_dir: Path) -> None:
    """A relative input path given as an override: made absolute against the current folder
    where it exists there; else left to the recipe's folder if it exists there (a path copied
    from the recipe); else against the current folder, so "not found" names the path the user
    typed. A model.path that exists in neither place stays as typed (a hub id, the embedded
    model's name)."""
    if tuple(parts) not in INPUT_PATHS:
        return
    section, key = parts
    value = raw[section][key]
    if not isinstance(value, str) or not value.strip():
        return
    typed = expanded(value)
    if typed.is_absolute():
        raw[section][key] = str(typed)  # `~/model`: expanded here, as the shell would have
        return
    here = Path.cwd() / typed
    if found(here) or not (section == "model" or found(recipe_dir / typed)):
        raw[section][key] = str(Path(os.path.abspath(here)))


def expanded(value: str) -> Path:
    """`~` and `~user` expanded; a `~user` with no home folder stays as typed, so the check
    that reads the path names it as not found."""
    try:
        return Path(value).expanduser()
    except RuntimeError:
        return Path(value)


def found(path: Path) -> bool:
    """Exists, for a path that may be anything a user typed (a NUL byte, 5,000 characters):
    the check that uses it later says what is wrong with it."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def resolved(path: Path) -> Path:
    """`path` absolute with its links followed; a link loop (Path.resolve raises RuntimeError
    on one before Python 3.13) stays as written, for the check that reads it to name."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Make recipe-relative paths absolute so the resolved recipe works from anywhere."""

    def resolve(value: str | None) -> str | None:
        if not value:
            return value
        candidate = expanded(value)
        return str(candidate if candidate.is_absolute() else resolved(base / candidate))

    data = recipe.data.model_copy(
        update={
            "path": resolve(recipe.data.path),
            "eval_path": resolve(recipe.data.eval_path),
        }
    )
    model_path = recipe.model.path
    if found(base / model_path):
        model_path = str(resolved(base / model_path))
    model = recipe.model.model_copy(update={"path": model_path})
    adapter = recipe.adapter.model_copy(update={"init_from": resolve(recipe.adapter.init_from)})
    return recipe.model_copy(update={"data": data, "model": model, "adapter": adapter})


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML, every default written out."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
