"""The one way components are picked by name: tasks, strategies, trackers, data formats.

A :class:`Registry` maps a config value (``model.task=causal-lm``) to where its implementation
lives (``"finetune.tasks.causal_lm:CausalLMTask"``). Implementations are imported only when
chosen, so a heavy optional dependency (DeepSpeed, wandb) costs nothing unless used, and the base
module of a kind never imports its implementations (no import cycles). The valid choices in
config errors come from the same table, so they can never disagree with what can be built.

A value of the form ``package.module:Name`` that is not registered is imported as given: a task
(or strategy) defined outside finetune/ is used without editing the package.
"""

from __future__ import annotations

import importlib
from typing import Any

from finetune.errors import ConfigError


class Registry:
    def __init__(self, key: str, entries: dict[str, str]):
        self.key = key  # the config key that picks from this registry, for messages
        self.entries = dict(entries)

    def choices(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def register(self, name: str, target: str | Any) -> None:
        """Add an entry: an import path ``module:Name`` or the object itself."""
        self.entries[name] = target

    def check(self, value: str) -> str | None:
        """None when ``value`` can be built, else the one-line problem (for config validation)."""
        if value in self.entries:
            return None
        if isinstance(value, str) and ":" in value:
            try:
                self._load(value)
            except ConfigError as exc:
                return str(exc)
            return None
        return f"{self.key}={value!r} is not valid; choose one of: {', '.join(self.entries)}"

    def get(self, value: str) -> Any:
        problem = self.check(value)
        if problem:
            raise ConfigError(problem)
        return self._load(self.entries.get(value, value))

    def _load(self, target: str | Any) -> Any:
        if not isinstance(target, str):
            return target
        module, _, name = target.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{self.key}={target!r} cannot be imported ({type(exc).__name__}: "
                              f"{exc}); give an importable package.module:Name") from None
