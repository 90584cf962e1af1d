"""Session fixture for tests/slurm: skip unless a SLURM cluster with two nodes answers.

CI starts one on a single machine with `.ci/slurm-up.sh` (slurmctld plus `slurmd -N n1` /
`slurmd -N n2`); helpers for submitting and polling jobs are in slurm_jobs.py.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest

import slurm_jobs
from slurm_jobs import sh


@pytest.fixture(scope="session")
def slurm_cluster() -> list[str]:
    """Names of the idle/usable nodes; skips unless `sinfo` answers with at least two."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip("SLURM client tools (sinfo, sbatch) not installed: run .ci/slurm-up.sh as root")
    try:
        out = sh("sinfo", "-h", "-N", "-o", "%N %t", timeout=20)
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"SLURM cluster not reachable ({e}): run .ci/slurm-up.sh as root")
    up = sorted({line.split()[0] for line in out.splitlines()
                 if len(line.split()) == 2 and line.split()[1].rstrip("*") in ("idle", "mix", "alloc")})
    if len(up) < 2:
        pytest.skip(f"need 2 SLURM nodes up, sinfo says {out.strip()!r}: run .ci/slurm-up.sh as root")
    return up


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs():
    """A failed test must not leave its jobs running (they would hold the nodes)."""
    first = len(slurm_jobs.SUBMITTED)
    yield
    for job_id in slurm_jobs.SUBMITTED[first:]:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
