"""Evaluation: token-weighted loss and perplexity, greedy generation, exact match."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from finetune.batching import collate, single
from finetune.data import TokenizedData, generation_prompt, require_trained_tokens, tokenize_rows
from finetune.peft_compat import generation_bridge
from finetune.positions import count_trained, trained_positions_loss, virtual_tokens_of
from finetune.progress import stage_progress


@dataclass
class LossResult:
    loss: float
    perplexity: float
    tokens: int


@torch.no_grad()
def evaluate_loss(
    model: Any,
    data: TokenizedData,
    pad_id: int,
    batch_size: int = 8,
    advance: Callable[[int], None] | None = None,
) -> LossResult:
    """Mean loss per trained token over `data`, and its perplexity exp(loss), counting the
    tokens training counts (prompt tuning's virtual tokens also predict the first label).
    `advance(n)` is told of every n examples scored."""
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    virtual_tokens = virtual_tokens_of(model)
    total, tokens = 0.0, 0
    for start in range(0, len(data.examples), batch_size):
        chunk = data.examples[start : start + batch_size]
        batch = collate([single(e) for e in chunk], pad_id, packed=False)
        batch = {k: v.to(device) for k, v in batch.items()}
        n = count_trained(batch["labels"], virtual_tokens)
        if n > 0:  # logits only where a token is scored, as in training (positions.py)
            total += float(trained_positions_loss(model, batch, n, virtual_tokens)) * n
            tokens += n
        if advance is not None:
            advance(len(chunk))
    model.train(was_training)
    loss = total / tokens if tokens else float("nan")
    return LossResult(loss, math.exp(loss) if tokens and loss < 700 else float("inf"), tokens)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    advance: Callable[[int], None] | None = None,
    **sampling: Any,
) -> list[str]:
    """Generate a completion for each already-rendered prompt (greedy unless told otherwise).
    `advance(n)` is told of every n prompts answered."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge of each row
    outputs: list[str] = []
    try:
        with generation_bridge(model):  # prefix/prompt tuning on transformers >= 5.24
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                outputs += generate_chunk(model, tokenizer, chunk, max_new_tokens, sampling)
                if advance is not None:
                    advance(len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [o.strip() for o in outputs]


def generate_chunk(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, sampling: dict[str, Any]
) -> list[str]:
    """One padded batch of `prompts` through generate(); the new text of each."""
    device = next(p.device for p in model.parameters())
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(device) for k, v in enc.items()}
    # Never past the model's context: the answer would be noise and take minutes (the
    # commands refuse such requests; eval.max_new_tokens and exact match get this bound).
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and context > 0:
        max_new_tokens = max(1, min(max_new_tokens, context - enc["input_ids"].shape[1]))
    gen = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=bool(sampling.get("do_sample", False)),
        pad_token_id=tokenizer.pad_token_id,
        **{k: v for k, v in sampling.items() if k != "do_sample"},
    )
    return tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@dataclass
class ExactMatch:
    accuracy: float
    correct: int
    total: int
    samples: list[dict[str, str]]


def exact_match(
    model: Any,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    max_new_tokens: int,
    advance: Callable[[int], None] | None = None,
) -> ExactMatch:
    """Share of greedy generations equal to the reference (surrounding whitespace ignored)."""
    prompts = [p for p, _ in pairs]
    predictions = generate(model, tokenizer, prompts, max_new_tokens, advance=advance)
    samples = [
        {"prompt": p, "reference": ref, "prediction": pred}
        for (p, ref), pred in zip(pairs, predictions, strict=True)
    ]
    correct = sum(s["prediction"] == s["reference"] for s in samples)
    return ExactMatch(correct / len(pairs) if pairs else 0.0, correct, len(pairs), samples)


# ------------------------------------------------------------------ finetune eval


@dataclass
class DatasetEval:
    """Loss, perplexity and (for instruction or chat data) exact match of one model on a file."""

    loss: float
    perplexity: float
    tokens: int
    exact_match: ExactMatch | None

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "tokens": self.tokens,
        }
        if self.exact_match is not None:
            em = self.exact_match
            result["exact_match"] = {
                "accuracy": em.accuracy,
                "correct": em.correct,
                "total": em.total,
                "samples": em.samples[:5],
            }
        return result


def evaluate_dataset(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    spec: Any,
    path: str,
    *,
    max_examples: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    label: str = "model",
) -> DatasetEval:
    """Evaluate `model` on `rows` formatted as the data section `spec` says, showing a
    progress bar per stage named after `label`.

    Loss and perplexity cover every row; exact match (instruction and chat formats only)
    the first `max_examples` rows.
    """
    data = tokenize_rows(rows, spec, tokenizer, path)
    # As train does: a row cut to nothing by max_length would make the loss nan.
    require_trained_tokens(data, spec)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with stage_progress(f"{label}: loss", len(data.examples)) as advance:
        loss = evaluate_loss(model, data, pad_id, batch_size, advance)
    em = None
    if spec.format != "text" and max_examples != 0:  # 0: no exact-match generation
        chosen = rows[:max_examples] if max_examples else rows
        pairs = [generation_prompt(r, spec, tokenizer, path) for r in chosen]
        with stage_progress(f"{label}: exact match", len(pairs)) as advance:
            em = exact_match(model, tokenizer, pairs, max_new_tokens, advance)
    return DatasetEval(loss.loss, loss.perplexity, loss.tokens, em)


def held_out_record(
    model: Any, data: TokenizedData, pad_id: int, batch_size: int, with_base: bool = False
) -> dict[str, Any]:
    """A held-out evaluation as metrics.jsonl records it: loss, perplexity, tokens, and with
    `with_base` the base model's loss beside them (the adapter disabled)."""
    result = evaluate_loss(model, data, pad_id, batch_size)
    record = {
        "eval_loss": result.loss,
        "eval_perplexity": result.perplexity,
        "eval_tokens": result.tokens,
    }
    if with_base:
        with model.disable_adapter():
            record["base_eval_loss"] = evaluate_loss(model, data, pad_id, batch_size).loss
    return record
