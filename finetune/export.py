"""After training: merge an adapter into its base, export it (adapter, merged, GGUF), combine.

Every merge checks itself: the merged model's logits are compared with the adapter model's on
a few fixed prompts, and a difference above the tolerance fails the command with nothing
written. After int8 or 4-bit training, `match_quantized` folds the adapter into the
dequantized quantized weights, the weights it was trained against, instead of the original
ones; the difference from the model as trained is measured and reported either way.

Every output is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune import gguf_file, inference, llamacpp, models, outputs, runs
from finetune.adapters import MERGEABLE
from finetune.errors import UserError, closest
from finetune.gguf_file import GGUF_TYPES
from finetune.inputs import check_number, parse_size, require_file
from finetune.outputs import claim_output
from finetune.recipe import VIRTUAL_TOKEN_METHODS
from finetune.targets import Target, read_adapter_config, resolve_target

FORMATS = ("adapter", "merged", "gguf", "gguf-adapter")
COMBINE_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
DTYPES = ("float32", "bfloat16", "float16")
# Default tolerances (max absolute logit difference) for the self-checks.
# A 16-bit merge is also allowed twice the difference 16-bit arithmetic alone makes (the same
# adapter model in float32 against 16-bit), measured on the same prompts.
MERGE_TOLERANCE = {"float32": 1e-2, "bfloat16": 0.5, "float16": 0.1}
# Absolute bounds on the GGUF checks' max |logit difference| (over every position and every
# vocabulary entry of the probe prompts), which catch a wrong layout or tokenizer (those change
# logits by whole units and more). Measured in llama.cpp on SmolLM2-135M (a quickstart run):
# f16 0.11, q8_0 4.1 (llama.cpp's own convert_hf_to_gguf.py writes bit-identical q8_0 tensors
# and scores the same: q8_0 arithmetic, weights and activations, is the whole difference), an
# adapter GGUF on the embedded Q4_1 base 2.7. transformers reading the file back: f16 0.07,
# q8_0 1.6.
GGUF_TOLERANCE = {"f32": 1e-2, "f16": 0.5, "q8_0": 8.0}
# An adapter GGUF is checked on its base GGUF, whose weights may be quantized (the embedded
# model's are Q4_1): the bound follows the base's coarsest weight type.
BASE_TOLERANCE = {"F32": 1e-2, "F16": 0.5, "BF16": 1.0, "Q8_0": 8.0, "other": 8.0}


class CheckFailed(Exception):
    """A self-check failed: the artefact does not reproduce the model (exit code 1)."""

    exit_code = 1


# ------------------------------------------------------------------------ shared checks


# What an existing --out folder must hold for --force to replace it: the files each kind of
# output is written with (finetune.outputs refuses every other folder).
OUTPUT_SIGNS = {
    "merged": ("merge.json", "a model written by finetune merge (merge.json)"),
    "adapter": ("adapter_config.json", "an adapter folder (adapter_config.json)"),
    "combined": ("adapter_config.json", "an adapter folder (adapter_config.json)"),
}


def check_output(
    out: Path,
    force: bool,
    targets: list[Target],
    output: str = "gguf",
    files: list[Path | None] = (),
) -> None:
    """Check `out` with the one rule for outputs (`finetune.outputs.claim_output`): never the
    source run, adapter or base model, and an existing output only with --force.

    Args:
        out: the --out path.
        force: --force was given.
        targets: the command's sources (their run, adapter and model folders are inputs).
        output: "merged", "adapter", "combined" (folders) or "gguf" (a file).
        files: more input files (the base GGUF an adapter GGUF is checked on).

    Raises:
        UserError: `out` may not be written.
    """
    sources = [folder for t in targets for folder in (t.run_dir, t.adapter_dir)]
    models_ = [t.model.path for t in targets if Path(t.model.path).expanduser().exists()]
    # The GGUF a base came from (the embedded model's file, too) is an input like the rest.
    models_ += [models.source_gguf(t.model.path) for t in targets] + list(files)
    if output == "gguf":
        claim_output(
            out,
            option="--out",
            kind="file",
            force=force,
            inputs=models_,
            sealed=sources,
            replaceable=is_gguf,
            what_it_holds="a GGUF file (--force replaces an earlier export only)",
        )
        return
    sign, words = OUTPUT_SIGNS[output]
    claim_output(
        out,
        option="--out",
        kind="folder",
        force=force,
        inputs=models_,
        sealed=sources,
        replaceable=lambda folder: (folder / sign).is_file(),
        what_it_holds=words,
    )


def is_gguf(path: Path) -> bool:
    """Whether a file starts with GGUF's magic bytes: the only files --force replaces."""
    with path.open("rb") as handle:
        return handle.read(4) == b"GGUF"


def require_adapter(target: Target, what: str) -> str:
    """The target's adapter method, refusing plain models and, for merges, virtual tokens."""
    if target.adapter_dir is None:
        raise UserError(
            f"{target.given}: a model, not a run or adapter folder; {what} needs a trained adapter"
        )
    method = target.method or ""
    if what != "export --format adapter" and method in VIRTUAL_TOKEN_METHODS:
        raise UserError(
            f"{target.given}: {method} tuning learns virtual tokens fed in front of the input, "
            f"it has no weights to fold into the base; use the adapter folder with `finetune "
            "generate`, or `finetune export --format adapter`"
        )
    if what != "export --format adapter" and method not in MERGEABLE:
        raise UserError(f"{target.given}: cannot merge a {method} adapter")
    return method


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(
            f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r}){closest(dtype, DTYPES)}"
        )


# ------------------------------------------------------------------------ merging


@dataclass
class MergeReport:
    """How a merged model was made and how closely it reproduces the adapter model."""

    source: str
    method: str
    base_model: str
    dtype: str
    trained_quantization: str
    match_quantized: bool
    folded_into: str
    max_logit_diff: float
    tolerance: float
    max_logit_diff_vs_trained: float | None = None
    sixteen_bit_noise: float | None = None
    probe_prompts: list[str] = field(default_factory=lambda: list(inference.PROBE_PROMPTS))


@dataclass
class Merged:
    model: Any
    tokenizer: Any
    report: MergeReport | None  # None: a plain model, nothing merged
    target: Target


def dequantized_weights(target: Target) -> dict[str, torch.Tensor]:
    """The quantized base as the adapter saw it, dequantized: Linear weight name to tensor."""
    from peft.utils.integrations import dequantize_bnb_weight

    spec = target.model.model_copy(update={"quantization": target.trained_quantization})
    loaded = models.load_model(spec, "cpu")
    weights: dict[str, torch.Tensor] = {}
    for name, module in loaded.model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.__class__.__name__ not in ("Params4bit", "Int8Params"):
            continue
        state = getattr(module, "state", None)
        weights[f"{name}.weight"] = dequantize_bnb_weight(weight, state).float().cpu()
    del loaded
    return weights


def build_merged(
    target: Target,
    *,
    dtype: str = "float32",
    match_quantized: bool = False,
    tolerance: float | None = None,
) -> Merged:
    """Fold the target's adapter into its base in memory and check it against the adapter model.

    Raises:
        UserError: no mergeable adapter, or --match-quantized after unquantized training.
        CheckFailed: merged and adapter logits differ by more than the tolerance.
    """
    check_dtype(dtype)
    method = require_adapter(target, "merge")
    quantized = target.trained_quantization not in ("none", "auto")
    if match_quantized and not quantized:
        raise UserError(
            f"--match-quantized: {target.given} was trained on an unquantized base, so there "
            "are no quantized weights to match; drop the flag"
        )
    inference.quiet_loading()
    fp_spec = target.model.model_copy(update={"quantization": "none", "dtype": dtype})
    folded_into = f"the original {dtype} weights"
    replacement = dequantized_weights(target) if match_quantized else {}
    loaded = models.load_model(fp_spec, "cpu")
    if replacement:
        folded_into = f"the dequantized {target.trained_quantization} weights (cast to {dtype})"
        with torch.no_grad():
            params = dict(loaded.model.named_parameters())
            for name, weight in replacement.items():
                params[name].copy_(weight.to(params[name].dtype))
    model = inference.attach_adapter(loaded.model, target.adapter_dir, fp_spec.path)
    model.eval()
    batch = inference.probe_batch(loaded.tokenizer)
    expected = inference.probe_logits(model, batch)
    merged = model.merge_and_unload()
    got = inference.probe_logits(merged, batch)
    diff = inference.max_logit_diff(expected, got, batch["attention_mask"])
    noise = None
    if dtype != "float32":
        noise = sixteen_bit_noise(target, fp_spec, replacement, batch, expected)
    limit = MERGE_TOLERANCE[dtype] if tolerance is None else tolerance
    if tolerance is None and noise is not None:
        limit = max(limit, 2 * noise)
    report = MergeReport(
        source=str(target.given),
        method=method,
        base_model=target.model.path,
        dtype=dtype,
        trained_quantization=target.trained_quantization,
        match_quantized=match_quantized,
        folded_into=folded_into,
        max_logit_diff=diff,
        tolerance=limit,
        sixteen_bit_noise=noise,
    )
    if quantized:
        # The model as trained: the adapter on the quantized base.
        as_trained = inference.load(
            target,
            device="cpu",
            spec=target.model.model_copy(update={"quantization": target.trained_quantization}),
        )
        trained = inference.probe_logits(as_trained.model, batch)
        report.max_logit_diff_vs_trained = inference.max_logit_diff(
            trained, got, batch["attention_mask"]
        )
        del as_trained
    if not diff <= limit:
        raise CheckFailed(
            f"merge check failed: merged and adapter logits differ by {diff:.3g} (tolerance "
            f"{limit:g}); nothing was written. A {dtype} merge may need --tolerance, or merge "
            "in float32"
        )
    return Merged(merged, loaded.tokenizer, report, target)


def sixteen_bit_noise(
    target: Target,
    spec: Any,
    replacement: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    logits: torch.Tensor,
) -> float:
    """How far the unmerged adapter model's 16-bit logits already are from its float32 ones."""
    loaded = models.load_model(spec.model_copy(update={"dtype": "float32"}), "cpu")
    if replacement:
        with torch.no_grad():
            params = dict(loaded.model.named_parameters())
            for name, weight in replacement.items():
                params[name].copy_(weight)
    model = inference.attach_adapter(loaded.model, target.adapter_dir, spec.path)
    reference = inference.probe_logits(model.eval(), batch)
    return inference.max_logit_diff(reference, logits, batch["attention_mask"])


def merge(
    run: str,
    out: Path,
    *,
    dtype: str = "float32",
    match_quantized: bool = False,
    force: bool = False,
    max_shard_size: str = "2GB",
    tolerance: float | None = None,
    model: str | None = None,
) -> MergeReport:
    """Merge RUN's adapter into its base and save a checked, self-describing model folder.

    Raises:
        UserError: bad input (see `build_merged`, `check_output`).
        CheckFailed: the merged model does not reproduce the adapter model.
    """
    # Every option first: a typo must not wait for a model to load and merge.
    parse_size(max_shard_size, "--max-shard-size")
    check_tolerance(tolerance)
    check_dtype(dtype)
    target = resolve_target(run, model)
    check_output(out, force, [target], "merged")
    require_adapter(target, "merge")
    merged = build_merged(target, dtype=dtype, match_quantized=match_quantized, tolerance=tolerance)
    runs.write_atomically(out, lambda tmp: save_merged(merged, tmp, max_shard_size))
    return merged.report


def check_tolerance(tolerance: float | None) -> None:
    """--tolerance is a finite, non-negative logit difference (omitted: by dtype or type)."""
    if tolerance is not None:
        check_number("--tolerance", tolerance, ge=0)


def save_merged(merged: Merged, folder: Path, max_shard_size: str) -> None:
    merged.model.save_pretrained(folder, max_shard_size=max_shard_size)
    merged.tokenizer.save_pretrained(folder)
    (folder / "merge.json").write_text(json.dumps(asdict(merged.report), indent=2) + "\n")
    (folder / "README.md").write_text(merge_card(merged.report, merged.target), encoding="utf-8")


def merge_card(report: MergeReport, target: Target) -> str:
    vs_trained = (
        f"- max |logit difference| against the adapter on the {report.trained_quantization} base "
        f"it was trained with: {report.max_logit_diff_vs_trained:.4g}\n"
        if report.max_logit_diff_vs_trained is not None
        else ""
    )
    hint = (
        "- trained against quantized weights; "
        + (
            "folded into their dequantized values (--match-quantized)\n"
            if report.match_quantized
            else "folded into the original weights instead (pass --match-quantized to fold into "
            "the weights the adapter was trained against)\n"
        )
        if report.trained_quantization not in ("none", "auto")
        else ""
    )
    return (
        "# Merged model\n\n"
        f"Made by `finetune merge` from `{report.source}`: the {report.method} adapter in "
        f"`{target.adapter_dir}` folded into the base model `{report.base_model}`.\n\n"
        f"- dtype: {report.dtype}\n"
        f"- folded into: {report.folded_into}\n"
        f"- adapter trained with base quantization: {report.trained_quantization}\n"
        f"{hint}"
        f"- self-check: max |logit difference| between the merged model and the adapter model on "
        f"{len(report.probe_prompts)} prompts: {report.max_logit_diff:.4g} "
        f"(tolerance {report.tolerance:g})\n"
        f"{vs_trained}"
        + (
            f"- the unmerged adapter model in {report.dtype} is itself "
            f"{report.sixteen_bit_noise:.4g} from its float32 logits (16-bit arithmetic alone)\n"
            if report.sixteen_bit_noise is not None
            else ""
        )
        + "\n"
        "Load it with plain transformers: `AutoModelForCausalLM.from_pretrained(<this folder>)`.\n"
        "`merge.json` holds the same facts as data.\n"
    )


# ------------------------------------------------------------------------ export


@dataclass
class ExportReport:
    format: str
    out: str
    size_bytes: int
    merge: MergeReport | None = None
    gguf_type: str | None = None
    check: GGUFCheck | None = None


@dataclass
class GGUFCheck:
    """How a GGUF file was checked, and what the check found."""

    runner: str  # "llama.cpp <version>", or "transformers" where llama.cpp is not installed
    max_logit_diff: float
    tolerance: float
    tokens_identical: bool
    prompts: int
    greedy_identical: int | None = None  # llama.cpp only: greedy answers equal token for token
    pre_tokenizer: str | None = None
    base_gguf: str | None = None  # gguf-adapter: the file the adapter was applied to
    note: str = ""


def export(
    run: str,
    out: Path,
    fmt: str,
    *,
    gguf_type: str = "f16",
    dtype: str = "float32",
    match_quantized: bool = False,
    force: bool = False,
    tolerance: float | None = None,
    model: str | None = None,
    base_gguf: Path | None = None,
) -> ExportReport:
    """Export RUN as an adapter folder, a merged model folder, a GGUF file, or its LoRA
    adapter as a GGUF adapter file.

    Raises:
        UserError: unknown format or GGUF type, bad input as for `merge`.
        CheckFailed: a merge or GGUF check failed; nothing written.
    """
    check_export_options(fmt, gguf_type, tolerance, dtype, base_gguf)
    if fmt == "merged":
        report = merge(
            run,
            out,
            dtype=dtype,
            match_quantized=match_quantized,
            force=force,
            tolerance=tolerance,
            model=model,
        )
        return ExportReport("merged", str(out), folder_size(out), merge=report)
    target = resolve_target(run, model)
    check_output(out, force, [target], "adapter" if fmt == "adapter" else "gguf", [base_gguf])
    if fmt == "adapter":
        method = require_adapter(target, "export --format adapter")
        runs.write_atomically(out, lambda tmp: copy_adapter(target, method, tmp))
        return ExportReport("adapter", str(out), folder_size(out))
    if fmt == "gguf-adapter":
        return export_gguf_adapter(target, out, base_gguf, tolerance)
    if target.adapter_dir is None:  # a plain model: the base GGUF an adapter GGUF needs
        if match_quantized:
            raise UserError(f"--match-quantized: {target.given} has no adapter to fold; drop it")
        merged = load_plain(target)
    else:
        require_adapter(target, "export --format gguf")
        merged = build_merged(target, dtype="float32", match_quantized=match_quantized)
    return write_checked_gguf(merged, out, gguf_type, tolerance)


def check_export_options(
    fmt: str, gguf_type: str, tolerance: float | None, dtype: str, base_gguf: Path | None
) -> None:
    """Every option first: a typo must not wait for a model to load and merge."""
    if fmt not in FORMATS:
        raise UserError(
            f"--format must be one of {', '.join(FORMATS)} (got {fmt!r}){closest(fmt, FORMATS)}"
        )
    if gguf_type not in GGUF_TYPES:
        raise UserError(
            f"--gguf-type must be one of {', '.join(GGUF_TYPES)} (got {gguf_type!r})"
            f"{closest(gguf_type, GGUF_TYPES)}"
        )
    check_tolerance(tolerance)
    check_dtype(dtype)
    if base_gguf is not None and fmt != "gguf-adapter":
        raise UserError(f"--base-gguf applies to --format gguf-adapter, not {fmt}; drop it")


def load_plain(target: Target) -> Merged:
    """A model without an adapter, in float32, shaped like a merge so it exports the same way."""
    inference.quiet_loading()
    spec = target.model.model_copy(update={"quantization": "none", "dtype": "float32"})
    loaded = models.load_model(spec, "cpu")
    return Merged(loaded.model.eval(), loaded.tokenizer, None, target)


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def copy_adapter(target: Target, method: str, folder: Path) -> None:
    shutil.copytree(target.adapter_dir, folder, dirs_exist_ok=True)
    if target.recipe is not None:
        from finetune.recipe import dump_recipe

        runs.write_recipe_copy(folder, dump_recipe(target.recipe))
    (folder / "README.md").write_text(adapter_card(target, method), encoding="utf-8")


def adapter_card(target: Target, method: str) -> str:
    recipe = target.recipe
    trained = ""
    if recipe is not None:
        trained = (
            f"- trained with: lr {recipe.train.lr}, "
            f"{recipe.train.max_steps or recipe.train.epochs} "
            f"{'steps' if recipe.train.max_steps else 'epochs'}, data `{recipe.data.path}` "
            f"({recipe.data.format})\n"
        )
    return (
        "---\nlibrary_name: peft\n"
        f"base_model: {target.model.path}\n---\n\n"
        f"# {method} adapter\n\n"
        f"Exported by `finetune export --format adapter` from `{target.given}`.\n\n"
        f"- method: {method}\n"
        f"- base model: `{target.model.path}` (quantization during training: "
        f"{target.trained_quantization})\n"
        f"{trained}"
        "- `recipe.yaml` (when present) is the fully resolved recipe that produced it.\n\n"
        'Use it with `finetune generate <this folder> "prompt"`, or with peft:\n\n'
        "```python\nfrom peft import PeftModel\n"
        'model = PeftModel.from_pretrained(base_model, "<this folder>")\n```\n'
    )


# ------------------------------------------------------------------------ GGUF


def write_checked_gguf(
    merged: Merged, out: Path, gguf_type: str, tolerance: float | None
) -> ExportReport:
    """Write the model as GGUF under a temporary name, check it (in llama.cpp where
    installed), and rename it into place only if the check passes."""
    source = models.source_gguf(merged.target.model.path)
    limit = GGUF_TOLERANCE[gguf_type] if tolerance is None else tolerance

    def write(tmp: Path) -> GGUFCheck:
        pre = gguf_file.write_model(
            merged.model, merged.tokenizer, tmp, gguf_type, name=out.stem, source=source
        )
        if llamacpp.available():
            check = llamacpp_check(tmp, None, merged, limit, f"the {gguf_type} file")
        else:
            check = transformers_check(merged, tmp, limit)
        check.pre_tokenizer = pre
        if source is not None:
            check.note = f"tokenizer fields carried over from {source.name}"
        return check

    check = write_checked_file(out, write)
    return ExportReport(
        "gguf", str(out), out.stat().st_size, merge=merged.report, gguf_type=gguf_type, check=check
    )


def write_checked_file(out: Path, write: Any) -> GGUFCheck:
    """`write(tmp)` writes and checks a file beside `out`; it replaces `out` only when that
    returns (a failed check raises), so a failure leaves nothing behind. A full disk or a
    read-only folder is one line naming `out`, not the temporary file."""
    with outputs.writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".gguf", dir=out.parent)
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        check = write(tmp)
        tmp.chmod(0o644)
        os.replace(tmp, out)
    except BaseException as err:
        error = outputs.write_error(err, out)
        tmp.unlink(missing_ok=True)
        if error is not None:
            raise error from None
        raise
    return check


def llamacpp_check(
    path: Path, lora: Path | None, reference: Merged, limit: float, what: str
) -> GGUFCheck:
    """Load the file (or base + adapter) in llama.cpp and compare it with `reference`.

    Raises:
        CheckFailed: llama.cpp refuses the file, splits text differently, or its logits
            differ by more than `limit`.
    """
    from finetune.llama_pre import CHKTXT

    try:
        llm = llamacpp.load(path, lora=lora)
    except llamacpp.LoadFailed as err:
        raise CheckFailed(
            f"GGUF check failed: llama.cpp refused {what}: {err}; nothing was written"
        ) from None
    texts = [inference.render_prompt(reference.tokenizer, p) for p in inference.PROBE_PROMPTS]
    try:
        # llama.cpp's own pre-tokenizer test text, tokenized only: it covers what the probe
        # prompts do not (digits, emoji, CJK, runs of whitespace).
        found = llamacpp.compare(llm, reference.model, reference.tokenizer, texts, [CHKTXT])
    finally:
        llm.close()
    check = GGUFCheck(
        runner=f"llama.cpp (llama-cpp-python {llamacpp.version()})",
        max_logit_diff=found.max_logit_diff,
        tolerance=limit,
        tokens_identical=found.tokens_identical,
        prompts=found.prompts,
        greedy_identical=found.greedy_identical,
    )
    if not found.tokens_identical:
        raise CheckFailed(
            f"GGUF check failed: llama.cpp splits text differently from the model's tokenizer "
            f"({found.first_difference}); nothing was written"
        )
    require_within(check, what)
    return check


def require_within(check: GGUFCheck, what: str) -> None:
    if not check.max_logit_diff <= check.tolerance:
        raise CheckFailed(
            f"GGUF check failed: {what} in {check.runner} differs from the merged model by "
            f"{check.max_logit_diff:.3g} in logits (tolerance {check.tolerance:g}); nothing "
            "was written"
        )


def transformers_check(merged: Merged, path: Path, limit: float) -> GGUFCheck:
    """Without llama.cpp: load the GGUF back with transformers and compare (a weaker check:
    transformers reads tokenizer metadata llama.cpp would refuse)."""
    diff, same = gguf_round_trip(merged, path)
    check = GGUFCheck(
        runner="transformers",
        max_logit_diff=diff,
        tolerance=limit,
        tokens_identical=same,
        prompts=len(inference.PROBE_PROMPTS),
        note=f"llama.cpp is not installed ({llamacpp.INSTALL_HINT})",
    )
    if not same:
        raise CheckFailed(
            "GGUF check failed: the file's tokenizer, read back by transformers, encodes the "
            "probe prompts differently; nothing was written"
        )
    require_within(check, "the file loaded back")
    return check


def gguf_round_trip(merged: Merged, path: Path) -> tuple[float, bool]:
    """Max logit difference between the GGUF loaded back by transformers and the merged model,
    and whether the GGUF's tokenizer encodes the probe prompts to the same ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batch = inference.probe_batch(merged.tokenizer)
    expected = inference.probe_logits(merged.model, batch)
    reloaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    got = inference.probe_logits(reloaded, batch)
    diff = inference.max_logit_diff(expected, got, batch["attention_mask"])
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = [inference.render_prompt(merged.tokenizer, p) for p in inference.PROBE_PROMPTS]
    same = all(
        tokenizer(t, add_special_tokens=False)["input_ids"]
        == merged.tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in texts
    )
    return diff, same


# ------------------------------------------------------------------------ GGUF adapter


def export_gguf_adapter(
    target: Target, out: Path, base_gguf: Path | None, tolerance: float | None
) -> ExportReport:
    """Write the run's LoRA adapter as a llama.cpp adapter GGUF and check it applied to its
    base GGUF against the adapter model in transformers."""
    alpha = require_lora(target)
    base, facts = choose_base_gguf(target, base_gguf)
    limit = adapter_tolerance(facts) if tolerance is None else tolerance
    spec = target.model.model_copy(update={"quantization": "none", "dtype": "float32"})
    session = inference.load(target, device="cpu", spec=spec)
    match_base(base, facts, session.model.config, target)
    reference = Merged(session.model, session.tokenizer, None, target)

    def write(tmp: Path) -> GGUFCheck:
        gguf_file.write_lora(session.model, tmp, alpha, name=out.stem)
        if llamacpp.available():
            check = llamacpp_check(base, tmp, reference, limit, f"the adapter on {base.name}")
        else:
            check = lora_file_check(session.model, tmp, alpha)
        check.base_gguf = str(base)
        return check

    check = write_checked_file(out, write)
    return ExportReport("gguf-adapter", str(out), out.stat().st_size, check=check)


def require_lora(target: Target) -> float:
    """The adapter's lora_alpha, refusing what a llama.cpp LoRA file cannot hold.

    Raises:
        UserError: not a LoRA adapter, DoRA, trained full modules or biases, new tokens.
    """
    method = require_adapter(target, "export --format gguf-adapter")
    config = read_adapter_config(target.adapter_dir)
    if method != "lora" or config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise UserError(
            f"{target.given}: a {method} adapter; --format gguf-adapter writes plain LoRA "
            "(llama.cpp adapters hold only LoRA A and B); use --format gguf for the merged model"
        )
    extras = [
        f"{key}={config[key]}"
        for key in ("modules_to_save", "trainable_token_indices", "lora_bias")
        if config.get(key)
    ]
    if config.get("bias", "none") != "none":
        extras.append(f"bias={config['bias']}")
    if extras:
        raise UserError(
            f"{target.given}: the adapter also trains {', '.join(extras)}, which a llama.cpp "
            "LoRA file cannot hold; use --format gguf for the merged model"
        )
    return float(config["lora_alpha"])


def choose_base_gguf(target: Target, given: Path | None) -> tuple[Path, dict[str, Any]]:
    """The base GGUF llama.cpp applies the adapter to: --base-gguf, or the GGUF the run's
    base model came from (the embedded model is one).

    Raises:
        UserError: none to be had, or a file that is not this base model.
    """
    base = given if given is not None else models.source_gguf(target.model.path)
    if base is None:
        raise UserError(
            f"--base-gguf: {target.given} was trained on {target.model.path}, not a GGUF file, "
            "and llama.cpp applies an adapter GGUF on top of a base GGUF; make one with "
            f"`finetune export {target.model.path} --format gguf --out base.gguf` and pass "
            "--base-gguf base.gguf"
        )
    require_file(base, "--base-gguf", "the base model as a .gguf file")
    try:
        facts = gguf_file.base_facts(base)
    except Exception as err:  # the parser raises ValueError, struct.error, IndexError, ...
        raise UserError(
            f"--base-gguf: {base} is not a readable GGUF file ({models.first_line(err)[:120]})"
        ) from None
    return base, facts


def match_base(base: Path, facts: dict[str, Any], config: Any, target: Target) -> None:
    """Refuse a base GGUF that is not the model the adapter was trained on.

    Raises:
        UserError: an adapter file, another architecture, or another shape.
    """
    want = {
        "type": "model",
        "architecture": "llama",
        "block_count": config.num_hidden_layers,
        "embedding_length": config.hidden_size,
    }
    wrong = [f"{k} {facts[k]} (want {v})" for k, v in want.items() if facts[k] != v]
    if wrong:
        raise UserError(
            f"--base-gguf: {base} is not the base model {target.model.path}: "
            f"{', '.join(wrong)}; export the base with --format gguf"
        )


def adapter_tolerance(facts: dict[str, Any]) -> float:
    """By the base's coarsest weight type: the adapter is exact, the base arithmetic is not."""
    types = facts["weight_types"]
    return max(BASE_TOLERANCE.get(t, BASE_TOLERANCE["other"]) for t in types)


def lora_file_check(peft_model: Any, path: Path, alpha: float) -> GGUFCheck:
    """Without llama.cpp: read the adapter file back and rebuild each weight update as
    llama.cpp will (alpha / rank · B·A, q and k rows un-permuted), against peft's own."""
    from gguf import GGUFReader

    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in GGUFReader(path).tensors}
    expected = dict(gguf_file.lora_tensors(peft_model, alpha))
    diff = 0.0
    for name in expected:
        got = tensors.get(name)
        if got is None or got.shape != expected[name].shape:
            raise CheckFailed(f"GGUF adapter check failed: {name} missing or misshapen")
        diff = max(diff, float((got - expected[name]).abs().max()))
    diff = max(diff, lora_update_diff(peft_model, tensors, alpha))
    check = GGUFCheck("the gguf reader", diff, 1e-4, True, 0)
    check.note = (
        f"llama.cpp is not installed ({llamacpp.INSTALL_HINT}): checked the weight updates "
        "the file encodes against peft's instead"
    )
    require_within(check, "the adapter file")
    return check


def lora_update_diff(peft_model: Any, tensors: dict[str, torch.Tensor], alpha: float) -> float:
    """Largest difference between peft's delta weights and alpha/rank · B·A from the file."""
    from peft.tuners.lora import LoraLayer

    config = peft_model.base_model.model.config
    names = gguf_file.name_map(config)
    diff = 0.0
    for module_name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        name = gguf_file.llama_name(names, f"{module_name}.weight")
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        update = gguf_file.rotary_rows(name, module.get_delta_weight("default"), config)
        diff = max(diff, float((alpha / a.shape[0] * b @ a - update).abs().max()))
    return diff


# ------------------------------------------------------------------------ combine


@dataclass
class CombineReport:
    out: str
    method: str
    weights: list[float]
    density: float | None
    sources: list[str]
    base_model: str


def parse_weights(text: str | None, n: int) -> list[float]:
    """One finite number per adapter from "0.6,0.4"; equal weights when omitted.

    Raises:
        UserError: not numbers, nan or infinite, or not one per adapter.
    """
    if text is None:
        return [1.0 / n] * n
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(
            f"--weights {text!r}: give comma-separated numbers such as 0.6,0.4"
        ) from None
    if len(weights) != n:
        raise UserError(
            f"--weights has {len(weights)} numbers for {n} adapters; give one per adapter"
        )
    # nan or inf would make every tensor of the combined adapter nan, silently.
    return [check_number("--weights", w, ge=-1e6, le=1e6) for w in weights]


def combine(
    sources: list[str],
    out: Path,
    *,
    method: str = "linear",
    weights: str | None = None,
    density: float | None = None,
    force: bool = False,
) -> CombineReport:
    """Combine LoRA adapters trained on the same base with peft's weighted adapter merging.

    Writes a standard adapter folder (plus the first run's `recipe.yaml`, so generate and eval
    find the base model).

    Raises:
        UserError: fewer than two adapters, adapters that do not fit together (base, method,
            target modules), bad weights, method or density, or an existing output.
    """
    if method not in COMBINE_METHODS:
        raise UserError(
            f"--method must be one of {', '.join(COMBINE_METHODS)} (got {method!r})"
            f"{closest(method, COMBINE_METHODS)}"
        )
    if len(sources) < 2:
        raise UserError("combine needs at least two runs or adapter folders")
    if method == "linear" and density is not None:
        raise UserError("--density applies to ties, dare_linear and dare_ties, not linear")
    if density is not None:
        check_number("--density", density, gt=0, le=1)
    if method != "linear" and density is None:
        density = 1.0 if method == "ties" else 0.5
    numbers = parse_weights(weights, len(sources))
    targets = [resolve_target(s) for s in sources]
    check_output(out, force, targets, "combined")
    check_compatible(targets)

    from peft import PeftModel

    first = targets[0]
    inference.quiet_loading()
    loaded = models.load_model(first.model.model_copy(update={"quantization": "none"}), "cpu")
    names = [f"source{i}" for i in range(len(targets))]
    inference.check_base(first.adapter_dir, loaded.model.config, first.model.path)
    model = PeftModel.from_pretrained(loaded.model, str(first.adapter_dir), adapter_name=names[0])
    for name, t in zip(names[1:], targets[1:], strict=True):
        model.load_adapter(str(t.adapter_dir), adapter_name=name)
    try:
        model.add_weighted_adapter(
            names, numbers, "default", combination_type=method, density=density
        )
    except ValueError as err:
        raise UserError(f"combine: peft refused: {models.first_line(err)}") from None
    for name in names:
        model.delete_adapter(name)
    model.set_adapter("default")
    report = CombineReport(
        str(out), method, numbers, density, [str(t.given) for t in targets], first.model.path
    )

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if first.recipe is not None:
            from finetune.recipe import dump_recipe

            runs.write_recipe_copy(folder, dump_recipe(first.recipe))
        (folder / "combine.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        (folder / "README.md").write_text(combine_card(report), encoding="utf-8")

    runs.write_atomically(out, write)
    return report


def check_compatible(targets: list[Target]) -> None:
    """Refuse adapters that do not fit together, naming what differs."""
    first = targets[0]
    for t in targets:
        if t.adapter_dir is None:
            raise UserError(
                f"{t.given}: a model, not a run or adapter folder; combine needs adapters"
            )
    first_method = first.method
    first_config = read_adapter_config(first.adapter_dir)
    for t in targets[1:]:
        if t.model.path != first.model.path:
            raise UserError(
                f"{t.given}: trained on base model {t.model.path}, but {first.given} on "
                f"{first.model.path}; combine adapters of the same base model"
            )
        if t.method != first_method:
            raise UserError(
                f"{t.given}: a {t.method} adapter, but {first.given} is {first_method}; combine "
                "adapters of the same method"
            )
        config = read_adapter_config(t.adapter_dir)
        mine, theirs = target_list(config), target_list(first_config)
        if mine != theirs:
            raise UserError(
                f"{t.given}: targets {', '.join(mine)}, but {first.given} targets "
                f"{', '.join(theirs)}; combine adapters with the same target modules"
            )
    if first_method != "lora":
        raise UserError(
            "combine handles LoRA adapters (peft's weighted adapter merging); these are "
            f"{first_method}"
        )


def target_list(config: dict[str, Any]) -> list[str]:
    targets = config.get("target_modules") or []
    return sorted([targets] if isinstance(targets, str) else targets)


def combine_card(report: CombineReport) -> str:
    parts = ", ".join(f"`{s}` × {w:g}" for s, w in zip(report.sources, report.weights, strict=True))
    density = f", density {report.density:g}" if report.density is not None else ""
    return (
        "---\nlibrary_name: peft\n"
        f"base_model: {report.base_model}\n---\n\n"
        "# Combined LoRA adapter\n\n"
        f"Made by `finetune combine` with peft's `add_weighted_adapter` ({report.method}{density}) "
        f"from {parts}.\n\n"
        "`recipe.yaml` is the first source's recipe (it names the base model), so "
        "`finetune generate`, `eval`, `merge` and `export` accept this folder as a run.\n"
    )
