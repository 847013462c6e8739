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

from finetune import inference, models, runs
from finetune.adapters import MERGEABLE
from finetune.errors import UserError, closest
from finetune.inputs import check_number, parse_size
from finetune.outputs import claim_output
from finetune.recipe import VIRTUAL_TOKEN_METHODS

FORMATS = ("adapter", "merged", "gguf")
GGUF_TYPES = ("f16", "f32", "q8_0")
COMBINE_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
DTYPES = ("float32", "bfloat16", "float16")
# Default tolerances (max absolute logit difference) for the self-checks.
# A 16-bit merge is also allowed twice the difference 16-bit arithmetic alone makes (the same
# adapter model in float32 against 16-bit), measured on the same prompts.
MERGE_TOLERANCE = {"float32": 1e-2, "bfloat16": 0.5, "float16": 0.1}
# Absolute bounds that catch a wrong layout or tokenizer (those change logits by whole units
# and more); measured on SmolLM2-135M: f16 0.07, q8_0 1.6.
GGUF_TOLERANCE = {"f32": 1e-2, "f16": 0.5, "q8_0": 4.0}


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
    out: Path, force: bool, targets: list[inference.Target], output: str = "gguf"
) -> None:
    """Check `out` with the one rule for outputs (`finetune.outputs.claim_output`): never the
    source run, adapter or base model, and an existing output only with --force.

    Args:
        out: the --out path.
        force: --force was given.
        targets: the command's sources (their run, adapter and model folders are inputs).
        output: "merged", "adapter", "combined" (folders) or "gguf" (a file).

    Raises:
        UserError: `out` may not be written.
    """
    sources = [folder for t in targets for folder in (t.run_dir, t.adapter_dir)]
    models_ = [t.model.path for t in targets if Path(t.model.path).expanduser().exists()]
    if output == "gguf":
        claim_output(out, option="--out", kind="file", force=force, inputs=models_, sealed=sources)
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


def require_adapter(target: inference.Target, what: str) -> str:
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
    report: MergeReport
    target: inference.Target


def dequantized_weights(target: inference.Target) -> dict[str, torch.Tensor]:
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
    target: inference.Target,
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
    target: inference.Target,
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
    target = inference.resolve_target(run, model)
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


def merge_card(report: MergeReport, target: inference.Target) -> str:
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
    round_trip_max_logit_diff: float | None = None
    round_trip_tolerance: float | None = None
    tokenizer_round_trip: bool | None = None


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
) -> ExportReport:
    """Export RUN as an adapter folder, a merged model folder, or a GGUF file.

    Raises:
        UserError: unknown format or GGUF type, bad input as for `merge`.
        CheckFailed: a merge or GGUF round-trip check failed; nothing written.
    """
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
    target = inference.resolve_target(run, model)
    check_output(out, force, [target], "adapter" if fmt == "adapter" else "gguf")
    if fmt == "adapter":
        method = require_adapter(target, "export --format adapter")
        runs.write_atomically(out, lambda tmp: copy_adapter(target, method, tmp))
        return ExportReport("adapter", str(out), folder_size(out))
    require_adapter(target, "export --format gguf")
    merged = build_merged(target, dtype="float32", match_quantized=match_quantized)
    return write_checked_gguf(merged, out, gguf_type, tolerance)


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def copy_adapter(target: inference.Target, method: str, folder: Path) -> None:
    shutil.copytree(target.adapter_dir, folder, dirs_exist_ok=True)
    if target.recipe is not None:
        from finetune.recipe import dump_recipe

        (folder / "recipe.yaml").write_text(dump_recipe(target.recipe), encoding="utf-8")
    (folder / "README.md").write_text(adapter_card(target, method), encoding="utf-8")


def adapter_card(target: inference.Target, method: str) -> str:
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
    """Write the GGUF under a temporary name, load it back with transformers, compare, rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".gguf", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_gguf(merged.model, merged.tokenizer, tmp, gguf_type, name=out.stem)
        diff, tokens_match = gguf_round_trip(merged, tmp)
        limit = GGUF_TOLERANCE[gguf_type] if tolerance is None else tolerance
        if not diff <= limit:
            raise CheckFailed(
                f"GGUF check failed: the {gguf_type} file loaded back with transformers differs "
                f"from the merged model by {diff:.3g} in logits (tolerance {limit:g}); nothing "
                "was written"
            )
        tmp.chmod(0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportReport(
        "gguf",
        str(out),
        out.stat().st_size,
        merge=merged.report,
        gguf_type=gguf_type,
        round_trip_max_logit_diff=diff,
        round_trip_tolerance=limit,
        tokenizer_round_trip=tokens_match,
    )


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


def llama_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order for its rotary kernel (transformers reverses this on load)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def check_gguf_architecture(config: Any) -> None:
    reasons = []
    if config.model_type != "llama":
        reasons.append(f"model_type {config.model_type}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        reasons.append("biases")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        reasons.append(f"rope {rope.get('rope_type')}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        reasons.append("head_dim * heads != hidden_size")
    if reasons:
        raise UserError(
            "GGUF export handles plain Llama-family models, and this one has "
            f"{', '.join(reasons)}; "
            "export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py"
        )


def gguf_tensors(model: Any) -> list[tuple[str, torch.Tensor]]:
    """The merged model's tensors under llama.cpp's names, q and k permuted for rotary."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    base = model.model
    tensors = [("token_embd.weight", base.embed_tokens.weight)]
    for i, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        tensors += [
            (f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight),
            (f"blk.{i}.attn_q.weight", llama_permute(attn.q_proj.weight, heads)),
            (f"blk.{i}.attn_k.weight", llama_permute(attn.k_proj.weight, kv_heads)),
            (f"blk.{i}.attn_v.weight", attn.v_proj.weight),
            (f"blk.{i}.attn_output.weight", attn.o_proj.weight),
            (f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight),
            (f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight),
            (f"blk.{i}.ffn_up.weight", mlp.up_proj.weight),
            (f"blk.{i}.ffn_down.weight", mlp.down_proj.weight),
        ]
    tensors.append(("output_norm.weight", base.norm.weight))
    if not config.tie_word_embeddings:
        tensors.append(("output.weight", model.lm_head.weight))
    return tensors


def tokenizer_vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id, their llama.cpp token types, and the merges, from a byte-level BPE."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise UserError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style, as SmolLM and Llama 3 "
            "use); export --format merged and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = dict.fromkeys(by_id, int(TokenType.NORMAL))
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = int(TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED)
    size = max(vocab_size, max(by_id) + 1)
    tokens, token_types = [], []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(types[i])
        else:  # embedding rows beyond the tokenizer: llama.cpp's placeholder convention
            tokens.append(f"[PAD{i}]")
            token_types.append(int(TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, token_types, merges


def write_gguf(model: Any, tokenizer: Any, path: Path, gguf_type: str, name: str = "model") -> None:
    """Write a Llama-family model and its byte-level BPE tokenizer as one GGUF file."""
    import gguf
    import numpy as np

    config = model.config
    check_gguf_architecture(config)
    tokens, token_types, merges = tokenizer_vocab(tokenizer, config.vocab_size)
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[gguf_type]
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[gguf_type]
    writer = gguf.GGUFWriter(str(path), "llama")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(int(file_type))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
        ("unk_token_id", writer.add_unk_token_id),
    ):
        value = getattr(tokenizer, key, None)
        if value is not None:
            add(int(value))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    for tensor_name, tensor in gguf_tensors(model):
        data = tensor.detach().float().cpu().numpy()
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor_name, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 == 0:
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor_name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


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
    targets = [inference.resolve_target(s) for s in sources]
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

            (folder / "recipe.yaml").write_text(dump_recipe(first.recipe), encoding="utf-8")
        (folder / "combine.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        (folder / "README.md").write_text(combine_card(report), encoding="utf-8")

    runs.write_atomically(out, write)
    return report


def check_compatible(targets: list[inference.Target]) -> None:
    """Refuse adapters that do not fit together, naming what differs."""
    first = targets[0]
    for t in targets:
        if t.adapter_dir is None:
            raise UserError(
                f"{t.given}: a model, not a run or adapter folder; combine needs adapters"
            )
    first_method = first.method
    first_config = inference.read_adapter_config(first.adapter_dir)
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
        config = inference.read_adapter_config(t.adapter_dir)
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
