"""Atomic, resumable training checkpoints.

Layout: ``<run_dir>/checkpoints/step-00000120/`` holding ``trainable.safetensors`` (the weights
that train: LoRA adapter and saved modules, or the whole model), ``optimizer.pt``,
``scheduler.pt``, ``rng-rank<R>.pt`` (python, numpy, torch, cuda) and ``trainer_state.json``
(step, epoch, position, tokens seen, config hashes). Everything is written into a hidden
``.tmp-*`` directory that is published by one ``rename``: a checkpoint is complete or absent, so
``kill -9`` at any moment leaves every published checkpoint loadable. Loading uses safetensors and
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from finetune.errors import ResumeError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Published checkpoints, oldest first (temporary dirs are never listed)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
             and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_resume_dir(resume: str, run_dir: Path) -> Path | None:
    """``resume=false`` -> None; ``auto`` -> newest complete checkpoint (or None); else the path."""
    value = str(resume).lower()
    if value == "false":
        return None
    if value == "auto":
        found = list_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not (path / "trainer_state.json").exists():
        raise ResumeError(f"resume={resume}: not a complete checkpoint directory "
                          "(no trainer_state.json); use resume=auto or a checkpoints/step-* dir")
    return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(legacy=False),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rng_to_safe(state: dict) -> dict:
    """numpy's state dict holds a numpy int array; store plain lists for weights_only loads."""
    np_state = dict(state["numpy"])
    np_state["state"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                         for k, v in np_state["state"].items()}
    return {**state, "numpy": np_state}


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = {k: (np.asarray(v, dtype=np.uint32) if isinstance(v, list) else v)
                         for k, v in np_state["state"].items()}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters()
            if p.requires_grad}


def load_trainable(model, path: Path) -> None:
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise ResumeError(f"checkpoint {path.parent} does not match the model "
                          f"(missing {missing[:3]}, unexpected {unknown[:3]}); "
                          "resume with the same model and peft settings")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


class CheckpointWriter:
    """Two-phase save: every rank writes its files into the temp dir, then rank 0 publishes."""

    def __init__(self, run_dir: Path):
        self.root = run_dir / "checkpoints"

    def temp_dir(self, step: int) -> Path:
        return self.root / f".tmp-{step_dir_name(step)}"

    def write_rank_files(self, tmp: Path, rank: int) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_to_safe(rng_state()), tmp / f"rng-rank{rank}.pt")

    def write_main_files(self, tmp: Path, weights: dict, scheduler, state: dict,
                         scaler=None) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))

    def publish(self, tmp: Path, step: int) -> Path:
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = self.root / step_dir_name(step)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final

    def prune(self, keep_last: int, keep: set[str]) -> None:
        """Delete all but the newest ``keep_last`` checkpoints (and those named in ``keep``)."""
        found = list_checkpoints(self.root)
        for old in found[: max(0, len(found) - keep_last)]:
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):  # left by a killed save; never published
            if stale.is_dir() and stale.stat().st_mtime < _newest_mtime(found):
                shutil.rmtree(stale, ignore_errors=True)


def _newest_mtime(found: list[Path]) -> float:
    return max((p.stat().st_mtime for p in found), default=0.0)


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def load_rank_rng(ckpt: Path, rank: int) -> dict | None:
    f = ckpt / f"rng-rank{rank}.pt"
    return torch.load(f, weights_only=True) if f.exists() else None


def load_torch(path: Path):
    return torch.load(path, weights_only=True, map_location="cpu")


# ---------------------------------------------------------------- may this checkpoint resume?
# Groups whose change makes a checkpoint's weights meaningless (refuse) vs. that change the run (warn).
MODEL_KEYS = ("model", "peft")
RUN_KEYS = ("data", "optim", "trainer", "seed")


def config_hash(cfg: DictConfig, keys: tuple[str, ...]) -> str:
    """A stable hash of the given top-level groups (resolved), used to match checkpoints."""
    payload = {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig)
               else cfg[k] for k in keys}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hashes(cfg: DictConfig) -> dict:
    return {"model": config_hash(cfg, MODEL_KEYS), "run": config_hash(cfg, RUN_KEYS)}


def check_resumable(path: Path, cfg: DictConfig, key) -> None:
    """Refuse a checkpoint that cannot continue this run exactly; warn where it will differ.

    ``key`` is this run's :class:`finetune.train.state.ResumeKey`."""
    state = read_state(path)
    hashes = state.get("config_hash", {})
    if hashes.get("model") != key.config_hash["model"]:
        raise ResumeError(f"checkpoint {path} was trained with a different model or "
                          "peft config; resume with the same model/peft settings or resume=false")
    if state.get("data_key") != key.data_key:
        raise ResumeError(f"checkpoint {path} was trained on different data (or "
                          "tokenizer / max_seq_len); resume with the same data or resume=false")
    if hashes.get("run") != key.config_hash["run"]:
        log.warning("resuming %s with a changed data/optim/trainer/seed config: the run will "
                    "differ from an uninterrupted one", path)
    if state.get("rows_per_step") != key.rows_per_step:
        raise ResumeError(f"checkpoint {path} used {state.get('rows_per_step')} rows per "
                          f"optimizer step, this run {key.rows_per_step}; keep world_size x "
                          "trainer.micro_batch_size x trainer.grad_accum equal to resume exactly")

