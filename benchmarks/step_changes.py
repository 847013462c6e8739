"""Logits at trained rows only (issue 13's last change), A/B on the benchmark's own batches.

One process, the embedded model with the quickstart LoRA (r16, every linear layer), bf16
autocast, forward and backward over one epoch of `trainer_vs_finetune.py`'s micro-batches
(length-grouped, 8 examples), variants interleaved (A B C A B C ...), medians reported:

    before      logits at every row of the positions trained in some row
    rows        logits only at the trained (row, position) pairs (positions.py, now)

The frozen-weight cast cache measured beside them (`rows+casts`) was reverted: see
BENCHMARKS.md and commit 38d5fb9 for its code.

Losses are printed for the first micro-batches: the variants compute the same numbers.

    .venv/bin/python benchmarks/step_changes.py [summaries|docstrings] [--repeats 3]
        [--variants before,rows]      (speed-ups are against the first)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import trainer_vs_finetune as bench

from finetune import batching
from finetune.data import IGNORE_INDEX
from finetune.positions import count_trained, logit_positions, trained_positions_loss
from finetune.prepare import prepare
from finetune.recipe import load_recipe


def every_row_loss(model, batch, n_trained):
    """The loss as it was: logits for every row at the positions trained in any row."""
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    loss = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1),
        targets[:, keep].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss / n_trained


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", nargs="?", default="summaries", choices=list(bench.DATASETS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="before,rows", help="comma-separated")
    args = parser.parse_args()
    prepared = prepare(load_recipe("recipes/quickstart.yaml", []))
    model, tokenizer = prepared.model, prepared.loaded.tokenizer
    model.train()
    examples = bench.tokenized(bench.docstring_pairs(args.dataset)[0], tokenizer)
    items = batching.build_items(examples, False, bench.MAX_LENGTH, 0)
    order = batching.micro_batches([len(i) for i in items], 8, 0, True, True)
    pad = tokenizer.pad_token_id
    batches = [
        batching.collate([items[i] for i in next(order)], pad, False)
        for _ in range(len(items) // 8)
    ]
    rows = sum(b["labels"].shape[0] * logit_positions(b["labels"]) for b in batches)
    trained = sum(count_trained(b["labels"]) for b in batches)
    print(
        f"{args.dataset}: {len(batches)} micro-batches; logits rows at kept positions "
        f"{rows:,}, trained {trained:,} ({1 - trained / rows:.0%} of the rows untrained)"
    )
    variants = {
        "before": every_row_loss,
        "rows": trained_positions_loss,
    }
    variants = {name: variants[name] for name in args.variants.split(",")}

    def epoch(loss_fn):
        started, losses = time.perf_counter(), []
        for batch in batches:
            n = count_trained(batch["labels"])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model, batch, n)
            loss.backward()
            losses.append(float(loss.detach()))
            model.zero_grad(set_to_none=True)
        return time.perf_counter() - started, losses

    epoch(trained_positions_loss)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, loss_fn in variants.items():
            took, losses = epoch(loss_fn)
            seconds[name].append(took)
            if repeat == 0:
                print(f"  {name:<11} first losses: {[round(x, 6) for x in losses[:4]]}")
    base = statistics.median(next(iter(seconds.values())))
    print("| variant | median s | runs | speed-up |\n|---|---|---|---|")
    for name, runs in seconds.items():
        med = statistics.median(runs)
        print(f"| {name} | {med:.2f} | {', '.join(f'{r:.2f}' for r in runs)} | {base / med:.3f}x |")


if __name__ == "__main__":
    main()
