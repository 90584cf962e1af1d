"""The project's own launcher: N worker processes per node with torchrun's environment.

``python -m finetune launcher.nproc_per_node=N ...`` ends up in :func:`launch`, which starts
``N`` copies of ``python -m finetune <same overrides>`` with the variables ``torchrun`` would set
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``NODE_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) plus ``FINETUNE_LAUNCHED=1`` so a worker does not launch again.
For several nodes, run one launcher per node (``slurm/multinode.sbatch`` does it with ``srun``)
with ``nnodes``/``node_rank``/``master_addr``/``master_port``.

Exit status (see :mod:`finetune.errors`):

- all workers exit 0 -> 0;
- a worker exits non-zero with anything but ``EXIT_PREEMPTED`` (or dies from a signal, reported
  as 128+signal) -> the others get SIGTERM, then SIGKILL after ``grace_s``, and that code is
  returned; the launcher never waits on peers stuck in a collective;
- workers exit ``EXIT_PREEMPTED`` (75: checkpoint written) -> 75 once all have exited; ranks that
  have not exited ``preempt_grace_s`` after the first 75 are terminated as above.

Signals (exactly-once delivery matters: the trainer reads a *second* SIGUSR1/SIGTERM as "abort
now, skip the checkpoint"). The launcher survives SIGUSR1/SIGTERM/SIGINT and:

- outside SLURM (``forward_signals=True``): workers start in their own session, so terminal and
  ``kill`` signals reach only the launcher, which forwards each received signal exactly once to
  every live worker (SIGINT is forwarded as SIGTERM: checkpoint and stop);
- inside a SLURM job (``SLURM_JOB_ID`` set, ``forward_signals=False``): slurmstepd signals every
  process of the step (the whole process tree with proctrack/linuxproc, the cgroup with
  proctrack/cgroup, the process group with proctrack/pgid), so workers stay in the launcher's
  process group and the launcher does *not* forward: each worker already got the signal once.
  ``FINETUNE_LAUNCHER_FORWARD_SIGNALS=0|1`` overrides the choice.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

from finetune.errors import EXIT_OK, EXIT_PREEMPTED

_HANDLED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def worker_env(local_rank: int, nproc_per_node: int, nnodes: int, node_rank: int,
               master_addr: str, master_port: int, base: Optional[dict] = None) -> dict:
    """The environment of one worker: ``base`` (default ``os.environ``) plus torchrun's variables."""
    env = dict(os.environ if base is None else base)
    world = nnodes * nproc_per_node
    rank = node_rank * nproc_per_node + local_rank
    env.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(nproc_per_node), GROUP_RANK=str(node_rank),
               NODE_RANK=str(node_rank), ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(world),
               MASTER_ADDR=str(master_addr), MASTER_PORT=str(master_port), FINETUNE_LAUNCHED="1")
    if nproc_per_node > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does: N procs must not oversubscribe
    return env


def _code(returncode: int) -> int:
    """Popen's returncode as a shell would report it (killed by signal N -> 128+N)."""
    return 128 - returncode if returncode < 0 else returncode


def _stop(procs: list[subprocess.Popen], grace_s: float, own_session: bool) -> None:
    """SIGTERM every live worker, then SIGKILL (its whole group if it has one) after grace_s."""
    for p in procs:
        if p.poll() is None:
            _send(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL) if own_session else p.kill()
            except (ProcessLookupError, PermissionError):
                pass
    for p in procs:
        p.wait()


def _send(p: subprocess.Popen, sig: int) -> None:
    try:
        p.send_signal(sig)
    except ProcessLookupError:
        pass


def launch(argv: list[str], nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
           master_addr: str = "127.0.0.1", master_port: int = 29500,
           monitor_interval: float = 0.5, *, cmd: Optional[Sequence[str]] = None,
           forward_signals: Optional[bool] = None, grace_s: float = 10.0,
           preempt_grace_s: float = 60.0) -> int:
    """Run ``nproc_per_node`` workers of ``cmd + argv`` on this node; return the node's status.

    ``cmd`` defaults to ``[sys.executable, "-m", "finetune"]``. ``forward_signals`` defaults to
    ``FINETUNE_LAUNCHER_FORWARD_SIGNALS`` if set, else "not inside a SLURM job" (module docs).
    Must run in the main thread (it installs signal handlers; the old ones are restored).
    """
    if nproc_per_node < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"bad launcher sizes: nproc_per_node={nproc_per_node} nnodes={nnodes} "
                         f"node_rank={node_rank}")
    if forward_signals is None:
        env_choice = os.environ.get("FINETUNE_LAUNCHER_FORWARD_SIGNALS")
        forward_signals = (env_choice != "0") if env_choice else "SLURM_JOB_ID" not in os.environ
    prefix = list(cmd) if cmd is not None else [sys.executable, "-m", "finetune"]
    received: list[int] = []  # signals not yet handled by the monitor loop

    def on_signal(signum, _frame):
        received.append(signum)

    old = {s: signal.signal(s, on_signal) for s in _HANDLED}
    procs: list[subprocess.Popen] = []
    try:
        for local_rank in range(nproc_per_node):
            env = worker_env(local_rank, nproc_per_node, nnodes, node_rank, master_addr, master_port)
            procs.append(subprocess.Popen(prefix + list(argv), env=env,
                                          start_new_session=forward_signals))
        first_preempt: Optional[float] = None
        while True:
            while received:
                sig = received.pop(0)
                if forward_signals:
                    fwd = signal.SIGTERM if sig == signal.SIGINT else sig
                    for p in procs:
                        if p.poll() is None:
                            _send(p, fwd)
            codes = [p.poll() for p in procs]
            failed = [_code(c) for c in codes if c is not None and c not in (EXIT_OK, EXIT_PREEMPTED)]
            if failed:
                print(f"finetune.launch: a worker exited with status {failed[0]}; stopping the others",
                      file=sys.stderr, flush=True)
                _stop(procs, grace_s, forward_signals)
                return failed[0]
            if EXIT_PREEMPTED in codes and first_preempt is None:
                first_preempt = time.monotonic()
            if all(c is not None for c in codes):
                return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else EXIT_OK
            if first_preempt is not None and time.monotonic() - first_preempt > preempt_grace_s:
                print("finetune.launch: workers still running after a preempted peer; stopping them",
                      file=sys.stderr, flush=True)
                _stop(procs, grace_s, forward_signals)
                return EXIT_PREEMPTED
            time.sleep(monitor_interval)
    finally:
        if any(p.poll() is None for p in procs):  # unexpected error in the launcher itself
            _stop(procs, grace_s, forward_signals)
        for s, h in old.items():
            signal.signal(s, h)
