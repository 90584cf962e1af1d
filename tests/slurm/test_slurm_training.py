"""Whole training runs of the real CLI through slurm/*.sbatch on the local two-node cluster.

1. `multinode.sbatch` on 2 nodes x 1 process: one launcher per node, rendezvous on the first
   node, DDP over gloo; the run completes with world_size 2.
2. Preemption, for `train.sbatch` (1 node x 2 processes) and `multinode.sbatch` (2 nodes x 1):
   the job gets the early-warning SIGUSR1 mid-run, checkpoints, exits 75, requeues itself,
   resumes with `resume=auto` and completes; every logged per-step loss equals the one of the
   same job run without interruption.
Bounded timeouts only catch hangs; nothing asserts speed.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from slurm_jobs import submit, wait_for, wait_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(2400)]  # loaded CI hosts are slow

COMMON = ("recipe=lora-llm", "distributed=ddp", "trainer.log_steps=1", "seed=7")


def train_losses(run_dir: Path) -> dict[int, list[float]]:
    """step -> every train loss logged for it (a resumed run must not log a step differently)."""
    losses: dict[int, list[float]] = {}
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return losses
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row and "step" in row:
            losses.setdefault(int(row["step"]), []).append(row["loss"])
    return losses


def test_multinode_two_nodes(slurm_cluster, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = submit("multinode.sbatch", *COMMON, "trainer.max_steps=6", f"output_dir={out}",
                 log=log, sbatch_args=("--nodes=2",), env={"GPUS_PER_NODE": "1"})
    info = wait_job(job, 600, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert info["NodeList"] == "n[1-2]", info
    assert "2 nodes x 1 process(es), rendezvous n1:" in text, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6, summary
    assert sorted(train_losses(out)) == list(range(1, 7))
    assert (out / "final").is_dir()


@pytest.mark.parametrize("script,sbatch_args,gpus", [
    ("train.sbatch", (), "2"),                    # 1 node x 2 processes
    ("multinode.sbatch", ("--nodes=2",), "1"),    # 2 nodes x 1 process
])
def test_preempt_requeue_resume_matches_uninterrupted(slurm_cluster, tmp_path, script, sbatch_args, gpus):
    steps = 30  # the signal goes out after step 3; fast hosts finish ~0.2 s a step
    args = (*COMMON, f"trainer.max_steps={steps}", "trainer.save_steps=1000")
    env = {"GPUS_PER_NODE": gpus}
    ref_out, ref_log = tmp_path / "ref", tmp_path / "ref.out"
    out, log = tmp_path / "run", tmp_path / "job.out"
    ref = submit(script, *args, f"output_dir={ref_out}", log=ref_log, sbatch_args=sbatch_args, env=env)
    job = submit(script, *args, f"output_dir={out}", log=log, sbatch_args=sbatch_args, env=env)

    # mid-run: a few steps logged, far from the end
    wait_for(lambda: len(train_losses(out)) >= 3, 600, "the job's first logged steps", job, log)
    # what `#SBATCH --signal=B:USR1@120` does before the time limit: signal the batch shell
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)

    info = wait_job(job, 900, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert int(info["Restarts"]) == 1, text
    # exactly one signal per process: a second one makes the trainer abort without a checkpoint
    assert "second signal" not in text, text
    if script == "train.sbatch":
        assert "[train.sbatch] exit 75: requeueing" in text, text
    else:  # with --kill-on-bad-exit srun may report the status of a node killed after its 75
        assert f"[{script}] exit " in text and ": requeueing job" in text, text
    assert "restart 1" in text, text
    # save_steps > max_steps: the only checkpoint is the one written on the signal, mid-run
    ckpt_steps = [int("".join(c for c in p.name if c.isdigit()) or -1)
                  for p in (out / "checkpoints").iterdir()]
    assert ckpt_steps and all(0 < s < steps for s in ckpt_steps), ckpt_steps

    ref_info = wait_job(ref, 900, ref_log)
    assert ref_info["JobState"] == "COMPLETED" and int(ref_info["Restarts"]) == 0, ref_log.read_text()
    ref_losses, losses = train_losses(ref_out), train_losses(out)
    assert sorted(ref_losses) == list(range(1, steps + 1))
    assert sorted(losses) == list(range(1, steps + 1))
    for step, values in losses.items():
        assert values == [ref_losses[step][0]] * len(values), f"step {step}: {values} vs {ref_losses[step]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps
