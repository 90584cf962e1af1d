"""User-facing errors: each one is printed as a single line and ends the run with a non-zero exit.

Raise these (never a bare exception) for anything the user can fix: a bad config value, a bad
data row, a model that cannot be found. The message must say what is wrong, where (file, line,
key) and what to do.
"""


class FinetuneError(Exception):
    """Base class: a problem the user can fix. Printed as ``error: <message>``."""

    exit_code = 2


class ConfigError(FinetuneError):
    """The composed config is invalid (unknown key, wrong type, conflicting options)."""


class DataError(FinetuneError):
    """The dataset cannot be read or formatted (bad file, bad row, empty result)."""

    exit_code = 3


class ModelError(FinetuneError):
    """The model or tokenizer cannot be loaded (missing, offline, unsupported)."""

    exit_code = 4


class ResumeError(FinetuneError):
    """A checkpoint cannot be resumed with this config."""

    exit_code = 5
