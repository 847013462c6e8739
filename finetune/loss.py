"""The training loss: summed over trained tokens and divided by the trained tokens of the
whole optimizer step, with logits computed only where a trained token is predicted."""

from __future__ import annotations

from typing import Any

import torch

from finetune import data


def count_trained(labels: torch.Tensor, method: str) -> int:
    """Tokens that contribute to the loss after the causal shift.

    Prompt tuning prepends virtual tokens, so even the first real label is predicted.
    """
    if method == "prompt":
        return int((labels != data.IGNORE_INDEX).sum())
    return int((labels[:, 1:] != data.IGNORE_INDEX).sum())


def logits_columns(labels: torch.Tensor, virtual_tokens: int = 0) -> tuple[int, torch.Tensor]:
    """(first, keep): labels from column `first` on are predicted inside the sequence (0 when
    virtual tokens in front predict the first label too), and `keep` are the columns of
    `labels[:, first:]` trained in some row: where `trained_positions_loss` computes logits."""
    first = 0 if virtual_tokens else 1
    return first, (labels[:, first:] != data.IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def trained_positions_loss(
    model: Any, batch: dict[str, Any], n_trained: int, virtual_tokens: int = 0
) -> torch.Tensor:
    """Sum of the token losses of `batch`, divided by the trained tokens of the whole step.

    The vocabulary projection and the fp32 log-softmax are the costliest per-token work of a
    small model (profiled: BENCHMARKS.md), so logits are computed only at positions whose
    next token is trained: with the prompt masked that is a fraction of them. Equal to the
    model's own loss with `num_items_in_batch=n_trained` (tested).

    Prompt tuning puts `virtual_tokens` embeddings in front of the sequence: label j is then
    predicted at position virtual_tokens + j - 1, the first label included.
    """
    # No KV cache: with one, transformers would not build the packed mask.
    first, keep = logits_columns(batch["labels"], virtual_tokens)
    targets = batch["labels"][:, first:]
    if keep.numel() == 0:
        return model(**batch, use_cache=False, num_items_in_batch=n_trained).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    positions = keep + first + virtual_tokens - 1
    logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits
    loss = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1),
        targets[:, keep].flatten(),
        ignore_index=data.IGNORE_INDEX,
        reduction="sum",
    )
    return loss / n_trained


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
        _, keep = logits_columns(batch["labels"], virtual_tokens)
        kind = widest["masked" if masked else "unmasked"]
        kind[:] = [max(kind[0], batch["labels"].shape[1]), max(kind[1], keep.numel())]
    return widest
