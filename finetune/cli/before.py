"""Commands before and around training: train, validate, estimate."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from finetune.cli.app import app, console, out
from finetune.cli.options import (
    Attention,
    Dtype,
    EstimateFormat,
    EstimateMethod,
    Objective,
    Optimizer,
    Overrides,
    Quant,
    RecipeArg,
    Reference,
    Sharding,
    StrictOpt,
    value,
)
from finetune.errors import UserError

# Each command imports its stage lazily so `finetune --help` stays fast.


@app.command()
def train(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the run in output.dir from its latest checkpoint."),
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Train on CUDA even when the estimate says it cannot fit."),
    ] = False,
    strict: StrictOpt = False,
) -> None:
    """Fine-tune a model as RECIPE says and write the run directory and its report."""
    import time

    from finetune.adapters import check_init_from
    from finetune.recipe import load_recipe
    from finetune.report import write_report
    from finetune.train import train as run_training

    started = time.perf_counter()
    from finetune.runs import bind_to_own_run

    spec = bind_to_own_run(load_recipe(recipe, overrides or []), recipe, overrides or [], resume)
    check_init_from(spec.adapter)
    # The CUDA fit check runs inside, after every input check and before the model loads.
    result = run_training(spec, resume=resume, strict=strict, force=force)
    if result.main_process:
        report = write_report(result, time.perf_counter() - started)
        show_report(result.run_dir, report)
    if result.stopped:
        raise UserError(result.stopped)
    if result.interrupted:
        again = shlex.join(["finetune", "train", str(recipe), *(overrides or []), "--resume"])
        saved = "checkpoint saved" if result.state.step else "no step taken, nothing to keep"
        console.print(
            f"{result.interrupted} at step {result.state.step}; {saved}, continue with: {again}",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
        sys.exit(result.exit_code)


def show_report(run_dir: Path, report: dict) -> None:
    """The report's summary (report.md without its plots), from the report's data."""
    from rich.markdown import Markdown

    from finetune.report import render_markdown
    from finetune.runs import written_outputs

    out.print(Markdown(render_markdown(report, images=False)))
    written = ", ".join(written_outputs(run_dir))
    out.print(f"run directory: {run_dir}  ({written})", highlight=False)


def machine_problems(spec: Any) -> list[str]:
    """What `finetune train` would refuse on this machine though the recipe is valid (a
    kernel or compiler it lacks): validate checks a recipe that may train elsewhere."""
    from finetune import compiling, models
    from finetune.prepare import checkpoints

    device = models.default_device()
    checks = [lambda: models.check_attention(spec.model.attn_implementation, device)]
    if spec.train.compile:
        checking = checkpoints(spec)
        checks.append(lambda: compiling.check_compiler(device, False, checkpointing=checking))
    problems = []
    for check in checks:
        try:
            check()
        except UserError as err:
            problems.append(str(err))
    return problems


@app.command()
def validate(
    recipe: RecipeArg,
    overrides: Overrides = None,
    strict: StrictOpt = False,
    plot: Annotated[
        Path | None,
        typer.Option(help="Write the token lengths of prompts and responses as a PNG."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing --plot file.")
    ] = False,
) -> None:
    """Check RECIPE's schema and data: run the data checks, show one example's trained tokens."""
    from rich.text import Text

    from finetune import doctor
    from finetune.adapters import check_init_from
    from finetune.data import check_recipe_data
    from finetune.outputs import claim_output
    from finetune.recipe import load_recipe
    from finetune.tracking import check_available

    spec = load_recipe(recipe, overrides or [])
    check_init_from(spec.adapter)
    check_available(spec.train.report_to)
    if plot is not None:  # checked before any work, like every output
        claim_output(plot, option="--plot", kind="file", force=force, inputs=spec.input_paths())
    check = check_recipe_data(spec)
    diagnosis = doctor.diagnose(spec, check.tokenizer, check.splits)
    train_data, eval_data = check.splits.train, check.splits.eval
    out.print(f"[green]recipe ok[/]: {recipe}")
    out.print(
        f"train: {len(train_data)} examples, {train_data.tokens:,} tokens, "
        f"{train_data.trained_tokens:,} trained, {train_data.truncated} truncated "
        f"at max_length {spec.data.max_length}"
    )
    if eval_data is not None:
        out.print(
            f"eval: {len(eval_data)} examples, {eval_data.tokens:,} tokens, "
            f"{eval_data.truncated} truncated"
        )
    show_diagnosis(diagnosis)
    for problem in machine_problems(spec):
        note = f"[yellow]note[/]: on this machine train would stop: {problem}"
        out.print(note, highlight=False, soft_wrap=True)
    sides = [("", check.shown)]
    if check.shown_rejected is not None:
        sides = [("chosen: ", check.shown), ("rejected: ", check.shown_rejected)]
    out.print(f"\nexample (row {check.shown_row}); trained tokens are between ⟦ and ⟧:")
    for label, runs in sides:
        text = Text(label)
        for chunk, trained in runs:
            style = "bold green" if trained else "dim"
            text.append(f"⟦{chunk}⟧" if trained else chunk, style=style)
        out.print(text)
    if plot is not None:
        doctor.plot_lengths(check.splits, spec.data.max_length, plot)
        out.print(f"wrote {plot}", highlight=False)
    doctor.refuse(diagnosis, strict)


def show_diagnosis(diagnosis) -> None:
    """The data checks as a table, then why and how to fix each one that fired."""
    from rich.markup import escape
    from rich.table import Table

    from finetune.doctor import sanitize

    styles = {"ok": "green", "warning": "yellow", "error": "bold red"}
    table = Table(title="data checks", title_justify="left")
    for name, justify in (("check", "left"), ("result", "left"), ("count", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    table.add_column("details and an example row")
    for f in diagnosis.findings:
        detail = "\n".join(escape(sanitize(text)) for text in (f.summary, f.example) if text)
        level = f"[{styles[f.level]}]{f.level}[/]"
        table.add_row(f.name, level, str(f.count), detail)
    out.print(table)
    for f in diagnosis.findings:
        if f.level != "ok":
            out.print(
                f"[{styles[f.level]}]{f.name}[/]: {escape(f.why)}. Fix: {escape(f.fix)}.",
                highlight=False,
            )


@app.command()
def estimate(
    target: Annotated[
        str,
        typer.Argument(
            help="A preset (llama-2-7b, smollm2-135m, ...), a "
            "model folder or config.json, a .gguf file, a hub "
            "id, a recipe YAML or a run directory."
        ),
    ],
    overrides: Overrides = None,
    method: Annotated[
        EstimateMethod | None, typer.Option(help="[default: lora or the recipe's]")
    ] = None,
    quant: Annotated[Quant | None, typer.Option(help="[default: none]")] = None,
    double_quant: Annotated[
        bool | None,
        typer.Option("--double-quant/--no-double-quant", help="Quantize the 4-bit scales again."),
    ] = None,
    dtype: Annotated[
        Dtype | None, typer.Option(help="Of the unquantized weights [default: bfloat16].")
    ] = None,
    r: Annotated[int | None, typer.Option("--r", help="LoRA/DoRA rank [default: 8].")] = None,
    targets: Annotated[
        str | None,
        typer.Option(help="Comma-separated module names or all-linear [default: all-linear]."),
    ] = None,
    virtual_tokens: Annotated[
        int | None, typer.Option(help="Virtual tokens for prefix/prompt [default: 20].")
    ] = None,
    batch: Annotated[int | None, typer.Option(help="Micro-batch size [default: 1].")] = None,
    seq: Annotated[int | None, typer.Option(help="Sequence length [default: 512].")] = None,
    grad_ckpt: Annotated[
        bool | None,
        typer.Option("--grad-ckpt/--no-grad-ckpt", help="Gradient checkpointing [default: off]."),
    ] = None,
    optimizer: Annotated[
        Optimizer | None,
        typer.Option(
            help="AdamW's implementation: adamw is torch's default for the device (foreach on "
            "CUDA, which holds whole-model temporaries in its step; for-loop on the CPU), as "
            "training runs it. [default: adamw]"
        ),
    ] = None,
    attn: Annotated[Attention | None, typer.Option(help="[default: sdpa]")] = None,
    objective: Annotated[
        Objective | None,
        typer.Option(
            help="The training objective: sft, or a preference one (dpo, orpo: --batch counts "
            "pairs, both sides in the step; dpo, kto: the reference's forward too). "
            "[default: sft]"
        ),
    ] = None,
    reference: Annotated[
        Reference | None,
        typer.Option(
            help="dpo, kto: forward (the reference's forward pass in every step) or cached "
            "(train.reference cached: its log-probabilities computed once before training). "
            "[default: forward]"
        ),
    ] = None,
    masked: Annotated[
        bool | None,
        typer.Option(
            "--masked/--unmasked",
            help="Padded or packed micro-batches: attention runs with a mask "
            "[default: masked when --batch is above 1].",
        ),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            help="Processes (GPUs) training together; --batch is per process and the "
            "estimate is one process's. [default: 1, or the launcher's WORLD_SIZE]"
        ),
    ] = None,
    sharding: Annotated[
        Sharding | None,
        typer.Option(
            help="none: each process holds the whole model (data parallelism); fsdp: FSDP2 "
            "full shard, weights, adapter, gradients and optimizer states split over "
            "--processes (recipes/accelerate/fsdp.yaml). [default: none]"
        ),
    ] = None,
    gpu: Annotated[
        float | None,
        typer.Option(
            help="GPU memory in GB (1e9 bytes): say whether it fits and what makes it fit."
        ),
    ] = None,
    fit: Annotated[
        bool,
        typer.Option(
            "--fit", help="With --gpu: the largest micro-batch and longest sequence that fit."
        ),
    ] = False,
    format: Annotated[EstimateFormat, typer.Option(help="How to print it.")] = EstimateFormat(
        "table"
    ),
    plot: Annotated[Path | None, typer.Option(help="Write the method comparison as a PNG.")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing --plot file.")
    ] = False,
) -> None:
    """Estimate the memory a fine-tuning run needs, component by component, before it starts."""
    from finetune.memory.command import EstimateOptions, show_estimate

    options = EstimateOptions(
        method=value(method),
        quant=value(quant),
        double_quant=double_quant,
        dtype=value(dtype),
        r=r,
        targets=targets,
        virtual_tokens=virtual_tokens,
        batch=batch,
        seq=seq,
        grad_ckpt=grad_ckpt,
        optimizer=value(optimizer),
        attn=value(attn),
        objective=value(objective),
        reference=value(reference),
        masked=masked,
        processes=processes,
        sharding=value(sharding),
    )
    show_estimate(target, overrides or [], options, format.value, gpu, plot, out, force, fit)


# ------------------------------------------------------------- after training (issue 4)
# generate, chat, eval, merge, export, combine: finetune.inference and finetune.export.
