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
SUBMITTED: list[str] = []  # every job id submit() returned; conftest cancels leftovers


def sh(*cmd: str, timeout: float = 30) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout


def job_env(**extra: str) -> str:
    """`sbatch --export` value: this interpreter and checkout for `python -m finetune`."""
    env = {"FINETUNE_PYTHON": sys.executable, "PYTHONPATH": str(REPO), **extra}
    return "ALL," + ",".join(f"{k}={v}" for k, v in env.items())


def submit(script: str, *overrides: str, log: Path, sbatch_args: tuple[str, ...] = (),
           env: dict[str, str] | None = None) -> str:
    """Submit slurm/<script> with Hydra overrides, run in the log's directory; return the job id."""
    cmd = ["sbatch", "--parsable", f"--output={log}", f"--chdir={log.parent}",
           f"--export={job_env(**(env or {}))}", *sbatch_args, str(SLURM_DIR / script), *overrides]
    job_id = sh(*cmd).strip().split(";")[0]
    SUBMITTED.append(job_id)
    return job_id


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, NodeList, Reason, ...)."""
    out = sh("scontrol", "show", "job", "-o", job_id)
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_job(job_id: str, timeout: float, log: Path | None = None,
             hurry_requeue_after: float | None = 45) -> dict:
    """Poll until the job reaches a final state; fail (with the job log) after `timeout` s.

    SLURM holds a requeued job ~2 min (Reason=BeginTime). After `hurry_requeue_after` s of that
    hold the job is released (`scontrol update StartTime=now`) to shorten the test; the protocol
    is unchanged. Not sooner: while the previous run is still being killed on its nodes
    (KillWait=30 s) a restart fails with "Job credential revoked".
    """
    deadline = time.monotonic() + timeout
    held_since = None
    while True:
        info = job_info(job_id)
        if info["JobState"] in FINAL_STATES:
            return info
        held = info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime"
        held_since = (held_since or time.monotonic()) if held else None
        if hurry_requeue_after is not None and held_since is not None \
                and time.monotonic() - held_since > hurry_requeue_after:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                           capture_output=True, timeout=30)
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
            tail = log.read_text()[-4000:] if log and log.exists() else "<no log>"
            pytest.fail(f"job {job_id} not finished after {timeout}s: {info}\n--- log tail:\n{tail}")
        time.sleep(1)


def wait_for(predicate, timeout: float, what: str, job_id: str | None = None,
             log: Path | None = None, interval: float = 0.2):
    """Poll predicate() until truthy; fail after `timeout` s, or at once if job_id has ended."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        ended = job_id is not None and job_info(job_id)["JobState"] in FINAL_STATES
        if ended or time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log and log.exists() else "<no log>"
            why = f"job {job_id} ended" if ended else f"timed out after {timeout}s"
            pytest.fail(f"{why} while waiting for {what}\n--- log tail:\n{tail}")
        time.sleep(interval)
    return result
