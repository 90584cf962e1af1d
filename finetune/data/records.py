"""Records of the run's sources, weighted into a mixture and formatted (data.format).

Shared by the cached path (``finetune.data.prepare_data``) and streaming (``streaming.py``). A bad
record ends the run with one line naming its file:line, or is skipped and counted
(``data.on_bad_example``).
"""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig, OmegaConf

from finetune.data import formats, sources
from finetune.data.formats import CHAT_FORMATS
from finetune.data.tokenize import Stats
from finetune.errors import DataError


def source_list(data: DictConfig) -> list:
    """``data.sources`` when set, else the single source ``data.path`` (weight 1)."""
    if data.sources:
        return list(data.sources)
    return [OmegaConf.create({"path": data.path, "name": data.name, "split": data.split,
                              "revision": data.revision, "weight": 1.0, "format": None})]


def source_format(data: DictConfig, src) -> str:
    """A mixture source may use another chat format (alpaca + sharegpt, ...); nothing else mixes."""
    fmt = src.get("format") or data.format
    if fmt != data.format and not (fmt in CHAT_FORMATS and data.format in CHAT_FORMATS):
        raise DataError(f"data.sources: {src.path!r} has format={fmt} but data.format={data.format}; "
                        f"only the chat formats ({', '.join(CHAT_FORMATS)}) can be mixed")
    return fmt


def read_records(cfg: DictConfig, split: str | None = None):
    """(record, format) pairs of every source, mixture weights applied (see :func:`_weighted`)."""
    data = cfg.data
    for index, src in enumerate(source_list(data)):
        fmt = source_format(data, src)
        records = list(sources.read_source(src.path, name=src.name, split=split or src.split,
                                           revision=src.revision, text_column=data.columns.text))
        for rec in weighted(records, float(src.weight), [cfg.seed, index]):
            yield rec, fmt


def weighted(records: list, weight: float, seed: list[int]):
    """Mixture semantics (map-style data): a source contributes ``round(weight * len(source))``
    records: each record ``int(weight)`` times, plus a seeded sample without replacement of the
    fractional part (weight 0.5 = a random half, 2.5 = everything twice plus a random half),
    seeded with ``[seed, source index]``.
    The trainer shuffles rows, so the order of sources does not matter."""
    if weight == 1.0:
        return records
    if weight < 0:
        raise DataError(f"data.sources weight={weight} must be >= 0")
    whole, frac = int(weight), weight - int(weight)
    rng = np.random.default_rng(seed)
    extra = rng.choice(len(records), size=int(round(frac * len(records))), replace=False)
    return records * whole + [records[i] for i in sorted(extra)]


class FormattedItems(list):
    """Formatted examples, with ``origins[i]`` (file:line) of item i for errors found later
    (a chat the template cannot render is a bad row like a malformed one)."""

    def __init__(self):
        super().__init__()
        self.origins: list[str] = []


def bad_row(data, stats: Stats, origin: str, problem: str, fmt: str) -> None:
    """``data.on_bad_example``: end the run naming the row (error), or count and skip it."""
    if data.on_bad_example == "error":
        raise DataError(f"{origin}: {problem} (data.format={fmt}); fix the row or set "
                        "data.on_bad_example=skip to skip and count bad rows") from None
    stats.skipped_bad += 1
    if len(stats.bad_examples) < 5:
        stats.bad_examples.append(f"{origin}: {problem}")


def format_records(cfg: DictConfig, pairs, stats: Stats) -> FormattedItems:
    """Format every (record, format) pair; a bad one ends the run (default) or is skipped and counted."""
    data = cfg.data
    specs: dict[str, formats.FormatSpec] = {}
    out = FormattedItems()
    for rec, fmt in pairs:
        spec = specs.get(fmt) or specs.setdefault(fmt, formats.FormatSpec.from_config(data, fmt))
        stats.read += 1
        try:
            if isinstance(rec.row, dict) and "__error__" in rec.row:
                raise formats.BadExample(rec.row["__error__"])
            out.append(formats.format_record(rec.row, spec))
            out.origins.append(rec.origin)
        except formats.BadExample as exc:
            bad_row(data, stats, rec.origin, str(exc), fmt)
    return out
