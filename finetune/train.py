"""The training loop: one explicit function over an `accelerate.Accelerator`.

Gradient accumulation is done by hand so that the loss is normalised by the number of
trained tokens in the whole optimizer step, not per micro-batch: results then do not
depend on how examples fall into micro-batches.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune import adapters, batching, data, doctor, evaluate, methods, models, runs, tracking
from finetune.errors import UserError
from finetune.memory.measure import RSS_NAME, LiveTensorPeak, PeakMemory
from finetune.positions import count_trained, trained_positions_loss
from finetune.precision import resolve_mixed_precision
from finetune.recipe import Recipe, dump_recipe
from finetune.stopping import StopRequests


class NonFinite(Exception):
    """A NaN or infinite loss or gradient norm at some step."""


@dataclass
class Prepared:
    """Everything a run needs, built and validated before anything is written."""

    recipe: Recipe
    loaded: models.LoadedModel
    model: Any
    splits: data.Splits
    params: adapters.ParameterCount
    gradient_checkpointing: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class RunState:
    """Where the loop is; saved in every checkpoint so a resumed run continues exactly."""

    step: int = 0
    micro_step: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    elapsed: float = 0.0
    skipped_steps: int = 0


@dataclass
class RunResult:
    run_dir: Path
    state: RunState
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    exact_match_before: evaluate.ExactMatch | None
    exact_match_after: evaluate.ExactMatch | None
    prepared: Prepared
    memory: dict[str, Any] = field(default_factory=dict)
    stopped: str | None = None  # why the run stopped early (divergence), else None
    main_process: bool = True  # under data parallelism, only the main process reports
    # Why the run paused with a checkpoint to resume from (a signal, train.max_time), else None.
    interrupted: str | None = None
    exit_code: int = 0  # 130 after SIGINT, 143 after SIGTERM


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare(recipe: Recipe, device: str | None = None, strict: bool = False) -> Prepared:
    """Load model, attach the adapter and tokenize the data; raise on any bad input.

    The data checks (finetune.doctor) run before the model loads: an error, or with
    `strict` a warning, stops the run there; other warnings become notes of the run.
    """
    seed_everything(recipe.train.seed)
    tracking.check_available(recipe.train.report_to)
    # Data first: a broken row should not wait for a model to load.
    tokenizer = models.load_tokenizer(
        models.resolve_source(recipe.model.path), recipe.model.trust_remote_code
    )
    splits = data.prepare(recipe.data, tokenizer, recipe.train.seed)
    diagnosis = doctor.diagnose(recipe, tokenizer, splits)
    doctor.refuse(diagnosis, strict)
    loaded = models.load_model(recipe.model, device, tokenizer=tokenizer)
    notes = list(loaded.notes) + recipe.method_default_notes() + diagnosis.warning_lines()
    if recipe.eval.max_examples == 0 and splits.eval_rows and recipe.data.format != "text":
        notes.append("eval.max_examples is 0: exact-match generation skipped")
    checkpointing = recipe.train.gradient_checkpointing
    method = methods.METHODS[recipe.adapter.method]
    if checkpointing and not method.gradient_checkpointing:
        checkpointing = False
        notes.append(method.no_checkpointing)
    spec = adapters.with_init_text(
        recipe.adapter, data.first_prompt(recipe.data, splits.train_rows)
    )
    notes += adapters.init_notes(recipe.adapter, spec)
    model = adapters.attach(
        loaded.model,
        spec,
        quantized=loaded.quantization != "none",
        gradient_checkpointing=checkpointing,
        tokenizer_path=loaded.folder,
        tokenizer=tokenizer,
    )
    params = adapters.count_parameters(model)
    return Prepared(recipe, loaded, model, splits, params, checkpointing, notes)


def total_steps(recipe: Recipe, n_items: int, world_size: int = 1) -> int:
    """Optimizer steps: max_steps, or enough for `epochs` passes over the items (examples or
    packed sequences), counting whole micro-batches as batching.micro_batches draws them."""
    if recipe.train.max_steps:
        return recipe.train.max_steps
    per_epoch = max(1, n_items // (recipe.train.micro_batch_size * world_size))
    return max(1, math.ceil(recipe.train.epochs * per_epoch / recipe.train.grad_accum))


def make_optimizer(model: Any, recipe: Recipe, steps: int) -> tuple[Any, Any]:
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay
    )
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    scheduler = get_scheduler(
        name[recipe.train.schedule],
        optimizer,
        num_warmup_steps=min(recipe.train.warmup_steps, steps),
        num_training_steps=steps,
    )
    return optimizer, scheduler


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    prepared: Prepared | None = None,
    strict: bool = False,
) -> RunResult:
    """Run the recipe end to end and return what happened; the report is written by the caller.

    `strict`: data warnings stop the run before the model loads, as errors do.
    """
    stop = StopRequests(recipe.train.max_time_s)  # the time budget counts model loading too
    run_dir = Path(recipe.output.dir)
    lock = None
    if is_main_launch_process():  # the others write nothing; torchrun stops them if it fails
        lock = runs.claim_run_dir(
            run_dir,
            overwrite=recipe.output.overwrite,
            resume=resume,
            inputs=recipe.input_paths(),
            sealed=recipe.sealed_paths(),
        )
    try:
        checkpoint = runs.latest_checkpoint(run_dir) if resume else None
        if resume:
            check_resumable(recipe, run_dir)
        saved = read_checkpoint(checkpoint) if checkpoint else None
        # The baseline is taken before the model loads, so the peak is what this run added.
        peak = PeakMemory(device=models.default_device()).start()
        try:
            prepared = prepared or prepare(recipe, strict=strict)
            return run_with_peak(recipe, run_dir, resume, saved, prepared, peak, stop)
        finally:
            peak.stop()  # also on errors: the sampling thread must not outlive the run
    finally:
        if lock is not None:
            lock.release()


def is_main_launch_process() -> bool:
    """Rank 0 of torchrun or accelerate launch (which set RANK), or a single process; known
    before the Accelerator exists, so the lock is taken before the model loads."""
    return os.environ.get("RANK", "0") == "0"


def run_with_peak(
    recipe: Recipe,
    run_dir: Path,
    resume: bool,
    saved: SavedCheckpoint | None,
    prepared: Prepared | None,
    peak: PeakMemory,
    stop: StopRequests,
) -> RunResult:
    from accelerate import Accelerator

    prepared = prepared or prepare(recipe)
    device = prepared.loaded.device
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(recipe.train.mixed_precision, device),
        cpu=device == "cpu",
    )
    if resume:
        prepared.notes.append(
            f"resumed from {saved.path}"
            if saved
            else f"--resume found no complete checkpoint in {run_dir}; started from step 0"
        )
    if accelerator.is_main_process:
        runs.start_run_dir(run_dir, fresh=not resume, recipe_yaml=dump_recipe(recipe))
        runs.remove_partial_writes(run_dir)
    return Loop(recipe, prepared, accelerator, run_dir, saved, peak).run(stop)


class Loop:
    """The training loop, readable top to bottom in `run` and `step`."""

    def __init__(
        self,
        recipe: Recipe,
        prepared: Prepared,
        accelerator: Any,
        run_dir: Path,
        saved: SavedCheckpoint | None,
        peak: PeakMemory,
    ) -> None:
        self.recipe = recipe
        self.peak = peak
        self.prepared = prepared
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.train_data = prepared.splits.train
        self.pad_id = prepared.loaded.tokenizer.pad_token_id
        self.packed = recipe.data.packing
        self.items = batching.build_items(
            self.train_data.examples, self.packed, recipe.data.max_length, recipe.train.seed
        )
        self.steps = total_steps(recipe, len(self.items), accelerator.num_processes)
        optimizer, self.scheduler = make_optimizer(prepared.model, recipe, self.steps)
        self.model, self.optimizer = accelerator.prepare(prepared.model, optimizer)
        # On the CPU the measured peak is the estimate's metric, live tensor bytes; on CUDA
        # torch's allocator statistics (PeakMemory) are the measurement.
        self.live = LiveTensorPeak(self.unwrapped(), enabled=prepared.loaded.device == "cpu")
        self.state = RunState()
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        if saved is not None:
            self.restore(saved)
        self.metrics = runs.MetricsWriter(
            run_dir,
            accelerator.is_main_process,
            self.state.step,
            recipe.train.report_to,
            recipe.model_dump(mode="json"),
        )

    # ------------------------------------------------------------------ the loop

    def run(self, stop: StopRequests) -> RunResult:
        self.announce()
        before = None
        if self.state.step == 0:
            before = self.exact_match("before")
            self.run_eval()  # the held-out loss the run starts from
        after = None
        with stop:  # from here a first Ctrl-C or SIGTERM ends the step, then saves and stops
            stopped = self.train_steps(stop)
            self.peak.stop()
            self.live.close()
            if stopped is None and not stop.requested:
                after = self.finish(stop)
            if stop.requested:
                self.checkpoint_now()
        self.metrics.close()
        return RunResult(
            self.run_dir,
            self.state,
            self.history,
            self.evals,
            before,
            after,
            self.prepared,
            self.measured_memory(),
            stopped,
            self.accelerator.is_main_process,
            stop.reason(),
            stop.exit_code(),
        )

    def train_steps(self, stop: StopRequests) -> str | None:
        """Optimizer steps until the last one, a stop request, or divergence (its message)."""
        from finetune.progress import TrainProgress

        t = self.recipe.train
        batches = batching.micro_batches(
            [len(item) for item in self.items],
            t.micro_batch_size * self.accelerator.num_processes,
            t.seed,
            self.recipe.data.shuffle,
            self.recipe.data.group_by_length,
            start=self.state.micro_step,
        )
        self.model.train()
        last_step_s = 0.0
        with TrainProgress(self.steps, self.state.step, self.accelerator.is_main_process) as bar:
            while self.state.step < self.steps and not self.stop_agreed(stop, last_step_s):
                before = self.state.elapsed  # step() times itself
                try:
                    record = self.step([next(batches) for _ in range(t.grad_accum)])
                except NonFinite as err:
                    return str(err)
                last_step_s = self.state.elapsed - before
                bar.update(self.state.step, record)
                if self.due(t.eval_every) and self.state.step < self.steps:
                    self.run_eval()  # the final evaluation comes after the loop
                if self.due(t.save_every):
                    self.save_checkpoint()
        return None

    def stop_agreed(self, stop: StopRequests, next_step_s: float) -> bool:
        """Whether to stop before the next step. Under data parallelism the processes agree
        (a signal may reach them at different steps), so all stop after the same step."""
        stop.check_time(next_step_s)
        if self.accelerator.num_processes == 1:
            return stop.requested
        flags = torch.tensor([stop.signum or 0, int(stop.out_of_time)])
        flags = self.accelerator.reduce(flags.to(self.accelerator.device), reduction="max")
        signum, out_of_time = (int(v) for v in flags.cpu())
        stop.signum = stop.signum or signum or None
        stop.out_of_time = bool(out_of_time)
        return stop.requested

    def finish(self, stop: StopRequests) -> evaluate.ExactMatch | None:
        """After the last step: held-out loss, checkpoint, adapter, then exact match (skipped
        when a stop was asked for meanwhile: it is the slow part and changes nothing saved)."""
        t = self.recipe.train
        self.run_eval()
        if t.save_every and self.state.step % t.save_every:
            self.save_checkpoint()
        self.save_adapter()
        return None if stop.requested else self.exact_match("after")

    def checkpoint_now(self) -> None:
        """A checkpoint at the current step, unless one exists (or no step was taken)."""
        latest = runs.latest_checkpoint(self.run_dir)
        if self.state.step and (latest is None or runs.checkpoint_step(latest) != self.state.step):
            self.save_checkpoint()

    def announce(self) -> None:
        """Say what is about to run: parameter counts, choices made for the user, the plan."""
        if not self.accelerator.is_main_process:
            return
        from rich.console import Console

        console = Console(stderr=True, highlight=False)
        p = self.prepared
        console.print(f"{self.recipe.adapter.method}: {p.params}")
        for note in p.notes:
            console.print(f"note: {note}")
        console.print(
            f"{len(self.train_data)} examples in {len(self.items)} sequences; "
            f"{self.steps} steps of {self.recipe.train.micro_batch_size} x "
            f"{self.recipe.train.grad_accum} x {self.accelerator.num_processes} process(es)"
        )

    def step(self, micro_batches: list[list[int]]) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches, loss normalised by trained tokens.

        Raises:
            NonFinite: the loss or gradient norm is NaN or infinite and on_nonfinite is stop.
        """
        started = time.perf_counter()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        shards = [[self.items[i] for i in idx[rank::world]] for idx in micro_batches]
        batches = [batching.collate(items, self.pad_id, self.packed) for items in shards]
        local = sum(count_trained(b["labels"], self.virtual_tokens) for b in batches)
        n_trained = int(self.accelerator.reduce(torch.tensor(local), reduction="sum"))
        with self.live.step(self.state.step + 1, batches, self.virtual_tokens):
            loss_total, grad_norm = self.accumulate(batches, max(n_trained, 1))
            finite = math.isfinite(loss_total) and math.isfinite(grad_norm)
            if finite:
                with self.live.phase("optimizer"):
                    self.optimizer.step()
        if not finite and self.recipe.train.on_nonfinite == "stop":
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFinite(
                f"training diverged at step {self.state.step + 1}: loss {loss_total}, gradient "
                f"norm {grad_norm}; the adapter keeps its last good weights"
                f"{self.last_checkpoint_note()}. Lower train.lr, check the data, or set "
                "train.on_nonfinite=skip"
            )
        if not finite:
            self.state.skipped_steps += 1
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        local_tokens = sum(len(item) for items in shards for item in items)
        tokens = int(self.accelerator.reduce(torch.tensor(local_tokens), reduction="sum"))
        elapsed = time.perf_counter() - started
        self.state.step += 1
        self.state.micro_step += len(micro_batches)
        self.state.tokens += tokens
        self.state.trained_tokens += n_trained
        self.state.elapsed += elapsed
        record = {
            "step": self.state.step,
            "loss": loss_total,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens": self.state.tokens,
            "trained_tokens": self.state.trained_tokens,
            "tokens_per_s": tokens / elapsed if elapsed else 0.0,
            "elapsed_s": self.state.elapsed,
        }
        if not finite:
            record["skipped"] = True
        self.history.append(record)
        if self.state.step % self.recipe.train.log_every == 0 or self.state.step == self.steps:
            self.metrics.write(record)
        return record

    def accumulate(self, batches: list[dict[str, Any]], n_trained: int) -> tuple[float, float]:
        """Forward and backward over the step's micro-batches: (summed loss, gradient norm)."""
        world = self.accelerator.num_processes
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            last = i == len(batches) - 1
            # DDP averages gradients over processes, so scale by world size to get a sum.
            with self.sync(last), self.accelerator.autocast(), self.live.phase("forward"):
                loss = self.forward_loss(batch, n_trained) * world
            with self.live.phase("backward"):
                self.accelerator.backward(loss)
            loss_sum += float(loss.detach()) / world
            del loss, batch  # freed before the next micro-batch, as in the dry run
        grad_norm = self.clip()
        loss_total = float(self.accelerator.reduce(torch.tensor(loss_sum), reduction="sum"))
        return loss_total, grad_norm

    def measured_memory(self) -> dict[str, Any]:
        """The run's measured memory: live-tensor peak on the CPU (the estimate's metric),
        allocator statistics on CUDA, and the process's RSS growth as a separate figure."""
        live = self.live.to_dict()
        if live is None:
            return {"measured": self.peak.to_dict()}
        return {"measured": live, "resident": {**self.peak.to_dict(), "metric": RSS_NAME}}

    @property
    def virtual_tokens(self) -> int:
        """Prompt tuning's virtual tokens, in front of every sequence: they shift positions."""
        adapter = self.recipe.adapter
        return methods.input_virtual_tokens(adapter.method, adapter.num_virtual_tokens)

    def forward_loss(self, batch: dict[str, Any], n_trained: int) -> torch.Tensor:
        return trained_positions_loss(self.model, batch, n_trained, self.virtual_tokens)

    def due(self, every: int) -> bool:
        """Whether an every-N-steps action is due at the current step (0 means never)."""
        return bool(every) and self.state.step % every == 0

    def last_checkpoint_note(self) -> str:
        latest = runs.latest_checkpoint(self.run_dir)
        return f"; the last good checkpoint is {latest}" if latest else ""

    def sync(self, last: bool) -> Any:
        import contextlib

        if last or self.accelerator.num_processes == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

    def clip(self) -> float:
        max_norm = self.recipe.train.max_grad_norm
        params = [p for p in self.model.parameters() if p.requires_grad]
        if max_norm is None:
            norms = [p.grad.detach().norm() for p in params if p.grad is not None]
            return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    # ------------------------------------------------------------------ evaluation

    def run_eval(self) -> None:
        eval_data = self.prepared.splits.eval
        if eval_data is None or not self.accelerator.is_main_process:
            return
        result = evaluate.evaluate_loss(
            self.unwrapped(), eval_data, self.pad_id, self.recipe.train.micro_batch_size
        )
        record = {
            "step": self.state.step,
            "eval_loss": result.loss,
            "eval_perplexity": result.perplexity,
            "eval_tokens": result.tokens,
        }
        if self.state.step == 0 and self.recipe.adapter.method in methods.VIRTUAL_TOKEN_METHODS:
            # Virtual tokens are no no-op at step 0 (LoRA is): the base model's loss beside it
            # shows how far the initialisation moved the model.
            with self.unwrapped().disable_adapter():
                base = evaluate.evaluate_loss(
                    self.unwrapped(), eval_data, self.pad_id, self.recipe.train.micro_batch_size
                )
            record["base_eval_loss"] = base.loss
        self.evals.append(record)
        self.metrics.write(record)

    def exact_match(self, when: str) -> evaluate.ExactMatch | None:
        spec = self.recipe.data
        rows = self.prepared.splits.eval_rows
        if not rows or spec.format == "text" or not self.accelerator.is_main_process:
            return None
        if self.recipe.eval.max_examples == 0:  # asked for no generation (a note says so)
            return None
        rows = rows[: self.recipe.eval.max_examples] if self.recipe.eval.max_examples else rows
        tokenizer = self.prepared.loaded.tokenizer
        pairs = [
            data.generation_prompt(r, spec, tokenizer, self.prepared.splits.eval_source)
            for r in rows
        ]
        model = self.unwrapped()
        if when == "before":
            # The base model: a LoRA adapter starts as a no-op, but prefix/prompt ones don't.
            with model.disable_adapter():
                return evaluate.exact_match(
                    model, tokenizer, pairs, self.recipe.eval.max_new_tokens
                )
        return evaluate.exact_match(model, tokenizer, pairs, self.recipe.eval.max_new_tokens)

    def unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------ saving

    def save_adapter(self) -> None:
        if self.accelerator.is_main_process:
            runs.write_atomically(
                self.run_dir / "adapter",
                self.unwrapped().save_pretrained,
                runs.resume_hint(self.run_dir),
            )

    def save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process:
            return
        target = self.run_dir / "checkpoints" / f"step-{self.state.step}"
        runs.write_atomically(target, self.write_checkpoint, then=runs.resume_hint(self.run_dir))
        runs.prune_checkpoints(self.run_dir, self.recipe.train.keep_last)

    def write_checkpoint(self, folder: Path) -> None:
        self.unwrapped().save_pretrained(folder / "adapter")
        projection = adapters.projection_state(self.unwrapped())
        if projection is not None:
            from safetensors.torch import save_file

            save_file(projection, folder / PROJECTION_FILE)
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state()}, folder / "rng_torch.pt")
        np_state = np.random.get_state()
        rng = {
            "python": _jsonable(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }
        (folder / "rng.json").write_text(json.dumps(rng))
        (folder / "state.json").write_text(json.dumps(self.state.__dict__, indent=2))

    def restore(self, saved: SavedCheckpoint) -> None:
        from peft import set_peft_model_state_dict

        if saved.projection is not None:
            adapters.restore_projection(self.unwrapped(), saved.projection)
        else:
            set_peft_model_state_dict(self.unwrapped(), saved.weights)
        self.optimizer.load_state_dict(saved.optimizer)
        self.scheduler.load_state_dict(saved.scheduler)
        torch.set_rng_state(saved.torch_rng)
        random.setstate(_tupled(saved.rng["python"]))
        kind, keys, *rest = saved.rng["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
        self.state = RunState(**saved.state)
        self.history = runs.read_history(self.run_dir, self.state.step)
        self.evals = runs.read_evals(self.run_dir, self.state.step)


# Beside a checkpoint's adapter: the prefix MLP, which peft's saved adapter leaves out.
PROJECTION_FILE = "prefix_encoder.safetensors"


@dataclass
class SavedCheckpoint:
    """A checkpoint read into memory, so a broken one is found before anything is written."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    torch_rng: torch.Tensor
    rng: dict[str, Any]
    state: dict[str, Any]
    projection: dict[str, torch.Tensor] | None = None  # the prefix MLP (prefix_projection)


def read_checkpoint(checkpoint: Path) -> SavedCheckpoint:
    """Read every part of a checkpoint (tensors only: `weights_only=True`, no pickled code).

    Raises:
        UserError: a part is missing or unreadable.
    """
    from safetensors.torch import load_file

    try:
        saved = SavedCheckpoint(
            path=checkpoint,
            weights=load_file(checkpoint / "adapter" / "adapter_model.safetensors"),
            optimizer=torch.load(checkpoint / "optimizer.pt", weights_only=True),
            scheduler=torch.load(checkpoint / "scheduler.pt", weights_only=True),
            torch_rng=torch.load(checkpoint / "rng_torch.pt", weights_only=True)["torch"],
            rng=json.loads((checkpoint / "rng.json").read_text()),
            state=json.loads((checkpoint / "state.json").read_text()),
        )
        if (checkpoint / PROJECTION_FILE).exists():
            saved.projection = load_file(checkpoint / PROJECTION_FILE)
        RunState(**saved.state)
    except Exception as err:  # any unreadable part means this checkpoint is unusable
        raise UserError(
            f"{checkpoint}: corrupt checkpoint ({models.first_line(err)[:120]}); delete it "
            "to resume from an earlier one"
        ) from None
    return saved


# What a resumed run must share with the run it continues: anything else (max_steps, eval
# and save intervals, output options) may change between the two.
RESUME_MUST_MATCH = {
    "model": None,
    "adapter": None,
    "data": None,
    "train": ("micro_batch_size", "grad_accum", "seed"),
}


def check_resumable(recipe: Recipe, run_dir: Path) -> None:
    """Refuse to resume a run with a recipe that changes what its checkpoints mean."""
    import yaml

    try:
        before = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return  # no readable record of the old recipe: the checkpoint itself is checked
    now = recipe.model_dump(mode="json")
    for section, keys in RESUME_MUST_MATCH.items():
        old_section = before.get(section) or {}
        for key in keys or now[section]:
            if key in old_section and old_section[key] != now[section][key]:
                raise UserError(
                    f"--resume: {section}.{key} is {now[section][key]!r} but the run in "
                    f"{run_dir} was made with {old_section[key]!r}; resume with the same "
                    "value, or start a new run (adapter.init_from can start from its adapter)"
                )


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value
