"""The live-tensor measurement tracks one step, and what it derives for the steady state is
what tracking the second step measures."""

import pytest
import torch
from helpers import build_model, build_tokenizer

from finetune.memory.measure import LiveTensorPeak
from finetune.positions import count_trained, trained_positions_loss


class EveryStep(LiveTensorPeak):
    def wants(self, step, shape):
        return True


def two_steps(live_class, optimizer_name: str) -> tuple[dict, LiveTensorPeak]:
    from peft import LoraConfig, get_peft_model

    tokenizer = build_tokenizer()
    model = get_peft_model(build_model(tokenizer), LoraConfig(r=4, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    foreach = optimizer_name == "foreach"
    optimizer = torch.optim.AdamW(params, lr=1e-3, foreach=foreach)
    live = live_class(model)
    torch.manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (3, 40))
    labels = ids.clone()
    labels[:, :25] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    n = count_trained(labels)
    for step in (1, 2):
        with live.step(step, [batch]):
            with live.phase("forward"):
                loss = trained_positions_loss(model, batch, n)
            with live.phase("backward"):
                loss.backward()
            del loss
            with live.phase("optimizer"):
                optimizer.step()
            live.keep_optimizer_states(optimizer)
        optimizer.zero_grad(set_to_none=True)
    return live.to_dict(), live


@pytest.mark.parametrize("optimizer_name", ["forloop", "foreach"])
def test_one_tracked_step_gives_the_steady_state_peak(optimizer_name):
    one, live = two_steps(LiveTensorPeak, optimizer_name)
    both, _ = two_steps(EveryStep, optimizer_name)
    assert one["tracked_steps"] == [1] and both["tracked_steps"] == [1, 2]
    assert one["peak_bytes"] == both["peak_bytes"]
    assert one["breakdown"] == both["breakdown"]
    # The first step alone peaks lower: its forward ran before AdamW's states existed.
    assert live.tracker.peak_bytes < one["peak_bytes"] or one["peak_phase"] == "optimizer"
