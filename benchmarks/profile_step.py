"""Where does a LoRA training step spend its time on the CPU? Profiles a few optimizer steps
of the quickstart recipe (embedded SmolLM2-135M) with torch.profiler and prints the top ops,
once with logits over every position (the model's own loss) and once with finetune's
logits at trained positions only.

    .venv/bin/python benchmarks/profile_step.py [recipe] [overrides...]
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from finetune import batching
from finetune.positions import count_trained, trained_positions_loss
from finetune.prepare import make_optimizer, prepare
from finetune.recipe import load_recipe


def main() -> None:
    recipe = load_recipe(
        sys.argv[1] if len(sys.argv) > 1 else "recipes/quickstart.yaml", sys.argv[2:] or []
    )
    prepared = prepare(recipe)
    model, spec = prepared.model, recipe.data
    items = batching.build_items(
        prepared.splits.train.examples, spec.packing, spec.max_length, recipe.train.seed
    )

    def batches():
        return batching.micro_batches(
            [len(i) for i in items],
            recipe.train.micro_batch_size,
            recipe.train.seed,
            True,
            spec.group_by_length,
        )

    optimizer, _ = make_optimizer(model, recipe, 10)
    pad = prepared.loaded.tokenizer.pad_token_id
    print(f"torch threads: {torch.get_num_threads()}, interop: {torch.get_num_interop_threads()}")

    def step(full_logits: bool, order) -> None:
        batch = batching.collate([items[i] for i in next(order)], pad, spec.packing)
        n = count_trained(batch["labels"])  # LoRA: no virtual tokens
        if full_logits:
            loss = model(**batch, use_cache=False, num_items_in_batch=n).loss
        else:
            loss = trained_positions_loss(model, batch, n)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    step(False, batches())  # warm-up
    for full_logits in (True, False):
        order = batches()  # the same four batches for both
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(4):
                step(full_logits, order)
        label = "logits at every position" if full_logits else "logits at trained positions"
        print(f"\n{label}: 4 steps in {time.perf_counter() - started:.2f} s (profiled)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
