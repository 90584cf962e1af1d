"""Sweeps on the local SLURM cluster with the real CLI.

1. `slurm/sweep-array.sbatch` in override-file mode: array task i runs line i of the file.
2. Hydra multirun through `hydra/launcher=submitit_slurm` (hydra-submitit-launcher).
The W&B-agent mode of sweep-array.sbatch needs a W&B server and is not run here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from slurm_jobs import REPO, submit, wait_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(2400)]  # loaded CI hosts are slow


def test_sweep_array_override_file(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("optim.lr=1e-3 seed=1\n'optim.lr=2e-3' seed=2\n")
    root = tmp_path / "runs"
    job = submit("sweep-array.sbatch", "recipe=lora-llm", "trainer.max_steps=3",
                 log=tmp_path / "task-%a.out", sbatch_args=("--array=1-2",),
                 env={"SWEEP_FILE": str(sweep), "OUTPUT_ROOT": str(root)})
    for task in (1, 2):
        info = wait_job(f"{job}_{task}", 600, tmp_path / f"task-{task}.out")
        assert info["JobState"] == "COMPLETED", (tmp_path / f"task-{task}.out").read_text()
    for task, (lr, seed) in {1: (1e-3, 1), 2: (2e-3, 2)}.items():
        run = root / f"sweep-{job}" / str(task)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["optim"]["lr"] == lr and cfg["seed"] == seed and cfg["resume"] == "auto"
        assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_hydra_multirun_submitit(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "multirun"
    cmd = [sys.executable, "-m", "finetune", "-m", "recipe=lora-llm", "trainer.max_steps=3",
           "optim.lr=1e-3,2e-3", "hydra/launcher=submitit_slurm",
           "hydra.launcher.partition=" + slurm_cluster_partition(),
           "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
           f"hydra.launcher.submitit_folder={tmp_path}/submitit/%j",
           f"hydra.sweep.dir={sweep_dir}", "output_dir=${hydra:sweep.dir}/${hydra:job.num}"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for num, lr in ((0, 1e-3), (1, 2e-3)):
        run = sweep_dir / str(num)
        assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == lr
        assert json.loads((run / "summary.json").read_text())["steps"] == 3


def slurm_cluster_partition() -> str:
    """The default partition (marked with * by sinfo)."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30).stdout
    return next(p.rstrip("*") for p in out.split() if p.endswith("*"))
