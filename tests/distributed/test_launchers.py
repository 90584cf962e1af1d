"""Launching: torchrun and accelerate launch drive the same entry point; a rank killed with
SIGKILL ends the whole job with a non-zero status, promptly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distributed_runs import BASE, ENV, REPO, TWO_PROCS, free_port, losses, run

BIN = Path(sys.executable).parent


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_external_launcher(runs, tmp_path, launcher):
    port = str(free_port())
    prefix = {
        "torchrun": [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port],
        # --multi_gpu is accelerate's torchrun-style launcher; on a CPU-only machine the workers
        # still get gloo (Accelerator(cpu=True) in the strategy). --cpu would start one process.
        "accelerate": [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "--main_process_port", port],
    }[launcher]
    out = tmp_path / launcher
    run([*BASE, "trainer.max_steps=2", "distributed=ddp", *TWO_PROCS, f"output_dir={out}"],
        prefix=[*prefix, "-m", "finetune"])
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    # Step 1 depends only on the initial weights and the first 16 rows: as the reference.
    assert abs(losses(out)[1] - losses(runs.reference())[1]) < 1e-4


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_rank_ends_the_job(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "finetune", *BASE, "trainer.max_steps=100000", "distributed=ddp",
           "distributed.timeout_s=30", "launcher.nproc_per_node=2",
           f"launcher.master_port={free_port()}", *TWO_PROCS, f"output_dir={out}"]
    launcher = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ENV}, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert launcher.poll() is None, launcher.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        workers = {int(p.environ().get("RANK", -1)): p for p in psutil.Process(launcher.pid).children()}
        workers[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = launcher.wait(timeout=60)
        assert code != 0
        assert time.monotonic() - killed < 60
        assert not workers[0].is_running() or workers[0].status() == psutil.STATUS_ZOMBIE
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
