"""Process exit statuses that job scripts rely on (see slurm/README.md).

- ``EXIT_OK`` (0): the run finished.
- ``EXIT_CONFIG_ERROR`` (2): bad config / usage; other user errors use 3-5 (see finetune.errors).
- ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL): a SIGTERM/SIGUSR1 arrived, the run finished its current
  optimizer step, wrote a complete checkpoint and stopped. Requeue the job with ``resume=auto``.
"""

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2
EXIT_PREEMPTED = 75
