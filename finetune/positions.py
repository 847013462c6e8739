"""Which positions a step learns from: counted, and scored, in one place.

A causal model predicts token j + 1 at position j, so the first label of a sequence has no
position predicting it, unless prompt tuning's virtual tokens sit in front of the
sequence: the last of them predicts the first label. Training, evaluation, the dry run,
the memory measurement and the report count through these functions, so they agree.

`virtual_tokens` below is the number of positions in front of the sequence
(`finetune.methods.input_virtual_tokens`; 0 for every method but prompt tuning).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from finetune import chunked_loss
from finetune.data import IGNORE_INDEX
from finetune.methods import input_virtual_tokens, method_of_config


def predicted_labels(labels: torch.Tensor, virtual_tokens: int = 0) -> torch.Tensor:
    """The labels some position predicts: every one behind virtual tokens, else all but
    the first of each row."""
    return labels if virtual_tokens else labels[:, 1:]


def count_trained(labels: torch.Tensor, virtual_tokens: int = 0) -> int:
    """Tokens that contribute to the loss of a batch with `labels`."""
    return int((predicted_labels(labels, virtual_tokens) != IGNORE_INDEX).sum())


def logit_positions(labels: torch.Tensor, virtual_tokens: int = 0) -> int:
    """Positions `trained_positions_loss` keeps: those whose next token is trained in any row
    of the batch. Logits are computed at the trained rows of these positions, at most every
    row of each (what the memory estimate counts)."""
    return int((predicted_labels(labels, virtual_tokens) != IGNORE_INDEX).any(dim=0).sum())


def most_logit_positions(seq: int, virtual_tokens: int = 0) -> int:
    """The most positions with logits a sequence of `seq` tokens can have."""
    return seq if virtual_tokens else seq - 1


def trained_positions_loss(
    model: Any, batch: dict[str, Any], n_trained: int, virtual_tokens: int = 0
) -> torch.Tensor:
    """Sum of the token losses of `batch`, divided by the trained tokens of the whole step.

    The vocabulary projection and the fp32 log-softmax are the costliest per-token work of a
    small model (profiled: BENCHMARKS.md), so logits are computed only where a next token is
    trained: the model keeps the positions trained in any row (`logits_to_keep`), and
    `logits_only_at` hands its output head only the rows trained at those. With the prompt
    masked and rows of different lengths that is a fraction of all positions (of the kept
    positions' rows, 39-43% were untrained in BENCHMARKS.md's datasets). Equal to the
    model's own loss with `num_items_in_batch=n_trained` (tested).

    Where the head allows it (`finetune.chunked_loss`), the head's own matmul is skipped and
    the loss is computed a chunk of positions at a time, so the whole logits never exist.

    Prompt tuning puts `virtual_tokens` embeddings in front of the sequence: label j is then
    predicted at position virtual_tokens + j - 1, the first label included.
    """
    # No KV cache: with one, transformers would not build the packed mask.
    first = 0 if virtual_tokens else 1
    targets = batch["labels"][:, first:]
    trained = targets != IGNORE_INDEX
    keep = trained.any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0:
        return model(**batch, use_cache=False, num_items_in_batch=n_trained).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    positions = keep + first + virtual_tokens - 1
    head = output_head(model)
    if head is None:  # no head to hook: logits at every row of the kept positions
        logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits
        labels = targets[:, keep]
    else:
        rows, columns = trained[:, keep].nonzero().unbind(1)  # trained (row, position) pairs
        labels = targets[:, keep][rows, columns]
        if chunked_loss.applies_to(model, head):
            with hidden_states_at(head, rows, columns) as picked:
                model(**inputs, use_cache=False, logits_to_keep=positions)
            return chunked_loss.cross_entropy_sum(picked[0], head, labels) / n_trained
        with logits_only_at(head, rows, columns):
            logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits
    loss = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss / n_trained


def output_head(model: Any) -> Any:
    """The model's output embeddings (its vocabulary projection), through a
    DistributedDataParallel wrapper; None where the model has none to give."""
    parallel = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    inner = model.module if parallel else model
    get = getattr(inner, "get_output_embeddings", None)
    return get() if get is not None else None


@contextlib.contextmanager
def logits_only_at(head: Any, rows: torch.Tensor, columns: torch.Tensor) -> Iterator[None]:
    """While inside, the output `head` sees only the hidden states at (`rows`, `columns`)
    of its input, as one row: the model's logits are then [1, pairs, vocab].

    A hook on the model's own head, not a head of ours: whatever the model does to the
    logits after it (soft-capping, scaling) is elementwise and still done by its own code."""

    def pick(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        picked = hidden[rows.to(hidden.device), columns.to(hidden.device)]
        return (picked.unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def hidden_states_at(head: Any, rows: torch.Tensor, columns: torch.Tensor) -> Iterator[list]:
    """While inside, the output `head` keeps the hidden states at (`rows`, `columns`) of its
    input, [pairs, hidden size], in the list this yields, and computes nothing: the model's
    logits are then empty ([1, pairs, 0]). Its hooks still run (the memory tracker's)."""
    picked: list[torch.Tensor] = []

    def keep(hidden: torch.Tensor) -> torch.Tensor:
        picked.append(hidden[rows.to(hidden.device), columns.to(hidden.device)])
        return hidden.new_empty((1, rows.shape[0], 0))

    # An instance attribute: the class's forward is left alone, and one set on the instance
    # before (the memory dry run's emulated autocast) is put back.
    before = head.__dict__.get("forward")
    head.forward = keep
    try:
        yield picked
    finally:
        if before is None:
            del head.forward
        else:
            head.forward = before


def virtual_tokens_of(model: Any) -> int:
    """The positions `model` puts in front of every sequence: a prompt-tuning peft model's
    virtual tokens while its adapter is on, else 0.

    peft's `disable_adapter()` runs the base model alone for prompt learning and marks it
    with `_adapters_disabled`; then no virtual token is in front.
    """
    config = getattr(model, "active_peft_config", None)
    if config is None or getattr(model, "_adapters_disabled", False):
        return 0
    method = method_of_config({"peft_type": str(getattr(config.peft_type, "value", ""))})
    return input_virtual_tokens(method or "", int(getattr(config, "num_virtual_tokens", 0) or 0))


def widest_shapes(
    batches: list[dict[str, Any]], packed: bool, virtual_tokens: int = 0
) -> dict[str, list[int]]:
    """The widest of `batches` with an attention mask ("masked": packed, or padded) and
    without ("unmasked"): [padded length, logits positions], [0, 0] where there is none.
    What a micro-batch's memory grows with; the report's estimate dry-runs these shapes."""
    widest = {"masked": [0, 0], "unmasked": [0, 0]}
    for batch in batches:
        mask = batch.get("attention_mask")
        masked = packed or (mask is not None and not bool(mask.all()))
        logits = logit_positions(batch["labels"], virtual_tokens)
        kind = widest["masked" if masked else "unmasked"]
        kind[:] = [max(kind[0], batch["labels"].shape[1]), max(kind[1], logits)]
    return widest
