"""Where the peft and transformers that users get disagree, and finetune's bridge between them.

transformers 5.24 renamed the key/value cache that `generate()` hands to the model from
`past_key_values` to `cache` (the old name is still accepted by `forward`, with a warning,
until 5.40). peft 0.21.2, the newest release, still reads and writes only the old name in
`PeftModelForCausalLM.prepare_inputs_for_generation`, and that breaks generation for the
prompt-learning methods:

- prefix tuning: peft puts the prefix's keys and values under `past_key_values` beside
  generate's own empty `cache`; `forward` keeps `cache` and drops the prefix, so every answer
  is the base model's (held-out loss 2.45 -> 0.22, exact match 0% before and after);
- prompt tuning: peft sees no cache at any step, so it prepends the virtual tokens again at
  every new token, and answers drift from the second token on.

Training and held-out loss are not affected: peft's `forward` passes the prefix as
`past_key_values` with no `cache` beside it, and transformers renames it, with a
FutureWarning at every load. `cache_by_new_name` renames it first, as transformers would,
so the deprecated name never reaches the model (and the warning has no cause).

The bridge shows peft the cache under the name it reads and gives the model back the name it
reads, for one `generate()` call. It is applied only where it is needed (transformers' model
takes `cache`, peft's code reads only `past_key_values`), so a peft that learns the new name
is left alone; tests/test_generate.py checks greedy generation against the adapter's own
forward pass token by token, which catches any version pair where the names disagree again.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any

OLD_NAME, NEW_NAME = "past_key_values", "cache"


def model_takes_new_name(model: Any) -> bool:
    return NEW_NAME in inspect.signature(model.forward).parameters


@functools.cache
def peft_reads_old_name_only() -> bool:
    from peft import PeftModelForCausalLM

    source = inspect.getsource(PeftModelForCausalLM.prepare_inputs_for_generation)
    return f'"{OLD_NAME}"' in source and f'"{NEW_NAME}"' not in source


def needs_bridge(model: Any) -> bool:
    """True for a peft prompt-learning model (prefix, prompt) whose peft and transformers
    name the generation cache differently."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning:
        return False
    if not hasattr(model, "base_model_prepare_inputs_for_generation"):
        return False
    return model_takes_new_name(model.get_base_model()) and peft_reads_old_name_only()


def cache_by_new_name(model: Any) -> Any:
    """Give `model` (a transformers model that takes `cache`) the cache peft passes as
    `past_key_values` under the new name, exactly as transformers' own rename does, before
    its forward runs; a call that gives both names is left to transformers. Returns `model`."""
    if not model_takes_new_name(model):
        return model

    def rename(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if OLD_NAME in kwargs and NEW_NAME not in kwargs:
            kwargs[NEW_NAME] = kwargs.pop(OLD_NAME)
        return args, kwargs

    model.register_forward_pre_hook(rename, with_kwargs=True)
    return model


def renamed(function: Any, old: str, new: str) -> Any:
    """`function`, whose returned dict has key `old` renamed to `new`. functools.wraps keeps the
    signature, which generate() reads to validate its keyword arguments."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = function(*args, **kwargs)
        if old in inputs:
            inputs[new] = inputs.pop(old)
        return inputs

    return call


@contextlib.contextmanager
def generation_bridge(model: Any) -> Iterator[None]:
    """For the calls to `model.generate()` inside: peft's step sees transformers' `cache` as
    `past_key_values` (so it adds the prefix once, at the first step, and prompt tuning's
    virtual tokens once), and the model receives it back as `cache`. The model is as before
    afterwards. Does nothing where `needs_bridge` is false."""
    if not needs_bridge(model):
        yield
        return
    # Instance attributes: peft sets the first in __init__; generate() looks the second up on
    # the instance before the class; peft's generate() points the base model's at the first
    # and leaves it there, so that one is put back as it was too.
    base = model.base_model
    saved = {
        "own": model.__dict__.get("prepare_inputs_for_generation"),
        "base": base.__dict__.get("prepare_inputs_for_generation"),
    }
    inner = model.base_model_prepare_inputs_for_generation
    model.base_model_prepare_inputs_for_generation = renamed(inner, NEW_NAME, OLD_NAME)
    model.prepare_inputs_for_generation = renamed(
        model.prepare_inputs_for_generation, OLD_NAME, NEW_NAME
    )
    try:
        yield
    finally:
        model.base_model_prepare_inputs_for_generation = inner
        put_back(model, saved["own"])
        put_back(base, saved["base"])


def put_back(owner: Any, method: Any) -> None:
    """`owner.prepare_inputs_for_generation` as an instance attribute `method`, or none."""
    if method is not None:
        owner.prepare_inputs_for_generation = method
    elif "prepare_inputs_for_generation" in owner.__dict__:
        del owner.prepare_inputs_for_generation
