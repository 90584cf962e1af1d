"""TensorBoard tracker: event files under ``<output_dir>/tensorboard`` (main process only).

Train rows go under ``train/<name>`` and eval rows under ``eval/<name>``, each at its optimizer
step, so ``tensorboard --logdir runs/`` compares runs side by side. The final summary's numbers
are written as text and as ``final/<name>`` scalars.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from finetune.outputs.trackers import Tracker

log = logging.getLogger(__name__)


class TensorboardTracker(Tracker):
    def __init__(self, cfg: DictConfig, run_dir: Path, resume_id: str | None = None):
        self.writer = None
        try:  # like W&B, TensorBoard never stops training (e.g. the package is not installed)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        except Exception as exc:  # noqa: BLE001
            log.warning("TensorBoard disabled: %s: %s (pip install tensorboard)", type(exc).__name__, exc)

    def log(self, row: dict, step: int) -> None:
        if self.writer is None:
            return
        prefix = "eval" if "eval_loss" in row else "train"
        for key, value in row.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = key[len("eval_"):] if prefix == "eval" and key.startswith("eval_") else key
            self.writer.add_scalar(f"{prefix}/{name}", value, global_step=step)

    def finish(self, summary: dict) -> None:
        if self.writer is None:
            return
        step = summary.get("steps") or 0
        for key, value in summary.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"final/{key}", value, global_step=step)
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=1, default=str) + "\n```",
                             global_step=step)
        self.writer.close()
