"""Where a run writes: ``output_dir``, or a fresh ``runs/<recipe>-<time>`` chosen once by rank 0;
a directory that cannot be made or written is one ConfigError line."""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from finetune.errors import ConfigError


def default_run_dir(recipe: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{recipe}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def resolve_run_dir(cfg: DictConfig, accelerator=None) -> Path:
    """``output_dir`` or a fresh ``runs/<recipe>-<time>``; chosen by rank 0, the same on every rank
    (each rank's clock would name another directory)."""
    from hydra.core.hydra_config import HydraConfig

    from finetune.distributed import broadcast_str

    if cfg.output_dir:
        return ensure_run_dir(Path(cfg.output_dir))
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
    return ensure_run_dir(Path(chosen))


def ensure_run_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) and check a file can be written in it; returns it
    resolved. ``output_dir=/proc/x``, a path under a file, a read-only mount: ConfigError."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"output_dir={path}: cannot create {path} (a file of that name exists); "
                          "choose a writable directory") from None
    except OSError as exc:
        where = exc.filename or path
        raise ConfigError(f"output_dir={path}: cannot create {where} ({exc.strerror}); "
                          "choose a writable directory") from None
    try:  # mkdir succeeds on an existing read-only dir: writing is what the run needs
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"output_dir={path}: cannot write in {path} ({exc.strerror}); "
                          "choose a writable directory") from None
    return path.resolve()
