"""Load a run, an adapter folder or a model (see `finetune.targets`) and use it: generate,
chat, eval, and the logit probes merge and export check themselves with.

Before an adapter is attached, the base is checked against the one it was trained on, so a
mismatch is one clear line instead of a size-mismatch traceback from torch.
"""

from __future__ import annotations

import json
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


def attach_adapter(model: Any, adapter_dir: Path, base_label: str) -> Any:
    """Load the adapter in `adapter_dir` onto `model` after checking they belong together.

    Raises:
        UserError: the base is not the one the adapter was trained on.
    """
    from peft import PeftModel

    check_base(adapter_dir, model.config, base_label)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
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
) -> list[str]:
    """Complete each prompt with the run's base plus adapter (or a plain model)."""
    from finetune.evaluate import generate

    for number, prompt in enumerate(prompts, start=1):
        if not prompt.strip():  # nothing to continue from: generate() fails on zero tokens
            raise UserError(f"prompt {number} is empty; give some text to complete")
        require_clean_text(prompt, f"prompt {number}")
    if seed is not None:
        check_number("--seed", seed, ge=0, le=MAX_SEED)
    session = load(resolve_target(given, model))
    if seed is not None:
        torch.manual_seed(seed)
    rendered = [render_prompt(session.tokenizer, p, chat_template) for p in prompts]
    return generate(session.model, session.tokenizer, rendered, max_new_tokens, **(sampling or {}))


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
        require_clean_text(system, "--system")
    session = load(resolve_target(given, model))
    tokenizer = session.tokenizer
    has_template = bool(getattr(tokenizer, "chat_template", None))
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    replies = lines = 0
    while True:
        line = read()
        lines += 1
        if line is None or line.strip() in ("/exit", "/quit"):
            return replies
        line = line.strip()
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
        reply = generate(session.model, tokenizer, [prompt], max_new_tokens, **(sampling or {}))[0]
        messages.append({"role": "assistant", "content": reply})
        write(reply)
        replies += 1


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
    spec = recipe.data if recipe is not None else DataSection(path=data_path)
    update: dict[str, Any] = {"path": data_path, "eval_path": None, "eval_fraction": 0.0}
    if fmt is not None:
        update["format"] = fmt
    spec = spec.model_copy(update=update)
    evaluation = recipe.eval if recipe is not None else EvalSection()
    rows = load_rows(data_path, "--data")
    session = load(target)
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
