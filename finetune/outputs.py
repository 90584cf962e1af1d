"""What a finished run leaves in its run dir: ``final/``, ``summary.json``, ``samples.jsonl``.

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

from finetune.data.tokenize import IGNORE


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
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    trainer.tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def write_summary(trainer, final_dir: Path) -> dict:
    losses = [h for h in trainer.history if "loss" in h]
    total, trainable = trainer.param_counts
    stats = trainer.data.stats
    summary = {
        "recipe": trainer.cfg.recipe,
        "steps": trainer.step,
        "first_loss": losses[0]["loss"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
        "eval_loss": (trainer.final_eval or {}).get("eval_loss"),
        "eval_accuracy": (trainer.final_eval or {}).get("eval_accuracy"),
        "best_eval_loss": trainer.best_eval,
        "best_step": trainer.best_step,
        "tokens_per_s": (sum(h["tokens_per_s"] for h in losses) / len(losses)) if losses else None,
        "tokens_seen": trainer.tokens_seen,
        "wall_time_s": time.perf_counter() - trainer.run_start,
        "parameters": {"total": total, "trainable": trainable},
        "final_dir": str(final_dir),
        "data": {"train": stats.get("train"), "eval": stats.get("eval"),
                 "packing": stats.get("packing"), "rows": len(trainer.data.train)},
        "world_size": trainer.acc.num_processes,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


@torch.no_grad()
def generate_samples(trainer, n: int) -> None:
    """Greedy completions of the first ``n`` eval prompts, appended to ``samples.jsonl``."""
    data = trainer.data.eval
    if data is None or not trainer.strategy.can_generate_on_main():
        return  # sharded weights: generation would need every rank
    model = trainer.acc.unwrap_model(trainer.model)
    tok = trainer.tokenizer
    model.eval()
    rows = []
    for i in range(min(n, len(data))):
        ex = data.encoded.example(i) if data.bins is not None else (data[i]["input_ids"], data[i]["labels"])
        ids, labels = ex
        first_target = next((j for j, lab in enumerate(labels) if lab != IGNORE), len(ids))
        prompt = torch.as_tensor(ids[:first_target], dtype=torch.long, device=trainer.acc.device)[None]
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=trainer.cfg.trainer.sample_max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        rows.append({"step": trainer.step, "prompt": tok.decode(prompt[0]),
                     "completion": tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True),
                     "reference": tok.decode([t for t in labels if t != IGNORE], skip_special_tokens=True)})
    model.train()
    with (trainer.run_dir / "samples.jsonl").open("a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
