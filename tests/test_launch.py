"""finetune.distributed.launch with real processes: a tiny worker script (not the trainer) written here.

The worker records its torchrun environment, then behaves as ``WORKER_MODE`` says. Bounded
timeouts only detect hangs; nothing asserts speed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from finetune.errors import EXIT_PREEMPTED
from finetune.distributed.launch import launch

WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    mode = os.environ["WORKER_MODE"]
    keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
            "MASTER_ADDR", "MASTER_PORT", "FINETUNE_LAUNCHED"]
    with open(f"{out}/env-{rank}.json", "w") as f:
        json.dump({k: os.environ.get(k) for k in keys} | {"argv": sys.argv[2:]}, f)
    got = []
    def on_sig(signum, frame):
        got.append(signum)
        with open(f"{out}/sig-{rank}.txt", "a") as f:
            f.write(f"{signum}\\n")
    signal.signal(signal.SIGUSR1, on_sig)
    signal.signal(signal.SIGTERM, on_sig)
    open(f"{out}/ready-{rank}", "w").close()
    if mode == "ok":
        sys.exit(0)
    if mode == "preempt":
        sys.exit(75)
    if mode in ("exit3", "kill9"):
        if rank == 1:
            time.sleep(0.5)
            if mode == "exit3":
                sys.exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a peer stuck in a collective
        while True:
            time.sleep(1)
    if mode == "signal":  # wait for the first signal, linger to catch a duplicate, exit 75
        deadline = time.time() + 60
        while not got and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(2)
        sys.exit(75 if got else 1)
""")


@pytest.fixture
def worker(tmp_path, monkeypatch):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)  # behave as outside SLURM even when pytest runs in a job
    return path


def _run(worker: Path, out: Path, mode: str, nproc: int = 2, **kw) -> int:
    os.environ["WORKER_MODE"] = mode
    try:
        return launch([str(out), "a=1", "b.c=x"], nproc_per_node=nproc,
                      cmd=[sys.executable, str(worker)], monitor_interval=0.1, **kw)
    finally:
        del os.environ["WORKER_MODE"]


def test_env_per_rank(worker, tmp_path):
    assert _run(worker, tmp_path, "ok", nproc=3, nnodes=2, node_rank=1, master_addr="n1",
                master_port=1234) == 0
    for local in range(3):
        env = json.loads((tmp_path / f"env-{3 + local}.json").read_text())
        assert env == {"RANK": str(3 + local), "LOCAL_RANK": str(local), "WORLD_SIZE": "6",
                       "LOCAL_WORLD_SIZE": "3", "GROUP_RANK": "1", "NODE_RANK": "1",
                       "MASTER_ADDR": "n1", "MASTER_PORT": "1234", "FINETUNE_LAUNCHED": "1",
                       "argv": ["a=1", "b.c=x"]}


@pytest.mark.parametrize("mode,expected", [("exit3", 3), ("kill9", 128 + 9)])
def test_dead_worker_stops_the_others(worker, tmp_path, mode, expected):
    start = time.monotonic()
    rc = _run(worker, tmp_path, mode, grace_s=2.0)
    assert rc == expected
    assert time.monotonic() - start < 60  # hang detection only: rank 0 would sleep forever


def test_all_preempted(worker, tmp_path):
    assert _run(worker, tmp_path, "preempt") == EXIT_PREEMPTED


def test_bad_sizes_rejected(worker, tmp_path):
    with pytest.raises(ValueError):
        launch([], nproc_per_node=0)
    with pytest.raises(ValueError):
        launch([], nproc_per_node=1, nnodes=2, node_rank=2)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_reaches_each_worker_once(worker, tmp_path, sig):
    """The launcher runs as its own process; the signal goes to it alone, like `kill -USR1 PID`."""
    code = (f"import sys; from finetune.distributed.launch import launch; "
            f"sys.exit(launch([{str(tmp_path)!r}], nproc_per_node=2, "
            f"cmd=[sys.executable, {str(worker)!r}], monitor_interval=0.1))")
    env = dict(os.environ, WORKER_MODE="signal")
    launcher = subprocess.Popen([sys.executable, "-c", code], env=env,
                                cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{r}").exists() for r in range(2)):
            assert time.monotonic() < deadline and launcher.poll() is None, "workers never started"
            time.sleep(0.05)
        launcher.send_signal(sig)
        assert launcher.wait(timeout=60) == EXIT_PREEMPTED
    finally:
        if launcher.poll() is None:
            launcher.kill()
    for r in range(2):
        assert (tmp_path / f"sig-{r}.txt").read_text().split() == [str(int(sig))]
