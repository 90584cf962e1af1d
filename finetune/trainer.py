"""The training recipe: ``setup()`` (data -> model -> optimizer -> resume), ``train()``, outputs.

The loss of an optimizer step is normalised by the number of targets in the WHOLE step: all
``grad_accum`` micro-batches on all ranks (one small all-reduce per step, which also carries the
preemption flag so every rank stops at the same step). With DDP averaging gradients over ranks,
each micro-batch contributes ``loss_sum * world_size / step_targets``; the result equals one big
batch exactly, whatever the lengths.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from finetune import checkpoint as ckpt
from finetune.config import config_hash
from finetune.data import prepare_data
from finetune.distributed import all_reduce_sum
from finetune.errors import ResumeError
from finetune.exit_codes import EXIT_OK, EXIT_PREEMPTED
from finetune.loss import count_targets, loss_sum_fn
from finetune.metrics import Console, MetricsLog, device_peak_flops, peak_memory, truncate_after
from finetune.model import (build_base_model, load_tokenizer, parameter_counts, resolve_dtype,
                            save_base_for_reload, wrap_peft)
from finetune.optim import build_optimizer, build_scheduler
from finetune.outputs import generate_samples, write_final, write_summary
from finetune.sampler import BatchPlan
from finetune.signals import PreemptionHandler
from finetune.tracking import open_trackers

log = logging.getLogger(__name__)
# Groups whose change makes a checkpoint's weights meaningless (refuse) vs. that change the run (warn).
MODEL_KEYS = ("model", "peft")
RUN_KEYS = ("data", "optim", "trainer", "seed")


class Trainer:
    def __init__(self, cfg: DictConfig, accelerator, run_dir: Path, strategy):
        self.cfg, self.acc, self.run_dir, self.strategy = cfg, accelerator, run_dir, strategy
        self.is_main = accelerator.is_main_process
        self.step, self.tokens_seen = 0, 0
        self.best_eval: float | None = None
        self.best_step: int | None = None
        self.history: list[dict] = []
        self.writer = ckpt.CheckpointWriter(run_dir)
        self.last_save_time = time.monotonic()

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        self.acc.wait_for_everyone()
        from finetune.hub import HubUploader

        # Created first: a missing hub.repo_id or token fails now, not after hours of training.
        self.uploader = HubUploader(cfg.hub, self.run_dir)
        self.tokenizer = load_tokenizer(cfg)
        self._setup_data()
        self._write_data_stats()
        self._setup_model()
        self.resume_dir = ckpt.find_resume_dir(cfg.resume, self.run_dir)
        if self.resume_dir is not None:
            self._check_resumable(ckpt.read_state(self.resume_dir))
            # Weights before wrapping: every rank loads the full tensors, sharding comes after.
            ckpt.load_trainable(self.model, self.resume_dir / "trainable.safetensors")
        # The schedule needs the number of steps, so it comes after the data plan; the optimizer
        # is built by the strategy over the (possibly sharded) parameters it wraps.
        self.model, self.optimizer, self.scheduler = self.strategy.prepare(
            self.acc, self.model, lambda m: build_optimizer(m, cfg),
            lambda o: build_scheduler(o, cfg, self.total_steps))
        if self.resume_dir is not None:
            self._load_resume_state(self.resume_dir)

    def _setup_data(self) -> None:
        cfg, acc = self.cfg, self.acc
        # One builder per node; the others poll the cache directory (no collective timeout).
        self.data = prepare_data(cfg, self.tokenizer, build=acc.local_process_index == 0)
        if cfg.data.streaming:
            # Rows come on the fly (data/streaming.py): one "epoch" of max_steps steps; the plan
            # only sizes the steps, the stream's own position replaces its row order.
            if cfg.trainer.max_steps <= 0:
                from finetune.errors import ConfigError

                raise ConfigError("data.streaming=true needs trainer.max_steps > 0 (a stream has "
                                  "no known length to count epochs in)")
            rows = cfg.trainer.max_steps * acc.num_processes * cfg.trainer.micro_batch_size * cfg.trainer.grad_accum
            self.plan = BatchPlan(rows, cfg.trainer.micro_batch_size, cfg.trainer.grad_accum,
                                  acc.num_processes, cfg.seed)
        else:
            lengths = self.data.train.row_lengths() if cfg.trainer.group_by_length and not cfg.data.packing else None
            self.plan = BatchPlan(len(self.data.train), cfg.trainer.micro_batch_size,
                                  cfg.trainer.grad_accum, acc.num_processes, cfg.seed, lengths,
                                  cfg.trainer.length_group_steps)
        if self.plan.steps_per_epoch == 0:
            from finetune.errors import ConfigError

            raise ConfigError(f"{len(self.data.train)} training rows do not fill one optimizer step of "
                              f"{self.plan.rows_per_step} rows (world_size x trainer.micro_batch_size x "
                              "trainer.grad_accum); lower the batch size or add data")
        t = cfg.trainer
        self.total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * self.plan.steps_per_epoch)
        self.collate = self.data.collator(self.tokenizer.pad_token_id, cfg.data.packing,
                                          cfg.data.max_seq_len if t.compile else None)
        chunked = {"on": True, "off": False}.get(t.chunked_loss, self.acc.device.type != "cuda")
        self.loss_sum = loss_sum_fn(cfg.model.task, chunked)

    def _setup_model(self) -> None:
        cfg = self.cfg
        from accelerate.utils import set_seed

        set_seed(cfg.seed)  # the built-in models' random init, LoRA init and dropout
        dtype = resolve_dtype(cfg, self.acc.device.type)
        labels = self.data.label_names
        base = build_base_model(cfg, self.tokenizer, num_labels=len(labels) if labels else None,
                                dtype=dtype, label_names=labels)
        if self.is_main:
            self.base_ref = save_base_for_reload(base, self.tokenizer, cfg, self.run_dir)
        if cfg.model.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if cfg.peft.method == "lora":
                base.enable_input_require_grads()
        self.model = wrap_peft(base, cfg)
        if cfg.trainer.compile:
            self.model = torch.compile(self.model)
        self.param_counts = parameter_counts(self.model)

    # --------------------------------------------------------------- resume
    def _check_resumable(self, state: dict) -> None:
        hashes = state.get("config_hash", {})
        if hashes.get("model") != config_hash(self.cfg, MODEL_KEYS):
            raise ResumeError(f"checkpoint {self.resume_dir} was trained with a different model or "
                              "peft config; resume with the same model/peft settings or resume=false")
        if state.get("data_key") != self.data.cache_dir.name:
            raise ResumeError(f"checkpoint {self.resume_dir} was trained on different data (or "
                              "tokenizer / max_seq_len); resume with the same data or resume=false")
        if hashes.get("run") != config_hash(self.cfg, RUN_KEYS):
            log.warning("resuming %s with a changed data/optim/trainer/seed config: the run will "
                        "differ from an uninterrupted one", self.resume_dir)
        if state.get("rows_per_step") != self.plan.rows_per_step:
            raise ResumeError(f"checkpoint {self.resume_dir} used {state.get('rows_per_step')} rows per "
                              f"optimizer step, this run {self.plan.rows_per_step}; keep world_size x "
                              "trainer.micro_batch_size x trainer.grad_accum equal to resume exactly")

    def _load_resume_state(self, path: Path) -> None:
        state = ckpt.read_state(path)
        self.strategy.load_optimizer(self.acc, self.optimizer, path)
        if self.acc.scaler is not None and (path / "scaler.pt").exists():
            self.acc.scaler.load_state_dict(ckpt.load_torch(path / "scaler.pt"))
        self.scheduler.load_state_dict(ckpt.load_torch(path / "scheduler.pt"))
        rng = ckpt.load_rank_rng(path, self.acc.process_index)
        if rng is not None:
            ckpt.restore_rng(rng)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        if self.cfg.data.streaming:
            self.data.train.load_state_dict(state["data_stream"])
        self.best_eval, self.best_step = state.get("best_eval"), state.get("best_step")
        self.history = state.get("history", [])
        self.tracker_ids = state.get("tracker_ids", {})
        if self.is_main:
            truncate_after(self.run_dir / "metrics.jsonl", self.step)
            log.info("resumed from %s at step %d", path, self.step)

    # ---------------------------------------------------------------- train
    def _loader(self, epoch: int, start_step: int):
        if self.cfg.data.streaming:  # continues from the stream's position (restored on resume)
            return self.data.train.micro_batches(self.acc.process_index, self.acc.num_processes,
                                                 self.cfg.trainer.micro_batch_size,
                                                 self.cfg.trainer.grad_accum, self.collate)
        batches = self.plan.micro_batches(epoch, start_step, self.acc.process_index)
        # A private generator: creating a DataLoader iterator otherwise draws from the global
        # torch RNG, so a resumed run (new iterator mid-epoch) would shift every dropout mask.
        return torch.utils.data.DataLoader(self.data.train, batch_sampler=batches,
                                           collate_fn=self.collate,
                                           num_workers=self.cfg.trainer.num_workers,
                                           generator=torch.Generator().manual_seed(self.cfg.seed + epoch))

    def _to_device(self, batch: dict) -> dict:
        dev = self.acc.device
        return {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def train(self) -> int:
        cfg, acc, t = self.cfg, self.acc, self.cfg.trainer
        trackers = open_trackers(cfg, self.run_dir, getattr(self, "tracker_ids", None)) if self.is_main else []
        self.console = Console(t.progress and self.is_main, self.total_steps, self.step)
        self.metrics = MetricsLog(self.run_dir, trackers, self.console) if self.is_main else None
        preempt = PreemptionHandler().install()
        self.model.train()
        window = {"losses": [], "tokens": 0.0, "rows": 0.0, "start": time.perf_counter(), "grad_norm": None}
        self.run_start = time.perf_counter()
        exit_code = EXIT_OK
        try:
            while self.step < self.total_steps:
                epoch, in_epoch = divmod(self.step, self.plan.steps_per_epoch)
                batches = iter(self._loader(epoch, in_epoch))
                for _ in range(in_epoch, self.plan.steps_per_epoch):
                    if self.step >= self.total_steps:
                        break
                    micro = [next(batches) for _ in range(t.grad_accum)]
                    targets, tokens, rows, stop = all_reduce_sum(acc, [
                        sum(count_targets(b) for b in micro), sum(b["num_tokens"] for b in micro),
                        sum(len(b["input_ids"]) for b in micro), float(preempt.requested is not None)])
                    if stop:
                        self.save_checkpoint(reason="preempted")
                        exit_code = EXIT_PREEMPTED
                        return exit_code
                    step_loss, grad_norm = self._optimizer_step(micro, targets)
                    self.step += 1
                    self.tokens_seen += int(tokens)
                    window["losses"].append(step_loss)
                    window["tokens"] += tokens
                    window["rows"] += rows
                    window["grad_norm"] = grad_norm
                    self._after_step(window)
            self._finish_training()
        finally:
            preempt.uninstall()
            self.console.stop()
        return exit_code

    def accumulate_gradients(self, micro: list[dict], step_targets: float) -> torch.Tensor:
        """Backward over one optimizer step's micro-batches; returns this rank's loss share.

        Each micro-batch's summed loss is scaled by ``world_size / step_targets``: DDP averages
        gradients over ranks, so the result is the gradient of the mean over all the step's targets.
        """
        acc, model = self.acc, self.model
        scale = acc.num_processes / max(step_targets, 1.0)
        local_loss = torch.zeros((), device=acc.device)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with (nullcontext() if last else acc.no_sync(model)), acc.autocast():
                loss = self.loss_sum(model, self._to_device(batch))
                acc.backward(loss * scale)
            local_loss += loss.detach()
        # Kept on the device: the host reads it only at log steps (no sync every step).
        return local_loss / max(step_targets, 1.0)

    def _optimizer_step(self, micro: list[dict], step_targets: float):
        step_loss = self.accumulate_gradients(micro, step_targets)
        grad_norm = None
        if self.cfg.optim.max_grad_norm > 0:
            grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, grad_norm

    def _after_step(self, window: dict) -> None:
        t, step = self.cfg.trainer, self.step
        if step % t.log_steps == 0 or step == self.total_steps:
            self._log_train(window)
        if t.eval_steps and step % t.eval_steps == 0 and step != self.total_steps:
            self._evaluate_and_track()
        due_steps = t.save_steps and step % t.save_steps == 0
        due_time = t.save_minutes and time.monotonic() - self.last_save_time >= t.save_minutes * 60
        if (due_steps or due_time) and step != self.total_steps:
            self.save_checkpoint(reason="periodic")
        if self.is_main:
            self.console.advance(step)

    def _log_train(self, window: dict) -> None:
        losses = torch.stack(window["losses"])
        losses = self.acc.reduce(losses, reduction="sum") if self.acc.num_processes > 1 else losses
        elapsed = time.perf_counter() - window["start"]
        row = {"step": self.step, "epoch": round(self.step / self.plan.steps_per_epoch, 4),
               "loss": float(losses.mean()), "lr": self.scheduler.get_last_lr()[0],
               "tokens_per_s": window["tokens"] / elapsed, "samples_per_s": window["rows"] / elapsed,
               "step_time_s": elapsed / len(window["losses"]), "tokens_seen": self.tokens_seen}
        if window["grad_norm"] is not None:
            row["grad_norm"] = float(window["grad_norm"])
        peak = device_peak_flops()
        if peak:
            row["mfu"] = 6 * self.param_counts[0] * row["tokens_per_s"] / (peak * self.acc.num_processes)
        row.update(peak_memory())
        if self.is_main:
            self.metrics.write(row)
        self.history.append({"step": row["step"], "loss": row["loss"], "tokens_per_s": row["tokens_per_s"]})
        window.update(losses=[], tokens=0.0, rows=0.0, start=time.perf_counter())

    # ----------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict:
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
        loss_sum, count, correct = 0.0, 0.0, 0.0
        classify = self.cfg.model.task == "sequence-classification"
        for k, rows in enumerate(chunks):
            keep = float(k < real)
            batch = self._to_device(self.collate([self.data.eval[i] for i in rows]))
            with acc.autocast():
                if classify:  # one forward gives the loss and the accuracy
                    loss, logits = self.loss_sum(model, batch, return_logits=True)
                    correct += keep * float((logits.argmax(-1) == batch["class_labels"]).sum())
                else:
                    loss = self.loss_sum(model, batch)
                loss_sum += keep * float(loss)
            count += keep * count_targets(batch)
        loss_sum, count, correct = all_reduce_sum(acc, [loss_sum, count, correct])
        model.train()
        out = {"step": self.step, "eval_loss": loss_sum / max(count, 1.0)}
        if classify:
            out["eval_accuracy"] = correct / max(count, 1.0)
        return out

    def _evaluate_and_track(self) -> dict:
        row = self.evaluate()
        if not row:
            return row
        improved = self.best_eval is None or row["eval_loss"] < self.best_eval
        if improved:
            self.best_eval, self.best_step = row["eval_loss"], self.step
        if self.is_main:
            self.metrics.write(row)
            if self.cfg.model.task == "causal-lm" and self.cfg.trainer.sample_prompts:
                generate_samples(self, self.cfg.trainer.sample_prompts)
        self.history.append(row)
        if improved and self.cfg.trainer.save_steps and self.step != self.total_steps:
            self.save_checkpoint(reason="best")
        return row

    # ----------------------------------------------------------- checkpoint
    def _state(self) -> dict:
        epoch, in_epoch = divmod(self.step, self.plan.steps_per_epoch)
        return {"step": self.step, "epoch": epoch, "step_in_epoch": in_epoch,
                "tokens_seen": self.tokens_seen, "rows_per_step": self.plan.rows_per_step,
                "world_size": self.acc.num_processes, "best_eval": self.best_eval,
                "best_step": self.best_step, "data_key": self.data.cache_dir.name,
                "config_hash": {"model": config_hash(self.cfg, MODEL_KEYS),
                                "run": config_hash(self.cfg, RUN_KEYS)},
                "tracker_ids": {type(t).__name__.lower().replace("tracker", ""): t.run_id
                                for t in (self.metrics.trackers if self.metrics else []) if t.run_id},
                "history": self.history,
                **({"data_stream": self.data.train.state_dict(self.step)} if self.cfg.data.streaming else {})}

    def save_checkpoint(self, reason: str) -> Path | None:
        acc = self.acc
        tmp = self.writer.temp_dir(self.step)
        if self.is_main:
            tmp.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        self.writer.write_rank_files(tmp, acc.process_index)
        weights = self.strategy.trainable_state(acc, self.model)  # a collective when sharded
        self.strategy.save_optimizer(acc, self.optimizer, tmp)
        if self.is_main:
            self.writer.write_main_files(tmp, weights, self.scheduler, self._state(),
                                         scaler=self.acc.scaler)  # fp16 loss scale (GPU)
        acc.wait_for_everyone()
        final = None
        if self.is_main:
            final = self.writer.publish(tmp, self.step)
            keep = {ckpt.step_dir_name(self.best_step)} if self.best_step is not None else set()
            self.writer.prune(self.cfg.trainer.keep_last, keep)
            log.info("checkpoint (%s): %s", reason, final)
            self._write_data_stats()
            event = "best" if reason == "best" else "checkpoint"
            if self.uploader.wants(event):  # background upload; training does not wait
                self.uploader.submit(final, f"{reason} checkpoint at step {self.step}",
                                     path_in_repo=f"checkpoints/{final.name}")
        acc.wait_for_everyone()
        self.last_save_time = time.monotonic()
        return final

    # -------------------------------------------------------------- outputs
    def _write_data_stats(self) -> None:
        """``data_stats.json``: kept / truncated / dropped / skipped counts, packing, cache hit.

        A stream's train counts grow as it is read (every rank reads the whole stream, so rank 0's
        are the run's): they are rewritten at every checkpoint and at the end of training."""
        if not self.is_main:
            return
        stats = dict(self.data.stats)
        if self.cfg.data.streaming:
            stats["train"] = self.data.train.report()
        (self.run_dir / "data_stats.json").write_text(json.dumps(stats, indent=1))

    def _finish_training(self) -> None:
        eval_row = self._evaluate_and_track()
        self.final_eval = eval_row
        self.acc.wait_for_everyone()
        final_dir = write_final(self)  # every rank: sharded weights are gathered collectively
        self._write_data_stats()
        if self.is_main:
            summary = write_summary(self, final_dir)
            self.metrics.close(summary)
            self.console.stop()
            self.summary = summary
        self.acc.wait_for_everyone()
