"""Distributed strategies: how the model is wrapped, and how its state is saved and loaded.

``distributed=none|ddp`` use :class:`Strategy` (replicated weights: rank 0 saves everything).
Sharded strategies (fsdp, zero1/2/3) subclass it: their weights and optimizer state live in
shards, so checkpoints gather what must be whole (trainable weights, ``final/``) and keep
optimizer state per rank. The trainer calls only the methods below, so recipes never change.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from finetune.registry import Registry
from finetune.train import checkpoint as ckpt

log = logging.getLogger(__name__)


class Strategy:
    """No sharding: DDP (or one process). Rank 0 writes weights and optimizer state."""

    name = "ddp"

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def build_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        from finetune.distributed import cpu_bf16_instructions, mixed_precision

        timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=self.cfg.distributed.timeout_s))
        # step_scheduler_with_optimizer=False: accelerate would otherwise step the schedule
        # num_processes times per optimizer step; ours counts optimizer steps, whatever the world size.
        kwargs = dict(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(self.cfg),
                      kwargs_handlers=[timeout], step_scheduler_with_optimizer=False)
        if kwargs["cpu"] and kwargs["mixed_precision"] == "bf16" and os.environ.get("RANK", "0") == "0":
            native = cpu_bf16_instructions()
            if native:
                log.info("trainer.precision=bf16 on CPU: autocast to bf16 (%s), fp32 weights and optimizer",
                         " + ".join(native))
            else:
                log.warning("trainer.precision=bf16: this CPU has no bf16 instructions (no amx_bf16 / avx512_bf16 "
                            "in /proc/cpuinfo), so torch emulates them: expect it slower than trainer.precision=fp32")
        return Accelerator(**{**kwargs, **self.accelerator_kwargs()})

    def accelerator_kwargs(self) -> dict:
        """What a strategy adds to (or changes in) the Accelerator's arguments."""
        return {}

    def prepare(self, accelerator, model, optimizer_factory, scheduler_factory):
        """Wrap the model and build optimizer + scheduler over the wrapped parameters."""
        optimizer = optimizer_factory(model)
        scheduler = scheduler_factory(optimizer)
        return accelerator.prepare(model, optimizer, scheduler)

    def prepare_frozen(self, accelerator, module: torch.nn.Module):
        """A frozen model that runs beside the policy (a full fine-tune's DPO / KTO reference),
        placed as the policy's weights are: here a whole copy on the device; sharded strategies
        shard it the same way. Called on every rank, after :meth:`prepare`; no optimizer."""
        return module.to(accelerator.device)

    def trainable_state(self, accelerator, model) -> dict[str, torch.Tensor]:
        """Full (gathered) trainable weights, keyed like the unwrapped model's parameters."""
        return ckpt.trainable_state(accelerator.unwrap_model(model))

    def save_optimizer(self, accelerator, optimizer, tmp: Path) -> None:
        if accelerator.is_main_process:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")

    def load_optimizer(self, accelerator, optimizer, path: Path) -> None:
        optimizer.load_state_dict(ckpt.load_torch(path / "optimizer.pt"))

    def gathered_state(self, accelerator, model) -> dict[str, torch.Tensor] | None:
        """The unwrapped model's full ``state_dict`` for ``final/`` (every rank calls; rank 0
        uses it), or None when the module on rank 0 already holds complete weights."""
        return None

    def can_generate_on_main(self) -> bool:
        return True


def local_share(module: torch.nn.Module) -> tuple[int, int]:
    """(weights this rank holds, weights of the whole model): an FSDP2 ``DTensor`` holds its local
    shard, a ZeRO-3 parameter its partition (``ds_tensor``; ``ds_numel`` is the whole size)."""
    from finetune.model.linear_cross_entropy import _is_dtensor

    local = whole = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):  # (a "persistent" one, below DeepSpeed's size threshold, stays whole)
            local += p.ds_numel if getattr(p, "ds_persist", False) else p.ds_tensor.numel()
            whole += p.ds_numel
        elif _is_dtensor(p):
            local, whole = local + p.to_local().numel(), whole + p.numel()
        else:
            local, whole = local + p.numel(), whole + p.numel()
    return local, whole


STRATEGIES = Registry("distributed.strategy", {
    "none": "finetune.distributed.strategy:Strategy",
    "ddp": "finetune.distributed.strategy:Strategy",
    "fsdp": "finetune.distributed.fsdp:FSDPStrategy",
    "zero1": "finetune.distributed.deepspeed:DeepSpeedStrategy",
    "zero2": "finetune.distributed.deepspeed:DeepSpeedStrategy",
    "zero3": "finetune.distributed.deepspeed:DeepSpeedStrategy",
})


def get_strategy(cfg: DictConfig) -> Strategy:
    return STRATEGIES.get(cfg.distributed.strategy)(cfg)
