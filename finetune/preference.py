"""Preference objectives: DPO (sigmoid, IPO, robust), ORPO and KTO, as one step's loss.

A response's score is the sum of its tokens' log-probabilities given the prompt
(`sequence_logps`, computed only at trained positions, as `positions.trained_positions_loss`
does for the token loss). The formulas are trl 1.16's (`DPOTrainer._compute_loss`,
`ORPOTrainer.odds_ratio_loss`, `KTOTrainer._compute_loss`); tests/test_preference.py runs
trl's own code on the same batch and checks losses and rewards agree within 1e-5.

The reference policy is the same model: with the adapter disabled (peft's
`disable_adapter()`), or, when the run starts from `adapter.init_from`, with that adapter's
initial weights swapped in for the forward pass (`Reference`): no second copy of the model.
With train.reference cached its log-probabilities of each example's own rows are computed
once before training (`reference_rows`, finetune/reference_cache.py) and a micro-batch
carries them as `ref_logps` (`cached_rows`); KTO's KL rows keep the reference forward.

The step's loss is normalised per pair (per example for KTO) over the whole optimizer
step, as the token loss is normalised per trained token: micro-batching does not change it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from finetune.data import IGNORE_INDEX, PairExample
from finetune.positions import logits_only_at, output_head


@dataclass(frozen=True)
class Objective:
    name: str  # dpo, orpo, kto
    beta: float = 0.1
    dpo_loss: str = "sigmoid"
    label_smoothing: float = 0.0
    orpo_lambda: float = 0.1
    # dpo: weight of the chosen responses' NLL per token added to the loss (trl's "sft").
    sft_weight: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @classmethod
    def of(cls, train: Any) -> Objective:
        return cls(
            train.objective,
            train.beta,
            train.dpo_loss,
            train.label_smoothing,
            train.orpo_lambda,
            sft_weight=train.dpo_sft_weight,
            desirable_weight=train.kto_desirable_weight,
            undesirable_weight=train.kto_undesirable_weight,
        )

    @property
    def paired(self) -> bool:
        return self.name in ("dpo", "orpo")

    @property
    def uses_reference(self) -> bool:
        return self.name in ("dpo", "kto")


# ------------------------------------------------------------------ batches


def collate_pairs(examples: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch of pairs: every chosen sequence, then every rejected one (trl's order),
    right-padded, prompt tokens masked. KTO rows: each completion, and the mismatched
    sequences the KL term is estimated on (prompt i with completion i-1, as trl rotates)."""
    if examples[0].label is not None:
        batch = padded([(e.prompt, e.chosen) for e in examples], pad_id)
        shifted = [examples[i - 1].chosen for i in range(len(examples))]
        kl = padded([(e.prompt, c) for e, c in zip(examples, shifted, strict=True)], pad_id)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch["desirable"] = torch.tensor([bool(e.label) for e in examples])
        return batch
    sides = [(e.prompt, e.chosen) for e in examples] + [(e.prompt, e.rejected) for e in examples]
    return padded(sides, pad_id)


def padded(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (prompt, response) in enumerate(sequences):
        n = len(prompt) + len(response)
        input_ids[row, :n] = torch.tensor(prompt + response)
        labels[row, len(prompt) : n] = torch.tensor(response)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def units(batch: dict[str, torch.Tensor], objective: Objective) -> torch.Tensor:
    """What a micro-batch adds to the step's normalisers: [pairs or examples, chosen tokens]."""
    rows = batch["input_ids"].shape[0] // (2 if objective.paired else 1)
    chosen = batch["labels"][:rows, 1:] != IGNORE_INDEX
    return torch.tensor([rows, int(chosen.sum())], dtype=torch.float64)


# ------------------------------------------------------------------ scores


def sequence_logps(
    model: Any, batch: dict[str, torch.Tensor], prefix: str = "", virtual_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of trained tokens' log-probabilities, trained tokens) of each row of `batch`.

    Logits are computed only at trained positions (the costly part of a small model's
    forward); `prefix` picks the KTO batch's `kl_` sequences."""
    labels = batch[f"{prefix}labels"]
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    keep = trained.any(dim=0).nonzero().squeeze(1)
    rows, columns = trained[:, keep].nonzero().unbind(1)
    inputs = {
        "input_ids": batch[f"{prefix}input_ids"],
        "attention_mask": batch[f"{prefix}attention_mask"],
    }
    positions = keep + virtual_tokens
    head = output_head(model)
    if head is None:
        logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits
        logits = logits[rows, columns].unsqueeze(0)
    else:
        with logits_only_at(head, rows, columns):
            logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits
    picked = targets[:, keep][rows, columns]
    token_logps = -F.cross_entropy(logits[0].float(), picked, reduction="none")
    sums = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps), trained.sum(dim=1)


class Reference:
    """The reference policy inside the trained model: the adapter disabled, or the adapter's
    `initial` weights (adapter.init_from as loaded) swapped in for the forward pass."""

    def __init__(self, initial: dict[str, torch.Tensor] | None = None) -> None:
        self.initial = initial

    @classmethod
    def of(cls, model: Any, from_init: bool) -> Reference:
        if not from_init:
            return cls()
        # A copy of the trainable tensors only (the adapter), not of the model.
        return cls({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    @contextlib.contextmanager
    def active(self, model: Any) -> Iterator[Any]:
        """Yields the model to run the reference on: under data parallel the model inside
        the DistributedDataParallel wrapper (which has no `disable_adapter`; a forward
        without gradients needs none of its synchronisation)."""
        inner = model.module if isinstance(model, DistributedDataParallel) else model
        with torch.no_grad(), deterministic(inner), self.weights(inner):
            yield inner

    @contextlib.contextmanager
    def weights(self, model: Any) -> Iterator[None]:
        if self.initial is None:
            with model.disable_adapter():
                yield
            return
        params = dict(model.named_parameters())
        kept = {n: params[n].data for n in self.initial}
        try:
            for name, value in self.initial.items():
                params[name].data = value
            yield
        finally:
            for name, value in kept.items():
                params[name].data = value


@contextlib.contextmanager
def deterministic(model: Any) -> Iterator[None]:
    """The model in eval mode (no dropout) except bitsandbytes' layers, which keep their mode:
    on the CPU an int8 layer in eval mode quantizes its inputs to int8 too (in training it
    multiplies by the dequantized weight), and a 4-bit layer in eval mode repacks its weight
    in place on CPUs with AVX512-BF16 (bitsandbytes 0.50). The reference would then not be
    the policy at step 0 (an int8 base's first DPO rewards were 1.4e-4, not 0)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for module, training in modes.items():
        if type(module).__module__.startswith("bitsandbytes"):
            module.training = training
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def reference_rows(
    model: Any, examples: list[PairExample], pad_id: int, reference: Reference
) -> torch.Tensor:
    """The reference's log-probabilities of each example's own rows, without gradients:
    [examples, 2] (chosen, rejected) for pairs, [examples, 1] for KTO's completions."""
    device = next(p.device for p in model.parameters())
    if examples[0].label is not None:
        batch = padded([(e.prompt, e.chosen) for e in examples], pad_id)
    else:
        batch = collate_pairs(examples, pad_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    with reference.active(model) as frozen:
        ref, _ = sequence_logps(frozen, batch)
    return ref.detach().reshape(-1, len(examples)).T.cpu()


def cached_rows(cache: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """A micro-batch's cached reference log-probabilities in `collate_pairs`'s row order:
    every chosen, then every rejected (KTO: each completion)."""
    return cache[indices].T.reshape(-1)


# ------------------------------------------------------------------ losses (trl's formulas)


def dpo_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    lengths: tuple[torch.Tensor, torch.Tensor],
    objective: Objective,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the chosen and rejected rewards beta * (logp - ref logp)."""
    beta = objective.beta
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if objective.dpo_loss == "ipo":
        # Length-normalised log-ratios, as trl (and the IPO authors) compute them.
        per_token = chosen_ratio / lengths[0].clamp(min=1) - rejected_ratio / lengths[1].clamp(
            min=1
        )
        losses = (per_token - 1 / (2 * beta)) ** 2
    elif objective.dpo_loss == "robust":
        eps = objective.label_smoothing
        clean = -(1 - eps) * F.logsigmoid(beta * delta)
        flipped = -eps * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * eps)
    else:
        losses = -F.logsigmoid(beta * delta)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def orpo_ratio_losses(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, objective: Objective
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's per-pair odds-ratio term -lambda * log sigmoid(log odds ratio), from the mean
    token log-probabilities, and the rewards lambda * mean logp (trl's)."""
    lam = objective.orpo_lambda
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    losses = -lam * F.logsigmoid(log_odds)
    return losses, lam * chosen_mean.detach(), lam * rejected_mean.detach()


def kto_losses(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    objective: Objective,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example weighted KTO losses, desirable then undesirable (trl's order), and the
    rewards beta * (logp - ref logp) of each group."""
    beta = objective.beta
    ratio = logps - ref_logps
    good, bad = ratio[desirable], ratio[~desirable]
    losses = torch.cat(
        (
            objective.desirable_weight * (1 - torch.sigmoid(beta * (good - kl))),
            objective.undesirable_weight * (1 - torch.sigmoid(beta * (kl - bad))),
        )
    )
    return losses, beta * good.detach(), beta * bad.detach()


# ------------------------------------------------------------------ one micro-batch


@dataclass
class Scored:
    """A micro-batch's share of the step loss, and sums for the step's record."""

    loss: torch.Tensor
    stats: torch.Tensor  # STATS, summed


# The sums a step adds up over micro-batches (and processes) for metrics.jsonl.
STATS = (
    "chosen_reward",
    "rejected_reward",
    "chosen_n",
    "rejected_n",
    "correct",
    "kl",
    "batches",
)


def stat_vector(
    chosen: torch.Tensor, rejected: torch.Tensor, paired: bool, kl: float = 0.0
) -> torch.Tensor:
    correct = float((chosen > rejected).sum()) if paired else 0.0
    values = [float(chosen.sum()), float(rejected.sum()), len(chosen), len(rejected), correct]
    return torch.tensor([*values, kl, 1.0], dtype=torch.float64)


def micro_batch_loss(
    model: Any,
    batch: dict[str, torch.Tensor],
    objective: Objective,
    reference: Reference,
    norm: torch.Tensor,
) -> Scored:
    """The objective on one micro-batch, divided by the step's pairs (examples for KTO)
    and, for ORPO's NLL term, the step's chosen tokens."""
    logps, counts = sequence_logps(model, batch)
    if objective.name == "kto":
        return kto_batch(model, batch, objective, reference, norm, logps)
    n = logps.shape[0] // 2
    if objective.name == "orpo":
        means = logps / counts.clamp(min=1)
        losses, chosen, rejected = orpo_ratio_losses(means[:n], means[n:], objective)
        nll = -logps[:n].sum() / norm[1]
        return Scored(nll + losses.sum() / norm[0], stat_vector(chosen, rejected, True))
    ref = batch.get("ref_logps")  # cached before training (train.reference cached)
    if ref is None:
        with reference.active(model) as frozen:
            ref, _ = sequence_logps(frozen, batch)
    lengths = (counts[:n], counts[n:])
    losses, chosen, rejected = dpo_losses(
        logps[:n], logps[n:], ref[:n], ref[n:], lengths, objective
    )
    loss = losses.sum() / norm[0]
    if objective.sft_weight:  # the chosen tokens' NLL over the step's chosen tokens
        loss = loss + objective.sft_weight * (-logps[:n].sum() / norm[1])
    return Scored(loss, stat_vector(chosen, rejected, True))


def kto_batch(
    model: Any,
    batch: dict[str, torch.Tensor],
    objective: Objective,
    reference: Reference,
    norm: torch.Tensor,
    logps: torch.Tensor,
) -> Scored:
    """KTO: the KL term is estimated on mismatched (prompt, completion) pairs, without
    gradients, clamped at 0 (trl's)."""
    with torch.no_grad():
        kl_logps, _ = sequence_logps(model, batch, "kl_")
    # The KL rows pair each prompt with another row's completion, so they depend on how
    # examples fall into micro-batches: they are not cached, only each example's own row.
    ref = batch.get("ref_logps")
    with reference.active(model) as frozen:
        ref_kl, _ = sequence_logps(frozen, batch, "kl_")
        if ref is None:
            ref, _ = sequence_logps(frozen, batch)
    kl = (kl_logps - ref_kl).mean().clamp(min=0)
    desirable = batch["desirable"].bool()
    losses, chosen, rejected = kto_losses(logps, ref, desirable, kl, objective)
    return Scored(losses.sum() / norm[0], stat_vector(chosen, rejected, False, float(kl)))


def step_record(stats: torch.Tensor, objective: Objective) -> dict[str, float]:
    """The step's rewards for metrics.jsonl: means over its pairs (or examples)."""
    s = dict(zip(STATS, stats.tolist(), strict=True))
    record: dict[str, float] = {}
    if s["chosen_n"]:
        record["rewards_chosen"] = s["chosen_reward"] / s["chosen_n"]
    if s["rejected_n"]:
        record["rewards_rejected"] = s["rejected_reward"] / s["rejected_n"]
    if s["chosen_n"] and s["rejected_n"]:
        record["reward_margin"] = record["rewards_chosen"] - record["rewards_rejected"]
    if objective.paired and s["chosen_n"]:
        record["reward_accuracy"] = s["correct"] / s["chosen_n"]
    if objective.name == "kto" and s["batches"]:
        record["kl"] = s["kl"] / s["batches"]
    return record


# ------------------------------------------------------------------ held-out evaluation


@torch.no_grad()
def held_out_record(
    model: Any,
    examples: list[PairExample],
    pad_id: int,
    batch_size: int,
    objective: Objective,
    reference: Reference,
) -> dict[str, float]:
    """The objective's loss on held-out pairs (mean over pairs), its rewards, and for paired
    data the preference accuracy: the share of pairs where the policy gives the chosen
    response the higher log-probability, and the same relative to the reference (the
    reward accuracy: log-probability gained over the reference, chosen above rejected)."""
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    loss, stats, prefers, beats_reference = 0.0, torch.zeros(len(STATS), dtype=torch.float64), 0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        scored = micro_batch_loss(model, batch, objective, reference, units(batch, objective))
        loss += float(scored.loss) * len(chunk) / len(examples)
        stats += scored.stats
        if objective.paired:
            n = len(chunk)
            logps, _ = sequence_logps(model, batch)
            with reference.active(model) as frozen:
                gained = logps - sequence_logps(frozen, batch)[0]
            prefers += int((logps[:n] > logps[n:]).sum())
            beats_reference += int((gained[:n] > gained[n:]).sum())
    model.train(was_training)
    record: dict[str, float] = {"eval_loss": loss, "eval_pairs": len(examples)}
    rewards = step_record(stats, objective)
    record.update({f"eval_{k}": v for k, v in rewards.items() if k != "reward_accuracy"})
    if objective.paired:
        record["eval_preference_accuracy"] = prefers / len(examples)
        record["eval_reward_accuracy"] = beats_reference / len(examples)
    return record
