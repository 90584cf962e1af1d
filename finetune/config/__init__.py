"""The run's config: the schema (``schema.py``), its checks (``validate.py``) and the one-line
explanation of a composition error (``explain.py``)."""

from finetune.config.schema import RunConfig, register_configs
from finetune.config.validate import problems, validate

__all__ = ["RunConfig", "register_configs", "problems", "validate"]
