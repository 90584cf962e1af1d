"""What a finished run leaves in its run dir: ``final/`` and ``summary.json``.

``final/`` is written to a temporary directory and published by rename, like checkpoints. For a
LoRA run it holds the adapter (``adapter_model.safetensors`` + ``adapter_config.json`` pointing at
a loadable base) and the tokenizer, so ``peft.AutoPeftModelFor...`` loads it offline.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from finetune.train import checkpoint as ckpt


def write_final(trainer) -> Path:
    """Called on every rank (sharded weights are gathered collectively); rank 0 writes."""
    cfg, run_dir, acc = trainer.cfg, trainer.run_dir, trainer.acc
    final, tmp = run_dir / "final", run_dir / ".final.tmp"
    state = trainer.strategy.gathered_state(acc, trainer.model)  # None: the module is whole
    if not acc.is_main_process:
        return final
    model = acc.unwrap_model(trainer.model)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.peft.method == "lora":
        # The adapter must point at a base that loads offline (built-ins were saved to base_model/).
        model.peft_config["default"].base_model_name_or_path = trainer.base_ref
    # The trained adapter only (a DPO run also holds a frozen "reference" adapter).
    adapters = {"selected_adapters": ["default"]} if cfg.peft.method == "lora" else {}
    with ckpt.guard_temp_dir(tmp, final, needed_bytes=ckpt.tree_size(final) or None):  # disk full: exit 8
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True, **adapters)
        trainer.tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def write_final_card(run_dir: Path) -> Path:
    """final/README.md: the project's model card (peft's save_pretrained leaves a placeholder)."""
    from finetune.outputs.model_card import build_model_card

    path = run_dir / "final" / "README.md"
    build_model_card(run_dir).save(path)
    return path


def write_summary(trainer, final_dir: Path) -> dict:
    state = trainer.state
    losses = [h for h in state.history if "loss" in h]
    total, trainable = trainer.param_counts
    stats = trainer.feed.stats(trainer.data.stats)  # a stream's counts as read
    summary = {
        "recipe": trainer.cfg.recipe,
        "steps": state.step,
        "first_loss": losses[0]["loss"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
        "eval_loss": (trainer.final_eval or {}).get("eval_loss"),
        "eval_accuracy": (trainer.final_eval or {}).get("eval_accuracy"),
        "eval_reward": (trainer.final_eval or {}).get("eval_reward"),  # GRPO: greedy reward on held-out prompts
        # DPO / reward model: held-out pairs whose chosen is rewarded (scored) above rejected
        "eval_reward_accuracy": (trainer.final_eval or {}).get("eval_rewards/accuracy"),
        "best_eval_loss": state.best_eval,
        "best_step": state.best_step,
        "tokens_per_s": (sum(h["tokens_per_s"] for h in losses) / len(losses)) if losses else None,
        "tokens_seen": state.tokens_seen,
        "skipped_steps": state.skipped_steps,
        "wall_time_s": time.perf_counter() - trainer.run_start,
        "parameters": {"total": total, "trainable": trainable},
        "final_dir": str(final_dir),
        "data": {"train": stats.get("train"), "eval": stats.get("eval"),
                 "packing": stats.get("packing"), "rows": trainer.feed.num_rows()},
        "world_size": trainer.acc.num_processes,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
