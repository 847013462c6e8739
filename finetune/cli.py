"""The `finetune` command line. It parses, calls one function per command, and prints.

User errors (`UserError`) end as one line on stderr and exit code 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from finetune.errors import UserError
from finetune.noise import silence_third_party
from finetune.outputs import write_error
from finetune.stopping import Interrupted

app = typer.Typer(
    add_completion=False,
    # Plain help text: with rich markup on, "[default: 8]" in a help string is read as a
    # markup tag and vanishes, leaving "LoRA/DoRA rank ." in --help.
    rich_markup_mode=None,
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
StrictOpt = Annotated[
    bool, typer.Option("--strict", help="Treat data warnings as errors (exit code 2).")
]


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
    force: Annotated[
        bool,
        typer.Option("--force", help="Train on CUDA even when the estimate says it cannot fit."),
    ] = False,
    strict: StrictOpt = False,
) -> None:
    """Fine-tune a model as RECIPE says and write the run directory and its report."""
    import time

    from finetune.adapters import check_init_from
    from finetune.memory.fit import check_recipe_fits_device
    from finetune.recipe import load_recipe
    from finetune.report import write_report
    from finetune.train import train as run_training

    started = time.perf_counter()
    spec = load_recipe(recipe, overrides or [])
    check_init_from(spec.adapter)
    check_recipe_fits_device(spec, force)  # before the model loads; a no-op on the CPU
    result = run_training(spec, resume=resume, strict=strict)
    if result.main_process:
        report = write_report(result, time.perf_counter() - started)
        show_report(result.run_dir, report)
    if result.stopped:
        raise UserError(result.stopped)
    if result.interrupted:
        again = shlex.join(["finetune", "train", str(recipe), *(overrides or []), "--resume"])
        console.print(
            f"{result.interrupted} at step {result.state.step}; checkpoint saved, continue "
            f"with: {again}",
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
    out.print(f"\nexample (row {check.shown_row}); trained tokens are between ⟦ and ⟧:")
    text = Text()
    for chunk, trained in check.shown:
        text.append(f"⟦{chunk}⟧" if trained else chunk, style="bold green" if trained else "dim")
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
    masked: Annotated[
        bool | None,
        typer.Option(
            "--masked/--unmasked",
            help="Padded or packed micro-batches: attention runs with a mask "
            "[default: masked when --batch is above 1].",
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
    format: Annotated[str, typer.Option(help="table|json|markdown")] = "table",
    plot: Annotated[Path | None, typer.Option(help="Write the method comparison as a PNG.")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing --plot file.")
    ] = False,
) -> None:
    """Estimate the memory a fine-tuning run needs, component by component, before it starts."""
    from finetune.memory.command import show_estimate

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
        "masked": masked,
    }
    show_estimate(target, overrides or [], options, format, gpu, plot, out, force, fit)


# ------------------------------------------------------------- after training (issue 4)
# generate, chat, eval, merge, export, combine: finetune.inference and finetune.export.

RunOrModel = Annotated[
    str,
    typer.Argument(
        help="A run directory, an adapter folder, or a model (folder, .gguf, hub id, "
        "smollm2-135m-instruct).",
        show_default=False,
    ),
]
RunArg = Annotated[
    str, typer.Argument(help="A run directory or an adapter folder.", show_default=False)
]
BaseModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Use this base model instead of the one the run names."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
MatchQuantizedOpt = Annotated[
    bool,
    typer.Option(
        "--match-quantized",
        help="After int8/nf4 training: fold into the dequantized quantized weights the "
        "adapter was trained against, instead of the original ones.",
    ),
]
ToleranceOpt = Annotated[
    float | None,
    typer.Option(help="Max |logit difference| the self-check accepts [default: by dtype/type]."),
]


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


SampleOpt = Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding.")]
TemperatureOpt = Annotated[
    float | None, typer.Option(help="Sampling temperature (implies --sample).")
]
TopPOpt = Annotated[float | None, typer.Option(help="Nucleus sampling mass (implies --sample).")]


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
    dtype: Annotated[str, typer.Option(help="float32|bfloat16|float16")] = "float32",
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
            dtype=dtype,
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
    format: Annotated[str, typer.Option(help="adapter|merged|gguf|gguf-adapter")] = "adapter",
    gguf_type: Annotated[str, typer.Option(help="GGUF tensor type: f16|f32|q8_0")] = "f16",
    dtype: Annotated[str, typer.Option(help="Merged dtype (format merged).")] = "float32",
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
            format,
            gguf_type=gguf_type,
            dtype=dtype,
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
    method: Annotated[str, typer.Option(help="linear|ties|dare_linear|dare_ties")] = "linear",
    weights: Annotated[
        str | None, typer.Option(help="Comma-separated, one per adapter [default: equal].")
    ] = None,
    density: Annotated[
        float | None, typer.Option(help="Kept fraction for ties/dare [default: 1 / 0.5].")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Combine LoRA adapters of one base into one adapter folder (peft's weighted merging)."""
    from finetune.export import combine as run_combine

    report = run_combine(
        runs, out_dir, method=method, weights=weights, density=density, force=force
    )
    weights_text = ", ".join(f"{w:g}" for w in report.weights)
    out.print(
        f"combined {len(report.sources)} adapters ({report.method}, weights {weights_text}): "
        f"{report.out}  (generate, eval, merge and export accept it)",
        highlight=False,
    )


def fail(message: str, code: int) -> NoReturn:
    """Print one error line and exit.

    The message may quote the user's input: a key or column name holding a newline or a
    control character is shown escaped (one line, always), and "[q_proj, v_proj]" is text
    to show, not rich markup to swallow.
    """
    from rich.markup import escape

    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    silence_third_party()
    try:
        code = app(args=argv, standalone_mode=False, prog_name="finetune")
        # Without standalone mode, click returns a typer.Exit's code instead of exiting.
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as err:
        if os.environ.get("FINETUNE_DEBUG"):
            raise
        fail(str(err), err.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Interrupted as err:  # a second Ctrl-C or SIGTERM while a run was saving and stopping
        console.print(f"stopped at once by a second {err}; every file written is complete")
        sys.exit(err.exit_code)
    except OSError as err:  # a write failing outside the places that name their path
        error = write_error(err, err.filename or "output")
        if error is None:
            raise
        fail(str(error), error.exit_code)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except typer.TyperException as err:  # typer's own (vendored) click errors
        if type(err).__name__ == "NoArgsIsHelpError":
            err.show()  # the help text
        else:  # a usage error: one line, like every other user error
            ctx = getattr(err, "ctx", None)
            hint = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
            fail(f"{err.format_message().rstrip('.')}{hint}", err.exit_code)
        sys.exit(err.exit_code)
