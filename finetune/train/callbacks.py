"""Everything around the training steps, as callbacks called in one fixed order.

The order of :func:`default_callbacks` is the order every event reaches them:

1. :class:`RunLog` — the start lines (model, data, steps) and the end line (losses, speed).
2. :class:`Metrics` — train rows at ``trainer.log_steps`` (loss, lr, tokens/s, grad norm, MFU,
   memory) and eval rows to metrics.jsonl, the console and the trackers (W&B, TensorBoard).
3. :class:`Evaluate` — eval at ``trainer.eval_steps`` and at the end, the task's samples, the
   best eval loss and its checkpoint.
4. :class:`Checkpoints` — periodic checkpoints (``trainer.save_steps`` / ``save_minutes``).
5. :class:`DataStats` — data_stats.json at the start, at every checkpoint and at the end.
6. :class:`Final` — ``final/`` (every rank: sharded weights are gathered) and summary.json.
7. :class:`Report` — loss_curves.png + report.md (``logger.plots``).
8. :class:`Export` — ``merged/`` (``export.merge``).
9. :class:`HubUpload` — checkpoints (``hub.strategy``) and the run (``hub.push``) to the Hub.

Events (each callback implements those it needs; every rank receives every event):
``on_data_ready`` (data prepared, before the model), ``on_train_start``, ``on_step_end(result)``,
``on_log(row)`` (a metrics row, main process), ``on_save(path, reason)`` (after a checkpoint was
published; path None on other ranks), ``on_train_end`` (after the last step), ``on_run_end(code)``
(0 done, 75 preempted, None after an exception).
"""

from __future__ import annotations

import json
import logging
import time

import torch

from finetune.train.metrics import Console, MetricsLog, peak_memory, truncate_after

log = logging.getLogger(__name__)


class Callback:
    def on_data_ready(self, trainer) -> None: ...
    def on_train_start(self, trainer) -> None: ...
    def on_step_end(self, trainer, result) -> None: ...
    def on_log(self, trainer, row: dict) -> None: ...
    def on_save(self, trainer, path, reason: str) -> None: ...
    def on_train_end(self, trainer) -> None: ...
    def on_run_end(self, trainer, code: int | None) -> None: ...


def due(step: int, every: int, total: int) -> bool:
    """Every ``every`` steps, but not at the last step (the end of the run does its own)."""
    return bool(every) and step % every == 0 and step != total


class RunLog(Callback):
    def on_train_start(self, trainer) -> None:
        if trainer.is_main:
            from finetune.train.run_log import describe_start

            describe_start(trainer)

    def on_run_end(self, trainer, code) -> None:
        if trainer.is_main and code == 0:
            from finetune.train.run_log import describe_end

            describe_end(trainer)


class Metrics(Callback):
    """Train rows averaged over the steps since the last log; every rank joins the loss reduce."""

    def __init__(self):
        self.log, self.console = None, None

    def on_train_start(self, trainer) -> None:
        t = trainer.cfg.trainer
        self.console = Console(t.progress and trainer.is_main, trainer.total_steps, trainer.state.step)
        if trainer.is_main:
            from finetune.outputs.trackers import open_trackers

            truncate_after(trainer.run_dir / "metrics.jsonl", trainer.state.step)  # a resumed run reads as one
            trackers = open_trackers(trainer.cfg, trainer.run_dir, trainer.state.tracker_ids)
            trainer.state.tracker_ids = {n: tr.run_id for n, tr in trackers.items() if tr.run_id}
            self.log = MetricsLog(trainer.run_dir, list(trackers.values()), self.console)
        from finetune.train.flops import run_peak_flops

        self.peak, how = run_peak_flops(trainer)
        if trainer.is_main and self.peak:
            log.info("mfu: against a peak of %.1f GFLOP/s per process (%s)", self.peak / 1e9, how)
        self._reset()

    def _reset(self) -> None:
        self.losses, self.tokens, self.rows, self.grad_norm, self.flops = [], 0.0, 0.0, None, 0.0
        self.start = time.perf_counter()

    def on_step_end(self, trainer, result) -> None:
        self.losses.append(result.loss)
        self.tokens += result.tokens
        self.rows += result.rows
        self.flops += result.flops
        self.grad_norm = result.grad_norm
        # The row's lr is the one its (last) step trained with, as transformers' Trainer logs it;
        # the scheduler already holds the next step's.
        self.lr = result.lr if result.lr is not None else trainer.scheduler.get_last_lr()[0]
        step = trainer.state.step
        if step % trainer.cfg.trainer.log_steps == 0 or step == trainer.total_steps:
            self._log_train(trainer)
        if trainer.is_main:
            self.console.advance(step)

    def _log_train(self, trainer) -> None:
        acc, step = trainer.acc, trainer.state.step
        losses = torch.stack(self.losses)
        losses = acc.reduce(losses, reduction="sum") if acc.num_processes > 1 else losses
        elapsed = time.perf_counter() - self.start
        row = {"step": step, "epoch": round(step / trainer.feed.steps_per_epoch, 4),
               "loss": float(losses.mean()), "lr": self.lr,
               "tokens_per_s": self.tokens / elapsed, "samples_per_s": self.rows / elapsed,
               "step_time_s": elapsed / len(self.losses), "tokens_seen": trainer.state.tokens_seen}
        sums = trainer.task.train_metric_sums()  # the task's own train metrics (DPO's rewards)
        if sums:
            names = sorted(sums)
            values = torch.stack([sums[n].float() for n in names])
            values = acc.reduce(values, reduction="sum") if acc.num_processes > 1 else values
            row.update(trainer.task.train_metrics(dict(zip(names, values.tolist()))))
        if trainer.state.skipped_steps:
            row["skipped_steps"] = trainer.state.skipped_steps  # not applied: NaN / inf (trainer.nonfinite)
        if self.grad_norm is not None:
            row["grad_norm"] = float(self.grad_norm)
        if self.peak:  # the model's training FLOPs / the peak of all ranks (finetune/train/flops.py)
            row["flops_per_s"] = self.flops / elapsed
            row["mfu"] = row["flops_per_s"] / (self.peak * acc.num_processes)
        row.update(peak_memory())
        trainer.log(row)
        trainer.state.history.append({"step": step, "loss": row["loss"], "tokens_per_s": row["tokens_per_s"]})
        self._reset()

    def on_log(self, trainer, row: dict) -> None:
        if self.log is not None:
            self.log.write(row)

    def on_run_end(self, trainer, code) -> None:
        if self.log is not None and code == 0:
            self.log.close(trainer.summary)
        if self.console is not None:
            self.console.stop()


class Evaluate(Callback):
    def on_step_end(self, trainer, result) -> None:
        if due(trainer.state.step, trainer.cfg.trainer.eval_steps, trainer.total_steps):
            self.evaluate(trainer)

    def on_train_end(self, trainer) -> None:
        trainer.final_eval = self.evaluate(trainer)

    def evaluate(self, trainer) -> dict:
        row = trainer.evaluate()
        if not row:
            return row
        if trainer.is_main:
            trainer.log(row)
            trainer.task.on_eval(trainer)
        improved = trainer.state.record_eval(row)
        if improved and trainer.cfg.trainer.save_steps and trainer.state.step != trainer.total_steps:
            trainer.save_checkpoint(reason="best")
        return row


class Checkpoints(Callback):
    def __init__(self):
        self.last_save = time.monotonic()

    def on_step_end(self, trainer, result) -> None:
        t, step = trainer.cfg.trainer, trainer.state.step
        due_time = t.save_minutes and time.monotonic() - self.last_save >= t.save_minutes * 60
        if due(step, t.save_steps, trainer.total_steps) or (due_time and step != trainer.total_steps):
            trainer.save_checkpoint(reason="periodic")

    def on_save(self, trainer, path, reason: str) -> None:
        self.last_save = time.monotonic()


class DataStats(Callback):
    """``data_stats.json``: kept / truncated / dropped / skipped counts, packing, cache hit. A
    stream's counts grow as it is read: they are rewritten at every checkpoint and at the end."""

    def write(self, trainer) -> None:
        if trainer.is_main:
            stats = trainer.feed.stats(trainer.data.stats)
            (trainer.run_dir / "data_stats.json").write_text(json.dumps(stats, indent=1))

    def on_data_ready(self, trainer) -> None:
        self.write(trainer)

    def on_save(self, trainer, path, reason: str) -> None:
        self.write(trainer)

    def on_train_end(self, trainer) -> None:
        self.write(trainer)


class Final(Callback):
    def on_train_end(self, trainer) -> None:
        from finetune.outputs.final import write_final, write_final_card, write_summary

        trainer.acc.wait_for_everyone()
        final_dir = write_final(trainer)  # every rank: sharded weights are gathered collectively
        if trainer.is_main:
            trainer.summary = write_summary(trainer, final_dir)
            try:
                write_final_card(trainer.run_dir)
            except Exception as exc:  # noqa: BLE001 - final/ itself is written and complete
                log.warning("final/README.md (model card) not written: %s: %s", type(exc).__name__, exc)
        trainer.acc.wait_for_everyone()


class Report(Callback):
    def on_run_end(self, trainer, code) -> None:
        if not (trainer.is_main and code == 0 and trainer.cfg.logger.plots):
            return
        from finetune.outputs.report import write_report

        try:
            write_report(trainer.run_dir, trainer.summary)
        except Exception as exc:  # noqa: BLE001 - the run itself is done and saved
            log.warning("run report not written: %s: %s", type(exc).__name__, exc)


class Export(Callback):
    def on_run_end(self, trainer, code) -> None:
        cfg = trainer.cfg
        if trainer.is_main and code == 0 and cfg.export.merge:
            from finetune.outputs.export import merge_and_export

            merge_and_export(trainer.run_dir / "final", trainer.run_dir / "merged", dtype=cfg.export.dtype,
                             max_shard_size=cfg.export.max_shard_size, task=cfg.model.task)


class HubUpload(Callback):
    """Background uploads: training never waits for the Hub; failures are logged, files stay local."""

    def __init__(self, trainer):
        from finetune.outputs.hub import HubUploader

        self.uploader = HubUploader(trainer.cfg.hub, trainer.run_dir)

    def on_save(self, trainer, path, reason: str) -> None:
        event = "best" if reason == "best" else "checkpoint"
        if path is not None and self.uploader.wants(event):
            self.uploader.submit(path, f"{reason} checkpoint at step {trainer.state.step}",
                                 path_in_repo=f"checkpoints/{path.name}")

    def on_run_end(self, trainer, code) -> None:
        if not trainer.is_main or code != 0:
            self.uploader.close(wait=False)  # preempted or failed: leave now, the checkpoint is local
            return
        if self.uploader.wants("end"):
            self.uploader.submit_run()
        for result in self.uploader.close(wait=True):
            if result.ok:
                log.info("pushed %s to the Hub: %s", result.what, result.commit_url)


def default_callbacks(trainer) -> list[Callback]:
    return [RunLog(), Metrics(), Evaluate(), Checkpoints(), DataStats(), Final(), Report(), Export(),
            HubUpload(trainer)]
