"""Commands after training: generate, chat, eval (finetune.inference), merge, export,
combine (finetune.export)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from finetune.cli.app import app, console, fail, out
from finetune.cli.options import (
    BaseModelOpt,
    CombineMethod,
    Dtype,
    ExportFormat,
    ForceOpt,
    GGUFType,
    MatchQuantizedOpt,
    RunArg,
    RunOrModel,
    SampleOpt,
    TemperatureOpt,
    ToleranceOpt,
    TopPOpt,
)


def _checked(call):
    """Run an export step; a failed self-check is one line and exit code 1."""
    from finetune.export import CheckFailed

    try:
        return call()
    except CheckFailed as err:
        fail(str(err), err.exit_code)


def _sampling(sample: bool, temperature: float | None, top_p: float | None) -> dict:
    from finetune.inference import sampling_options

    return sampling_options(sample, temperature, top_p)


@app.command()
def generate(
    target: RunOrModel,
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts.", show_default=False)],
    max_new_tokens: Annotated[
        int, typer.Option(min=1, max=1_000_000, help="Tokens to generate.")
    ] = 64,
    sample: SampleOpt = False,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Do not wrap prompts in the chat template.")
    ] = False,
    model: BaseModelOpt = None,
) -> None:
    """Complete PROMPTS with a run (base plus adapter) or a model; greedy by default."""
    from finetune.inference import generate_text

    options = _sampling(sample, temperature, top_p)
    texts = generate_text(
        target,
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=options,
        chat_template=not raw,
        model=model,
        seed=seed,
        notify=lambda text: console.print(text, highlight=False, markup=False),
    )
    for prompt, text in zip(prompts, texts, strict=True):
        if len(prompts) > 1:
            out.print(f"[bold]> {prompt}[/]", highlight=False)
        out.print(text, highlight=False, markup=False)


@app.command()
def chat(
    target: RunOrModel,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, max=1_000_000, help="Tokens per reply.")
    ] = 128,
    sample: SampleOpt = False,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    model: BaseModelOpt = None,
) -> None:
    """Talk to a run or model, one line per turn; /reset starts over, /exit or Ctrl-D ends."""
    from finetune.inference import chat_loop

    interactive = sys.stdin.isatty()
    if interactive:
        # input() gains line editing and history: arrow keys no longer reach the model.
        # Windows has no readline; its console does its own line editing.
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401

    def read() -> str | None:
        try:
            return input("you> " if interactive else "")
        except EOFError:
            return None

    def write(text: str) -> None:
        out.print(f"[bold]model>[/] {text}" if interactive else text, highlight=False)

    def notify(text: str) -> None:  # on stderr: stdout holds only what the model said
        console.print(f"[dim]{text}[/]", highlight=False)

    if interactive:
        console.print(
            "loading... (type /exit or press Ctrl-D to end, /reset to start over)", highlight=False
        )
    options = _sampling(sample, temperature, top_p)
    chat_loop(
        target,
        read,
        write,
        max_new_tokens=max_new_tokens,
        sampling=options,
        model=model,
        system=system,
        notify=notify,
    )


@app.command("eval")
def eval_(
    target: RunOrModel,
    data: Annotated[Path, typer.Option("--data", help="Data file (any recipe data format).")],
    base: Annotated[
        bool, typer.Option("--base", help="Evaluate the base model too, side by side.")
    ] = False,
    format: Annotated[
        str | None, typer.Option(help="text|instruction|chat [default: the run's]")
    ] = None,
    max_examples: Annotated[
        int | None, typer.Option(min=1, max=1_000_000, help="Cap on exact-match examples.")
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(min=1, max=1_000_000, help="Tokens generated per exact-match example."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    model: BaseModelOpt = None,
) -> None:
    """Loss, perplexity and exact match of a run (and with --base, of its base) on a dataset."""
    import json

    from finetune.inference import evaluate_target

    result = evaluate_target(
        target,
        str(data),
        base=base,
        fmt=format,
        model=model,
        max_examples=max_examples,
        max_new_tokens=max_new_tokens,
    )
    if json_out:
        out.print_json(json.dumps(result))
        return
    from rich.table import Table

    names = [n for n in ("base", "adapter", "model") if n in result]
    table = Table(title=f"{result['data']} ({result['examples']} examples, {result['format']})")
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    rows = [("loss", "loss", "{:.4f}"), ("perplexity", "perplexity", "{:.3f}")]
    rows.append(("tokens", "tokens", "{:,}"))
    for label, key, fmt in rows:
        table.add_row(label, *[fmt.format(result[n][key]) for n in names])
    if "exact_match" in result[names[0]]:
        table.add_row(
            "exact match",
            *[
                f"{result[n]['exact_match']['accuracy']:.1%} "
                f"({result[n]['exact_match']['correct']}/{result[n]['exact_match']['total']})"
                for n in names
            ],
        )
    out.print(table)


@app.command()
def merge(
    run: RunArg,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the merged model.")],
    dtype: Annotated[Dtype, typer.Option(help="Of the merged weights.")] = Dtype("float32"),
    match_quantized: MatchQuantizedOpt = False,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard.")] = "2GB",
    tolerance: ToleranceOpt = None,
    force: ForceOpt = False,
    model: BaseModelOpt = None,
) -> None:
    """Fold a LoRA, DoRA or IA3 adapter into its base; check logits; save with a README."""
    from finetune.export import merge as run_merge

    report = _checked(
        lambda: run_merge(
            run,
            out_dir,
            dtype=dtype.value,
            match_quantized=match_quantized,
            force=force,
            max_shard_size=max_shard_size,
            tolerance=tolerance,
            model=model,
        )
    )
    _show_merge(report)
    out.print(f"merged model: {out_dir}  (README.md, merge.json)")


def _show_merge(report) -> None:
    from finetune.export import merge_lines

    for line in merge_lines(report):
        out.print(line, highlight=False)


@app.command()
def export(
    run: Annotated[
        str,
        typer.Argument(
            help="A run directory or an adapter folder (for --format gguf also a plain model, "
            "to make the base GGUF an adapter GGUF applies to).",
            show_default=False,
        ),
    ],
    out_path: Annotated[Path, typer.Option("--out", help="Output folder, or .gguf file.")],
    format: Annotated[ExportFormat, typer.Option(help="What to write.")] = ExportFormat("adapter"),
    gguf_type: Annotated[GGUFType, typer.Option(help="GGUF tensor type.")] = GGUFType("f16"),
    dtype: Annotated[Dtype, typer.Option(help="Merged dtype (format merged).")] = Dtype("float32"),
    base_gguf: Annotated[
        Path | None,
        typer.Option(
            "--base-gguf",
            help="gguf-adapter: the base model's GGUF the adapter is checked on [default: the "
            "GGUF the run's base came from].",
        ),
    ] = None,
    match_quantized: MatchQuantizedOpt = False,
    tolerance: ToleranceOpt = None,
    force: ForceOpt = False,
    model: BaseModelOpt = None,
) -> None:
    """Export a run as its adapter (with a model card), a merged model, a GGUF file, or its
    LoRA adapter as a llama.cpp adapter GGUF. GGUF files are checked in llama.cpp when
    llama-cpp-python is installed."""
    from finetune.export import export as run_export
    from finetune.export import gguf_check_line

    report = _checked(
        lambda: run_export(
            run,
            out_path,
            format.value,
            gguf_type=gguf_type.value,
            dtype=dtype.value,
            match_quantized=match_quantized,
            force=force,
            tolerance=tolerance,
            model=model,
            base_gguf=base_gguf,
        )
    )
    if report.merge is not None:
        _show_merge(report.merge)
    if report.check is not None:
        out.print(gguf_check_line(report), highlight=False)
    out.print(f"{report.format}: {report.out} ({report.size_bytes / 1e6:.1f} MB)", highlight=False)


@app.command()
def combine(
    runs: Annotated[
        list[str], typer.Argument(help="Two or more runs or adapter folders.", show_default=False)
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the combined adapter.")],
    method: Annotated[CombineMethod, typer.Option(help="peft's way of combining.")] = CombineMethod(
        "linear"
    ),
    weights: Annotated[
        str | None,
        typer.Option(help="Comma-separated, one per adapter [default: 1/N each: the average]."),
    ] = None,
    density: Annotated[
        float | None, typer.Option(help="Kept fraction for ties/dare [default: 1 / 0.5].")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Combine LoRA adapters of one base into one adapter folder (peft's weighted merging)."""
    from finetune.export import combine as run_combine

    report = run_combine(
        runs, out_dir, method=method.value, weights=weights, density=density, force=force
    )
    weights_text = ", ".join(f"{w:g}" for w in report.weights)
    out.print(
        f"combined {len(report.sources)} adapters ({report.method}, weights {weights_text}): "
        f"{report.out}  (generate, eval, merge and export accept it)",
        highlight=False,
    )
