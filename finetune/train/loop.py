"""The training recipe: ``setup()`` (data -> model -> optimizer -> resume), then ``train()``.

The loop is the same for every task and every kind of data: a :class:`~finetune.train.feed.Feed`
gives each optimizer step's micro-batches, the :class:`~finetune.tasks.Task` gives the loss sum
and its target count, the :class:`~finetune.distributed.strategy.Strategy` wraps the model and
saves its state, and callbacks (train/callbacks.py) do everything around the steps in a fixed order.

The loss of an optimizer step is normalised by the number of targets in the WHOLE step: all
``grad_accum`` micro-batches on all ranks (one small all-reduce per step, which also carries the
preemption flag so every rank stops at the same step). With DDP averaging gradients over ranks,
each micro-batch contributes ``loss_sum * world_size / step_targets``; the result equals one big
batch exactly, whatever the lengths.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from finetune.data import prepare_data
from finetune.distributed import all_reduce_sum
from finetune.errors import (EXIT_OK, EXIT_PREEMPTED, CheckpointError, ConfigError, NonFiniteError,
                             PreemptedAtStartup)
from finetune.model.checkpointing import checkpoint_every, checkpointed_layers
from finetune.model.linear_cross_entropy import plain_lm_head
from finetune.model.load import (build_base_model, load_tokenizer, parameter_counts, resolve_dtype,
                                 save_base_for_reload, wrap_peft)
from finetune.tasks import Task, get_task
from finetune.train import checkpoint as ckpt
from finetune.train.feed import BatchPlan, Feed, MapFeed, StreamFeed
from finetune.train.flops import FlopCounter
from finetune.train.optim import build_optimizer, build_scheduler
from finetune.train.signals import PreemptionHandler
from finetune.train.state import ResumeKey, RunState

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one optimizer step hands to the callbacks (all host values but ``loss``)."""

    loss: torch.Tensor  # this rank's share of the step's mean loss, on the device
    tokens: float  # non-padding tokens of the step, all ranks
    rows: float
    grad_norm: torch.Tensor | float | None
    lr: float | None = None  # the learning rate the step trained with (the schedule steps after it)
    flops: float = 0.0  # the model's training FLOPs of the step, all ranks (finetune/train/flops.py)


class Trainer:
    def __init__(self, cfg: DictConfig, accelerator, run_dir: Path, strategy, *,
                 task: Task | None = None, callbacks: list | None = None):
        self.cfg, self.acc, self.run_dir, self.strategy = cfg, accelerator, run_dir, strategy
        self.task = task or get_task(cfg)
        self.is_main = accelerator.is_main_process
        self.state = RunState()
        self.writer = ckpt.CheckpointWriter(run_dir)
        self.callbacks = callbacks
        self.final_eval: dict | None = None  # set by the eval callback at the end
        self.summary: dict | None = None  # set by the final/ callback (main process)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        # From here on SIGTERM / SIGUSR1 ask for a clean stop (without a handler they would kill
        # the process mid-write): during start-up it ends the run at the next stage, exit 75.
        self.preempt = PreemptionHandler().install()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        self.acc.wait_for_everyone()
        if self.callbacks is None:
            from finetune.train.callbacks import default_callbacks

            # Built first: a missing hub.repo_id or token fails now, not after hours of training.
            self.callbacks = default_callbacks(self)
        self.tokenizer = load_tokenizer(cfg, self.task)
        self.task.setup(self.acc.device.type)
        self._setup_data()
        self.emit("on_data_ready")
        self._stop_if_signalled("the data was prepared")
        self._setup_model()
        self._stop_if_signalled("the model was built")
        resume_dir = ckpt.find_resume_dir(cfg.resume, self.run_dir)
        if resume_dir is not None:
            ckpt.check_resumable(resume_dir, cfg, self.resume_key())
            # Weights before wrapping: every rank loads the full tensors, sharding comes after.
            ckpt.load_trainable(self.model, resume_dir / "trainable.safetensors")
        # The schedule needs the number of steps, so it comes after the data; the optimizer is
        # built by the strategy over the (possibly sharded) parameters it wraps.
        self.model, self.optimizer, self.scheduler = self.strategy.prepare(
            self.acc, self.model, lambda m: build_optimizer(m, cfg.optim),
            lambda o: build_scheduler(o, cfg.optim, self.total_steps))
        if resume_dir is not None:
            self._load_resume_state(resume_dir)
        self.flops = FlopCounter(self.model)
        if getattr(self.task, "chunked", None) is not None and self.is_main:
            chunked = self.task.chunked and plain_lm_head(self.model) is not None
            log.info("LM head + loss: %s", "in chunks, no logits kept" if chunked else
                     "plain (logits kept: trainer.chunked_loss, or a head it cannot stand in for)")
        self.task.before_train(self)

    def _setup_data(self) -> None:
        cfg, acc, t = self.cfg, self.acc, self.cfg.trainer
        # One builder per node; the others poll the cache directory (no collective timeout).
        self.data = prepare_data(cfg, self.tokenizer, self.task, build=acc.local_process_index == 0)
        self.collate = self.task.collator(self.tokenizer, cfg.data.max_seq_len if t.compile else None)
        if cfg.data.streaming:
            self.feed: Feed = StreamFeed(self.data.train, self.collate, t.max_steps, acc.num_processes,
                                         acc.process_index, t.micro_batch_size, t.grad_accum)
        else:
            unpacked = not cfg.data.packing or self.task.packs_per_batch  # rows of one example each
            lengths = self.data.train.row_lengths() if unpacked and (t.group_by_length or t.length_split > 1) else None
            plan = BatchPlan(len(self.data.train), t.micro_batch_size, t.grad_accum, acc.num_processes,
                             cfg.seed, lengths if t.group_by_length else None, t.length_group_steps,
                             t.length_split, lengths)
            if plan.steps_per_epoch == 0:
                raise ConfigError(f"{len(self.data.train)} training rows do not fill one optimizer step of "
                                  f"{plan.rows_per_step} rows (world_size x trainer.micro_batch_size x "
                                  "trainer.grad_accum); lower the batch size or add data")
            self.feed = MapFeed(self.data.train, self.collate, plan, acc.process_index, t.num_workers, cfg.seed)
        self.feed = self.task.make_feed(self, self.feed)  # e.g. RL: rollouts generated from the prompts
        self.total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * self.feed.steps_per_epoch)

    def _setup_model(self) -> None:
        cfg = self.cfg
        from accelerate.utils import set_seed

        set_seed(cfg.seed)  # the built-in models' random init, LoRA init and dropout
        dtype = resolve_dtype(cfg, self.acc.device.type)
        base = build_base_model(cfg, self.tokenizer, self.task, label_names=self.data.label_names, dtype=dtype)
        if self.is_main:
            relabelled = bool(self.task.model_kwargs(cfg, self.data.label_names))  # num_labels, id2label
            self.base_ref = save_base_for_reload(base, self.tokenizer, cfg, self.run_dir, relabelled)
        if cfg.model.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if cfg.model.checkpoint_every > 1:
                kept = checkpoint_every(base, cfg.model.checkpoint_every)
                if self.is_main:
                    log.info("gradient checkpointing: %d of %d layers recompute (model.checkpoint_every=%d)",
                             len(kept), len(checkpointed_layers(base)), cfg.model.checkpoint_every)
            if cfg.peft.method == "lora":
                base.enable_input_require_grads()
        self.model = wrap_peft(base, cfg, self.task)
        if cfg.trainer.compile:
            self.model = torch.compile(self.model)
        self.param_counts = parameter_counts(self.model)

    def _stop_if_signalled(self, when: str) -> None:
        if self.preempt.requested is not None:
            self.preempt.uninstall()
            raise PreemptedAtStartup(f"signal {self.preempt.requested} after {when}, before the first step: "
                                     "nothing was trained and no checkpoint written; requeue the job "
                                     "(resume=auto starts afresh)")

    # --------------------------------------------------------------- resume
    def resume_key(self) -> ResumeKey:
        return ResumeKey(self.feed.rows_per_step, self.acc.num_processes, self.data.cache_dir.name,
                         ckpt.config_hashes(self.cfg))

    def _load_resume_state(self, path: Path) -> None:
        self.strategy.load_optimizer(self.acc, self.optimizer, path)
        if self.acc.scaler is not None and (path / "scaler.pt").exists():
            self.acc.scaler.load_state_dict(ckpt.load_torch(path / "scaler.pt"))
        self.scheduler.load_state_dict(ckpt.load_torch(path / "scheduler.pt"))
        rng = ckpt.load_rank_rng(path, self.acc.process_index)
        if rng is not None:
            ckpt.restore_rng(rng)
        self.state = RunState.from_json(ckpt.read_state(path))
        if self.state.feed_state is not None:
            self.feed.load_state_dict(self.state.feed_state)
        self.feed.load_rank_state(path, self.acc.process_index, self.state.step)
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.state.step)

    # ---------------------------------------------------------------- train
    def train(self) -> int:
        preempt, start_step = self.preempt, self.state.step
        self.model.train()
        self.run_start = time.perf_counter()
        self.emit("on_train_start")
        try:
            steps = self.feed.steps(self.state.step)
            while self.state.step < self.total_steps:
                micro = next(steps)
                targets, tokens, rows, stop, flops = all_reduce_sum(self.acc, [
                    sum(self.task.count_targets(b) for b in micro), sum(b["num_tokens"] for b in micro),
                    # rows: what a padded batch would hold (a collator that packs the micro-batch says)
                    sum(b.get("num_rows", len(b["input_ids"])) for b in micro), float(preempt.requested is not None),
                    sum(self.flops.batch(b) for b in micro)])
                if stop:  # a checkpoint only when this run trained a step (else: nothing new)
                    if self.state.step > start_step:
                        self.save_checkpoint(reason="preempted")
                    return EXIT_PREEMPTED
                lr = self.scheduler.get_last_lr()[0]  # read before optimizer_step advances the schedule
                loss, grad_norm = self.optimizer_step(micro, targets)
                self.state.step += 1
                self.state.tokens_seen += int(tokens)
                self.emit("on_step_end", StepResult(loss, tokens, rows, grad_norm, lr, flops))
            self.emit("on_train_end")
        finally:
            preempt.uninstall()
        return EXIT_OK

    def accumulate_gradients(self, micro: list[dict], step_targets: float) -> torch.Tensor:
        """Backward over one optimizer step's micro-batches; returns this rank's loss share.

        Each micro-batch's summed loss is scaled by ``world_size / step_targets``: DDP averages
        gradients over ranks, so the result is the gradient of the mean over all the step's targets.
        """
        acc, model = self.acc, self.model
        scale = acc.num_processes / max(step_targets, 1.0)
        local_loss = torch.zeros((), device=acc.device)
        self.micro_losses = []  # per micro-batch, on the device: read only if the step is not finite
        self.task.before_step(self, micro)  # a statistic of the whole step (KTO's KL estimate)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with (nullcontext() if last else acc.no_sync(model)), acc.autocast():
                loss = self.task.loss_sum(model, self.to_device(batch))
                acc.backward(loss * scale)
            self.micro_losses.append(loss.detach())
            local_loss += self.micro_losses[-1]
        # Kept on the device: the host reads it only at log steps.
        return local_loss / max(step_targets, 1.0)

    def optimizer_step(self, micro: list[dict], step_targets: float):
        step_loss = self.accumulate_gradients(micro, step_targets)
        # The norm of the synchronised gradients is the same on every rank, so every rank takes
        # the same decision below; a NaN / inf loss makes it non-finite too. max_grad_norm=0: inf.
        grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm or math.inf)
        if not math.isfinite(float(grad_norm)):
            self.nonfinite_step(micro)
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, grad_norm if self.cfg.optim.max_grad_norm > 0 else None

    def nonfinite_step(self, micro: list[dict]) -> None:
        """``trainer.nonfinite``: stop naming the step, micro-batch and rows, or skip the update."""
        step = self.state.step + 1
        bad = [i for i, loss in enumerate(self.micro_losses) if not math.isfinite(float(loss))]
        where = (f"micro-batch {bad[0] + 1} of {len(micro)} (loss {float(self.micro_losses[bad[0]])})"
                 if bad else "the gradients (every micro-batch's loss is finite)")
        rows = micro[bad[0] if bad else 0].get("row_ids")
        rows = f", data rows {rows}" if rows is not None else ""
        if self.cfg.trainer.nonfinite == "skip_step":
            self.state.skipped_steps += 1
            log.warning("step %d: NaN/inf in %s%s: update skipped (%d so far; trainer.nonfinite=skip_step)",
                        step, where, rows, self.state.skipped_steps)
            return
        raise NonFiniteError(f"step {step}: NaN/inf in {where}{rows}; the last "
                             "checkpoint is the newest good state: lower optim.lr, check those rows, or "
                             "set trainer.nonfinite=skip_step")

    def to_device(self, batch: dict) -> dict:
        dev = self.acc.device
        return {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    # ----------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss (and the task's metrics) over the eval rows, all ranks; {} without eval data."""
        if self.data.eval is None or len(self.data.eval) == 0:
            return {}
        acc, model, t = self.acc, self.model, self.cfg.trainer
        model.eval()
        idx = list(range(acc.process_index, len(self.data.eval), acc.num_processes))
        chunks = [idx[i:i + t.micro_batch_size] for i in range(0, len(idx), t.micro_batch_size)]
        if t.eval_max_batches:
            chunks = chunks[: t.eval_max_batches]
        real = len(chunks)
        if not self.strategy.can_generate_on_main():
            # Sharded weights make each forward a collective: every rank runs as many as rank 0
            # (which has the most rows); the extra forwards repeat row 0 and count nothing.
            most = math.ceil(math.ceil(len(self.data.eval) / acc.num_processes) / t.micro_batch_size)
            chunks += [[0]] * (min(most, t.eval_max_batches or most) - real)
        loss_sum, count, sums = 0.0, 0.0, {}
        for k, rows in enumerate(chunks):
            keep = float(k < real)
            batch = self.to_device(self.collate([self.data.eval[i] for i in rows]))
            batch["row_ids"] = rows  # as in training batches (tasks with per-row tables)
            with acc.autocast():
                loss, metrics = self.task.eval_sums(model, batch)
                loss_sum += keep * float(loss)
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + keep * value
            count += keep * self.task.count_targets(batch)
        names = sorted(sums)
        loss_sum, count, *totals = all_reduce_sum(acc, [loss_sum, count] + [sums[n] for n in names])
        model.train()
        return {"step": self.state.step, "eval_loss": loss_sum / max(count, 1.0),
                **self.task.eval_metrics(dict(zip(names, totals)), count)}

    # ----------------------------------------------------------- checkpoint
    def save_checkpoint(self, reason: str) -> Path | None:
        """A complete, atomically published checkpoint (every rank calls; rank 0 publishes)."""
        acc = self.acc
        self.state.feed_state = self.feed.state_dict(self.state.step)
        tmp = self.writer.temp_dir(self.state.step)
        if self.is_main:
            tmp.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        failure = None
        try:  # a failed write (disk full): temp dir removed, one CheckpointError line (exit 8)
            with self.writer.writing(tmp):
                weights = self.strategy.trainable_state(acc, self.model)  # a collective when sharded
                self.strategy.save_optimizer(acc, self.optimizer, tmp)
                self.writer.write_rank_files(tmp, acc.process_index)  # after the collectives
                self.feed.save_rank_state(tmp, acc.process_index, self.state.step)
                if self.is_main:
                    state = self.state.to_json(self.resume_key(), self.feed.steps_per_epoch)
                    self.writer.write_main_files(tmp, weights, self.scheduler, state,
                                                 scaler=self.acc.scaler)  # fp16 loss scale (GPU)
        except CheckpointError as exc:
            failure = exc
        if all_reduce_sum(acc, [float(failure is not None)])[0]:  # every rank stops, none waits
            shutil.rmtree(tmp, ignore_errors=True)
            raise failure or CheckpointError(f"another rank could not write its part of {tmp}; "
                                             "see its log (nothing was published)")
        final = None
        if self.is_main:
            with self.writer.writing(tmp):
                final = self.writer.publish(tmp, self.state.step)
            best = self.state.best_step
            self.writer.prune(self.cfg.trainer.keep_last, {ckpt.step_dir_name(best)} if best is not None else set())
            log.info("checkpoint (%s): %s", reason, final)
        acc.wait_for_everyone()
        self.emit("on_save", final, reason)
        return final

    # ------------------------------------------------------------ callbacks
    def emit(self, event: str, *args) -> None:
        """Call ``event`` on every callback, in their fixed order (train/callbacks.py)."""
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def log(self, row: dict) -> None:
        """A metrics row (train or eval) to the callbacks that record it (main process)."""
        self.emit("on_log", row)
