"""Rendering an estimate: rich tables, JSON, markdown and a bar chart.

GB means 1e9 bytes everywhere (the unit of the 84 GB and 13 GB rules of thumb).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.memory.dryrun import (
    REFUSED_ROWS_NOTE,
    UNSHARDABLE_ROWS_NOTE,
    compare_methods,
    reference_costs,
)
from finetune.memory.estimate import (
    COMPONENTS,
    SHARDING_COMPONENT,
    Estimate,
    Setup,
    rule_of_thumb_bytes,
)
from finetune.memory.presets import nominal_params
from finetune.outputs import write_file_atomically

GB = 1e9


def human(nbytes: float) -> str:
    """Bytes as GB (1e9), MB or kB with three significant figures."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= size:
            return (
                f"{nbytes / size:.3g} {unit}"
                if nbytes / size < 100
                else f"{nbytes / size:.1f} {unit}"
            )
    return f"{int(nbytes)} B"


def component_rows(est: Estimate) -> list[tuple[str, int, float, str]]:
    """(component, bytes, share of total, note) in the order of COMPONENTS; the sharding
    row only for a sharded setup."""
    total = est.total_bytes or 1
    return [
        (name, est.components[name], est.components[name] / total, est.notes.get(name, ""))
        for name in COMPONENTS
        if name != SHARDING_COMPONENT or est.setup.sharding != "none"
    ]


def per_process(setup: Setup) -> str:
    """How the figures divide between processes, for the headline ("" for one process)."""
    if setup.processes == 1:
        return ""
    if setup.sharding == "fsdp":
        return f"; per process of {setup.processes}, FSDP2 full shard"
    return f"; per process of {setup.processes} (data parallel: each holds the whole model)"


def headline(est: Estimate) -> list[str]:
    """The sentences printed above the tables: counts, state bytes, the rules of thumb."""
    arch, setup = est.arch, est.setup
    lines = [
        f"{arch.name}: {est.total_params:,} parameters, {est.trainable_params:,} trainable "
        f"({100 * est.trainable_params / est.total_params:.3g}%); "
        f"batch {setup.batch} x seq {setup.seq}"
        f"{' with an attention mask (padding or packing)' if setup.attention_masked else ''}"
        f"{per_process(setup)}; GB = 1e9 bytes",
        f"weights + gradients + optimizer states: {human(est.state_bytes)}; "
        f"estimated peak: {human(est.total_bytes)} ({est.metric}, plus runtime overhead)",
    ]
    if est.reserved_bytes is not None and est.setup.device == "cuda":
        lines.append(
            f"allocated peak {human(est.allocated_bytes)}; reserved by the caching allocator "
            f"(modelled) {human(est.reserved_bytes)}; with the CUDA context "
            f"{human(est.verdict_bytes)}"
        )
    nominal = nominal_params(arch.name) or est.total_params
    thumb = rule_of_thumb_bytes(nominal, setup)
    if thumb is None:
        return lines
    parts = " + ".join(f"{human(v)} {k}" for k, v in thumb.items())
    size = f"{nominal / 1e9:g}B nominal"
    if setup.method == "full":
        lines.append(budget_line(est))
    else:
        lines.append(
            f"rule of thumb (LoRA on int8): {parts} = {human(sum(thumb.values()))} at "
            f"{size}; our breakdown: {human(est.state_bytes)} weights and states + "
            f"{human(est.components['activations'] + est.components['logits and loss'])}"
            " activations and logits"
        )
    return lines


def budget_line(est: Estimate) -> str:
    """The seed's 12 B/param budget, labelled as what it is: arithmetic, not a dry run."""
    base = est.base_params
    nominal = nominal_params(est.arch.name) or base
    parts = rule_of_thumb_bytes(nominal, Setup(method="full")) or {}
    terms = " + ".join(f"{human(v)} {k}" for k, v in parts.items())
    return (
        f"seed's budget for full fp16 fine-tuning, 12 B/param (fp16 weights 2 + fp16 "
        f"gradients 2 + fp32 Adam m, v 8; no activations, not a dry run): {terms} = "
        f"{human(sum(parts.values()))} at {nominal / 1e9:g}B nominal; "
        f"{human(12 * base)} at the exact {base / 1e9:.4g}B. "
        "Pure 16-bit AdamW keeps 8 B/param of state, mixed precision 16 (rows above)"
    )


def comparison_rows(est: Estimate) -> list[tuple[str, int, int, int]]:
    """(method, trainable params, weights+states bytes, total bytes) for the same model."""
    return [
        (label, e.trainable_params, e.state_bytes, e.total_bytes)
        for label, e in compare_methods(est.arch, est.setup, est.config)
    ]


def comparison_notes(est: Estimate) -> list[str]:
    """Lines under the method comparison: what the reference pass costs (dpo, kto) and,
    for a preference objective, the rows left out."""
    lines = []
    costs = reference_costs(est)
    if costs is not None:
        kl = "; kto's KL rows still run it" if est.setup.objective == "kto" else ""
        # Below 0 for kto: its KL rows' reference forward still sets the peak, and the
        # cached log-probabilities are one more tensor.
        extra = costs["reference_forward_bytes"]
        lines.append(
            f"reference forward: {'+' if extra >= 0 else '-'}{human(abs(extra))} "
            f"({human(costs['forward_total_bytes'])} with it in the step, "
            f"{human(costs['cached_total_bytes'])} with train.reference cached{kl})"
        )
    if est.setup.objective != "sft":
        lines.append(REFUSED_ROWS_NOTE)
    if est.setup.sharding != "none":
        lines.append(UNSHARDABLE_ROWS_NOTE)
    return lines


def to_json(est: Estimate, fit: list[str] | None = None) -> str:
    """The estimate as a JSON object: total_bytes, components (name -> bytes) and more."""
    data: dict[str, Any] = est.to_dict()
    data["comparison"] = [
        {"method": m, "trainable_params": t, "state_bytes": s, "total_bytes": tot}
        for m, t, s, tot in comparison_rows(est)
    ]
    costs = reference_costs(est)
    if costs is not None:
        data["reference_pass"] = costs
    data["comparison_notes"] = comparison_notes(est)
    data["budget"] = budget_line(est)
    data["headline"] = headline(est)
    if fit is not None:
        data["fit"] = fit
    return json.dumps(data, indent=2)


def measured_lines(
    est: Estimate, measured: dict[str, Any] | None, resident: dict[str, Any] | None = None
) -> list[str]:
    """The measured peak beside the estimate (metric named, error when the metric is the
    estimate's), and the process's resident-memory growth as its own, uncompared line.

    `measured`: `LiveTensorPeak.to_dict()` on the CPU or `PeakMemory.to_dict()` on CUDA;
    `resident`: `PeakMemory.to_dict()` of the CPU run's RSS.
    """
    if not measured:
        return []
    peak = measured["peak_bytes"]
    lines = [f"measured: {human(peak)} ({measured['metric']})"]
    if "live tensors" in measured["metric"] and peak:
        error = (est.allocated_bytes - peak) / peak
        lines[0] += f"; estimate {human(est.allocated_bytes)}, {error:+.1%} of measured"
    each = measured.get("per_process_peak_bytes") or []
    if len(each) > 1 and "live tensors" in measured["metric"]:
        lines.append(
            "measured per process: "
            + ", ".join(
                f"rank {rank} {human(peak)} ({(est.allocated_bytes - peak) / peak:+.1%})"
                for rank, peak in enumerate(each)
                if peak
            )
            + f"; the estimate is one process's ({est.setup.processes} processes, sharding "
            f"{est.setup.sharding})"
        )
    if measured.get("reserved_bytes"):
        lines.append(f"measured max reserved: {human(measured['reserved_bytes'])}")
    if resident:
        lines.append(
            f"process resident memory: {human(resident['peak_bytes'])} ({resident['metric']})"
        )
    return lines


METHODS_LEFT_OUT = (
    "method comparison left out: the run was stopped by a signal, and a scheduler's grace "
    "period is seconds (`finetune estimate <run directory>` prints it)"
)


def to_markdown(
    est: Estimate,
    measured: dict[str, Any] | None = None,
    fit: list[str] | None = None,
    resident: dict[str, Any] | None = None,
    methods: bool = True,
) -> str:
    """The estimate as markdown (for report.md), with a measured peak beside it if given
    (see `measured_lines`); without the method comparison (seven dry runs) if not `methods`."""
    lines = [f"- {line}" for line in headline(est)]
    lines += [f"- {line}" for line in measured_lines(est, measured, resident)]
    lines += ["", "| component | bytes | share | note |", "|---|---:|---:|---|"]
    for name, nbytes, share, note in component_rows(est):
        lines.append(f"| {name} | {human(nbytes)} | {100 * share:.1f}% | {note} |")
    lines.append(f"| **total** | **{human(est.total_bytes)}** | 100% | {est.metric} |")
    if methods:
        lines += ["", "| method | trainable | weights + states | total |", "|---|---:|---:|---:|"]
        for label, trainable, state, total in comparison_rows(est):
            lines.append(f"| {label} | {trainable:,} | {human(state)} | {human(total)} |")
        lines += [""] + [f"- {line}" for line in comparison_notes(est)]
    else:
        lines += ["", f"- {METHODS_LEFT_OUT}"]
    lines += [f"- {budget_line(est)}"]
    lines += [f"- {line}" for line in fit or []]
    return "\n".join(lines) + "\n"


def print_tables(
    est: Estimate,
    console: Any,
    fit: list[str] | None = None,
    measured: dict[str, Any] | None = None,
) -> None:
    """Print the headline, the component table and the method comparison with rich."""
    from rich.table import Table

    for line in headline(est):
        console.print(line, highlight=False)
    for line in measured_lines(est, measured):
        console.print(line, highlight=False)
    table = Table(
        title=f"memory estimate: {est.setup.method}, quant {est.setup.quant}, {est.setup.dtype}"
    )
    for col, justify in (
        ("component", "left"),
        ("bytes", "right"),
        ("share", "right"),
        ("note", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, nbytes, share, note in component_rows(est):
        table.add_row(name, human(nbytes), f"{100 * share:.1f}%", note)
    table.add_row("total", human(est.total_bytes), "100%", est.metric, style="bold")
    console.print(table)
    compare = Table(title="same model and shape, by method (AdamW)")
    for col in ("method", "trainable", "weights + states", "total"):
        compare.add_column(col, justify="left" if col == "method" else "right")
    for label, trainable, state, total in comparison_rows(est):
        compare.add_row(label, f"{trainable:,}", human(state), human(total))
    console.print(compare)
    for line in comparison_notes(est):
        console.print(line, highlight=False)
    console.print(budget_line(est), highlight=False)
    for line in fit or []:
        console.print(line, highlight=False)


def plot_memory(
    measured: dict[str, Any] | None, run: Estimate, full: Estimate, path: str | Path
) -> Path:
    """Bar chart (PNG) of one metric: the run's estimate by component, its measured peak,
    and full fine-tuning of the same model and shape; the seed's 12 B/param budget is a
    labelled line, since it counts state only (no activations) and is not the same kind.

    Args:
        measured: `LiveTensorPeak.to_dict()` (CPU) or `PeakMemory.to_dict()` (CUDA), or None.
        run: the dry-run estimate of the run.
        full: the dry-run estimate of full fine-tuning at the same batch, sequence, dtype.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak = (measured or {}).get("peak_bytes") or 0
    budget = run.full_fp16_budget_bytes
    unit, size = ("GB", GB) if max(full.allocated_bytes, budget) >= GB else ("MB", 1e6)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    method = run.setup.method
    bars = [(f"{method}: estimate", run), (f"{method}: measured", peak)] if measured else []
    bars = bars or [(f"{method}: estimate", run)]
    bars.append(("full fine-tuning:\nestimate", full))
    for x, (_, value) in enumerate(bars):
        if isinstance(value, Estimate):
            stacked_bar(ax, x, value, size)
        else:
            ax.bar(x, value / size, width=0.6, color="black", label="measured (same metric)")
            label_bar(ax, x, value, size)
    ax.axhline(budget / size, color="crimson", linestyle="--", linewidth=1.2)
    ax.text(
        0.99,
        budget / size,
        f"seed budget, full fp16 at 12 B/param: {human(budget)}\n"
        "(weights + gradients + Adam states only, no activations)",
        transform=ax.get_yaxis_transform(),
        ha="right",
        va="bottom",
        fontsize=7,
        color="crimson",
    )
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=8)
    ax.set_ylim(0, 1.25 * max(full.allocated_bytes, run.allocated_bytes, peak, budget) / size)
    ax.set_ylabel(f"{unit} (1e{9 if unit == 'GB' else 6} bytes)")
    setup = run.setup
    ax.set_title(
        f"{metric_name(run)}: {Path(run.arch.name).name}, batch {setup.batch} x seq "
        f"{setup.seq}, {setup.dtype}",
        fontsize=9,
    )
    handles = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))  # unique
    ax.legend(
        handles.values(),
        handles.keys(),
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        title="estimate by component",
        title_fontsize=7,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# One colour per component, the same in every stacked bar.
COMPONENT_COLORS = dict(zip(COMPONENTS, [f"C{i}" for i in range(len(COMPONENTS))], strict=True))


def stacked_bar(ax: Any, x: int, est: Estimate, size: float) -> None:
    """The estimate's allocated components stacked at `x` (runtime overhead is not a tensor)."""
    bottom = 0.0
    for name in COMPONENTS:
        value = est.components[name] / size
        if value > 0 and name != "runtime overhead":
            ax.bar(x, value, width=0.6, bottom=bottom, color=COMPONENT_COLORS[name], label=name)
            bottom += value
    label_bar(ax, x, est.allocated_bytes, size)


def label_bar(ax: Any, x: int, nbytes: float, size: float) -> None:
    ax.annotate(
        human(nbytes),
        (x, nbytes / size),
        xytext=(0, 2),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=8,
    )


def metric_name(run: Estimate) -> str:
    """The chart's metric: live tensor bytes on the CPU, max allocated on CUDA."""
    if run.setup.device == "cuda":
        return "Peak allocated (torch.cuda.max_memory_allocated)"
    return "Peak bytes of live tensors"


def plot_comparison(est: Estimate, path: str | Path) -> Path:
    """Bar chart (PNG) of the method comparison: weights+states and total per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison_rows(est)
    labels = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(labels, [r[3] / GB for r in rows], label="total (with activations, logits)")
    ax.bar(labels, [r[2] / GB for r in rows], label="weights + gradients + optimizer")
    ax.set_ylabel("GB (1e9 bytes)")
    ax.set_title(
        f"{est.arch.name}, batch {est.setup.batch} x seq {est.setup.seq}{per_process(est.setup)}"
    )
    ax.tick_params(axis="x", labelrotation=25, labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    # Under a temporary name first: a failed write never leaves half a picture at `path`,
    # and a full disk or read-only folder is one line naming it.
    try:
        write_file_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
    return path
