"""Turn Hydra / OmegaConf composition errors into one line: the key, what is wrong, the fix."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, MissingMandatoryValue,
                              OmegaConfBaseException, ValidationError)


def _root_cause(exc: BaseException) -> BaseException:
    seen = exc
    while seen.__cause__ is not None or (seen.__context__ is not None and not seen.__suppress_context__):
        seen = seen.__cause__ or seen.__context__
    return seen


def _group_choices(config_dir: str, group: str) -> list[str]:
    folder = Path(config_dir) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _valid_keys(dotted_parent: str) -> list[str]:
    from finetune.config.schema import RunConfig

    node = OmegaConf.structured(RunConfig)
    if dotted_parent:
        node = OmegaConf.select(node, dotted_parent)
    return sorted(node.keys()) if node is not None and hasattr(node, "keys") else []


def _unknown_key(full_key: str) -> str:
    parent, _, leaf = full_key.rpartition(".")
    keys = _valid_keys(parent)
    close = difflib.get_close_matches(leaf, keys, n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
    where = f"under {parent}" if parent else "at the top level"
    return f"unknown key {full_key!r}{hint}; valid keys {where}: {', '.join(keys)}"


def explain(exc: Exception, overrides: list[str], config_dir: str) -> str:
    text = str(exc)
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text) or \
        re.search(r"In '[^']+': Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, name = missing.groups()
        choices = _group_choices(config_dir, group)
        return f"{group}={name} is not a known {group}; valid choices: {', '.join(choices)}"
    cause = _root_cause(exc)
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None) or ""
        if isinstance(cause, MissingMandatoryValue):
            return f"{key} is required but not set; pass {key}=<value>"
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            m = re.search(r"Key '([^']+)' (?:is )?not in struct", str(cause))
            override = re.search(r"Could not (?:override|append to) '([^']+)'", text)
            full = override.group(1) if override else (f"{key}" if key else (m.group(1) if m else "?"))
            return _unknown_key(full)
        if isinstance(cause, ValidationError):
            value = getattr(cause, "value", None)
            msg = str(cause).splitlines()[0]
            return f"{key}={value!r} has the wrong type ({msg}); fix the value of {key}"
    if "mismatched input" in text or "no viable alternative" in text or "extraneous input" in text:
        return f"could not parse the overrides {overrides}: use key=value (quote values with spaces)"
    return text.splitlines()[0] if text else type(exc).__name__


def override_named(exc: Exception, overrides: list[str]) -> str | None:
    """The override that caused ``exc`` (so the others can be checked too), or None if unknown."""
    text = str(exc)
    cause = _root_cause(exc)
    named = {getattr(cause, "full_key", None) or ""}
    for pattern in (r"Could not find '([^']+)/", r"Could not (?:override|append to) '([^']+)'",
                    r"Key '([^']+)' (?:is )?not in struct"):
        named |= set(re.findall(pattern, text))
    keys = {o: o.split("=", 1)[0].lstrip("+~") for o in overrides}
    exact = [o for o, k in keys.items() if k in named]
    if exact:
        return exact[-1]  # the last one wins in Hydra, so it is the one that failed
    mentioned = sorted((o for o, k in keys.items() if k and k in text), key=lambda o: -len(keys[o]))
    return mentioned[0] if mentioned else None
