"""Process-group helpers shared by the strategies (``finetune.distributed.strategy``).

On CPU, multi-process runs need ``Accelerator(cpu=True)`` to get gloo (MULTI_CPU); without it
each process would silently train alone. The collective timeout (``distributed.timeout_s``)
bounds how long survivors wait for a dead rank.
"""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig

from finetune.errors import ConfigError


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_bf16_instructions(cpuinfo: str | None = None) -> list[str]:
    """The CPU's native bf16 instruction sets (``amx_bf16``, ``avx512_bf16``) from /proc/cpuinfo;
    empty where it has none (or is not Linux): torch then emulates bf16 matmuls, slower than fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = open("/proc/cpuinfo").read()
        except OSError:
            return []
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def mixed_precision(cfg: DictConfig) -> str:
    """accelerate's ``mixed_precision`` for ``trainer.precision``. bf16 runs the forward under
    autocast with fp32 weights, gradients, optimizer state and loss maths, on a GPU or a CPU;
    ``auto`` stays fp32 on CPU (the per-step losses of existing runs, and the tests' references)."""
    precision = cfg.trainer.precision
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp32":
        return "no"
    if cuda:
        return precision
    if precision == "fp16":
        raise ConfigError("trainer.precision=fp16 needs a GPU; use trainer.precision=bf16 (autocast) or fp32 on CPU")
    if cfg.distributed.strategy.startswith("zero"):
        raise ConfigError(f"trainer.precision=bf16 on CPU is autocast, which distributed={cfg.distributed.strategy} "
                          "does not use (DeepSpeed keeps bf16 weights); use distributed=ddp or fsdp, "
                          "or trainer.precision=fp32")
    return "bf16"


def check_world(cfg: DictConfig) -> None:
    if cfg.distributed.strategy == "none" and world_size_from_env() > 1:
        raise ConfigError("several processes were launched but distributed=none; "
                          "set distributed=ddp (or fsdp / zero2 / zero3)")


def broadcast_str(accelerator, value: str | None) -> str | None:
    """The main process's value on every rank (run dirs must not differ per rank)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def all_reduce_sum(accelerator, values: list[float]) -> list[float]:
    """Sum small host values over ranks (one collective)."""
    if accelerator.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()
