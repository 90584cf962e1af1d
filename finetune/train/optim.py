"""Optimizer and learning-rate schedule.

AdamW with weight decay on matrices only (norm weights and biases are excluded), fused on CUDA.
Schedules: cosine / linear / constant, each after linear warmup (steps, or a ratio of the total).
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # 1-D tensors are biases and norm scales: decaying them hurts and is not standard.
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model, o: DictConfig) -> torch.optim.Optimizer:
    """AdamW over ``model``'s trainable parameters, from the ``optim`` config group."""
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if torch.cuda.is_available():
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(param_groups(model, o.weight_decay), **kwargs)


def warmup_steps(o: DictConfig, total_steps: int) -> int:
    """``optim.warmup_steps`` when > 0, else ``ceil(optim.warmup_ratio * total_steps)``; 0 = none."""
    if o.warmup_steps > 0:
        return min(o.warmup_steps, total_steps)
    return int(math.ceil(o.warmup_ratio * total_steps))


def lr_lambda(kind: str, warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return min_ratio + (1 - min_ratio) * (1 - progress)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer, o: DictConfig, total_steps: int):
    """The ``optim.scheduler`` schedule after linear warmup, stepped once per optimizer step."""
    fn = lr_lambda(o.scheduler, warmup_steps(o, total_steps), total_steps, o.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
