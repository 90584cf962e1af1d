"""Preemption: SIGTERM / SIGUSR1 (SLURM's early warning) ask the run to stop cleanly.

The first signal sets a flag; the trainer finishes the current optimizer step, writes a
checkpoint and exits with ``EXIT_PREEMPTED`` (75) so the job script can requeue it. A second
signal means "now": the process exits at once (a published checkpoint is never half-written, so
this is safe).
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self):
        self.requested: int | None = None
        self._previous = {}

    def install(self) -> "PreemptionHandler":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            os.write(2, f"finetune: second signal {signum}: aborting now\n".encode())
            os._exit(128 + signum)
        self.requested = signum
        os.write(2, f"finetune: signal {signum}: checkpointing after this step, then exiting 75\n".encode())

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
