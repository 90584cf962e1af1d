"""Preemption of preference runs: SIGUSR1 mid-run checkpoints and exits 75, the requeued run is
killed with kill -9 a few steps later, the third run completes; per-step losses and rewards (KTO:
its KL estimate) equal an uninterrupted run's bit for bit.

DPO runs with the precomputed reference (the table written by the first run is read by the
restarts), KTO with the live one (LoRA: the adapter disabled); each on 96 rows made like the shipped
sets (finetune/data/sample/make_sample.py).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest

from run_helpers import REPO, read_metrics, run_cli
from finetune.data.sample.make_sample import instruction_rows, kto_rows, preference_rows
from finetune.errors import EXIT_PREEMPTED

STEPS = 16
COMMON = ["trainer.log_steps=1", "trainer.eval_steps=0", "trainer.sample_prompts=0", "trainer.micro_batch_size=4",
          "trainer.grad_accum=2", f"trainer.max_steps={STEPS}", "trainer.progress=false", "data.eval_split=null", "data.eval_size=8"]
MAKE = {"dpo": preference_rows, "kto": kto_rows}
TASKS = {
    "dpo": (["recipe=dpo-llm", "trainer.exact_match_prompts=0", "pref.precompute_ref=true"],
            ("loss", "rewards/chosen", "rewards/margin", "logps/rejected")),
    "kto": (["recipe=kto-llm"], ("loss", "kl", "rewards/chosen", "rewards/rejected")),
}


def per_step(run_dir, keys) -> dict[int, tuple]:
    """The last row logged for each step (a killed run's steps are logged again after resuming)."""
    return {r["step"]: tuple(r.get(k) for k in keys) for r in read_metrics(run_dir) if "loss" in r}


def _popen(args):
    return subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, run_dir, step: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and max((r.get("step", 0) for r in read_metrics(run_dir) if "loss" in r), default=0) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before step {step}: {proc.stderr.read()[-2000:]}")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("task", sorted(TASKS))
def test_sigusr1_then_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, task):
    extra, keys = TASKS[task]
    data = tmp_path / f"{task}.jsonl"
    rows = MAKE[task](instruction_rows(random.Random(7), 96), random.Random(8))
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [*extra, *COMMON, f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}", "trainer.save_steps=2"]
    ref = tmp_path / "ref"
    run_cli([*args, f"output_dir={ref}"], check=True)
    expected = per_step(ref, keys)
    assert sorted(expected) == list(range(1, STEPS + 1))

    run_dir = tmp_path / "preempted"
    proc = _popen([*args, f"output_dir={run_dir}"])
    _wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == EXIT_PREEMPTED, proc.stderr.read()[-2000:]
    stopped = max(per_step(run_dir, keys))
    assert 3 <= stopped < STEPS - 4

    proc = _popen([*args, "resume=auto", f"output_dir={run_dir}"])  # the requeued job
    _wait_for_step(proc, run_dir, stopped + 3)
    proc.kill()  # kill -9, mid-step or mid-save
    proc.wait()

    run_cli([*args, "resume=auto", f"output_dir={run_dir}"], check=True)
    assert per_step(run_dir, keys) == expected  # bit-identical, not approximate
    if task == "dpo":  # computed once by the first run, read by every restart
        assert len(list((tmp_path / "cache").rglob("reference-logps-*.safetensors"))) == 1
