"""The training loop: one explicit function over an `accelerate.Accelerator`.

Gradient accumulation is done by hand so that the loss is normalised by the number of
trained tokens in the whole optimizer step, not per micro-batch: results then do not
depend on how examples fall into micro-batches.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from finetune import (
    adapters,
    batching,
    compiling,
    data,
    evaluate,
    methods,
    models,
    preference,
    reference_cache,
    runs,
    sharding,
)
from finetune.errors import UserError
from finetune.memory.measure import RSS_NAME, LiveTensorPeak, PeakMemory, every_process
from finetune.positions import count_trained, trained_positions_loss, widest_shapes
from finetune.precision import resolve_mixed_precision
from finetune.prepare import Prepared, make_optimizer, prepare, total_steps
from finetune.recipe import Recipe, dump_recipe
from finetune.runs import RunState, SavedCheckpoint
from finetune.stopping import StopRequests


class NonFinite(Exception):
    """A NaN or infinite loss or gradient norm at some step."""


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
    checkpoint: Path | None = None  # the newest checkpoint of the run, if any


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    prepared: Prepared | None = None,
    strict: bool = False,
    force: bool = False,
) -> RunResult:
    """Run the recipe end to end and return what happened; the report is written by the caller.

    `strict`: data warnings stop the run before the model loads, as errors do. `force`: train
    on CUDA even when the estimate says the run cannot fit.
    """
    stop = StopRequests(recipe.train.max_time_s)  # the time budget counts model loading too
    run_dir = Path(recipe.output.dir)
    sharding.check_recipe(recipe, models.default_device())  # before anything is written
    sharding.check_launch()
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
        saved = runs.checkpoint_to_resume(recipe, run_dir) if resume else None
        # The baseline is taken before the model loads, so the peak is what this run added.
        peak = PeakMemory(device=models.default_device()).start()
        try:
            prepared = prepared or prepare(recipe, strict=strict, force=force)
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
    prepared: Prepared,
    peak: PeakMemory,
    stop: StopRequests,
) -> RunResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device = prepared.loaded.device
    # accelerate keeps its state (mixed precision included) in a process-wide singleton and
    # refuses a second Accelerator with another precision; each run sets its own. The
    # distributed part (PartialState, the process group) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    with sharding.accelerate_unsharded():
        accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(recipe.train.mixed_precision, device),
            cpu=device == "cpu",
        )
    if resume:
        same_checkpoint_everywhere(accelerator, run_dir, saved)
    if saved is not None:  # nothing is written yet: a run with no step left stops here
        planned = total_steps(recipe, len(run_items(recipe, prepared)), accelerator.num_processes)
        runs.refuse_finished(run_dir, saved, planned)
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


def same_checkpoint_everywhere(accelerator: Any, run_dir: Path, saved: Any) -> None:
    """Every process reads the checkpoint it resumes from itself; on several machines a node
    that cannot see the main one's output.dir would start again from step 0 and train
    another run than the others. Checked before anything is written.

    Raises:
        UserError: the processes found checkpoints of different steps.
    """
    if accelerator.num_processes == 1:
        return
    step = saved.state.step if saved is not None else 0
    # One reduction gives both ends: the largest step, and the largest of the negated steps.
    high, low = accelerator.reduce(torch.tensor([step, -step], device=accelerator.device), "max")
    if int(high) != -int(low):
        raise UserError(
            f"--resume: the processes found different checkpoints in {run_dir} (step "
            f"{-int(low)} on some, {int(high)} on others); on several machines output.dir "
            "must be a folder every node reads (shared, or copied to the same path)"
        )


def run_items(recipe: Recipe, prepared: Prepared) -> list:
    """The training examples as the loop batches them (packed into sequences or not; pairs
    for a preference objective)."""
    data = recipe.data
    if prepared.splits.train_pairs is not None:
        return prepared.splits.train_pairs.examples
    return batching.build_items(
        prepared.splits.train.examples, data.packing, data.max_length, recipe.train.seed
    )


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
        self.items = run_items(recipe, prepared)
        self.steps = total_steps(recipe, len(self.items), accelerator.num_processes)
        # Taken before a checkpoint is restored: with init_from, the initial adapter.
        self.reference = preference.Reference.of(prepared.model, bool(recipe.adapter.init_from))
        if saved is not None:  # into whole tensors, before the model is wrapped or sharded
            restore_adapter(prepared.model, saved)
        self.sharded = prepared.sharding is not None
        self.model, self.optimizer, self.scheduler = self.wrap(prepared)
        # On the CPU the measured peak is the estimate's metric, live tensor bytes; on CUDA
        # torch's allocator statistics (PeakMemory) are the measurement.
        self.live = LiveTensorPeak(
            self.unwrapped(),
            enabled=prepared.loaded.device == "cpu",
            compiled=recipe.train.compile,
        )
        self.objective = None  # a preference objective, or None for the token loss
        if prepared.splits.train_pairs is not None:
            self.objective = preference.Objective.of(recipe.train)
        self.ref_logps: torch.Tensor | None = None  # train.reference cached: by example index
        self.stats = torch.zeros(len(preference.STATS), dtype=torch.float64)
        self.state = RunState(
            data_sha256=runs.data_fingerprint(Path(recipe.data.path)),
            recipe=recipe.model_dump(mode="json"),
        )
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.checkpoint: Path | None = None  # the newest, on every process (only one writes)
        if saved is not None:
            self.restore(saved)
        self.metrics = runs.MetricsWriter(
            run_dir,
            accelerator.is_main_process,
            self.state.step,
            recipe.train.report_to,
            recipe.model_dump(mode="json"),
        )

    def wrap(self, prepared: Prepared) -> tuple[Any, Any, Any]:
        """(model, optimizer, scheduler) for the loop: the model sharded (FSDP2) or prepared
        by accelerate (DDP under data parallelism), the optimizer made over its parameters."""
        if prepared.sharding is None:
            optimizer, scheduler = make_optimizer(prepared.model, self.recipe, self.steps)
            model, optimizer = self.accelerator.prepare(prepared.model, optimizer)
            # Under mixed precision accelerate wraps the model's forward in autocast for
            # good; the steps enter autocast themselves, so evaluation, generation and the
            # saved model then run in the weights' own precision, as the adapter reloads.
            self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
            return model, optimizer, scheduler
        device = prepared.loaded.device
        self.root = sharding.shard(prepared.model, prepared.sharding, device)
        held, total = sharding.local_share(prepared.model)
        prepared.notes.append(
            f"sharded (FSDP2) over {self.accelerator.num_processes} processes: each holds "
            f"{held:,} of the model's {total:,} parameters"
        )
        # After sharding: fully_shard replaces the parameters the optimizer must hold.
        optimizer, scheduler = make_optimizer(prepared.model, self.recipe, self.steps)
        return prepared.model, optimizer, scheduler

    # ------------------------------------------------------------------ the loop

    def run(self, stop: StopRequests) -> RunResult:
        self.announce()
        if self.objective is not None and self.recipe.train.reference == "cached":
            self.ref_logps = self.cached_reference()
        if self.state.step == 0:
            before = self.exact_match("before")
            self.run_eval()  # the held-out loss the run starts from
        else:  # measured by the run's first session
            before = recorded_exact_match(self.run_dir, "before")
        after = None
        with stop:  # from here a first Ctrl-C or SIGTERM ends the step, then saves and stops
            stopped = self.train_steps(stop)
            if self.recipe.train.compile and compiling.recompile_limit_hit():
                self.prepared.notes.append(compiling.RECOMPILE_LIMIT_NOTE)
            self.peak.stop()
            self.live.close()
            if stopped is None and not stop.requested:
                after = self.finish(stop)
            if stop.requested:
                self.checkpoint_now()
        self.metrics.close()
        return RunResult(
            run_dir=self.run_dir,
            state=self.state,
            history=self.history,
            evals=self.evals,
            exact_match_before=before,
            exact_match_after=after,
            prepared=self.prepared,
            memory=self.measured_memory(),
            stopped=stopped,
            main_process=self.accelerator.is_main_process,
            interrupted=stop.reason(),
            exit_code=stop.exit_code(),
            checkpoint=self.checkpoint,
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
            while self.state.step < self.steps and not stop.agreed(self.accelerator, last_step_s):
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
        latest = self.checkpoint
        if self.state.step and (latest is None or runs.checkpoint_step(latest) != self.state.step):
            self.save_checkpoint()

    def announce(self) -> None:
        if self.accelerator.is_main_process:
            console = Console(stderr=True, highlight=False)
            for line in self.prepared.plan(
                len(self.items), self.steps, self.accelerator.num_processes
            ):
                console.print(line)

    def step(self, micro_batches: list[list[int]]) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches, loss normalised by trained tokens.

        Raises:
            NonFinite: the loss or gradient norm is NaN or infinite and on_nonfinite is stop.
        """
        started = time.perf_counter()
        compiling_before = self.compile_seconds()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        indices = [idx[rank::world] for idx in micro_batches]
        shards = [[self.items[i] for i in idx] for idx in indices]
        batches = [self.collate(items, idx) for items, idx in zip(shards, indices, strict=True)]
        self.record_widest(batches)
        local = sum(count_trained(b["labels"], self.virtual_tokens) for b in batches)
        n_trained = int(self.accelerator.reduce(torch.tensor(local), reduction="sum"))
        norm = self.normaliser(batches, n_trained)
        self.stats.zero_()
        with self.live.step(self.state.step + 1, batches, self.virtual_tokens):
            loss_total, grad_norm = self.accumulate(batches, norm)
            finite = math.isfinite(loss_total) and math.isfinite(grad_norm)
            if finite:
                with self.live.phase("optimizer"):
                    self.optimizer.step()
                self.live.keep_optimizer_states(self.optimizer)
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
        self.state.compile_s += self.compile_seconds() - compiling_before
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
        if self.recipe.train.compile:
            record["compile_s"] = self.state.compile_s
        if self.objective is not None:
            stats = self.accelerator.reduce(self.stats.to(self.accelerator.device), "sum")
            record.update(preference.step_record(stats.cpu(), self.objective))
        if not finite:
            record["skipped"] = True
        self.history.append(record)
        if self.state.step % self.recipe.train.log_every == 0 or self.state.step == self.steps:
            self.metrics.write(record)
        return record

    def compile_seconds(self) -> float:
        """Seconds torch.compile has spent in this process (0 when train.compile is off)."""
        return compiling.compile_seconds() if self.recipe.train.compile else 0.0

    def collate(self, items: list[Any], indices: list[int]) -> dict[str, Any]:
        if self.objective is None:
            return batching.collate(items, self.pad_id, self.packed)
        batch = preference.collate_pairs(items, self.pad_id)
        if self.ref_logps is not None:
            batch["ref_logps"] = preference.cached_rows(self.ref_logps, indices)
        return batch

    def cached_reference(self) -> torch.Tensor:
        """train.reference cached: the run directory's reference log-probabilities for this
        data (a resumed run's), or computed now, before the first step, and saved there."""
        fingerprint = runs.data_fingerprint(Path(self.recipe.data.path))
        cached = reference_cache.read(self.run_dir, fingerprint, len(self.items))
        if cached is not None:
            self.prepared.notes.append(
                f"reference log-probabilities read from {reference_cache.FILE}"
            )
            return cached
        started = time.perf_counter()
        t = self.recipe.train
        order = batching.epoch_order(
            [len(item) for item in self.items],
            t.micro_batch_size * self.accelerator.num_processes,
            t.seed,
            0,
            self.recipe.data.shuffle,
            self.recipe.data.group_by_length,
        )
        with self.uncompiled():
            logps = reference_cache.compute(
                self.unwrapped(),
                self.items,
                order,
                t.micro_batch_size,
                self.pad_id,
                self.reference,
                self.accelerator.autocast,
            )
        if self.accelerator.is_main_process:
            reference_cache.write(self.run_dir, logps, fingerprint)
        self.prepared.notes.append(
            f"reference log-probabilities of {len(self.items)} examples computed before the "
            f"first step in {time.perf_counter() - started:.1f} s, kept in {reference_cache.FILE}"
        )
        return logps

    def normaliser(self, batches: list[dict[str, Any]], n_trained: int) -> Any:
        """What the step's loss is divided by: its trained tokens, or for a preference
        objective its pairs (examples for KTO) and chosen tokens, over every process."""
        if self.objective is None:
            return max(n_trained, 1)
        local = sum(preference.units(b, self.objective) for b in batches)
        return self.accelerator.reduce(local.to(self.accelerator.device), "sum").clamp(min=1)

    def accumulate(self, batches: list[dict[str, Any]], n_trained: Any) -> tuple[float, float]:
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

    def record_widest(self, batches: list[dict[str, Any]]) -> None:
        """Fold this step's widest micro-batches, over all processes, into `state.widest`."""
        seen = widest_shapes(batches, self.packed, self.virtual_tokens)
        flat = torch.tensor([*seen["masked"], *seen["unmasked"]], device=self.accelerator.device)
        agreed = self.accelerator.reduce(flat, reduction="max").tolist()
        for kind, (width, logits) in (("masked", agreed[:2]), ("unmasked", agreed[2:])):
            if width:
                old = self.state.widest.get(kind, [0, 0])
                self.state.widest[kind] = [max(old[0], width), max(old[1], logits)]

    def measured_memory(self) -> dict[str, Any]:
        """The run's measured memory: live-tensor peak on the CPU (the estimate's metric),
        allocator statistics on CUDA, and the process's RSS growth as a separate figure."""
        live = self.live.to_dict()
        if live is None:
            return {"measured": self.peak.to_dict()}
        if self.accelerator.num_processes > 1:
            live = every_process(live)
        return {"measured": live, "resident": {**self.peak.to_dict(), "metric": RSS_NAME}}

    def forward_loss(self, batch: dict[str, Any], n_trained: Any) -> torch.Tensor:
        if self.objective is None:
            return trained_positions_loss(self.model, batch, n_trained, self.virtual_tokens)
        scored = preference.micro_batch_loss(
            self.model, batch, self.objective, self.reference, n_trained
        )
        self.stats += scored.stats
        return scored.loss

    @property
    def virtual_tokens(self) -> int:
        """Prompt tuning's virtual tokens sit in front of the sequence and shift its positions."""
        adapter = self.recipe.adapter
        return methods.input_virtual_tokens(adapter.method, adapter.num_virtual_tokens)

    def due(self, every: int) -> bool:
        """Whether an every-N-steps action is due at the current step (0 means never)."""
        return bool(every) and self.state.step % every == 0

    def last_checkpoint_note(self) -> str:
        latest = self.checkpoint
        return f"; the last good checkpoint is {latest}" if latest else ""

    def sync(self, last: bool) -> Any:
        if self.sharded:  # gradients stay whole and accumulate until the last micro-batch
            self.root.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if last or self.accelerator.num_processes == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

    def clip(self) -> float:
        max_norm = self.recipe.train.max_grad_norm
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.sharded:
            return sharding.clip_grad_norm(params, max_norm)
        if max_norm is None:
            norms = [p.grad.detach().norm() for p in params if p.grad is not None]
            return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    # ------------------------------------------------------------------ evaluation

    def run_eval(self) -> None:
        with self.uncompiled():
            self.record_eval()

    def uncompiled(self) -> Any:
        """Outside the training step compiled layers run eagerly (see compiling.eager)."""
        return compiling.eager(self.recipe.train.compile)

    def record_eval(self) -> None:
        eval_data = self.prepared.splits.eval
        if eval_data is None or not self.evaluates():
            return
        if self.objective is not None:
            record = preference.held_out_record(
                self.unwrapped(),
                self.prepared.splits.eval_pairs.examples,
                self.pad_id,
                self.recipe.train.micro_batch_size,
                self.objective,
                self.reference,
            )
            record = {"step": self.state.step, **record}
            self.evals.append(record)
            self.metrics.write(record)
            return
        # Virtual tokens are no no-op at step 0 (LoRA is): the base model's loss beside it
        # shows how far the initialisation moved the model.
        base = self.state.step == 0 and self.recipe.adapter.method in methods.VIRTUAL_TOKEN_METHODS
        record = evaluate.held_out_record(
            self.unwrapped(), eval_data, self.pad_id, self.recipe.train.micro_batch_size, base
        )
        record = {"step": self.state.step, **record}
        self.evals.append(record)
        self.metrics.write(record)

    def exact_match(self, when: str) -> evaluate.ExactMatch | None:
        spec, rows, options = self.recipe.data, self.prepared.splits.eval_rows, self.recipe.eval
        if not rows or spec.format in ("text", *data.PREFERENCE_FORMATS):
            return None  # preference data is judged by preference accuracy instead
        if not self.evaluates():
            return None
        if options.max_examples == 0:  # asked for no generation (a note says so)
            return None
        tokenizer, source = self.prepared.loaded.tokenizer, self.prepared.splits.eval_source
        pairs = [
            data.generation_prompt(r, spec, tokenizer, source) for r in rows[: options.max_examples]
        ]
        model = self.unwrapped()
        # Before training, the base model: a LoRA adapter starts as a no-op, prefix/prompt don't.
        base = model.disable_adapter() if when == "before" else contextlib.nullcontext()
        with self.uncompiled(), base:
            found = evaluate.exact_match(model, tokenizer, pairs, options.max_new_tokens)
        details = {"correct": found.correct, "total": found.total, "samples": found.samples[:5]}
        self.metrics.write(
            runs.exact_match_record(when, self.state.step, found.accuracy, **details)
        )
        return found

    def evaluates(self) -> bool:
        """Whether this process evaluates: the main one, or under sharding every one, since
        each forward gathers the layers from all processes (only the main one records)."""
        return self.sharded or self.accelerator.is_main_process

    def unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------ saving

    def save_adapter(self) -> None:
        weights = self.whole_adapter()  # under sharding every process gathers
        if self.accelerator.is_main_process:
            runs.save_adapter(self.run_dir, self.unwrapped(), weights)

    def save_checkpoint(self) -> None:
        weights = self.whole_adapter()
        optimizer = sharding.optimizer_state(self.optimizer) if self.sharded else None
        if self.accelerator.is_main_process:
            runs.save_checkpoint(
                self.run_dir,
                self.state,
                model=self.unwrapped(),
                weights=weights,
                projection=adapters.projection_state(self.unwrapped()),
                optimizer=optimizer or self.optimizer.state_dict(),
                scheduler=self.scheduler,
                keep_last=self.recipe.train.keep_last,
            )
        self.checkpoint = runs.checkpoint_path(self.run_dir, self.state.step)  # every process

    def whole_adapter(self) -> dict[str, torch.Tensor] | None:
        """Under sharding the adapter's tensors gathered whole (a collective), else None:
        peft's save_pretrained reads them from the model."""
        return sharding.adapter_state(self.unwrapped()) if self.sharded else None

    def restore(self, saved: SavedCheckpoint) -> None:
        """Everything but the adapter's weights (`restore_adapter`, before wrapping)."""
        if self.sharded:
            sharding.load_optimizer_state(self.optimizer, saved.optimizer)
        else:
            self.optimizer.load_state_dict(saved.optimizer)
        self.scheduler.load_state_dict(saved.scheduler)
        runs.restore_rng(saved)
        self.state = saved.state
        self.checkpoint = saved.path
        self.history = runs.read_history(self.run_dir, self.state.step)
        self.evals = runs.read_evals(self.run_dir, self.state.step)


def recorded_exact_match(run_dir: Path, when: str) -> evaluate.ExactMatch | None:
    """The exact match metrics.jsonl recorded `when` (see runs.exact_match_record)."""
    record = runs.read_exact_match(run_dir, when)
    if record is None:
        return None
    details = record["exact_match"]
    return evaluate.ExactMatch(
        record[f"exact_match_{when}"], details["correct"], details["total"], details["samples"]
    )


def restore_adapter(model: Any, saved: SavedCheckpoint) -> None:
    """Put a checkpoint's adapter weights into the peft model, while its tensors are whole."""
    from peft import set_peft_model_state_dict

    if saved.projection is not None:
        adapters.restore_projection(model, saved.projection)
    else:
        set_peft_model_state_dict(model, saved.weights)
