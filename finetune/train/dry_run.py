"""``dry_run=true``: the plan of a run (parameters, batch, steps, memory) without training."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from finetune.data import prepare_data
from finetune.model.load import build_base_model, load_tokenizer, parameter_counts, wrap_peft
from finetune.tasks import get_task
from finetune.train.feed import BatchPlan
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def memory_estimate(model, cfg: DictConfig, world: int, sequences_per_row: int = 1) -> dict:
    """Rough peak per process, in GiB: weights + grads + AdamW states + activations."""
    total, trainable = parameter_counts(model)
    dtype = next(model.parameters()).dtype
    weights = total * BYTES.get(dtype, 4)
    grads_and_adam = trainable * (BYTES.get(dtype, 4) + 8)  # grad + two fp32 moments
    if cfg.distributed.strategy in ("zero2", "zero3", "fsdp"):
        grads_and_adam /= world
    if cfg.distributed.strategy in ("zero3", "fsdp"):
        weights /= world
    mc = model.config
    hidden = getattr(mc, "hidden_size", 0)
    layers = getattr(mc, "num_hidden_layers", 0)
    tokens = cfg.trainer.micro_batch_size * sequences_per_row * cfg.data.max_seq_len
    # ~34 bytes/token/hidden/layer for a transformer block in 16/32-bit (activation recompute
    # with gradient checkpointing keeps ~2 per layer: every layer, or each model.checkpoint_every-th),
    # plus fp32 logits for the targets.
    recomputed = -(-layers // cfg.model.checkpoint_every) / max(layers, 1) if cfg.model.gradient_checkpointing else 0
    per_layer = 2 * recomputed + 34 * (1 - recomputed)
    acts = tokens * hidden * layers * per_layer * BYTES.get(dtype, 4) / 2
    logits = tokens * getattr(mc, "vocab_size", 0) * 4 * 2
    gib = 2**30
    return {"weights_gib": weights / gib, "grads_optimizer_gib": grads_and_adam / gib,
            "activations_gib": (acts + logits) / gib,
            "total_gib": (weights + grads_and_adam + acts + logits) / gib}


def print_plan(cfg: DictConfig) -> None:
    """dry_run=true: config, tokenizer, data and a meta-device model; no training."""
    task = get_task(cfg)
    tok = load_tokenizer(cfg, task)
    data = prepare_data(cfg, tok, task)
    model = wrap_peft(build_base_model(cfg, tok, task, label_names=data.label_names, meta=True), cfg, task)
    total, trainable = parameter_counts(model)
    world = cfg.launcher.nproc_per_node * cfg.launcher.nnodes
    t = cfg.trainer
    streaming = bool(cfg.data.streaming)
    rows = t.max_steps * world * t.micro_batch_size * t.grad_accum if streaming else len(data.train)
    plan = BatchPlan(rows, t.micro_batch_size, t.grad_accum, world, cfg.seed)
    steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * plan.steps_per_epoch)
    per_row = task.sequences_per_row
    mem = memory_estimate(model, cfg, world, per_row)
    rows = [
        ("recipe", cfg.recipe), ("model", f"{cfg.model.name_or_path} ({cfg.model.task})"),
        ("parameters", f"{total:,} total, {trainable:,} trainable ({100 * trainable / max(total, 1):.2f}%)"),
        ("data", f"{'streamed' if streaming else format(rows, ',')} train rows, "
                 f"{len(data.eval) if data.eval else 0:,} eval rows "
                 f"(packing={'on' if cfg.data.packing else 'off'}, max_seq_len={cfg.data.max_seq_len})"),
        ("processes", f"{world} ({cfg.distributed.strategy})"),
        ("global batch", f"{plan.rows_per_step} rows = {world} x {t.micro_batch_size} x {t.grad_accum} "
                         f"(processes x micro_batch_size x grad_accum), up to "
                         f"{plan.rows_per_step * per_row * cfg.data.max_seq_len:,} tokens"
                         + (f" ({per_row} sequences of up to data.max_seq_len per row)" if per_row > 1 else "")),
        ("steps per epoch", "one pass of trainer.max_steps over the stream" if streaming else
         f"{plan.steps_per_epoch:,} ({plan.rows_unused_per_epoch} rows per epoch "
         "do not fill a step; reshuffled into the next epoch)"),
        ("total steps", f"{steps:,}"),
        ("peak memory (est.)", f"{mem['total_gib']:.2f} GiB per process = weights {mem['weights_gib']:.2f}"
                               f" + grads/optimizer {mem['grads_optimizer_gib']:.2f} + activations "
                               f"{mem['activations_gib']:.2f}"),
        ("data stats", str({k: v for k, v in data.stats["train"].items() if k != "bad_examples"})),
    ]
    rows += task.plan_rows(cfg, plan)
    if "packing" in data.stats:
        rows.append(("packing efficiency", f"{data.stats['packing']['train']['packing_efficiency']:.1%}"))
    width = max(len(k) for k, _ in rows)
    print("dry run: nothing will be trained")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
