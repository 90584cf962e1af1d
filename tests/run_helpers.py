"""Helpers for tests: compose configs like the CLI does, run the CLI, read a run dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


def compose(overrides: list[str]):
    """The config the CLI would build for these overrides (validated)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from finetune.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    validate(cfg)
    return cfg


def run_cli(args: list[str], *, timeout: float = 600, env: dict | None = None,
            cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """``python -m finetune <args>`` in a fresh process; returns the completed process."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"finetune {args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def build_trainer(overrides: list[str], run_dir: Path):
    """An in-process Trainer (single process) set up for ``overrides``."""
    from omegaconf import OmegaConf

    from finetune.distributed.strategy import get_strategy
    from finetune.train.loop import Trainer

    cfg = compose(overrides + [f"output_dir={run_dir}"])
    OmegaConf.set_struct(cfg, True)
    strategy = get_strategy(cfg)
    acc = strategy.build_accelerator()
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, acc, run_dir, strategy)
    trainer.setup()
    return trainer
