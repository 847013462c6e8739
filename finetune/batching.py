"""How tokenized examples become micro-batches: packing, length grouping, a resumable order.

Packing puts several examples into one sequence of `data.max_length` tokens with position
ids that restart at 0 for every example; given such position ids and no attention mask,
transformers builds a block-diagonal causal mask (SDPA included), so no example attends to
another. Without packing, examples of similar length are batched together so padding stays
small. Either way the order of an epoch is a pure function of (seed, epoch), which is what
makes resuming at any micro-batch exact.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from finetune.data import IGNORE_INDEX, TokenizedExample

# Length grouping sorts within windows of at most this many micro-batches: close to sorted,
# yet every epoch still mixes short and long batches (the Hugging Face Trainer's megabatch).
GROUP_WINDOW = 50


@dataclass
class Item:
    """One row of a micro-batch: an example, or several packed into one sequence."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    rows: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def single(example: TokenizedExample) -> Item:
    n = len(example.input_ids)
    return Item(list(example.input_ids), list(example.labels), list(range(n)), [example.row])


def pack(examples: list[TokenizedExample], length: int, seed: int) -> list[Item]:
    """First-fit-decreasing packing of (seed-shuffled) examples into sequences of `length`.

    The first token of every packed example is not a target: it would otherwise be predicted
    from the previous example's last token.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -len(examples[i].input_ids))
    bins: list[Item] = []
    for i in order:
        example = examples[i]
        n = len(example.input_ids)
        target = next((b for b in bins if len(b) + n <= length), None)
        if target is None:
            target = Item([], [], [], [])
            bins.append(target)
        target.input_ids += example.input_ids
        target.labels += [IGNORE_INDEX, *example.labels[1:]]
        target.position_ids += range(n)
        target.rows.append(example.row)
    return bins


def build_items(
    examples: list[TokenizedExample], packing: bool, length: int, seed: int
) -> list[Item]:
    return pack(examples, length, seed) if packing else [single(e) for e in examples]


def epoch_order(
    lengths: list[int], batch_size: int, seed: int, epoch: int, shuffle: bool, group_by_length: bool
) -> list[int]:
    """The item order of one epoch: a pure function of its arguments."""
    order = list(range(len(lengths)))
    if not shuffle:
        return order
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * group_window(len(lengths), batch_size)
        grouped: list[int] = []
        for start in range(0, len(order), window):
            grouped += sorted(order[start : start + window], key=lambda i: -lengths[i])
        # Shuffle whole micro-batches so that long and short ones alternate.
        batches = [grouped[i : i + batch_size] for i in range(0, len(grouped), batch_size)]
        rng.shuffle(batches)
        order = [i for b in batches for i in b]
    return widest_first(order, lengths, batch_size)


def widest_first(order: list[int], lengths: list[int], batch_size: int) -> list[int]:
    """`order` with the micro-batch holding the epoch's longest item moved to the front.

    The widest micro-batch first (as the Hugging Face Trainer's length grouping does): a run
    that runs out of memory does so at its first step, not hours in, and the live-tensor
    measurement (finetune.memory.measure) tracks one step instead of every new widest one.
    Only whole micro-batches count (an incomplete last one is dropped)."""
    whole = len(order) - len(order) % batch_size
    if whole <= batch_size:
        return order
    longest = max(range(whole), key=lambda k: lengths[order[k]])
    start = longest - longest % batch_size
    return order[start : start + batch_size] + order[:start] + order[start + batch_size :]


def group_window(n: int, batch_size: int) -> int:
    """Micro-batches sorted together: 50, or a quarter of the epoch's batches when fewer.

    Sorting a whole short epoch makes every batch uniform in length, and with the loss
    normalised per step the tokens of short batches then weigh more than those of long
    ones: held-out loss about 1% worse than unsorted batches on 64 docstring pairs, three
    seeds (BENCHMARKS.md, benchmarks/trainer_vs_finetune.py). The Trainer's rule,
    min(50, n / (4 x batch)), keeps batches mixed there and is the same as a fixed 50 from
    1,600 examples of 8 on.
    """
    return max(1, min(GROUP_WINDOW, n // (4 * batch_size)))


def micro_batches(
    lengths: list[int],
    batch_size: int,
    seed: int,
    shuffle: bool,
    group_by_length: bool = False,
    start: int = 0,
) -> Iterator[list[int]]:
    """Yield index lists forever, epoch after epoch, skipping the first `start` micro-batches.

    An incomplete last micro-batch is dropped each epoch (the next epoch reshuffles).
    """
    n = len(lengths)
    per_epoch = max(1, n // batch_size)
    position = start
    cached_epoch, order = -1, []
    while True:
        epoch, index = divmod(position, per_epoch)
        if epoch != cached_epoch:
            order = epoch_order(lengths, batch_size, seed, epoch, shuffle, group_by_length)
            cached_epoch = epoch
        yield order[index * batch_size : (index + 1) * batch_size]
        position += 1


def collate(items: list[Item], pad_id: int, packed: bool) -> dict[str, Any]:
    """Pad a micro-batch on the right. Packed batches carry position ids and no attention
    mask (that is how transformers knows to build the block-diagonal mask); padding then
    gets position ids of its own so that it is a separate, untrained sequence."""
    import torch

    width = max(len(item) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(items), width), dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        positions[row, :n] = torch.tensor(item.position_ids)
        positions[row, n:] = torch.arange(width - n)
        attention[row, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = attention
    return batch
