"""The stages a run can execute: train, preprocess (data only), export (merge an adapter), inspect
(the data as it would be trained on, no model: finetune/inspect/), chat (a Gradio chat over a run's
model) and space (push that chat as a Hub Space)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finetune.errors import ConfigError

log = logging.getLogger(__name__)


def run_train(cfg: DictConfig) -> int:
    from finetune.distributed import check_world
    from finetune.distributed.strategy import get_strategy
    from finetune.model.load import check_environment
    from finetune.train.loop import Trainer
    from finetune.train.run_dir import resolve_run_dir
    from finetune.train.run_lock import RunLock

    check_world(cfg)
    check_environment(cfg)
    strategy = get_strategy(cfg)
    accelerator = strategy.build_accelerator()
    run_dir = resolve_run_dir(cfg, accelerator)
    OmegaConf.set_struct(cfg, False)
    cfg.output_dir = str(run_dir)
    OmegaConf.set_struct(cfg, True)
    # One live run per run dir (a requeued job next to a stale one): the main process holds the lock.
    lock = RunLock(run_dir).acquire() if accelerator.is_main_process else None
    try:
        trainer = Trainer(cfg, accelerator, run_dir, strategy)
        trainer.setup()
        code = None
        try:
            code = trainer.train()
        finally:
            trainer.emit("on_run_end", code)  # report, export, Hub after a finished run (callbacks.py)
    finally:
        if lock is not None:
            lock.release()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    reset_accelerate_state()
    destroy_process_group()
    return code


def destroy_process_group() -> None:
    """Tear the process group down before the interpreter exits: a gloo group left to static
    destructors can abort a worker that finished cleanly ("terminate called without an active
    exception", exit 134; seen in 2-rank FSDP tests on CPU; ``finetune.__main__`` also ends such a
    worker with ``os._exit`` once it has finished)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons, so the next Hydra multirun job in this same
    process builds its Accelerator from its own config (not the previous job's)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_preprocess(cfg: DictConfig) -> int:
    from finetune.data import prepare_data
    from finetune.model.load import load_tokenizer
    from finetune.tasks import get_task

    task = get_task(cfg)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    data = prepare_data(cfg, load_tokenizer(cfg, task), task, build=local_rank == 0)
    log.info("data cache: %s (%s)", data.cache_dir, "hit" if data.cache_hit else "built")
    log.info(json.dumps(data.stats, indent=1))
    return 0


def run_export(cfg: DictConfig) -> int:
    from finetune.outputs.export import merge_and_export

    if not cfg.export.adapter_dir and not cfg.output_dir:
        raise ConfigError("stage=export needs export.adapter_dir=<dir with the adapter> or "
                          "output_dir=<run dir> (its final/ is merged)")
    adapter = Path(cfg.export.adapter_dir or Path(cfg.output_dir) / "final")
    out = Path(cfg.export.out_dir or adapter.parent / "merged")
    if not (adapter / "adapter_config.json").exists():
        raise ConfigError(f"stage=export: {adapter} has no adapter_config.json; point "
                          "export.adapter_dir at a LoRA run's final/ directory")
    path = merge_and_export(adapter, out, dtype=cfg.export.dtype,
                            max_shard_size=cfg.export.max_shard_size, task=cfg.model.task)
    log.info("merged model written to %s", path)
    return 0


def run_inspect(cfg: DictConfig) -> int:
    from finetune.inspect import run_inspect as inspect_data

    return inspect_data(cfg)


def run_chat(cfg: DictConfig) -> int:
    from finetune.chat.serve import run_chat as serve_chat

    return serve_chat(cfg)


def run_space(cfg: DictConfig) -> int:
    from finetune.chat.space import run_space as push_space

    return push_space(cfg)


STAGES = {"train": run_train, "preprocess": run_preprocess, "export": run_export, "inspect": run_inspect,
          "chat": run_chat, "space": run_space}
