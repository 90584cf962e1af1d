"""The lines a user reads when a run starts (model, data, steps) and when it ends (losses, speed)."""

from __future__ import annotations

import logging

from finetune.outputs.exact_match import exact_match_line, read_result

log = logging.getLogger(__name__)


def describe_start(trainer) -> None:
    total, trainable = trainer.param_counts
    stats = trainer.data.stats
    train = stats["train"]
    log.info("run dir: %s", trainer.run_dir)
    log.info("model: %s  parameters %s total, %s trainable (%.2f%%)", trainer.cfg.model.name_or_path,
             f"{total:,}", f"{trainable:,}", 100 * trainable / max(total, 1))
    log.info("data: %d examples kept (%d truncated, %d dropped overlong, %d no target, %d bad skipped), "
             "%d rows, cache %s", train["kept"], train["truncated"], train["dropped_overlong"],
             train["dropped_no_target"], train["skipped_bad"], trainer.feed.num_rows(),
             f"hit (saved {stats['cache'].get('saved_seconds', 0):.1f}s)" if stats["cache"]["hit"] else "built")
    if "packing" in stats:
        log.info("packing efficiency: %.1f%%", 100 * stats["packing"]["train"]["packing_efficiency"])
    log.info("steps: %d (%d per epoch, %d rows per step)%s", trainer.total_steps,
             trainer.feed.steps_per_epoch, trainer.feed.rows_per_step,
             f", resuming at step {trainer.state.step}" if trainer.state.step else "")


def describe_end(trainer) -> None:
    s = trainer.summary
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    log.info("done: %d steps in %.1fs | loss %s -> %s | eval_loss %s%s | %.0f tokens/s",
             s["steps"], s["wall_time_s"], fmt(s["first_loss"]), fmt(s["last_loss"]), fmt(s["eval_loss"]),
             f" | eval_accuracy {s['eval_accuracy']:.3f}" if s.get("eval_accuracy") is not None else
             f" | held-out reward accuracy {s['eval_reward_accuracy']:.3f}" if s.get("eval_reward_accuracy") is not None
             else "",
             s["tokens_per_s"] or 0)
    log.info("adapter written to %s" if trainer.cfg.peft.method == "lora" else "model written to %s",
             s["final_dir"])
    exact = read_result(trainer.run_dir)  # trainer.exact_match_prompts (finetune/outputs/exact_match.py)
    if exact and exact.get("after"):
        log.info(exact_match_line(exact.get("before"), exact["after"]))
