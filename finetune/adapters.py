"""Attach an adapter to a model, start its virtual tokens, check an adapter to start from,
and count parameters. What each method is (peft's config, mergeable, virtual tokens) is
`finetune.methods`' table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.inputs import require_file
from finetune.methods import MERGEABLE, METHODS, adapts_modules, build_config, method_of_config
from finetune.recipe import AdapterSection


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({self.percent:.3f}%)"


def attach(
    model: Any,
    spec: AdapterSection,
    *,
    quantized: bool,
    gradient_checkpointing: bool,
    tokenizer_path: Path | str | None = None,
    tokenizer: Any = None,
) -> Any:
    """Wrap `model` in a peft model for `spec` (or load `spec.init_from`'s weights).

    Raises:
        UserError: target modules that match nothing, or an adapter folder that won't load.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        # Upcasts norms/embeddings to fp32 for stable training. Checkpointing as for an
        # unquantized base: without use_reentrant named, torch warned on every command and
        # ran the reentrant variant.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if spec.init_from:
        return load_init_adapter(model, spec)
    check_target_modules(model, spec)
    if spec.target_modules == "all-linear" and spec.method in MERGEABLE:
        spec = spec.model_copy(update={"target_modules": linear_module_names(model)})
    model_type = getattr(model.config, "model_type", None)
    try:
        peft_model = get_peft_model(model, build_config(spec, model_type, tokenizer_path))
    except ValueError as err:
        if "not found in the base model" in str(err) or "Target modules" in str(err):
            raise UserError(unknown_targets_line(model, spec)) from None
        raise
    if spec.method == "prefix" and spec.virtual_init == "text" and spec.prefix_init_text:
        init_prefix_from_text(peft_model, tokenizer, spec.prefix_init_text)
    return peft_model


def with_init_text(spec: AdapterSection, first_prompt: str | None) -> AdapterSection:
    """`spec` with the text its virtual tokens start from filled in: the recipe's, else the
    first training prompt (a text in the task's own words and language)."""
    field = METHODS[spec.method].init_text_field
    if field is None or spec.virtual_init != "text" or getattr(spec, field):
        return spec
    if not (first_prompt and first_prompt.strip()):
        return spec.model_copy(update={"virtual_init": "random"})
    return spec.model_copy(update={field: first_prompt.strip()})


def init_notes(given: AdapterSection, used: AdapterSection) -> list[str]:
    """What the run says about where its virtual tokens start (when the recipe left it)."""
    if given.virtual_init != used.virtual_init:
        return [f"{used.method} tuning starts at random: the first training prompt is empty"]
    field = f"{used.method}_init_text"
    text = getattr(used, field, None)
    if used.virtual_init != "text" or text is None or text == getattr(given, field):
        return []
    shown = text if len(text) <= 60 else text[:57] + "..."
    return [f"{used.method} tuning starts from the first training prompt {shown!r} ({field})"]


def rendered_ids(tokenizer: Any, text: str) -> Any:
    """Token ids of `text` as a system message, the way peft's own KV-prefix initialiser
    renders it (plain text where the tokenizer has no chat template)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "system", "content": text}], tokenize=True, return_dict=False
        )
        if ids and isinstance(ids[0], list):
            ids = ids[0]
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids)


def init_prefix_from_text(model: Any, tokenizer: Any, text: str) -> None:
    """Start the prefix from the base model's own keys and values for `text`.

    The prefix-tuning paper found initialising from real words' activations far better
    than random; a random prefix puts SmolLM2-135M's held-out loss at 6.1 at step 0 (the
    base model's is 0.66). The text is repeated until it is long enough. With
    `prefix_projection` the MLP's output layer is solved (least squares) so that the MLP
    outputs exactly these keys and values, which peft's own initialiser refuses to do.
    """
    import torch
    from peft.tuners.cartridge.utils import prompt_embeddings_from_past_key_values

    config = model.active_peft_config
    n = config.num_virtual_tokens
    unit = rendered_ids(tokenizer, text)
    ids = unit * -(-n // max(1, len(unit)))
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids[:n]], device=device)
    encoder = model.prompt_encoder[model.active_adapter]
    with torch.no_grad(), model.disable_adapter():
        out = model(input_ids=input_ids, use_cache=True)
        target = prompt_embeddings_from_past_key_values(out.past_key_values, num_virtual_tokens=n)
        if config.prefix_projection:
            fit_projection(encoder, target.float())
        else:
            encoder.load_prompt_embeddings(target)


def projection_state(model: Any) -> dict[str, Any] | None:
    """The prefix MLP's own weights, or None for any other adapter.

    peft saves a prefix with `prefix_projection` as the MLP's output only (what inference
    needs), so a checkpoint must keep the MLP beside the adapter for training to go on.
    """
    config = getattr(model, "active_peft_config", None)
    if not getattr(config, "prefix_projection", False):
        return None
    encoder = model.prompt_encoder[model.active_adapter]
    return {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}


def restore_projection(model: Any, state: dict[str, Any]) -> None:
    model.prompt_encoder[model.active_adapter].load_state_dict(state)


def fit_projection(encoder: Any, target: Any) -> None:
    """Set the last layer of the prefix MLP so that it maps the n virtual-token embeddings
    to `target` (n x layers*2*kv): with n at most the MLP's width the hidden states are
    linearly independent and the minimum-norm solution is exact."""
    import torch

    first, act, last = encoder.transform
    hidden = act(first(encoder.embedding.weight)).float()
    bias = target.mean(dim=0)
    weight = torch.linalg.pinv(hidden) @ (target - bias)
    last.weight.copy_(weight.T.to(last.weight.dtype))
    last.bias.copy_(bias.to(last.bias.dtype))


def linear_module_names(model: Any) -> list[str]:
    """Short names of every Linear layer except the output head: what "all-linear" means.

    Resolved here rather than by peft because peft saves IA3's expanded "all-linear" targets
    as full paths, which its own subset check then rejects when the adapter is reloaded.
    """
    import torch

    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    return sorted(names)


def adaptable_modules(model: Any) -> list[str]:
    """Full names of the layers a target name can pick: every Linear layer, the output head
    included, and every embedding (peft adapts both with LoRA)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Embedding)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def picks_a_layer(target: str, modules: list[str]) -> bool:
    """peft's rule for a name in target_modules: a module's full name, or its last parts."""
    return any(name == target or name.endswith("." + target) for name in modules)


def check_target_modules(model: Any, spec: AdapterSection) -> None:
    """Refuse `adapter.target_modules` names that pick no layer of `model` (a real model or
    one built on the meta device from its config: the check before the GPU fit check).

    Raises:
        UserError: one line naming the unknown names and the model's Linear layers.
    """
    if spec.init_from or isinstance(spec.target_modules, str) or not adapts_modules(spec.method):
        return
    modules = adaptable_modules(model)
    if not all(picks_a_layer(target, modules) for target in spec.target_modules):
        raise UserError(unknown_targets_line(model, spec))


def unknown_targets_line(model: Any, spec: AdapterSection) -> str:
    return (
        f"adapter.target_modules {spec.target_modules} match no layer; the Linear layers of "
        f"this model are {', '.join(linear_module_names(model))} (or use all-linear)"
    )


def load_init_adapter(model: Any, spec: AdapterSection) -> Any:
    from peft import PeftModel

    check_init_from(spec)
    return PeftModel.from_pretrained(model, str(spec.init_from), is_trainable=True)


def check_init_from(spec: AdapterSection) -> None:
    """The adapter in `adapter.init_from` must be the one the recipe describes.

    Its weights are loaded as they are, so a different method, rank or target list would
    train that adapter while the run's recipe.yaml records another.

    Raises:
        UserError: no readable adapter_config.json, or a method, r or target that differs.
    """
    if not spec.init_from:
        return
    path = Path(spec.init_from) / "adapter_config.json"
    inside = Path(spec.init_from) / "adapter" / "adapter_config.json"
    if not path.exists() and inside.is_file():  # a run directory: its adapter is one down
        raise UserError(
            f"adapter.init_from: {spec.init_from} is a run directory, not an adapter folder; "
            f"set adapter.init_from={inside.parent}"
        )
    require_file(path, "adapter.init_from", "an adapter folder (with adapter_config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        method = method_of_config(config) or config.get("peft_type")
    except (ValueError, UnicodeDecodeError, RecursionError, AttributeError):
        raise UserError(f"adapter.init_from: {path} is not a valid adapter config") from None
    found = {"method": method}
    if method in ("lora", "dora"):
        found["r"] = config.get("r")
    if method in MERGEABLE and isinstance(spec.target_modules, list):  # all-linear: any
        targets = config.get("target_modules")
        found["target_modules"] = sorted(targets) if isinstance(targets, list) else targets
    targets = sorted(spec.target_modules) if isinstance(spec.target_modules, list) else None
    wanted = {"method": spec.method, "r": spec.r, "target_modules": targets}
    for key, value in found.items():
        if value != wanted[key]:
            raise UserError(
                f"adapter.init_from: {spec.init_from} holds a {method} adapter with {key} "
                f"{value}, but the recipe says adapter.{key} {wanted[key]}; set adapter.{key} "
                "to match, or start without init_from"
            )


def count_parameters(model: Any) -> ParameterCount:
    """Trainable and total parameters as peft counts them (4-bit weights unpacked)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParameterCount(trainable, total)
