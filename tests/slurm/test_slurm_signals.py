"""The sbatch scripts' preemption path with the real launcher and a tiny worker (no trainer).

`slurm/train.sbatch` runs `$FINETUNE_PYTHON -m finetune ...`; FINETUNE_PYTHON here is a small
script that calls the real `finetune.distributed.launch.launch` with a worker that counts the signals it
gets. This pins down the delivery chain: SLURM -> batch shell trap -> srun -> slurmstepd ->
every process of the step exactly once (the launcher must not forward again inside SLURM),
then exit 75 -> `scontrol requeue` -> the job runs again.
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from slurm_jobs import REPO, job_info, submit, wait_for, wait_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Stands in for `python -m finetune launcher.nproc_per_node=N ...` (the launcher part is real).
FAKE_PYTHON = textwrap.dedent(f"""\
    #!{sys.executable}
    import os, sys
    sys.path.insert(0, {str(REPO)!r})
    from finetune.distributed.launch import launch
    args = sys.argv[3:]  # after "-m finetune"
    kv = dict(a.split("=", 1) for a in args)
    n = int(kv["launcher.nproc_per_node"])
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
    sys.exit(launch([kv["output_dir"]], n, cmd=[sys.executable, worker], monitor_interval=0.1))
""")

WORKER = textwrap.dedent("""\
    import os, signal, sys, time
    out, rank = sys.argv[1], os.environ["RANK"]
    attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
    os.makedirs(out, exist_ok=True)
    got = []
    def on_sig(signum, frame):
        got.append(signum)
        with open(f"{out}/sig-{attempt}-{rank}", "a") as f:
            f.write(f"{signum}\\n")
    signal.signal(signal.SIGUSR1, on_sig)
    signal.signal(signal.SIGTERM, on_sig)
    open(f"{out}/ready-{attempt}-{rank}", "w").close()
    if attempt != "0":
        sys.exit(0)  # the requeued run: "resumed and finished"
    deadline = time.time() + 120
    while not got and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(3)  # a duplicate delivery would land here
    sys.exit(75 if got else 1)
""")


def test_usr1_reaches_each_worker_once_then_requeue(slurm_cluster, tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = submit("train.sbatch", f"output_dir={out}", log=log,
                 env={"FINETUNE_PYTHON": str(fake), "GPUS_PER_NODE": "2"})
    wait_for(lambda: all((out / f"ready-0-{r}").exists() for r in range(2)), 120,
             "both workers to start", job, log)
    # what `#SBATCH --signal=B:USR1@120` does at the time limit: signal the batch shell only
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
    info = wait_job(job, 300, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert int(info["Restarts"]) == 1, text
    assert "[train.sbatch] exit 75: requeueing" in text, text
    for r in range(2):
        assert (out / f"sig-0-{r}").read_text().split() == ["10"], f"rank {r}: {text}"
        assert (out / f"ready-1-{r}").exists()
    assert re.search(r"restart 1 on", text)
    assert job_info(job)["ExitCode"] == "0:0"

