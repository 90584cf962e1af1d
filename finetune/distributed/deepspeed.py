"""DeepSpeed ZeRO-1/2/3 (``distributed=zero1|zero2|zero3``, ``zero2-offload``, ``zero3-offload``).

The DeepSpeed config is built from the run's config (:meth:`DeepSpeedStrategy.ds_config`): micro
batch, accumulation, clipping (``optim.max_grad_norm``), precision and offload have one source.
accelerate's ``DeepSpeedPlugin`` turns the model + our AdamW into an engine; on CPU this needs
``DS_ACCELERATOR=cpu`` (set here when unset and there is no GPU) and talks gloo.

How it meets the trainer's maths (see :class:`ExactStepEngine`): the trainer normalises each
micro-batch's loss by the targets of the whole optimizer step and calls ``accelerator.backward``
``grad_accum`` times per step. accelerate's own DeepSpeed wrapper would mark every backward as an
accumulation boundary (our loop does not use ``accelerator.accumulate``) and the engine would
divide the loss by ``gradient_accumulation_steps``. ``ExactStepEngine`` replaces it: the loss goes
in unscaled, the last micro-batch of a step is the boundary, and ``engine.step()`` (reduce, clip,
optimizer update) runs exactly once per optimizer step. accelerate's optimizer wrapper makes
``optimizer.step()``/``zero_grad()`` no-ops and ``clip_grad_norm_`` returns the engine's norm
(clipping happens once, in the engine). Our LambdaLR is not a DeepSpeed schedule, so accelerate
leaves it to the trainer, which steps it once per optimizer step.

State: ZeRO-1/2 keep whole weights on every rank; ZeRO-3 gathers them
(``deepspeed.zero.GatheredParameters``) for checkpoints and ``final/``. Optimizer state is the
engine's own per-rank checkpoint, written into our temporary checkpoint dir (flat: the dir is the
engine's ``tag``), so the two-phase publish keeps it atomic. Those shards are tied to the data-
parallel world size: resuming on a different number of processes is refused.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import torch
from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

from finetune.train import checkpoint as ckpt
from finetune.distributed import mixed_precision
from finetune.errors import ResumeError
from finetune.distributed.strategy import Strategy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeepSpeedStrategy(Strategy):

    def __init__(self, cfg):
        super().__init__(cfg)
        self.name = cfg.distributed.strategy
        self.stage = int(self.name[-1])
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported

    def ds_config(self) -> dict:
        """The DeepSpeed config, derived from the run's config only."""
        t, precision = self.cfg.trainer, mixed_precision(self.cfg)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        zero: dict = {"stage": self.stage, "overlap_comm": False, "contiguous_gradients": True}
        if self.cfg.distributed.offload:
            pin = torch.cuda.is_available()
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
            if self.stage == 3:
                zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
        return {
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": t.micro_batch_size * t.grad_accum * world,
            "gradient_clipping": float(max(self.cfg.optim.max_grad_norm, 0.0)),
            "zero_optimization": zero,
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16"},
            # Our AdamW (decay groups, betas) stays the optimizer, offloaded or not.
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    def accelerator_kwargs(self) -> dict:
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        if "RANK" not in os.environ:  # one process: DeepSpeed still needs a (1-rank) process group
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))

        # zero3_init_flag=False: the model is built whole (the trainer loads resumed weights
        # into it before wrapping); the engine partitions it in prepare().
        plugin = DeepSpeedPlugin(hf_ds_config=self.ds_config(), zero3_init_flag=False)
        # cpu=False: with cpu=True accelerate never selects DeepSpeed. Naming the backend matters
        # on CPU: with none, accelerate reports one process although DeepSpeed joined the group.
        group = InitProcessGroupKwargs(backend="nccl" if torch.cuda.is_available() else "gloo",
                                       timeout=datetime.timedelta(seconds=self.cfg.distributed.timeout_s))
        return {"cpu": False, "deepspeed_plugin": plugin, "kwargs_handlers": [group],
                "gradient_accumulation_steps": self.cfg.trainer.grad_accum}  # agrees with the DS config

    def build_accelerator(self):
        accelerator = super().build_accelerator()
        # accelerate registers the config with transformers even with zero3_init_flag=False, and
        # transformers would then build the model already partitioned (zero.Init: a different
        # random init, and no whole weights to load a resumed checkpoint into). Build it whole;
        # the engine partitions it in prepare().
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        return accelerator

    def prepare(self, accelerator, model, optimizer_factory, scheduler_factory):
        optimizer = optimizer_factory(model)
        scheduler = scheduler_factory(optimizer)
        engine, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        accelerator.deepspeed_engine_wrapped = ExactStepEngine(engine, self.cfg.trainer.grad_accum)
        self.engine = engine
        return engine, optimizer, scheduler

    def prepare_frozen(self, accelerator, module):
        """ZeRO-3: the frozen model partitioned over the ranks by an engine of its own with no
        optimizer (DeepSpeed's parameter-offload path: each forward gathers a module's weights
        and frees them after); ZeRO-1/2 keep whole weights, so a whole copy on the device."""
        if self.stage < 3:
            return super().prepare_frozen(accelerator, module)
        import deepspeed

        config = self.ds_config()
        config.pop("gradient_clipping")
        zero = {k: v for k, v in config["zero_optimization"].items() if k != "offload_optimizer"}
        hidden = getattr(getattr(module, "config", None), "hidden_size", None)
        if hidden:  # vectors (norms, biases) stay whole on every rank, every matrix is partitioned
            zero["stage3_param_persistence_threshold"] = 10 * hidden
        config["zero_optimization"] = zero
        engine, *_ = deepspeed.initialize(model=module, config=config)
        engine.eval()  # (DeepSpeedEngine.eval returns None)
        return engine

    # ------------------------------------------------------------ weights
    def trainable_state(self, accelerator, model) -> dict[str, torch.Tensor]:
        return self._gather(accelerator, model, trainable_only=True)

    def gathered_state(self, accelerator, model) -> dict[str, torch.Tensor] | None:
        if self.stage < 3:
            return None  # ZeRO-1/2 partition optimizer state and gradients, not weights
        return self._gather(accelerator, model, trainable_only=self.cfg.peft.method != "none")

    def _gather(self, accelerator, model, trainable_only: bool) -> dict[str, torch.Tensor]:
        """Whole tensors on rank 0 ({} elsewhere); under ZeRO-3 every rank joins each gather."""
        import deepspeed

        module, keep = accelerator.unwrap_model(model), accelerator.is_main_process
        out = {}
        for name, p in module.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            if self.stage == 3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if keep:
                        out[name] = p.detach().to("cpu").contiguous().clone()
            elif keep:
                out[name] = p.detach().to("cpu").contiguous().clone()
        if keep and any(t.numel() == 0 for t in out.values()):
            raise RuntimeError("gathered an empty tensor from a ZeRO-3 partition; refusing to save")
        return out

    def can_generate_on_main(self) -> bool:
        return self.stage < 3  # ZeRO-3: a forward needs every rank

    # ---------------------------------------------------------- optimizer
    def save_optimizer(self, accelerator, optimizer, tmp: Path) -> None:
        # Every rank writes its own optimizer partition; tag=tmp.name writes straight into tmp.
        self.engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False,
                                    exclude_frozen_parameters=True)
        if accelerator.is_main_process:  # DeepSpeed's recovery scripts land next to the checkpoints
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):
                (tmp.parent / script).unlink(missing_ok=True)

    def load_optimizer(self, accelerator, optimizer, path: Path) -> None:
        saved = ckpt.read_state(path).get("world_size")
        if saved != accelerator.num_processes:
            raise ResumeError(f"checkpoint {path} holds DeepSpeed optimizer shards of {saved} processes; "
                              f"resume {self.name} with {saved} processes (this run has "
                              f"{accelerator.num_processes})")
        self.engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)


class ExactStepEngine(DeepSpeedEngineWrapper):
    """accelerate's engine wrapper with one engine step per optimizer step (module docs)."""

    def __init__(self, engine, grad_accum: int):
        super().__init__(engine)
        self.grad_accum, self.micro = grad_accum, 0

    def backward(self, loss, sync_gradients=True, **kwargs):
        # The trainer calls backward grad_accum times per step; the last one is the boundary.
        self.micro += 1
        boundary = self.micro == self.grad_accum
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, scale_wrt_gas=False, **kwargs)  # already normalised per step
        if boundary:
            self.engine.step()
            self.micro = 0
