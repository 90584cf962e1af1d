"""Experiment trackers (W&B, TensorBoard) behind one small interface.

The metrics callback opens the enabled trackers once on the main process (``logger.<name>.enabled``);
each tracker gets every metrics row with its step, and ``finish`` at the end. Other ranks never
create trackers. A tracker's ``run_id`` is saved in checkpoints under its registry name, so a
resumed run continues the same W&B run.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from finetune.registry import Registry

TRACKERS = Registry("logger", {
    "tensorboard": "finetune.outputs.trackers.tensorboard:TensorboardTracker",
    "wandb": "finetune.outputs.trackers.wandb:WandbTracker",
})


class Tracker:
    """Interface: ``log(row, step)``, ``finish(summary)``; ``run_id`` is saved in checkpoints."""

    run_id: str | None = None

    def log(self, row: dict, step: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self, summary: dict) -> None:
        pass


def open_trackers(cfg: DictConfig, run_dir: Path, resume_ids: dict | None = None) -> dict[str, Tracker]:
    """The enabled trackers by name (``logger.<name>.enabled``), continuing ``resume_ids``."""
    ids = resume_ids or {}
    return {name: TRACKERS.get(name)(cfg, run_dir, ids.get(name))
            for name in TRACKERS.choices() if cfg.logger[name].enabled}
