"""Load a run, an adapter folder or a model (see `finetune.targets`) and use it: generate,
chat, eval, and the logit probes merge and export check themselves with.

Before an adapter is attached, the base is checked against the one it was trained on, so a
mismatch is one clear line instead of a size-mismatch traceback from torch.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune import models
from finetune.errors import UserError
from finetune.inputs import MAX_SEED, check_number, check_path_text, require_clean_text
from finetune.recipe import ModelSection
from finetune.targets import Target, read_adapter_config, resolve_target

# Config fields that must agree between the base an adapter was trained on and the one given.
SHAPE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


@dataclass
class Session:
    """A model ready to generate: the peft model (or plain model), its tokenizer, its target."""

    model: Any
    tokenizer: Any
    target: Target
    loaded: models.LoadedModel


# ------------------------------------------------------------------------ loading


def check_base(adapter_dir: Path, base_config: Any, base_label: str) -> None:
    """Refuse a base whose shape differs from the base named in the adapter's config.

    Raises:
        UserError: a config field (hidden size, layers, vocabulary...) differs.
    """
    named = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    original = Path(str(named)) / "config.json" if named else None
    if original is None or not original.is_file():
        return
    try:
        trained_on = json.loads(original.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return
    for key in SHAPE_FIELDS:
        want, got = trained_on.get(key), getattr(base_config, key, None)
        if want is not None and got is not None and want != got:
            raise UserError(
                f"{adapter_dir}: trained on {named} ({key}={want}), but the base model "
                f"{base_label} has {key}={got}; use the base model the adapter was trained on"
            )


def attach_adapter(
    model: Any, adapter_dir: Path, base_label: str, adapter_name: str = "default"
) -> Any:
    """Load the adapter in `adapter_dir` onto `model` (a plain model, or a PeftModel to add
    `adapter_name` to) after checking they belong together and that it changes something.

    Raises:
        UserError: the base is not the one the adapter was trained on, or the adapter's
            weights file is missing, unreadable, not finite or matches no module.
    """
    from peft import PeftModel

    keys = check_adapter_file(adapter_dir)
    check_base(adapter_dir, model.config, base_label)
    try:
        with warnings.catch_warnings():  # missing keys are checked below, in one line
            warnings.simplefilter("ignore")
            if isinstance(model, PeftModel):
                model.load_adapter(str(adapter_dir), adapter_name=adapter_name)
            else:
                model = PeftModel.from_pretrained(
                    model, str(adapter_dir), adapter_name=adapter_name
                )
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        detail = next(
            (line.strip() for line in str(err).splitlines() if "size mismatch" in line), ""
        )
        raise UserError(
            f"{adapter_dir}: does not fit the base model {base_label} ({detail[:200]}); use the "
            "base model the adapter was trained on"
        ) from None
    except ValueError as err:
        if "not found in the base model" in str(err) or "Target modules" in str(err):
            raise UserError(
                f"{adapter_dir}: its target modules are not in the base model {base_label}; use "
                "the base model the adapter was trained on"
            ) from None
        raise
    check_every_key_used(model, adapter_dir, keys, adapter_name, base_label)
    return model


ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's name; finetune reads no pickles
AGAIN_HINT = "copy the adapter again, or use a checkpoint's adapter (checkpoints/step-N/adapter)"


def check_adapter_file(adapter_dir: Path) -> set[str]:
    """The tensor names in the adapter's weights file, once it is known to be there, readable
    and finite (NaN weights evaluate to loss nan; a merge of them is a broken model).

    Raises:
        UserError: one line naming the file and the fix.
    """
    from safetensors import safe_open

    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        found = (
            "adapter_model.bin, a pickle finetune does not load"
            if (adapter_dir / "adapter_model.bin").is_file()
            else "nothing"
        )
        raise UserError(f"{path}: missing (the folder holds {found}); {AGAIN_HINT}")
    try:
        with safe_open(str(path), "pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if not torch.isfinite(weights.get_tensor(name).float()).all():
                    raise UserError(
                        f"{path}: tensor {name} holds NaN or infinite values; use a "
                        "checkpoint's adapter from before they appeared, or train again"
                    )
            return set(weights.keys())
    except UserError:
        raise
    except Exception as err:  # safetensors raises its own error types for a cut file
        raise UserError(
            f"{path}: not a readable safetensors file, truncated or corrupt "
            f"({models.first_line(err)[:120]}); {AGAIN_HINT}"
        ) from None


def check_every_key_used(
    model: Any, adapter_dir: Path, keys: set[str], adapter_name: str, base_label: str
) -> None:
    """Compare the file's tensors with what peft loaded: a tensor that matches no module is
    silently dropped, and a module without its tensors keeps its initial value (LoRA's B is
    zero), so the adapter would change nothing.

    Raises:
        UserError: some tensors match no module, or some modules got no tensor.
    """
    from peft import get_peft_model_state_dict

    with warnings.catch_warnings():  # it looks for the base's config.json to save embeddings
        warnings.simplefilter("ignore")
        used = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    path = adapter_dir / ADAPTER_WEIGHTS
    unused, missing = sorted(keys - used), sorted(used - keys)
    if unused:
        raise UserError(
            f"{path}: {len(unused)} of its {len(keys)} tensors match no module of the base "
            f"model {base_label} (such as {unused[0]}); use the base model the adapter was "
            "trained on, or an adapter made by finetune or peft for it"
        )
    if missing:
        raise UserError(
            f"{path}: holds no weights for {len(missing)} of the adapter's {len(used)} tensors "
            f"(such as {missing[0]}), which would keep their initial values; {AGAIN_HINT}"
        )


def quiet_loading() -> None:
    """No per-file progress bars from transformers: commands print their own one-line results."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def load(
    target: Target,
    *,
    device: str | None = None,
    with_adapter: bool = True,
    spec: ModelSection | None = None,
) -> Session:
    """Load the target's base (as `spec` says, default the target's) and attach its adapter."""
    spec = spec or target.model
    quiet_loading()
    loaded = models.load_model(spec, device)
    model = loaded.model
    if with_adapter and target.adapter_dir is not None:
        model = attach_adapter(model, target.adapter_dir, spec.path)
    model.eval()
    return Session(model, loaded.tokenizer, target, loaded)


# ------------------------------------------------------------------------ prompts


def render_prompt(tokenizer: Any, prompt: str, chat_template: bool = True) -> str:
    """A user prompt as the model expects it: through the chat template when it has one."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


# ------------------------------------------------------------------------ commands


def sampling_options(
    sample: bool, temperature: float | None, top_p: float | None
) -> dict[str, Any]:
    """generate() keyword arguments: greedy unless sampling is asked for (or implied)."""
    if temperature is not None:  # omitted: greedy decoding
        check_number("--temperature", temperature, gt=0, le=1000)
    if top_p is not None:
        check_number("--top-p", top_p, gt=0, le=1)
    if not (sample or temperature is not None or top_p is not None):
        return {}
    options: dict[str, Any] = {"do_sample": True}
    if temperature is not None:
        options["temperature"] = temperature
    if top_p is not None:
        options["top_p"] = top_p
    return options


def generate_text(
    given: str,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    sampling: dict[str, Any] | None = None,
    chat_template: bool = True,
    model: str | None = None,
    seed: int | None = None,
    notify: Any = None,
) -> list[str]:
    """Complete each prompt with the run's base plus adapter (or a plain model); `notify`
    is told when the answer must be shorter to fit the model's context."""
    from finetune.evaluate import generate

    for number, prompt in enumerate(prompts, start=1):
        require_unicode(prompt, f"prompt {number}")
        if not prompt.strip():  # nothing to continue from: generate() fails on zero tokens
            raise UserError(f"prompt {number} is empty; give some text to complete")
        require_clean_text(prompt, f"prompt {number}")
    if seed is not None:
        check_number("--seed", seed, ge=0, le=MAX_SEED)
    session = load(resolve_target(given, model))
    if seed is not None:
        torch.manual_seed(seed)
    rendered = [render_prompt(session.tokenizer, p, chat_template) for p in prompts]
    max_new_tokens = fit_in_context(session, rendered, max_new_tokens, notify)
    return generate(session.model, session.tokenizer, rendered, max_new_tokens, **(sampling or {}))


def check_system_fits(session: Session, start: list[dict[str, str]]) -> None:
    """Refuse a --system message that alone fills the context: every turn would be skipped.

    Raises:
        UserError: names --system, its length and the context.
    """
    context = context_length(session.model)
    if not start or context is None:
        return
    tokenizer = session.tokenizer
    text = start[0]["content"]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(start, tokenize=False, add_generation_prompt=True)
    length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if length >= context:
        raise UserError(
            f"--system is {length:,} tokens, which fills the model's context of {context:,} "
            "tokens and leaves no room for a conversation; shorten it"
        )


def require_unicode(text: str, what: str) -> None:
    """Refuse text holding bytes that are not UTF-8 (Python keeps them from argv and stdin as
    lone surrogates, which the tokenizer rejects with a TypeError).

    Raises:
        UserError: names the input, the byte and its position.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = ord(text[err.start])
        byte = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
        raise UserError(
            f"{what} is not UTF-8 text ({byte} at character {err.start + 1}); give UTF-8 text"
        ) from None


def context_length(model: Any) -> int | None:
    """The model's context (max_position_embeddings), or None when its config names none."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_max_new_tokens(session: Session, max_new_tokens: int) -> None:
    """Refuse more new tokens than the whole context holds: generation would run for
    minutes past what the model was trained to attend to, printing nothing.

    Raises:
        UserError: --max-new-tokens above the model's context length.
    """
    context = context_length(session.model)
    if context is not None and max_new_tokens > context:
        raise UserError(
            f"--max-new-tokens {max_new_tokens:,} is more than the model's context of "
            f"{context:,} tokens (prompt and answer together); give at most {context}"
        )


def fit_in_context(
    session: Session, rendered: list[str], max_new_tokens: int, notify: Any = None
) -> int:
    """`max_new_tokens`, lowered so the longest prompt and its answer fit the context.

    Raises:
        UserError: a prompt that alone fills the context, or too many new tokens asked.
    """
    check_max_new_tokens(session, max_new_tokens)
    context = context_length(session.model)
    if context is None:
        return max_new_tokens
    lengths = [
        len(session.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in rendered
    ]
    longest = max(lengths)
    if longest >= context:
        number = lengths.index(longest) + 1
        raise UserError(
            f"prompt {number} is {longest:,} tokens, which fills the model's context of "
            f"{context:,} tokens and leaves no room for an answer; shorten it"
        )
    room = context - longest
    if max_new_tokens > room and notify is not None:
        notify(
            f"--max-new-tokens lowered to {room:,}: the prompt ({longest:,} tokens) and the "
            f"answer fill the model's context of {context:,} tokens"
        )
    return min(max_new_tokens, room)


def chat_loop(
    given: str,
    read: Any,
    write: Any,
    *,
    max_new_tokens: int = 128,
    sampling: dict[str, Any] | None = None,
    model: str | None = None,
    system: str | None = None,
    notify: Any = None,
) -> int:
    """An interactive conversation: `read()` returns a user line (None at the end of input),
    `write(text)` shows a reply, `notify(text)` a note from finetune itself (kept apart so it
    is never mistaken for something the model said). `/reset` starts over, `/exit` or end
    of input stops. Returns the number of replies."""
    from finetune.evaluate import generate

    if system is not None:
        require_unicode(system, "--system")  # bytes that are not UTF-8, named as bytes
        require_clean_text(system, "--system")
    session = load(resolve_target(given, model))
    check_max_new_tokens(session, max_new_tokens)
    tokenizer = session.tokenizer
    has_template = bool(getattr(tokenizer, "chat_template", None))
    start = [{"role": "system", "content": system}] if system else []
    check_system_fits(session, start)
    messages = list(start)
    replies = lines = 0
    while True:
        line = read()
        lines += 1
        if line is None or line.strip() in ("/exit", "/quit"):
            return replies
        line = line.strip()
        require_unicode(line, f"chat input line {lines}")
        if not line:
            continue
        require_clean_text(line, f"chat input line {lines}")
        if line == "/reset":
            messages = list(start)
            if notify is not None:
                notify("(conversation reset)")
            continue
        messages.append({"role": "user", "content": line})
        if has_template:
            prompt = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        else:
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        try:
            budget = fit_in_context(session, [prompt], max_new_tokens, notify)
        except UserError:  # the conversation outgrew the context: this turn is not taken
            messages.pop()
            if notify is not None:
                notify("(that would not fit the model's context; /reset to start over)")
            continue
        reply = generate(session.model, tokenizer, [prompt], budget, **(sampling or {}))[0]
        messages.append({"role": "assistant", "content": reply})
        write(reply)
        replies += 1


def refuse_preference_format(given: str, fmt: str) -> None:
    """eval scores demonstrations (loss, perplexity, exact match); a run trained on pairs
    or labelled completions reports its held-out preference accuracy in its own report."""
    if fmt in ("preference", "kto"):
        raise UserError(
            f"eval: {given} was trained on data.format {fmt}, and eval scores text, "
            "instruction or chat data; pass --format instruction (or chat, text) with data of "
            "that form, or read the run's held-out preference accuracy in its report.md"
        )


def refuse_preference_rows(data_path: str, rows: list[dict[str, Any]], spec: Any) -> None:
    """Pairs (or labelled completions) given to eval: say so, instead of naming a missing
    column with a data.*_column fix that eval takes no overrides for."""
    needed = {
        "text": (spec.text_column,),
        "instruction": (spec.prompt_column, spec.response_column),
        "chat": (spec.messages_column,),
    }.get(spec.format, ())
    first = rows[0] if rows else {}
    if not needed or all(column in first for column in needed):
        return
    shapes = {
        "preference pairs": (spec.prompt_column, spec.chosen_column, spec.rejected_column),
        "labelled completions (kto)": (
            spec.prompt_column,
            spec.completion_column,
            spec.label_column,
        ),
    }
    for shape, columns in shapes.items():
        if all(column in first for column in columns):
            raise UserError(
                f"eval: {data_path} holds {shape} ({', '.join(columns)}), and eval scores "
                f"{spec.format} data ({', '.join(needed)}); give rows of that form (e.g. each "
                "prompt with its chosen side as the response); a preference run reports its "
                "held-out preference accuracy in its report.md"
            )


def evaluate_target(
    given: str,
    data_path: str,
    *,
    base: bool = False,
    fmt: str | None = None,
    model: str | None = None,
    max_examples: int | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """`finetune eval`: loss, perplexity and exact match of the run (and optionally its base).

    The data format comes from the run's recipe (`fmt` overrides it); for a plain model or an
    adapter without a recipe the defaults of the recipe schema apply.

    Raises:
        UserError: unreadable data, bad format, or `base` asked of a plain model.
    """
    from finetune.data import load_rows
    from finetune.evaluate import evaluate_dataset
    from finetune.recipe import DataSection, EvalSection

    if fmt is not None and fmt not in ("text", "instruction", "chat"):
        raise UserError(f"--format must be text, instruction or chat (got {fmt!r})")
    check_path_text(data_path, "--data")  # before DataSection's own check says it as pydantic
    target = resolve_target(given, model)
    if base and target.adapter_dir is None:
        raise UserError(f"--base: {given} is a model, not a run; it is the base already")
    recipe = target.recipe
    if fmt is None and recipe is not None:
        refuse_preference_format(given, recipe.data.format)
    spec = recipe.data if recipe is not None else DataSection(path=data_path)
    update: dict[str, Any] = {"path": data_path, "eval_path": None, "eval_fraction": 0.0}
    if fmt is not None:
        update["format"] = fmt
    spec = spec.model_copy(update=update)
    evaluation = recipe.eval if recipe is not None else EvalSection()
    rows = load_rows(data_path, "--data")
    refuse_preference_rows(data_path, rows, spec)
    session = load(target)
    if max_new_tokens is not None:
        check_max_new_tokens(session, max_new_tokens)
    options = {
        "max_examples": max_examples or evaluation.max_examples,
        "max_new_tokens": max_new_tokens or evaluation.max_new_tokens,
    }
    result: dict[str, Any] = {
        "target": given,
        "data": data_path,
        "format": spec.format,
        "examples": len(rows),
    }
    name = "adapter" if target.adapter_dir is not None else "model"
    result[name] = evaluate_dataset(
        session.model, session.tokenizer, rows, spec, data_path, label=name, **options
    ).as_dict()
    if base:
        with session.model.disable_adapter():
            result["base"] = evaluate_dataset(
                session.model, session.tokenizer, rows, spec, data_path, label="base", **options
            ).as_dict()
    return result
