"""One live run per run dir: ``<run_dir>/.lock`` names its holder.

The lock file is JSON: ``host``, ``pid``, ``started`` (unix time), ``proc_start`` (the pid's start
time from ``/proc``, to tell a reused pid), ``slurm_job`` / ``slurm_restart`` and a random
``token``. It is written complete to a private temp file and then hard-linked to ``.lock`` (an
exclusive create: a reader never sees half a lock; ``O_CREAT | O_EXCL`` where links are not
supported). A second run finds it and:

- refuses with one ConfigError line naming the holder's host and pid when the holder may be
  alive (same host and the pid runs the same process, or another host: it cannot be checked);
- takes it over with a warning when it is stale: same host and the pid is gone (or now another
  process), or the holder was an earlier incarnation of this same SLURM job (a requeue after the
  node died), or the file is not a lock at all. Two processes taking over one stale lock at once
  are serialised by ``flock`` on ``.lock.takeover``: exactly one wins.

Only the main process of a run takes the lock (other ranks share its dir). ``release()`` (or
leaving the ``with`` block, or interpreter exit) removes the file if it is still ours.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from finetune.errors import ConfigError
from finetune.train.run_dir import ensure_run_dir

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


def proc_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


class RunLock:
    """``with RunLock(run_dir):`` or ``lock = RunLock(run_dir).acquire()`` ... ``lock.release()``."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.held = False
        self._stale_taken: str | None = None  # the warning to log once our lock is in place

    # ------------------------------------------------------------------ public
    def acquire(self) -> "RunLock":
        ensure_run_dir(self.run_dir)
        me = self._record()
        for _ in range(10):
            if self._create(me):
                self.held = True
                atexit.register(self.release)
                if self._stale_taken:
                    log.warning("%s", self._stale_taken)
                return self
            holder = self._read()
            if holder is None:  # released (or taken over) between create and read: try again
                continue
            why_stale = self._stale(holder)
            if why_stale is None:
                raise ConfigError(self._refusal(holder))
            self._take_over(holder, why_stale)
        raise ConfigError(f"output_dir={self.run_dir}: could not take {self.path} (other runs keep "
                          "replacing it); make sure one run uses this output_dir")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self._read()
        if isinstance(holder, dict) and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ----------------------------------------------------------------- details
    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                "proc_start": proc_start(os.getpid()), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart": _env_int("SLURM_RESTART_COUNT") or 0, "token": self.token}

    def _create(self, me: dict) -> bool:
        """Publish our lock if there is none; False when one exists."""
        data = json.dumps(me, indent=1).encode()
        tmp = self.run_dir / f"{LOCK_NAME}.{me['host']}.{me['pid']}.{self.token[:8]}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError as exc:  # no hard links here (some FUSE / object-store mounts)
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
            return self._create_exclusive(data)
        finally:
            tmp.unlink(missing_ok=True)

    def _create_exclusive(self, data: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _read(self) -> dict | str | None:
        """The holder's record; its raw text when it does not parse; None when there is no lock."""
        for attempt in range(20):
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return None
            except OSError as exc:
                return f"<unreadable: {exc.strerror}>"
            try:
                holder = json.loads(text)
                if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                    return holder
            except ValueError:
                pass
            if attempt < 19 and time.time() - self._mtime() < 2:
                time.sleep(0.1)  # an O_EXCL lock being written (no hard links): wait for it
                continue
            return text[:80]
        return None

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _stale(self, holder: dict | str) -> str | None:
        """Why the lock is stale, or None when its holder may be alive."""
        if not isinstance(holder, dict):
            return f"the file is not a lock ({holder!r})"
        job, restart = os.environ.get("SLURM_JOB_ID"), _env_int("SLURM_RESTART_COUNT") or 0
        if job and holder.get("slurm_job") == job and (holder.get("slurm_restart") or 0) < restart:
            return f"it was taken by an earlier run of SLURM job {job} (now requeued)"
        if holder.get("host") != socket.gethostname():
            return None
        pid = holder["pid"]
        if not _pid_alive(pid):
            return f"pid {pid} no longer runs"
        recorded, now = holder.get("proc_start"), proc_start(pid)
        if recorded and now and recorded != now:
            return f"pid {pid} is another process now"
        return None

    def _refusal(self, holder: dict) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started") or 0))
        job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        return (f"output_dir={self.run_dir} is in use by another run (host {holder.get('host')}, "
                f"pid {holder['pid']}{job}, started {started}); wait for it to finish or choose "
                f"another output_dir; if that run is gone, delete {self.path}")

    def _take_over(self, holder: dict | str, why: str) -> None:
        guard = self.run_dir / f"{LOCK_NAME}.takeover"
        with open(guard, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # one taker at a time; released when fh closes
            if self._read() == holder:  # still the stale lock we judged (not a new live one)
                self.path.unlink(missing_ok=True)
                who = (f"host {holder.get('host')}, pid {holder.get('pid')}"
                       if isinstance(holder, dict) else "unknown holder")
                self._stale_taken = f"taking over the stale lock {self.path} ({who}): {why}"
