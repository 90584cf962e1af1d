"""Disk full (ENOSPC) while a checkpoint or final/ is written, on a real small filesystem: a tmpfs
of a few MB mounted by the test (root; skipped with the reason where the mount fails).

The write fails with one CheckpointError line (exit 8) naming the path and the bytes needed vs
free, the temp dir is removed, the previous checkpoint is intact and resume=auto continues from it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from run_helpers import run_cli
from test_reliability_checkpoints import _save

from finetune.train import checkpoint as ckpt

MB = 1 << 20


@pytest.fixture
def small_fs(tmp_path):
    """``make(size_mb) -> mount point`` of a fresh tmpfs; unmounted afterwards."""
    mounts = []

    def make(size_mb: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        mnt = tmp_path / f"fs{len(mounts)}"
        mnt.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounts.append(mnt)
        return mnt

    yield make
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt: Path, leave: int) -> Path:
    """Take all free space of ``mnt`` but ``leave`` bytes (really written: tmpfs has no holes)."""
    filler = mnt / "filler"
    todo = shutil.disk_usage(mnt).free - leave
    with open(filler, "wb") as fh:
        while todo > 0:
            n = min(todo, MB)
            fh.write(b"\xa5" * n)
            todo -= n
    return filler


def test_disk_full_during_a_save_removes_the_temp_dir_and_keeps_the_previous(small_fs):
    mnt = small_fs(4)
    run_dir = mnt / "run"
    previous = _save(run_dir, 2)
    size = ckpt.tree_size(previous)
    filler = fill(mnt, leave=size // 3)
    with pytest.raises(ckpt.CheckpointError) as err:
        _save(run_dir, 4)
    msg = str(err.value)
    assert "\n" not in msg and err.value.exit_code == 8
    assert f"cannot write {run_dir / 'checkpoints' / 'step-00000004'} (No space left on device)" in msg
    assert f"it needs about {ckpt.human_bytes(size)}, " in msg and " kB free on " in msg
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the temp dir is gone
    assert [p.name for p in ckpt.step_dirs(run_dir / "checkpoints")] == ["step-00000002"]
    assert ckpt.checkpoint_problem(previous) is None  # intact, verified against its manifest
    assert ckpt.find_resume_dir("auto", run_dir) == previous
    filler.unlink()  # space again: the same save now succeeds
    assert ckpt.checkpoint_problem(_save(run_dir, 4)) is None


def test_disk_full_while_final_is_written(small_fs):
    """``final/`` through guard_temp_dir: a real save_pretrained of the built-in tiny Llama."""
    from transformers import LlamaForCausalLM

    from finetune.model.builtin import tiny_llama_config

    mnt = small_fs(4)
    run_dir = mnt / "run"
    run_dir.mkdir()
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=512, pad_id=0, eos_id=1))
    fill(mnt, leave=256 * 1024)
    tmp, final = run_dir / ".final.tmp", run_dir / "final"
    with pytest.raises(ckpt.CheckpointError) as err:
        with ckpt.guard_temp_dir(tmp, final):
            model.save_pretrained(tmp, safe_serialization=True)
    msg = str(err.value)
    assert f"cannot write {final} (" in msg and "it needs more than" in msg and "free on" in msg
    assert not tmp.exists() and not final.exists()


def test_a_failure_that_is_not_a_write_is_re_raised_and_the_temp_dir_still_removed(tmp_path):
    tmp = tmp_path / ".tmp-step-00000002"
    with pytest.raises(KeyError):
        with ckpt.guard_temp_dir(tmp, tmp_path / "step-00000002"):
            tmp.mkdir()
            (tmp / "half.pt").write_bytes(b"x")
            raise KeyError("a bug, not the disk")
    assert not tmp.exists()


def test_write_failures_are_recognised_as_the_libraries_raise_them(small_fs):
    """torch.save reports ENOSPC as a RuntimeError from its zip writer, safetensors as its own
    SafetensorError, plain writes as OSError: all three are write failures."""
    from safetensors.torch import save_file

    mnt = small_fs(1)
    big = {"w": torch.zeros(512, 1024)}  # 2 MB > the 1 MB filesystem
    for write in (lambda: torch.save(big, mnt / "a.pt"), lambda: save_file(big, str(mnt / "b.st")),
                  lambda: (mnt / "c.json").write_bytes(b"x" * (2 * MB))):
        with pytest.raises(Exception) as err:
            write()
        assert ckpt.is_write_failure(err.value), repr(err.value)
        for f in mnt.iterdir():
            f.unlink()
    assert not ckpt.is_write_failure(ValueError("a bad value"))


def _train(run_dir: Path, cache: Path, steps: int, *extra: str):
    return run_cli(["recipe=lora-llm", f"trainer.max_steps={steps}", "trainer.save_steps=2",
                    "trainer.log_steps=1", "trainer.eval_steps=0", "trainer.sample_prompts=0",
                    "trainer.progress=false", "logger.plots=false", f"output_dir={run_dir}",
                    f"data.cache_dir={cache}", *extra], timeout=600)


@pytest.mark.slow
def test_real_run_disk_full_at_a_checkpoint_exits_8_and_resumes(small_fs, tmp_path):
    mnt = small_fs(16)
    run_dir, cache = mnt / "run", tmp_path / "cache"
    first = _train(run_dir, cache, 4)  # step-2 checkpoint, final/ at step 4
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.rmtree(run_dir / "final")
    previous = run_dir / "checkpoints" / "step-00000002"
    filler = fill(mnt, leave=ckpt.tree_size(previous) // 2)  # the step-4 save cannot fit
    full = _train(run_dir, cache, 8, "resume=auto")
    assert full.returncode == 8, full.stdout[-2000:] + full.stderr[-2000:]
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write "), full.stderr
    assert "step-00000004 (No space left on device)" in lines[0] and "free on" in lines[0]
    assert "Traceback" not in full.stdout + full.stderr
    assert not list((run_dir / "checkpoints").glob(".tmp-*")) and not (run_dir / "final").exists()
    assert ckpt.checkpoint_problem(previous) is None
    filler.unlink()
    again = _train(run_dir, cache, 8, "resume=auto")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {previous} at step 2" in again.stdout
    assert (run_dir / "final").is_dir()
