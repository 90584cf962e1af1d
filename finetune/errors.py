"""User-facing errors and the process exit statuses that job scripts rely on (slurm/README.md).

Raise these (never a bare exception) for anything the user can fix: a bad config value, a bad
data row, a model that cannot be found. The message must say what is wrong, where (file, line,
key) and what to do; the entry point prints it as ``error: <message>`` (one line per problem)
and exits with the class's status:

| status | meaning |
|---|---|
| 0 ``EXIT_OK`` | the run finished |
| 2 ``EXIT_CONFIG_ERROR`` | bad config or usage (:class:`ConfigError`) |
| 3 | bad data (:class:`DataError`) |
| 4 | the model or tokenizer cannot be loaded (:class:`ModelError`) |
| 5 | a checkpoint cannot be resumed (:class:`ResumeError`) |
| 6 | Hub set-up or push (:class:`HubPushError`) |
| 7 | the exported model failed its logits check (:class:`ExportError`) |
| 8 | a checkpoint or ``final/`` could not be written: disk full, I/O error (:class:`CheckpointError`) |
| 9 | the loss or gradients became NaN / inf (``trainer.nonfinite=stop``, :class:`NonFiniteError`) |
| 75 ``EXIT_PREEMPTED`` | SIGTERM/SIGUSR1: the current step finished, a complete checkpoint was written; requeue with ``resume=auto`` (EX_TEMPFAIL) |
"""

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2
EXIT_PREEMPTED = 75


class FinetuneError(Exception):
    """Base class: a problem the user can fix. Printed as ``error: <message>``."""

    exit_code = EXIT_CONFIG_ERROR

    def lines(self) -> list[str]:
        return [str(self)]


class ConfigError(FinetuneError):
    """The composed config is invalid (unknown key, wrong type, conflicting options)."""


class ConfigErrors(ConfigError):
    """Several config problems found together: printed one line each."""

    def __init__(self, messages: list[str]):
        super().__init__("; ".join(messages))
        self.messages = list(messages)

    def lines(self) -> list[str]:
        return self.messages


class DataError(FinetuneError):
    """The dataset cannot be read or formatted (bad file, bad row, empty result)."""

    exit_code = 3


class ModelError(FinetuneError):
    """The model or tokenizer cannot be loaded (missing, offline, unsupported)."""

    exit_code = 4


class ResumeError(FinetuneError):
    """A checkpoint cannot be resumed with this config."""

    exit_code = 5


class HubPushError(FinetuneError):
    """A push to the Hub failed or was refused; the message is one line, token redacted."""

    exit_code = 6


class ExportError(FinetuneError):
    """The merged or exported model does not reproduce the adapter's outputs."""

    exit_code = 7


class CheckpointError(FinetuneError):
    """A checkpoint or ``final/`` could not be written (disk full, I/O error); nothing was
    published and the temp dir was removed."""

    exit_code = 8


class NonFiniteError(FinetuneError):
    """The loss or the gradients of a step are NaN or inf; the step was not applied."""

    exit_code = 9


class PreemptedAtStartup(FinetuneError):
    """SIGTERM / SIGUSR1 before the first step: nothing trained, nothing to resume."""

    exit_code = EXIT_PREEMPTED
