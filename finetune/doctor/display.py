"""How `finetune validate` shows the data: a plot of token lengths, escaped table cells."""

from __future__ import annotations

import re
from pathlib import Path

from finetune import data
from finetune.outputs import write_file_atomically


def plot_lengths(splits: data.Splits, max_length: int, path: Path) -> Path:
    """Histograms (PNG) of prompt, response and total token lengths before truncation, with
    data.max_length marked; written under a temporary name and renamed into place."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples = [e for d in (splits.train, splits.eval) if d is not None for e in d.examples]
    series = {
        "prompt": [e.prompt_length for e in examples],
        "response": [e.response_length for e in examples],
        "prompt + response": [e.prompt_length + e.response_length for e in examples],
    }
    fig, ax = plt.subplots(figsize=(8, 4.5))
    top = max(max(series["prompt + response"]), max_length)
    bins = range(0, top + 2, max(1, (top + 1) // 60))
    for label, values in series.items():
        ax.hist(values, bins=bins, alpha=0.55, label=label)
    ax.axvline(max_length, color="black", linestyle="--", label=f"data.max_length {max_length}")
    ax.set_xlabel("tokens (before truncation)")
    ax.set_ylabel("examples")
    ax.set_title(f"token lengths of {len(examples)} examples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        write_file_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
    return path


def sanitize(text: str) -> str:
    """Control characters of the user's data shown escaped, so a table cell stays one line."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)
