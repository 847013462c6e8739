"""Exact match of a run's GGUF exports in llama.cpp, on the run's held-out set.

Run: PYTHONPATH=. .venv/bin/python benchmarks/gguf_llamacpp.py [RUN] [--out FOLDER]

Exports RUN (default runs/quickstart) with `finetune export` as f16 and q8_0 GGUF and as a
LoRA adapter GGUF (on the GGUF the base came from), each checked by the exporter, then
answers every held-out prompt greedily in llama.cpp (llama-cpp-python): the prompt rendered
as `finetune eval` renders it (the chat template), tokenized and detokenized by llama.cpp,
up to eval.max_new_tokens tokens, scored as finetune.evaluate.exact_match scores
(whitespace stripped, equal to the reference). The adapter model in transformers is the
reference row. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from finetune import evaluate, export, inference, targets
from finetune.data import generation_prompt, load_rows
from finetune.export import llamacpp


def llama_exact_match(
    model: Path, lora: Path | None, pairs: list[tuple[str, str]], max_new_tokens: int, stop
) -> int:
    """Greedy answers from llama.cpp (in its child process), tokenized and detokenized there."""
    prompts = [p for p, _ in pairs]
    request = llamacpp.Request(model, lora, answer=prompts, n_new=max_new_tokens, stop=sorted(stop))
    answers = llamacpp.run(request).answers
    return sum(a.strip() == ref for a, (_, ref) in zip(answers, pairs, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", nargs="?", default="runs/quickstart")
    parser.add_argument("--out", type=Path, default=Path("runs/gguf-bench"))
    args = parser.parse_args()
    target = targets.resolve_target(args.run)
    recipe = target.recipe
    spec = target.model.model_copy(update={"quantization": "none", "dtype": "float32"})
    session = inference.load(target, device="cpu", spec=spec)
    tokenizer, n_new = session.tokenizer, recipe.eval.max_new_tokens
    path = recipe.data.eval_path
    pairs = [generation_prompt(r, recipe.data, tokenizer, path) for r in load_rows(path)]
    stop = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    rows = []
    start = time.perf_counter()
    em = evaluate.exact_match(session.model, tokenizer, pairs, n_new)
    rows.append(
        ("adapter model, transformers (float32)", "-", em.correct, time.perf_counter() - start)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    files = {}
    for fmt, gguf_type in (("gguf", "f16"), ("gguf", "q8_0"), ("gguf-adapter", "f16")):
        name = "adapter.gguf" if fmt == "gguf-adapter" else f"{gguf_type}.gguf"
        files[name] = export.export(args.run, args.out / name, fmt, gguf_type=gguf_type, force=True)
    labels = {
        "f16.gguf": "merged GGUF f16, llama.cpp",
        "q8_0.gguf": "merged GGUF q8_0, llama.cpp",
        "adapter.gguf": "adapter GGUF on the base GGUF, llama.cpp",
    }
    for name, report in files.items():
        base = Path(report.check.base_gguf) if report.check.base_gguf else args.out / name
        lora = args.out / name if report.check.base_gguf else None
        start = time.perf_counter()
        correct = llama_exact_match(base, lora, pairs, n_new, stop)
        rows.append(
            (
                labels[name],
                f"{report.size_bytes / 1e6:.1f} MB",
                correct,
                time.perf_counter() - start,
            )
        )
    print(f"{args.run}, {len(pairs)} held-out rows of {path}, greedy, {n_new} new tokens at most;")
    print(f"llama-cpp-python {llamacpp.version()}, {datetime.date.today().isoformat()}\n")
    print("| model | file | exact match | time |")
    print("|---|---|---|---|")
    for label, size, correct, seconds in rows:
        share = f"{correct}/{len(pairs)} ({correct / len(pairs):.1%})"
        print(f"| {label} | {size} | {share} | {seconds:.0f} s |")
    for name, report in files.items():
        c = report.check
        print(
            f"\n{name}: check max |logit difference| {c.max_logit_diff:.3g} (tolerance "
            f"{c.tolerance:g}), greedy probe answers identical {c.greedy_identical}/{c.prompts}"
            + (f", base {c.base_gguf}" if c.base_gguf else ""),
            end="",
        )
    print()


if __name__ == "__main__":
    main()
