"""The `finetune` command line. It parses, calls one function per command, and prints.

User errors (`UserError`) end as one line on stderr and exit code 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from finetune.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Parameter-efficient fine-tuning of decoder language models, with memory you can "
    "know before you start.",
)
console = Console(stderr=True)
out = Console()

Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Dotted overrides such as train.lr=1e-4 adapter.r=16.", show_default=False),
]
RecipeArg = Annotated[Path, typer.Argument(help="A YAML recipe.", show_default=False)]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    if debug:
        os.environ["FINETUNE_DEBUG"] = "1"


# --------------------------------------------------------------------------- commands
# Each command imports its stage lazily so `finetune --help` stays fast.


@app.command()
def train(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the run in output.dir from its latest checkpoint."),
    ] = False,
) -> None:
    """Fine-tune a model as RECIPE says and write the run directory and its report."""
    import time

    from finetune.recipe import load_recipe
    from finetune.report import write_report
    from finetune.train import train as run_training

    started = time.perf_counter()
    spec = load_recipe(recipe, overrides or [])
    result = run_training(spec, resume=resume)
    report = write_report(result, time.perf_counter() - started)
    show_report(result.run_dir, report)


def show_report(run_dir: Path, report: dict) -> None:
    from rich.markdown import Markdown

    out.print(Markdown((run_dir / "report.md").read_text().replace("![loss](loss.png)", "")))
    out.print(f"run directory: {run_dir}  (report.md, report.json, loss.png, adapter/)")


@app.command()
def validate(recipe: RecipeArg, overrides: Overrides = None) -> None:
    """Check RECIPE's schema and data; show one example with its trained tokens marked."""
    from rich.text import Text

    from finetune.data import check_recipe_data
    from finetune.recipe import load_recipe

    spec = load_recipe(recipe, overrides or [])
    check = check_recipe_data(spec)
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
    out.print(f"\nexample (row {check.shown_row}); trained tokens are between ⟦ and ⟧:")
    text = Text()
    for chunk, trained in check.shown:
        text.append(f"⟦{chunk}⟧" if trained else chunk, style="bold green" if trained else "dim")
    out.print(text)


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
        str | None,
        typer.Option(help="full|lora|dora|ia3|prefix|prompt [default: lora or the recipe's]"),
    ] = None,
    quant: Annotated[str | None, typer.Option(help="none|int8|nf4|fp4 [default: none]")] = None,
    double_quant: Annotated[
        bool | None,
        typer.Option("--double-quant/--no-double-quant", help="Quantize the 4-bit scales again."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="float32|bfloat16|float16 of the unquantized weights [default: bfloat16]"
        ),
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
        str | None, typer.Option(help="adamw|adamw8bit|sgd [default: adamw]")
    ] = None,
    attn: Annotated[str | None, typer.Option(help="sdpa|eager|flash [default: sdpa]")] = None,
    gpu: Annotated[
        float | None,
        typer.Option(
            help="GPU memory in GB (1e9 bytes): say whether it fits and what makes it fit."
        ),
    ] = None,
    format: Annotated[str, typer.Option(help="table|json|markdown")] = "table",
    plot: Annotated[Path | None, typer.Option(help="Write the method comparison as a PNG.")] = None,
) -> None:
    """Estimate the memory a fine-tuning run needs, component by component, before it starts."""
    from finetune.memory.command import run_estimate

    if format not in ("table", "json", "markdown"):
        raise UserError(f"--format must be table, json or markdown (got {format!r})")
    options = {
        "method": method,
        "quant": quant,
        "double_quant": double_quant,
        "dtype": dtype,
        "r": r,
        "targets": targets,
        "virtual_tokens": virtual_tokens,
        "batch": batch,
        "seq": seq,
        "grad_ckpt": grad_ckpt,
        "optimizer": optimizer,
        "attn": attn,
    }
    run_estimate(target, overrides or [], options, format, gpu, plot, out)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as err:
        if os.environ.get("FINETUNE_DEBUG"):
            raise
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as err:  # click's usage errors carry their own exit code
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Exit):
            sys.exit(err.exit_code)
        raise
