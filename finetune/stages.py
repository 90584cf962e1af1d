"""The stages a run can execute: train, preprocess (data only), export (merge an adapter)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from finetune.distributed import broadcast_str, default_run_dir
from finetune.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_run_dir(cfg: DictConfig, accelerator=None) -> Path:
    """``output_dir`` or a fresh ``runs/<recipe>-<time>``; chosen by rank 0, the same on every rank."""
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser().resolve()
    chosen = None
    if accelerator is None or accelerator.is_main_process:
        if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
            chosen = HydraConfig.get().runtime.output_dir
        elif os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
            # A W&B sweep trial (`wandb agent` sets both): one dir per trial, one parent per sweep.
            chosen = f"runs/sweep-{os.environ['WANDB_SWEEP_ID'].split('/')[-1]}/{os.environ['WANDB_RUN_ID']}"
        else:
            chosen = str(default_run_dir(cfg.recipe))
    if accelerator is not None:
        chosen = broadcast_str(accelerator, chosen)
    return Path(chosen).resolve()


def run_train(cfg: DictConfig) -> int:
    from finetune.distributed import check_world
    from finetune.model import check_environment
    from finetune.strategies import get_strategy
    from finetune.trainer import Trainer

    check_world(cfg)
    check_environment(cfg)
    strategy = get_strategy(cfg)
    accelerator = strategy.build_accelerator()
    run_dir = resolve_run_dir(cfg, accelerator)
    OmegaConf.set_struct(cfg, False)
    cfg.output_dir = str(run_dir)
    OmegaConf.set_struct(cfg, True)
    trainer = Trainer(cfg, accelerator, run_dir, strategy)
    trainer.setup()
    if accelerator.is_main_process:
        from finetune.plan import describe_start

        describe_start(trainer)
    code = trainer.train()
    if accelerator.is_main_process and code == 0:
        from finetune.plan import describe_end

        describe_end(trainer)
        if cfg.logger.plots:
            write_run_report(run_dir, getattr(trainer, "summary", None))
        if cfg.export.merge:
            from finetune.export import merge_and_export

            merge_and_export(run_dir / "final", run_dir / "merged", dtype=cfg.export.dtype,
                             max_shard_size=cfg.export.max_shard_size, task=cfg.model.task)
        if trainer.uploader.wants("end"):
            trainer.uploader.submit_run()
        for result in trainer.uploader.close(wait=True):  # failures were logged; files stay local
            if result.ok:
                log.info("pushed %s to the Hub: %s", result.what, result.commit_url)
    elif code != 0:
        trainer.uploader.close(wait=False)  # preempted: leave now, the checkpoint is local
    accelerator.wait_for_everyone()
    accelerator.end_training()
    reset_accelerate_state()
    return code


def write_run_report(run_dir: Path, summary: dict | None) -> None:
    """loss_curves.png + report.md (finetune.report); a failed plot warns, never fails the run."""
    from finetune.report import write_report

    try:
        write_report(run_dir, summary)
    except Exception as exc:  # noqa: BLE001 - the run itself is done and saved
        log.warning("run report not written: %s: %s", type(exc).__name__, exc)


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons, so the next Hydra multirun job in this same
    process builds its Accelerator from its own config (not the previous job's)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_preprocess(cfg: DictConfig) -> int:
    import json

    from finetune.data import prepare_data
    from finetune.model import load_tokenizer

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    data = prepare_data(cfg, load_tokenizer(cfg), build=local_rank == 0)
    log.info("data cache: %s (%s)", data.cache_dir, "hit" if data.cache_hit else "built")
    log.info(json.dumps(data.stats, indent=1))
    return 0


def run_export(cfg: DictConfig) -> int:
    from finetune.export import merge_and_export

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
