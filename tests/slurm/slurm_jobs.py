"""Helpers for tests that submit the real slurm/*.sbatch scripts to the local SLURM cluster.

Job states come from `scontrol show job` (the test cluster started by `.ci/slurm-up.sh` has no
accounting daemon, so no `sacct`; it keeps finished jobs for MinJobAge=1 h).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "slurm"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def sh(*cmd: str, timeout: float = 30) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout


def job_env(**extra: str) -> str:
    """`sbatch --export` value: this interpreter and checkout for `python -m finetune`."""
    env = {"FINETUNE_PYTHON": sys.executable, "PYTHONPATH": str(REPO), **extra}
    return "ALL," + ",".join(f"{k}={v}" for k, v in env.items())


def submit(script: str, *overrides: str, log: Path, sbatch_args: tuple[str, ...] = (),
           env: dict[str, str] | None = None) -> str:
    """Submit slurm/<script> with Hydra overrides; return the job id."""
    cmd = ["sbatch", "--parsable", f"--output={log}", f"--chdir={REPO}",
           f"--export={job_env(**(env or {}))}", *sbatch_args, str(SLURM_DIR / script), *overrides]
    return sh(*cmd).strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, NodeList, Reason, ...)."""
    out = sh("scontrol", "show", "job", "-o", job_id)
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_job(job_id: str, timeout: float, log: Path | None = None, hurry_requeue: bool = True) -> dict:
    """Poll until the job reaches a final state; fail (with the job log) after `timeout` s.

    hurry_requeue: SLURM holds a requeued job ~2 min (Reason=BeginTime); release it at once.
    This shortens the test only; the protocol is unchanged.
    """
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id)
        if info["JobState"] in FINAL_STATES:
            return info
        if hurry_requeue and info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                           capture_output=True, timeout=30)
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
            tail = log.read_text()[-4000:] if log and log.exists() else "<no log>"
            pytest.fail(f"job {job_id} not finished after {timeout}s: {info}\n--- log tail:\n{tail}")
        time.sleep(1)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return result
