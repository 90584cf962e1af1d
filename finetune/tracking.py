"""Experiment trackers (W&B, TensorBoard) behind one small interface.

The trainer calls ``open_trackers`` once on the main process; each tracker gets every metrics
row with its step, and ``finish`` at the end. Other ranks never create trackers.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


class Tracker:
    """Interface: ``log(row, step)``, ``finish(summary)``; ``run_id`` is saved in checkpoints."""

    run_id: str | None = None

    def log(self, row: dict, step: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self, summary: dict) -> None:
        pass


def open_trackers(cfg: DictConfig, run_dir: Path, resume_ids: dict | None = None) -> list[Tracker]:
    trackers: list[Tracker] = []
    if cfg.logger.tensorboard.enabled:
        from finetune.trackers.tensorboard import TensorboardTracker

        trackers.append(TensorboardTracker(cfg, run_dir))
    if cfg.logger.wandb.enabled:
        from finetune.trackers.wandb import WandbTracker

        trackers.append(WandbTracker(cfg, run_dir, (resume_ids or {}).get("wandb")))
    return trackers
