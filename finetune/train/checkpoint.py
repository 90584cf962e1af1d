"""Atomic, verified, resumable training checkpoints.

Layout: ``<run_dir>/checkpoints/step-00000120/`` holding ``trainable.safetensors`` (the weights
that train: LoRA adapter and saved modules, or the whole model), ``optimizer.pt`` (or the
strategy's optimizer shards), ``scheduler.pt``, ``rng-rank<R>.pt`` (python, numpy, torch, cuda),
``trainer_state.json`` (step, epoch, position, tokens seen, config hashes, ``"manifest":
"manifest.json"``) and ``manifest.json`` (``{"version": 1, "hash": "sha256", "files": {name:
{"size", "sha256"}}}`` of every other file). Everything is written into a hidden ``.tmp-*``
directory that is published by one ``rename``: a checkpoint is complete or absent, so ``kill -9``
at any moment leaves every published checkpoint loadable. Loading uses safetensors and
``torch.load(weights_only=True)``.

Damage after publishing (a truncated file, a trainer_state.json that does not parse, a file
deleted by hand, a missing manifest) is found by :func:`checkpoint_problem` against the manifest:
``resume=auto`` warns and falls back to the newest sound checkpoint, an explicit ``resume=<dir>``
fails with one line (ResumeError, exit 5). A write that fails (disk full, I/O error) inside
:meth:`CheckpointWriter.writing` / :func:`guard_temp_dir` removes the temp dir and raises
CheckpointError (exit 8) naming the path and the bytes needed vs free; nothing is published and
the previous checkpoints stay as they were.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from finetune.errors import CheckpointError, ResumeError

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"

def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Published checkpoints, oldest first (temporary dirs are never listed)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
             and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def step_dirs(ckpt_root: Path) -> list[Path]:
    """Every ``step-*`` dir, oldest first, sound or not (``list_checkpoints`` needs a state file)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_resume_dir(resume: str, run_dir: Path) -> Path | None:
    """``resume=false`` -> None; ``auto`` -> newest sound checkpoint (or None); else the path.

    ``auto`` verifies the checkpoints newest first (see :func:`checkpoint_problem`), warns about
    each damaged one with its path and what is wrong, and returns the first sound one. An
    explicit path that is damaged raises ResumeError."""
    value = str(resume).lower()
    if value == "false":
        return None
    if value == "auto":
        found = step_dirs(run_dir / "checkpoints")
        for ckpt in reversed(found):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                return ckpt
            log.warning("checkpoint %s is damaged (%s); skipping it, resuming from an "
                        "older one", ckpt, problem)
        if found:
            log.warning("none of the %d checkpoints in %s is sound; starting from step 0",
                        len(found), run_dir / "checkpoints")
        return None
    path = Path(resume).expanduser()
    if not (path / "trainer_state.json").exists():
        raise ResumeError(f"resume={resume}: not a complete checkpoint directory "
                          "(no trainer_state.json); use resume=auto or a checkpoints/step-* dir")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ResumeError(f"resume={resume}: the checkpoint is damaged ({problem}); use "
                          "resume=auto to fall back to the newest sound checkpoint, or pass "
                          "another checkpoints/step-* dir")
    return path


# ----------------------------------------------------------------- verification
def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(tmp: Path) -> dict:
    """``manifest.json`` in ``tmp``: size and sha256 of every other file, before the publish."""
    files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in _files(tmp)}
    manifest = {"version": 1, "hash": "sha256", "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def checkpoint_problem(ckpt: Path) -> str | None:
    """What is wrong with a published checkpoint (one phrase), or None when it is sound.

    Checks trainer_state.json parses, then every file against the manifest (missing, size, then
    sha256). A checkpoint written before manifests existed (its state does not claim one) gets
    structural checks only: the safetensors header agrees with the file size."""
    state_file = ckpt / "trainer_state.json"
    if not state_file.is_file():
        return "trainer_state.json is missing"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        return f"trainer_state.json does not parse: {str(exc).splitlines()[0][:120]}"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "trainer_state.json holds no step"
    manifest_file = ckpt / MANIFEST
    if not manifest_file.is_file():
        if state.get("manifest"):
            return f"{MANIFEST} is missing (trainer_state.json says one was written)"
        return _legacy_problem(ckpt)
    try:
        files = json.loads(manifest_file.read_text())["files"]
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{MANIFEST} does not parse: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}"
    for name, size, _ in entries:  # sizes first: cheap, and they catch truncation
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing (deleted?)"
        actual = f.stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, {size} when published (truncated or overwritten)"
    for name, _, digest in entries:
        if file_sha256(ckpt / name) != digest:
            return f"{name} differs from its sha256 at publish time (corrupted)"
    return None


def _legacy_problem(ckpt: Path) -> str | None:
    weights = ckpt / "trainable.safetensors"
    if not weights.is_file():
        return "trainable.safetensors is missing"
    return safetensors_problem(weights)


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file whose header does not parse or does not match its size (truncated)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n)) if 0 < n <= size - 8 else None
    except (OSError, ValueError, struct.error):
        header = None
    if not isinstance(header, dict):
        return f"{path.name} has no readable safetensors header"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{path.name} is {size} bytes, its header says {expected} (truncated)"
    return None


# ---------------------------------------------------------- failed writes
def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


WRITE_FAILURE_MARKERS = ("No space left", "Disk quota", "file write failed", "unexpected pos",
                         "iostream error", "I/O error", "os error")


def is_write_failure(exc: BaseException) -> bool:
    """An exception that means "the bytes did not reach the disk" (torch.save reports ENOSPC as a
    RuntimeError from its zip writer, safetensors as a SafetensorError)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) or type(seen).__name__ == "SafetensorError":
            return True
        if isinstance(seen, RuntimeError) and any(m in str(seen) for m in WRITE_FAILURE_MARKERS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _reason(exc: BaseException, free: int, needed: int) -> str:
    """strerror of the OSError behind ``exc``; else ENOSPC when the disk has less free than is
    needed (torch.save says only "unexpected pos" then); else the exception's first line."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror + (f": {seen.filename}" if seen.filename else "")
        if "No space left" in str(seen):
            return os.strerror(errno.ENOSPC)
        seen = seen.__cause__ or seen.__context__
    if free < max(needed, 1 << 20):
        return os.strerror(errno.ENOSPC)
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


def human_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return 0


@contextmanager
def guard_temp_dir(tmp: Path, dest: Path, needed_bytes: int | None = None) -> Iterator[Path]:
    """Writes into ``tmp`` (to be published as ``dest`` by a rename) under this guard: if any of
    them fails, ``tmp`` is removed, and a write failure (disk full, I/O error) becomes one
    CheckpointError naming ``dest``, the bytes needed (``needed_bytes``, else at least what was
    written so far) and the bytes free. Anything else is re-raised unchanged."""
    try:
        yield tmp
    except Exception as exc:
        written = tree_size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_failure(exc):
            raise
        free = _free_bytes(dest.parent)
        needed = (f"about {human_bytes(needed_bytes)}" if needed_bytes
                  else f"more than {human_bytes(written)}")
        reason = _reason(exc, free, needed_bytes or written)
        raise CheckpointError(
            f"cannot write {dest} ({reason}): it needs {needed}, {human_bytes(free)} free on "
            f"{dest.parent}; free space or set output_dir on a larger disk (nothing was "
            f"published; earlier checkpoints are intact)") from None


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
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "manifest": MANIFEST}, indent=1))

    def writing(self, tmp: Path):
        """Guard for every write of one save (see :func:`guard_temp_dir`); what a save needs is
        estimated from the newest published checkpoint."""
        newest = list_checkpoints(self.root)
        needed = tree_size(newest[-1]) if newest else None
        dest = self.root / tmp.name.removeprefix(".tmp-")
        return guard_temp_dir(tmp, dest, needed)

    def publish(self, tmp: Path, step: int) -> Path:
        write_manifest(tmp)  # sizes + hashes of what is about to be published
        for f in _files(tmp) + [tmp / MANIFEST]:  # data on disk before the rename makes it visible
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
        newest = _newest_mtime(found)  # before any rename: a pruned path no longer exists
        for old in found[: max(0, len(found) - keep_last)]:
            if old.name not in keep:
                # Renamed first (atomic): a kill -9 inside rmtree must not leave a partial step-* dir
                # that looks like a checkpoint; the .tmp-* sweep below removes what a kill leaves.
                doomed = old.with_name(f".tmp-pruned-{old.name}")
                old.rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):  # left by a killed save; never published
            if stale.is_dir() and stale.stat().st_mtime < newest:
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

