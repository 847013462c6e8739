"""Preference objectives against trl's own code, on a real tiny model with a real LoRA adapter.

trl (a test-only dependency, pinned in constraints.txt) computes DPO's and KTO's loss inside
`_compute_loss`, which needs a trainer; the trainer is made without its __init__ (which
would tokenize a dataset and build a Trainer) and given exactly the attributes its
`__init__` sets from a real DPOConfig / KTOConfig, then run on the batch trl's own collator
makes from the same token ids finetune batches.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict

import pytest
import torch
from helpers import ROOT, build_model, build_tokenizer

from finetune import preference
from finetune.data import PairExample

TOLERANCE = 1e-5


def assert_close(ours, theirs) -> None:
    """Within 1e-5 in fp32; the difference is printed (pytest -s shows the figures)."""
    ours, theirs = float(torch.as_tensor(ours).detach()), float(torch.as_tensor(theirs))
    print(f"finetune {ours:.8f} trl {theirs:.8f} |diff| {abs(ours - theirs):.2e}")
    assert abs(ours - theirs) < TOLERANCE


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama with trl's fused head patched in (used only when trl asks for it) and a
    LoRA adapter whose B is random, so that policy and reference differ."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    tokenizer = build_tokenizer()
    base = build_model(tokenizer, seed=3).float()
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(5)
    model = get_peft_model(base, config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    model.train()
    return model, tokenizer


def pairs(tokenizer) -> list[PairExample]:
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rows = [
        ("Convert 3 March 2024 to ISO.", "2024-03-03", "2024-03-30 maybe"),
        ("What is the answer?", "Yes", "no maybe no"),
        ("the quick brown fox", "jumps over the lazy dog", "dog"),
    ]
    return [PairExample(ids(p), ids(c), ids(r), i) for i, (p, c, r) in enumerate(rows)]


def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=True)


def trl_dpo(model, loss_type: str, beta: float, label_smoothing: float, tmp_path, sft=0.0):
    """trl's DPOTrainer; `sft` > 0 adds trl's "sft" loss with that weight (finetune's
    train.dpo_sft_weight)."""
    from trl import DPOConfig, DPOTrainer

    types, weights = ([loss_type, "sft"], [1.0, sft]) if sft else ([loss_type], [1.0])
    args = DPOConfig(
        output_dir=str(tmp_path),
        loss_type=types,
        loss_weights=weights,
        beta=beta,
        label_smoothing=label_smoothing,
        report_to=[],
        use_cpu=True,
    )
    trainer = DPOTrainer.__new__(DPOTrainer)
    # What DPOTrainer.__init__ sets from args (trl 1.16), and the model with no ref_model:
    # the reference is the adapter disabled, as in finetune.
    trainer.args, trainer.model, trainer.ref_model = args, model, None
    trainer.accelerator = accelerator()
    trainer.beta, trainer.precompute_ref_logps = args.beta, args.precompute_ref_log_probs
    trainer.loss_types, trainer.loss_weights = args.loss_type, weights
    trainer.ld_alpha, trainer.f_divergence_type = args.ld_alpha, args.f_divergence_type
    trainer.f_alpha_divergence_coef = args.f_alpha_divergence_coef
    trainer.label_smoothing, trainer.use_weighting = args.label_smoothing, args.use_weighting
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    return trainer


@pytest.mark.parametrize(
    ("loss_type", "beta", "smoothing", "sft"),
    [
        ("sigmoid", 0.1, 0.0, 0.0),
        ("ipo", 0.5, 0.0, 0.0),
        ("robust", 0.2, 0.15, 0.0),
        ("sigmoid", 0.1, 0.0, 0.7),  # train.dpo_sft_weight: trl's [sigmoid, sft]
    ],
)
def test_dpo_loss_and_rewards_equal_trl(tiny, tmp_path, loss_type, beta, smoothing, sft):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    model, tokenizer = tiny
    examples = pairs(tokenizer)
    objective = preference.Objective(
        "dpo", beta=beta, dpo_loss=loss_type, label_smoothing=smoothing, sft_weight=sft
    )
    batch = preference.collate_pairs(examples, tokenizer.pad_token_id)
    scored = preference.micro_batch_loss(
        model, batch, objective, preference.Reference(), preference.units(batch, objective)
    )
    ours = preference.step_record(scored.stats, objective)

    trainer = trl_dpo(model, loss_type, beta, smoothing, tmp_path, sft)
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    trl_batch = collator(
        [
            {"prompt_ids": e.prompt, "chosen_ids": e.chosen, "rejected_ids": e.rejected}
            for e in examples
        ]
    )
    assert torch.equal(trl_batch["input_ids"], batch["input_ids"])  # the same sequences
    with torch.no_grad():
        expected = trainer._compute_loss(model, trl_batch, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    assert_close(float(scored.loss), float(expected))
    assert_close(ours["rewards_chosen"], metrics["rewards/chosen"])
    assert_close(ours["rewards_rejected"], metrics["rewards/rejected"])
    assert_close(ours["reward_margin"], metrics["rewards/margins"])
    assert ours["reward_accuracy"] == pytest.approx(metrics["rewards/accuracies"])
    assert abs(metrics["rewards/margins"]) > 1e-3  # policy and reference really differ


def with_ref_adapter(tokenizer):
    """A LoRA model whose trained adapter is near the base and a second adapter named "ref",
    far from it, that trl takes as the reference; finetune's Reference swaps the same
    weights in (what it does with adapter.init_from). The policy then scores the KL
    sequences higher than the reference, so KTO's KL term is above its clamp at 0."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    base = build_model(tokenizer, seed=3).float()
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(2)
    model = get_peft_model(base, config)
    model.add_adapter("ref", config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5 if ".ref." in name else 0.05)
    model.set_adapter("default")
    model.train()
    params = dict(model.named_parameters())
    initial = {
        name: params[name.replace(".default.", ".ref.")].detach().clone()
        for name, p in params.items()
        if p.requires_grad
    }
    return model, preference.Reference(initial)


def test_kto_loss_and_rewards_equal_trl(tmp_path):
    from trl import KTOConfig, KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    tokenizer = build_tokenizer()
    model, reference = with_ref_adapter(tokenizer)
    labels = [True, False, True, False]
    sides = [(e.prompt, e.chosen) for e in pairs(tokenizer)] + [(pairs(tokenizer)[0].prompt, [5])]
    examples = [
        PairExample(p, c, [], i, label) for i, ((p, c), label) in enumerate(zip(sides, labels))
    ]
    objective = preference.Objective("kto", beta=0.3, desirable_weight=1.3, undesirable_weight=0.7)
    batch = preference.collate_pairs(examples, tokenizer.pad_token_id)
    scored = preference.micro_batch_loss(
        model, batch, objective, reference, preference.units(batch, objective)
    )
    ours = preference.step_record(scored.stats, objective)

    args = KTOConfig(
        output_dir=str(tmp_path),
        beta=0.3,
        desirable_weight=1.3,
        undesirable_weight=0.7,
        report_to=[],
        use_cpu=True,
    )
    trainer = KTOTrainer.__new__(KTOTrainer)
    trainer.args, trainer.model, trainer.ref_model = args, model, None
    trainer.accelerator = accelerator()
    trainer.beta, trainer.precompute_ref_logps = args.beta, args.precompute_ref_log_probs
    trainer.loss_type, trainer.calculate_KL = args.loss_type, True
    trainer.desirable_weight, trainer.undesirable_weight = 1.3, 0.7
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    completions = [e.chosen for e in examples]
    kl_completions = [completions[-1], *completions[:-1]]  # trl's add_kl_completion_ids
    rows = [
        {
            "prompt_ids": e.prompt,
            "completion_ids": e.chosen,
            "KL_completion_ids": k,
            "label": e.label,
        }
        for e, k in zip(examples, kl_completions, strict=True)
    ]
    trl_batch = DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        expected = trainer._compute_loss(model, trl_batch, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    assert_close(float(scored.loss), float(expected))
    assert_close(ours["kl"], metrics["kl"])
    assert_close(ours["rewards_chosen"], metrics["rewards/chosen"])
    assert_close(ours["rewards_rejected"], metrics["rewards/rejected"])
    assert_close(ours["reward_margin"], metrics["rewards/margins"])
    assert abs(metrics["rewards/margins"]) > 1e-3
    assert metrics["kl"] > 1e-3  # the KL term is exercised, not clamped to 0


def test_orpo_odds_ratio_and_rewards_equal_trl(tiny):
    """trl's ORPO scores mean log-probabilities with its static get_batch_logps and the
    odds-ratio term with odds_ratio_loss; finetune's equal both. (trl's NLL term also trains
    the prompt tokens; finetune's trains the responses only, as every objective here.)"""
    from trl.experimental.orpo import ORPOTrainer

    model, tokenizer = tiny
    examples = pairs(tokenizer)
    objective = preference.Objective("orpo", orpo_lambda=0.25)
    batch = preference.collate_pairs(examples, tokenizer.pad_token_id)
    norm = preference.units(batch, objective)
    with torch.no_grad():
        scored = preference.micro_batch_loss(model, batch, objective, preference.Reference(), norm)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ours = preference.step_record(scored.stats, objective)

    trainer = ORPOTrainer.__new__(ORPOTrainer)
    trainer.beta, trainer.accelerator = 0.25, accelerator()
    means = ORPOTrainer.get_batch_logps(logits.float(), batch["labels"], average_log_prob=True)
    n = len(examples)
    losses, chosen, rejected, _, _ = trainer.odds_ratio_loss(means[:n], means[n:])
    nll = torch.nn.CrossEntropyLoss()(  # trl's cross_entropy_loss, on the responses
        logits[:n, :-1].flatten(0, 1).float(), batch["labels"][:n, 1:].flatten()
    )
    expected = nll - losses.mean()

    assert_close(float(scored.loss), float(expected))
    assert_close(ours["rewards_chosen"], float(chosen.mean()))
    assert_close(ours["rewards_rejected"], float(rejected.mean()))
    assert ours["reward_accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))


def test_init_from_reference_is_the_initial_adapter_frozen(tiny):
    """With adapter.init_from the reference is the adapter as it started: at step 0 every
    reward is 0, after a weight change not, and the trained weights are back after each
    reference pass."""
    model, tokenizer = tiny
    reference = preference.Reference.of(model, from_init=True)
    objective = preference.Objective("dpo")
    batch = preference.collate_pairs(pairs(tokenizer), tokenizer.pad_token_id)
    norm = preference.units(batch, objective)
    at_start = preference.micro_batch_loss(model, batch, objective, reference, norm)
    assert preference.step_record(at_start.stats, objective)["rewards_chosen"] == 0.0
    lora = next(p for n, p in model.named_parameters() if "lora_B" in n)
    saved = lora.detach().clone()
    with torch.no_grad():
        lora.add_(0.3)
    try:
        moved = preference.micro_batch_loss(model, batch, objective, reference, norm)
        assert abs(preference.step_record(moved.stats, objective)["rewards_chosen"]) > 1e-4
        assert torch.equal(lora.detach(), saved + 0.3)  # swapped back after the pass
    finally:
        with torch.no_grad():
            lora.copy_(saved)


def test_cached_reference_rows_are_keyed_by_example_not_by_batch(tiny):
    """The cache is computed in one order and micro-batching (here one example at a time,
    in reverse); a step's micro-batch in another order and composition reads, row for row,
    what the reference's own forward over that micro-batch gives (chosen rows, then
    rejected rows, as collate_pairs lays them out)."""
    from finetune import reference_cache

    model, tokenizer = tiny
    examples = pairs(tokenizer)
    reference = preference.Reference()
    cache = reference_cache.compute(
        model, examples, [2, 1, 0], 1, tokenizer.pad_token_id, reference
    )
    assert cache.shape == (3, 2)
    indices = [2, 0]
    batch = preference.collate_pairs([examples[i] for i in indices], tokenizer.pad_token_id)
    with reference.active(model):
        forward, _ = preference.sequence_logps(model, batch)
    cached = preference.cached_rows(cache, indices)
    assert torch.allclose(cached, forward, atol=1e-5)
    assert not torch.allclose(cached, cached.flip(0), atol=1e-3)  # the order is checked


@pytest.mark.parametrize(
    ("only", "said"), [("", "''"), ("dpo;", "''"), ("dpo,kto", "'dpo,kto'"), ("DPO", "'DPO'")]
)
def test_preference_benchmark_refuses_an_empty_or_unknown_only(tmp_path, only, said):
    """Red-team 5: --only '' trained all three objectives; --only 'dpo;' said
    "--only:  unknown" and exited 1. Now one line, exit 2, before any folder is made."""
    script = ROOT / "benchmarks" / "preference.py"
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, str(script), "--only", only, "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert said in done.stderr and "dpo, orpo, kto" in done.stderr, done.stderr
    assert not out.exists()
