"""Two runs in one output_dir: ``RunLock`` refuses a second live holder with one line, takes over
a stale lock (dead pid on this host, a reused pid, an earlier run of a requeued SLURM job) with a
warning, and releases on exit. The holders are real separate processes.

Also ``ensure_run_dir``: a run dir that cannot be created or written is one ConfigError line.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.errors import ConfigError
from finetune.train.run_dir import ensure_run_dir
from finetune.train.run_lock import RunLock, proc_start

REPO = Path(__file__).resolve().parent.parent
HOLDER = """
import sys, time
from pathlib import Path
from finetune.train.run_lock import RunLock
Path(sys.argv[2]).parent.mkdir(parents=True, exist_ok=True)
while not Path(sys.argv[2]).exists():  # a start barrier shared by racing holders
    time.sleep(0.005)
try:
    lock = RunLock(Path(sys.argv[1])).acquire()
except Exception as exc:
    print("refused:", exc, flush=True)
    sys.exit(2)
print("held", flush=True)
time.sleep(float(sys.argv[3]))
lock.release()
print("released", flush=True)
"""


def _holder(run_dir: Path, go: Path, hold_s: float = 60.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(go), str(hold_s)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_held(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline().strip()
    assert line == "held", (line, proc.stderr.read() if proc.poll() is not None else "")


def test_acquire_writes_the_holder_and_release_removes_it(tmp_path):
    run_dir = tmp_path / "new" / "run"  # created by acquire
    with RunLock(run_dir) as lock:
        holder = json.loads((run_dir / ".lock").read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        assert holder["proc_start"] == proc_start(os.getpid()) and holder["token"] == lock.token
        assert abs(holder["started"] - time.time()) < 60
        assert [p.name for p in run_dir.iterdir()] == [".lock"]  # no temp file left
    assert not (run_dir / ".lock").exists()


def test_a_second_live_holder_is_refused_with_one_line(tmp_path):
    run_dir, go = tmp_path / "run", tmp_path / "go"
    go.touch()
    proc = _holder(run_dir, go)
    try:
        _wait_held(proc)
        with pytest.raises(ConfigError) as err:
            RunLock(run_dir).acquire()
        msg = str(err.value)
        assert "\n" not in msg and err.value.exit_code == 2
        assert f"output_dir={run_dir} is in use by another run (host {socket.gethostname()}, " \
               f"pid {proc.pid}, started " in msg
        assert f"delete {run_dir / '.lock'}" in msg
        assert json.loads((run_dir / ".lock").read_text())["pid"] == proc.pid  # untouched
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    run_dir, go = tmp_path / "run", tmp_path / "go"
    go.touch()
    proc = _holder(run_dir, go)
    _wait_held(proc)
    proc.send_signal(signal.SIGKILL)  # kill -9: no release, the lock stays behind
    proc.wait()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == proc.pid
    with caplog.at_level(logging.WARNING, logger="finetune.train.run_lock"):
        lock = RunLock(run_dir).acquire()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock {run_dir / '.lock'}" in caplog.text
    assert f"pid {proc.pid} no longer runs" in caplog.text
    lock.release()
    assert not (run_dir / ".lock").exists()


def test_a_holder_that_exits_normally_releases(tmp_path):
    run_dir, go = tmp_path / "run", tmp_path / "go"
    go.touch()
    proc = _holder(run_dir, go, hold_s=0.1)
    _wait_held(proc)
    assert proc.wait(timeout=30) == 0
    assert not (run_dir / ".lock").exists()
    RunLock(run_dir).acquire().release()


def _fake_lock(run_dir: Path, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time() - 3600,
              "proc_start": proc_start(os.getpid()), "slurm_job": None, "slurm_restart": 0,
              "token": "x" * 32, **fields}
    (run_dir / ".lock").write_text(json.dumps(record))


def test_a_lock_from_another_host_is_refused(tmp_path):
    _fake_lock(tmp_path, host="gpu-node-17", pid=4242)
    with pytest.raises(ConfigError, match=r"host gpu-node-17, pid 4242, started .*if that run is gone, delete"):
        RunLock(tmp_path).acquire()


def test_a_reused_pid_is_stale(tmp_path, caplog):
    """The pid runs, but it is another process than the one that took the lock."""
    _fake_lock(tmp_path, pid=os.getpid(), proc_start="1")
    with caplog.at_level(logging.WARNING, logger="finetune.train.run_lock"):
        RunLock(tmp_path).acquire().release()
    assert f"pid {os.getpid()} is another process now" in caplog.text


def test_a_requeued_slurm_job_takes_over_its_earlier_run(tmp_path, caplog, monkeypatch):
    _fake_lock(tmp_path, host="node-that-died", pid=99, slurm_job="1234", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with caplog.at_level(logging.WARNING, logger="finetune.train.run_lock"):
        RunLock(tmp_path).acquire().release()
    assert "earlier run of SLURM job 1234 (now requeued)" in caplog.text
    monkeypatch.setenv("SLURM_JOB_ID", "999")  # another job: the holder may be alive
    _fake_lock(tmp_path, host="node-that-died", pid=99, slurm_job="1234", slurm_restart=0)
    with pytest.raises(ConfigError, match="SLURM job 1234"):
        RunLock(tmp_path).acquire()


def test_a_file_that_is_not_a_lock_is_replaced(tmp_path, caplog):
    (tmp_path / ".lock").write_text("garbage")
    os.utime(tmp_path / ".lock", (time.time() - 60, time.time() - 60))
    with caplog.at_level(logging.WARNING, logger="finetune.train.run_lock"):
        RunLock(tmp_path).acquire().release()
    assert "the file is not a lock ('garbage')" in caplog.text


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = RunLock(tmp_path).acquire()
    _fake_lock(tmp_path, host="elsewhere")  # replaced by hand
    lock.release()
    assert json.loads((tmp_path / ".lock").read_text())["host"] == "elsewhere"


def test_racing_takeovers_of_one_stale_lock_leave_exactly_one_holder(tmp_path):
    run_dir, go = tmp_path / "run", tmp_path / "go"
    _fake_lock(run_dir, pid=2 ** 22 + 7, proc_start=None)  # a pid that does not run
    procs = [_holder(run_dir, go, hold_s=3) for _ in range(4)]
    time.sleep(1.0)  # all started and waiting at the barrier
    go.touch()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    held = [o for o in outs if o.startswith("held")]
    refused = [o for o in outs if o.startswith("refused:")]
    assert len(held) == 1 and len(refused) == 3, outs
    assert all("is in use by another run" in o for o in refused)
    assert not (run_dir / ".lock").exists()  # the winner released it


# ----------------------------------------------------------------------------- ensure_run_dir
def test_ensure_run_dir_creates_parents_and_returns_the_resolved_path(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    assert ensure_run_dir(target) == target.resolve() and target.is_dir()
    assert ensure_run_dir(target) == target.resolve()  # an existing writable dir is fine
    assert list(target.iterdir()) == []  # the write probe is removed


@pytest.mark.parametrize("case", ["proc", "under-a-file", "is-a-file", "proc-itself"])
def test_ensure_run_dir_refuses_with_one_line(tmp_path, case):
    (tmp_path / "f").write_text("x")
    path, phrase = {
        "proc": (Path("/proc/x"), "cannot create /proc/x ("),
        "under-a-file": (tmp_path / "f" / "run", "(Not a directory)"),
        "is-a-file": (tmp_path / "f", "(a file of that name exists)"),
        "proc-itself": (Path("/proc"), "cannot write in /proc ("),
    }[case]
    with pytest.raises(ConfigError) as err:
        ensure_run_dir(path)
    msg = str(err.value)
    assert msg.startswith(f"output_dir={path}: ") and phrase in msg
    assert msg.endswith("; choose a writable directory") and "\n" not in msg
