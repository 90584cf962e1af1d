"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``distributed=fsdp`` / ``fsdp-offload``.

accelerate ignores its FSDP plugin on CPU (it falls back to DDP), so this strategy shards the
model itself: after PEFT wrapping, each decoder layer becomes one FSDP unit, then the root (the
embeddings, the LM head and the LoRA / ``modules_to_save`` copies outside the layers). The
process group is accelerate's (gloo on CPU, NCCL on GPU); accelerate prepares nothing here.

Maths: the reduce-scatter averages gradients over ranks like DDP, so the trainer's
``loss_sum * world_size / step_targets`` normalisation holds unchanged.

State:
- trainable weights (checkpoints) and ``final/`` are gathered full tensors
  (``DTensor.full_tensor()``, a collective every rank joins), never local shards; rank 0 keeps
  them (a LoRA ``final/`` gathers only the adapter and saved modules);
- optimizer state is saved *gathered* (``get_optimizer_state_dict(full_state_dict=True)``, keyed
  by parameter name) in ``optimizer.pt`` and re-sharded on load, so a checkpoint resumes on any
  world size (the trainer still requires the same global batch to resume exactly).
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.train import checkpoint as ckpt
from finetune.errors import ConfigError
from finetune.distributed.strategy import Strategy


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks (one FSDP unit each), found through transformers'
    ``_no_split_modules`` (the classes it never splits across devices)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


class FSDPStrategy(Strategy):
    name = "fsdp"

    def _offload_policy(self):
        from torch.distributed.fsdp import CPUOffloadPolicy

        # Pinned host memory needs CUDA; on CPU the parameters already live in host memory.
        return CPUOffloadPolicy(pin_memory=torch.cuda.is_available())

    def prepare(self, accelerator, model, optimizer_factory, scheduler_factory):
        from torch.distributed.device_mesh import init_device_mesh

        if not torch.distributed.is_initialized():  # one process: FSDP still needs a (1-rank) group
            torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(),
                                                 rank=0, world_size=1)
        self.shard_kwargs = {"mesh": init_device_mesh(accelerator.device.type, (accelerator.num_processes,))}
        if self.cfg.distributed.offload:
            self.shard_kwargs["offload_policy"] = self._offload_policy()
        model = self._shard(accelerator, model)
        # The optimizer sees the sharded (DTensor) parameters: its state is sharded too.
        optimizer = optimizer_factory(model)
        self.model = model  # the optimizer state helpers need the module (not passed to them)
        return model, optimizer, scheduler_factory(optimizer)

    def _shard(self, accelerator, model):
        """Each decoder layer one FSDP unit, then the root; in place (FSDP2 wraps no module)."""
        from torch.distributed.fsdp import fully_shard

        model = model.to(accelerator.device)
        layers = decoder_layers(model)
        if not layers:
            raise ConfigError(f"distributed=fsdp: no decoder layers found in {type(model).__name__} "
                              "(no _no_split_modules); use distributed=ddp or zero3 for this model")
        for layer in layers:
            fully_shard(layer, **self.shard_kwargs)
        fully_shard(model, **self.shard_kwargs)
        return model

    def prepare_frozen(self, accelerator, module):
        # The same units, mesh and offload as the policy: each rank keeps 1/world of the frozen
        # weights and every forward all-gathers a layer at a time (all ranks run the same forwards).
        return self._shard(accelerator, module)

    # ------------------------------------------------------------ weights
    def trainable_state(self, accelerator, model) -> dict[str, torch.Tensor]:
        return _gather(((n, p) for n, p in model.named_parameters() if p.requires_grad),
                       accelerator.is_main_process)

    def gathered_state(self, accelerator, model) -> dict[str, torch.Tensor]:
        if self.cfg.peft.method != "none":  # an adapter is exactly the trainable tensors
            return self.trainable_state(accelerator, model)
        return _gather(model.state_dict().items(), accelerator.is_main_process)

    def can_generate_on_main(self) -> bool:
        return False  # a forward needs every rank's shards

    # ---------------------------------------------------------- optimizer
    def save_optimizer(self, accelerator, optimizer, tmp: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if accelerator.is_main_process:
            torch.save(state, tmp / "optimizer.pt")

    def load_optimizer(self, accelerator, optimizer, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = ckpt.load_torch(path / "optimizer.pt") if accelerator.is_main_process else {}
        set_optimizer_state_dict(self.model, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _gather(named, keep: bool) -> dict[str, torch.Tensor]:
    """Whole CPU tensors on the rank that keeps them ({} elsewhere). Every rank must call: each
    ``full_tensor()`` is a collective. One tensor at a time, so no rank holds the whole model."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in named:
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            out[name] = full.detach().to("cpu").contiguous().clone()
    return out
