"""Damaged checkpoints: a manifest (sizes + sha256) is recorded at publish time; ``resume=auto``
warns about a damaged newest checkpoint and falls back to the newest sound one; an explicit
``resume=<dir>`` that is damaged fails with one line (exit 5).

The fast tests write checkpoints in-process with the real CheckpointWriter; the slow ones damage
checkpoints written by a real short training run and resume it through the CLI.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from run_helpers import read_metrics, run_cli

from finetune.train import checkpoint as ckpt
from finetune.errors import ResumeError


def _save(run_dir: Path, step: int) -> Path:
    """One checkpoint as the trainer writes it (weights, optimizer, scheduler, rng, state)."""
    writer = ckpt.CheckpointWriter(run_dir)
    tmp = writer.temp_dir(step)
    torch.manual_seed(step)
    weights = {"lora_A": torch.randn(64, 128), "lora_B": torch.randn(128, 64)}
    param = torch.nn.Parameter(torch.zeros(8))
    opt = torch.optim.AdamW([param])
    param.grad = torch.ones(8)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with writer.writing(tmp):
        writer.write_rank_files(tmp, 0)
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        writer.write_main_files(tmp, weights, sched, {"step": step, "tokens_seen": 10 * step})
        return writer.publish(tmp, step)


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


DAMAGE = {  # what is done to the newest checkpoint -> what the warning must say
    "truncated-weights": (lambda c: _truncate(c / "trainable.safetensors"),
                          "trainable.safetensors is"),
    "truncated-optimizer": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt is"),
    "flipped-byte-optimizer": (lambda c: _flip_byte(c / "optimizer.pt"),
                               "optimizer.pt differs from its sha256"),
    "state-json-does-not-parse": (lambda c: (c / "trainer_state.json").write_text('{"step": 3,'),
                                  "trainer_state.json does not parse"),
    "state-json-deleted": (lambda c: (c / "trainer_state.json").unlink(),
                           "trainer_state.json is missing"),
    "scheduler-deleted": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    "manifest-deleted": (lambda c: (c / "manifest.json").unlink(), "manifest.json is missing"),
    "manifest-garbage": (lambda c: (c / "manifest.json").write_text("{]"),
                         "manifest.json does not parse"),
}


def test_publish_records_a_manifest_of_every_file(tmp_path):
    final = _save(tmp_path, 2)
    manifest = json.loads((final / "manifest.json").read_text())
    names = {p.name for p in final.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == names
    for name, entry in manifest["files"].items():
        assert entry["size"] == (final / name).stat().st_size
        assert entry["sha256"] == ckpt.file_sha256(final / name)
    assert json.loads((final / "trainer_state.json").read_text())["manifest"] == "manifest.json"
    assert ckpt.checkpoint_problem(final) is None
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("damage", DAMAGE)
def test_auto_falls_back_to_the_newest_sound_checkpoint(tmp_path, caplog, damage):
    sound, newest = _save(tmp_path, 2), _save(tmp_path, 4)
    act, phrase = DAMAGE[damage]
    act(newest)
    problem = ckpt.checkpoint_problem(newest)
    assert problem is not None and phrase in problem
    with caplog.at_level(logging.WARNING, logger="finetune.train.checkpoint"):
        assert ckpt.find_resume_dir("auto", tmp_path) == sound
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert str(newest) in warning and phrase in warning
    if damage != "state-json-deleted":  # then it is no checkpoint dir at all (its own message)
        with pytest.raises(ResumeError) as err:
            ckpt.find_resume_dir(str(newest), tmp_path)
        assert "damaged" in str(err.value) and phrase in str(err.value)
        assert "\n" not in str(err.value) and err.value.exit_code == 5


def test_every_checkpoint_damaged_starts_fresh_with_a_warning(tmp_path, caplog):
    for step in (2, 4):
        _truncate(_save(tmp_path, step) / "trainable.safetensors")
    with caplog.at_level(logging.WARNING, logger="finetune.train.checkpoint"):
        assert ckpt.find_resume_dir("auto", tmp_path) is None
    assert "none of the 2 checkpoints" in caplog.text and "starting from step 0" in caplog.text


def test_prune_keeps_the_newest_and_sweeps_a_killed_save_left_behind(tmp_path):
    """A killed save's .tmp-step-* (older than the newest checkpoint) is swept by the next prune,
    the stale checkpoints go, and nothing half-deleted keeps a step-* name."""
    import os

    for step in (1, 2):
        _save(tmp_path, step)
    root = tmp_path / "checkpoints"
    killed = root / ".tmp-step-00000003"
    killed.mkdir()
    (killed / "trainable.safetensors").write_bytes(b"partial")
    os.utime(killed, (1, 1))  # older than every published checkpoint
    _save(tmp_path, 4)
    ckpt.CheckpointWriter(tmp_path).prune(keep_last=2, keep=set())
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]
    ckpt.CheckpointWriter(tmp_path).prune(keep_last=1, keep={"step-00000002"})
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]
    ckpt.CheckpointWriter(tmp_path).prune(keep_last=1, keep=set())
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]


def test_checkpoint_from_before_manifests_is_checked_structurally(tmp_path):
    """A checkpoint written before this change (no manifest, none claimed) still resumes; a
    truncated safetensors file in it is still found from its own header."""
    old = _save(tmp_path, 2)
    (old / "manifest.json").unlink()
    state = json.loads((old / "trainer_state.json").read_text())
    state.pop("manifest")
    (old / "trainer_state.json").write_text(json.dumps(state))
    assert ckpt.checkpoint_problem(old) is None
    assert ckpt.find_resume_dir("auto", tmp_path) == old
    _truncate(old / "trainable.safetensors")
    assert "header says" in ckpt.checkpoint_problem(old)


# ------------------------------------------------------------------ real runs through the CLI
def _train(run_dir: Path, cache: Path, *extra: str):
    return run_cli(["recipe=lora-llm", "trainer.max_steps=8", "trainer.save_steps=2",
                    "trainer.keep_last=3", "trainer.log_steps=1", "trainer.eval_steps=0",
                    "trainer.sample_prompts=0", "trainer.progress=false", "logger.plots=false",
                    f"output_dir={run_dir}", f"data.cache_dir={cache}", *extra], timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A real run with checkpoints at steps 2, 4 and 6 (and final/ at 8)."""
    root = tmp_path_factory.mktemp("damaged")
    run = _train(root / "run", root / "cache")
    assert run.returncode == 0, run.stderr[-2000:]
    return root / "run", root / "cache"


def _copy(trained, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    shutil.rmtree(run_dir / "final")
    return run_dir


@pytest.mark.slow
def test_real_checkpoints_carry_manifests(trained):
    found = ckpt.list_checkpoints(trained[0] / "checkpoints")
    assert [p.name for p in found] == ["step-00000002", "step-00000004", "step-00000006"]
    for c in found:
        files = json.loads((c / "manifest.json").read_text())["files"]
        assert {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng-rank0.pt",
                "trainer_state.json"} <= set(files)
        assert ckpt.checkpoint_problem(c) is None


@pytest.mark.slow
def test_resume_auto_skips_damaged_checkpoints_of_a_real_run(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    step6, step4 = (run_dir / "checkpoints" / f"step-0000000{s}" for s in (6, 4))
    _truncate(step6 / "trainable.safetensors")
    (step4 / "trainer_state.json").write_text('{"step": 4, "epoch"')
    run = _train(run_dir, trained[1], "resume=auto")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Traceback" not in run.stdout + run.stderr
    log = run.stdout
    assert f"checkpoint {step6} is damaged (trainable.safetensors is" in log
    assert f"checkpoint {step4} is damaged (trainer_state.json does not parse" in log
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000002'} at step 2" in log
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps[-6:] == [3, 4, 5, 6, 7, 8]  # continued from step 2 to the end
    assert (run_dir / "final").is_dir()
    for c in ckpt.list_checkpoints(run_dir / "checkpoints"):  # rewritten checkpoints are sound
        assert ckpt.checkpoint_problem(c) is None, c


@pytest.mark.slow
def test_explicit_resume_of_a_damaged_checkpoint_is_one_line_exit_5(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    step6 = run_dir / "checkpoints" / "step-00000006"
    (step6 / "optimizer.pt").unlink()
    run = _train(run_dir, trained[1], f"resume={step6}")
    assert run.returncode == 5, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert f"resume={step6}: the checkpoint is damaged (optimizer.pt is missing" in lines[0]
    assert "Traceback" not in run.stdout + run.stderr
    assert not (run_dir / "final").exists()
