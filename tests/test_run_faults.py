"""Faults inside a run, made for real: a NaN loss from an exploding learning rate, a preemption
signal during start-up."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest

from run_helpers import REPO, read_metrics, run_cli, train_losses

FAST = ["recipe=lora-llm", "trainer.log_steps=1", "trainer.eval_steps=0", "trainer.sample_prompts=0",
        "trainer.progress=false", "logger.plots=false", "optim.warmup_steps=0"]
# AdamW moves every weight by ~lr in the first step: 1e30 overflows float32 in the next forward.
EXPLODE = ["optim.lr=1e30", "optim.scheduler=constant", "trainer.max_steps=5", "trainer.save_steps=1"]


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_the_step_and_rows(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli([*FAST, *EXPLODE, f"output_dir={run_dir}"], timeout=600)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    [line] = error_lines(proc)
    # Where the overflow shows first depends on the data: the loss of the step's one micro-batch,
    # or only its gradients (the made-up-word sample set); both name the step and the rows.
    assert re.search(r"step 2: NaN/inf in (micro-batch 1 of 1 \(loss |the gradients)", line), line
    assert "data rows [" in line, line
    assert "trainer.nonfinite=skip_step" in line
    # The last good state stays: step 1's checkpoint, no final/, and the metrics stop at step 1.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000001"]
    assert not (run_dir / "final").exists()
    assert [s for s, _ in train_losses(run_dir)] == [1]


def test_a_nan_micro_batch_loss_is_named_with_its_rows(tmp_path):
    """The message names the first non-finite micro-batch of the step, its loss and its rows."""
    import torch

    from finetune.errors import NonFiniteError
    from run_helpers import build_trainer

    trainer = build_trainer([*FAST, "trainer.max_steps=2", "trainer.micro_batch_size=2", "trainer.grad_accum=2"],
                            tmp_path / "run")
    micro = next(trainer.feed.steps(0))
    trainer.micro_losses = [torch.tensor(1.0), torch.tensor(math.nan)]
    with pytest.raises(NonFiniteError, match=r"step 1: NaN/inf in micro-batch 2 of 2 \(loss nan\), data rows \[") as err:
        trainer.nonfinite_step(micro)
    assert str(micro[1]["row_ids"]) in str(err.value)


@pytest.mark.slow
def test_skip_step_skips_and_counts_nonfinite_updates(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli([*FAST, *EXPLODE, "trainer.save_steps=0", "trainer.nonfinite=skip_step",
                    f"output_dir={run_dir}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r.get("skipped_steps", 0) for r in rows] == [0, 1, 2, 3, 4]  # every step after the first
    assert json.loads((run_dir / "summary.json").read_text())["skipped_steps"] == 4
    assert "update skipped" in proc.stdout + proc.stderr
    assert (run_dir / "final" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_sigusr1_during_startup_exits_75_with_nothing_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    args = [*FAST, "trainer.max_steps=3", f"output_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run_dir / "config.yaml").exists():  # written once the signal handler is installed
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert "Traceback" not in out + err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "before the first step" in line and "resume=auto" in line
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    # The requeued job starts afresh.
    again = run_cli([*args, "resume=auto"], timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [s for s, _ in train_losses(run_dir)] == [1, 2, 3]
