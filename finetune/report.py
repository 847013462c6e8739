"""The run report, built as data from what the loop recorded (`train.RunResult`), written
once: report.json (for machines), report.md (for people), loss.png and memory.png. The CLI
prints its summary from the same data (`render_markdown` without the images)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from finetune import runs
from finetune.outputs import write_file_atomically
from finetune.precision import resolve_mixed_precision
from finetune.train import RunResult


def interrupted_section(result: RunResult) -> dict[str, Any] | None:
    """Why and where a run paused with a checkpoint to resume from, or None."""
    if result.interrupted is None:
        return None
    return {
        "reason": result.interrupted,
        "step": result.state.step,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "exit_code": result.exit_code,
    }


def build_report(result: RunResult, wall_time_s: float, estimates: Any) -> dict[str, Any]:
    """Everything worth knowing about a finished run, as plain data."""
    import peft
    import torch
    import transformers

    p = result.prepared
    recipe = p.recipe
    history, evals = result.history, result.evals
    state = result.state
    report: dict[str, Any] = {
        "run_dir": str(result.run_dir),
        "model": {
            "path": recipe.model.path,
            "folder": str(p.loaded.folder),
            "quantization": p.loaded.quantization,
            "dtype": str(p.loaded.dtype).removeprefix("torch."),
            "device": p.loaded.device,
        },
        "adapter": {
            "method": recipe.adapter.method,
            "trainable_parameters": p.params.trainable,
            "total_parameters": p.params.total,
            "trainable_percent": p.params.percent,
        },
        "data": {
            "train_examples": len(p.splits.train),
            "eval_examples": len(p.splits.eval) if p.splits.eval else 0,
            "train_tokens": p.splits.train.tokens,
            "trained_tokens_per_epoch": p.splits.train.trained_tokens,
            "truncated_examples": p.splits.train.truncated,
        },
        "training": {
            "steps": state.step,
            "tokens_seen": state.tokens,
            "trained_tokens": state.trained_tokens,
            "train_time_s": state.elapsed,
            "compile_s": state.compile_s,  # of train_time_s (train.compile)
            "tokens_per_s": state.tokens / state.elapsed if state.elapsed else 0.0,
            "trained_tokens_per_s": state.trained_tokens / state.elapsed if state.elapsed else 0.0,
            "wall_time_s": wall_time_s,
            "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None,
            "gradient_checkpointing": p.gradient_checkpointing,
            # As accelerate ran it (auto resolved): the estimate's autocast follows it.
            "mixed_precision": resolve_mixed_precision(
                recipe.train.mixed_precision, p.loaded.device
            ),
            "skipped_steps": state.skipped_steps,
        },
        "objective": recipe.train.objective,
        "stopped": result.stopped,
        "interrupted": interrupted_section(result),
        "eval": evals[-1] if evals else None,
        "eval_start": evals[0] if evals and evals[0]["step"] == 0 else None,
        "exact_match": exact_match_section(result),
        "memory": memory_section(result, estimates),
        "notes": p.notes,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
    return report


def run_estimates(result: RunResult) -> Any:
    """The dry-run estimates for this very run (see `finetune.memory.runmemory`)."""
    from finetune.memory.runmemory import run_estimates as estimates

    p = result.prepared
    return estimates(p.loaded.model.config, run_setups(result), p.recipe.model.path)


def run_setups(result: RunResult) -> list[Any]:
    """The run's exact setups: its recipe on its device at the widest micro-batch it trained
    on with an attention mask and at the widest without one, each with the most logits
    positions the loop computed (either can set the peak: a mask costs memory, a wider batch
    too). One setup when every micro-batch was of one kind; the recipe's own (at
    data.max_length) when the loop recorded none (no step taken)."""
    from dataclasses import replace

    from finetune.memory import setup_from_recipe

    p = result.prepared
    setup = setup_from_recipe(p.recipe, p.loaded.device)
    setup = replace(
        setup,
        grad_ckpt=p.gradient_checkpointing,
        dtype=str(p.loaded.dtype).removeprefix("torch."),
    )
    widest = result.state.widest
    return [
        replace(setup, seq=seq, logit_positions=logits, masked=kind == "masked")
        for kind, (seq, logits) in widest.items()
    ] or [setup]


def memory_section(result: RunResult, estimates: Any) -> dict[str, Any]:
    """Estimate and measurement of the same metric, full fine-tuning beside them, and the
    process's resident-memory growth as a separate, named figure."""
    from finetune.memory.render import to_markdown

    est = estimates.run
    measured = result.memory.get("measured")
    return {
        "measured": measured,
        "resident": result.memory.get("resident"),
        "estimate": est.to_dict(),
        "model_config": est.config.to_dict(),
        "full_finetuning": estimates.full.to_dict(),
        "full_fp16_budget_bytes": est.full_fp16_budget_bytes,
        # After SIGTERM or Ctrl-C the process should end within a scheduler's grace period
        # (SLURM's and torchrun's: 30 s): no seven dry runs for the method table then.
        "markdown": to_markdown(
            est, measured, resident=result.memory.get("resident"), methods=result.exit_code == 0
        )
        + full_line(estimates),
    }


def full_line(estimates: Any) -> str:
    """One line setting the run beside full fine-tuning of the same shape, same metric."""
    from finetune.memory.render import human

    run, full = estimates.run, estimates.full
    return (
        f"\nFull fine-tuning of the same model at the same batch, sequence and dtype "
        f"(dry run, same metric): {human(full.allocated_bytes)}; this run's estimate "
        f"{human(run.allocated_bytes)} ({run.allocated_bytes / full.allocated_bytes:.0%} of "
        f"it). The seed's 12 B/param budget (fp16 weights, gradients, Adam states; no "
        f"activations) for this model: {human(run.full_fp16_budget_bytes)}.\n"
    )


def exact_match_section(result: RunResult) -> dict[str, Any] | None:
    """Before and after training; either may be missing (a run resumed from a version
    that did not record "before", a run paused or stopped before its end)."""
    before, after = result.exact_match_before, result.exact_match_after
    if after is None and before is None:
        return None
    return {
        "examples": (after or before).total,
        "before": before.accuracy if before else None,
        "after": after.accuracy if after else None,
        "samples_after": after.samples[:5] if after else [],
        "samples_before": before.samples[:5] if before else [],
    }


def render_markdown(report: dict[str, Any], images: bool = True) -> str:
    """report.md; without `images` (the plots' links), the summary the CLI prints."""
    m, a, d, t = report["model"], report["adapter"], report["data"], report["training"]
    lines = [
        f"# Run report: {report['run_dir']}",
        "",
        f"- model: `{m['path']}` ({m['dtype']}, quantization {m['quantization']}, {m['device']})",
        f"- adapter: {a['method']}, {a['trainable_parameters']:,} trainable of "
        f"{a['total_parameters']:,} parameters ({a['trainable_percent']:.3f}%)",
        f"- data: {d['train_examples']} training examples ({d['train_tokens']:,} tokens, "
        f"{d['truncated_examples']} truncated), {d['eval_examples']} held out",
        f"- training: {t['steps']} steps, {t['tokens_seen']:,} tokens in {t['train_time_s']:.1f} s "
        f"({t['tokens_per_s']:.0f} tokens/s, {t['trained_tokens_per_s']:.0f} trained tokens/s"
        + (f"; {t['compile_s']:.1f} s of it compiling" if t.get("compile_s") else "")
        + f"); wall time of this command {t['wall_time_s']:.1f} s",
    ]
    if report["stopped"]:
        lines.insert(2, f"**Stopped early:** {report['stopped']}\n")
    if report["interrupted"]:
        i = report["interrupted"]
        lines.insert(
            2, f"**Paused:** {i['reason']} at step {i['step']}; continue it with --resume\n"
        )
    if t["skipped_steps"]:
        lines.append(f"- skipped {t['skipped_steps']} steps with a non-finite loss or gradient")
    if t["first_loss"] is not None:
        lines.append(f"- loss: {t['first_loss']:.4f} at step 1 -> {t['final_loss']:.4f} at the end")
    if report["eval"]:
        e, start = report["eval"], report.get("eval_start")
        began = f"{start['eval_loss']:.4f} at step 0 -> " if start and e["step"] else ""
        base = start.get("base_eval_loss") if start else None
        base = f" (base model {base:.4f} at step 0)" if base is not None else ""
        if "eval_pairs" in e:  # a preference objective: its loss, then the accuracy table
            lines.append(f"- held-out {report['objective']} loss {began}{e['eval_loss']:.4f}")
            lines += preference_table(e, start)
        else:
            lines.append(
                f"- held-out loss {began}{e['eval_loss']:.4f}{base}, perplexity "
                f"{e['eval_perplexity']:.2f} ({e['eval_tokens']} tokens)"
            )
    em = report["exact_match"]
    if em:
        before = f"{em['before']:.1%}" if em["before"] is not None else "n/a (resumed run)"
        after = f"{em['after']:.1%}" if em["after"] is not None else "n/a (not at the end yet)"
        lines += [
            "",
            "## Held-out exact match (greedy decoding)",
            "",
            "| | accuracy |",
            "|---|---|",
            f"| before training (base model) | {before} |",
            f"| after training | {after} |",
            "",
            f"on the same {em['examples']} held-out examples.",
            "",
        ]
        lines += sample_table(em)
    if report["memory"].get("markdown"):
        lines += ["", "## Memory", "", report["memory"]["markdown"]]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    if images:
        lines += ["", f"![loss]({runs.LOSS_PLOT})", "", f"![memory]({runs.MEMORY_PLOT})", ""]
    return "\n".join(lines)


PREFERENCE_ROWS = (
    ("eval_preference_accuracy", "preference accuracy (chosen more likely than rejected)", "%"),
    ("eval_reward_accuracy", "reward accuracy (chosen gained more over the reference)", "%"),
    ("eval_reward_margin", "reward margin (chosen - rejected reward)", "f"),
    ("eval_rewards_chosen", "reward of chosen (desirable) responses", "f"),
    ("eval_rewards_rejected", "reward of rejected (undesirable) responses", "f"),
)


def preference_table(end: dict[str, Any], start: dict[str, Any] | None) -> list[str]:
    """Held-out preference figures at step 0 and after training (ties count as wrong)."""
    lines = [
        "",
        f"## Held-out preference ({end['eval_pairs']} examples)",
        "",
        "| | before training | after training |",
        "|---|---|---|",
    ]
    for key, label, kind in PREFERENCE_ROWS:
        if key not in end:
            continue
        cells = [(start or {}).get(key), end[key] if end["step"] else None]
        shown = ["n/a" if v is None else (f"{v:.1%}" if kind == "%" else f"{v:.4f}") for v in cells]
        lines.append(f"| {label} | {shown[0]} | {shown[1]} |")
    return [*lines, ""]


def sample_table(em: dict[str, Any]) -> list[str]:
    rows = ["| prompt | reference | before | after |", "|---|---|---|---|"]
    before = {s["prompt"]: s["prediction"] for s in em["samples_before"]}
    after = {s["prompt"]: s["prediction"] for s in em["samples_after"]}
    for s in em["samples_after"] or em["samples_before"]:
        prompt = s["prompt"].rsplit("user\n", 1)[-1].split("<|im_end|>")[0].strip()
        cells = [prompt, s["reference"], before.get(s["prompt"], ""), after.get(s["prompt"], "")]
        rows.append(
            "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
        )
    return rows


def plot_loss(history: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss")
    if evals:
        ax.plot(
            [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        write_file_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)


def write_report(result: RunResult, wall_time_s: float) -> dict[str, Any]:
    """Build the report and write report.json, report.md and the plots into the run
    directory, once; return the report."""
    estimates = run_estimates(result)
    report = build_report(result, wall_time_s, estimates)
    run_dir = result.run_dir
    runs.write_report(run_dir, report, render_markdown(report))
    if result.history:
        plot_loss(result.history, result.evals, runs.loss_plot_path(run_dir))
    plot_memory_use(estimates, report["memory"], runs.memory_plot_path(run_dir))
    return report


def plot_memory_use(estimates: Any, memory: dict[str, Any], path: Path) -> None:
    from finetune.memory.render import plot_memory

    write_file_atomically(
        path, lambda tmp: plot_memory(memory["measured"], estimates.run, estimates.full, tmp)
    )
