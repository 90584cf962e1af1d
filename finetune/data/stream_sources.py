"""Sources read lazily, each with a JSON-serialisable position to resume from exactly.

- Local JSON-lines files (``.jsonl``, or ``.json`` holding one object per line): the position is
  a byte offset, so resuming seeks straight to the next record, whatever the file size.
- Other local files (JSON array, CSV, Parquet, Arrow, TXT): a record index within the file; resuming
  re-reads and discards the records before it (no formatting, no tokenisation) - these formats
  cannot be entered in the middle without parsing what comes before.
- Hub datasets (and local dataset repos) through ``datasets.load_dataset(streaming=True)``: the
  position is the ``IterableDataset.state_dict()`` that datasets>=3 restores with
  ``load_state_dict``.

Local files are checked like the map-style path's (``sources.check_file``: binary, not UTF-8,
empty, unreadable, symlink loop, bad magic number) when the reader is opened, and damage found
while streaming becomes the same one-line DataError naming the file.

A :class:`Mixture` draws each next record from one of its sources at random, with probability
proportional to the source's weight among the sources not yet exhausted (seeded; the generator
state is part of the position), until every source is exhausted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from finetune.data import sources
from finetune.data.sources import Record
from finetune.errors import DataError


def _is_json_lines(path: Path) -> bool:
    if path.suffix == ".jsonl":
        return True
    if path.suffix != ".json":
        return False
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip()
    return not head.startswith(b"[")


class LocalReader:
    """Records of local files from ``position = {"file", "offset", "row", "line"}``."""

    def __init__(self, path: str, text_column: str, position: dict | None = None):
        self.files = sources.resolve_files(path)
        self.text_column = text_column
        self.position = dict(position or {"file": 0, "offset": 0, "row": 0, "line": 0})

    def __iter__(self) -> Iterator[Record]:
        pos = self.position
        while pos["file"] < len(self.files):
            f = self.files[pos["file"]]
            with sources.reading(f):
                yield from (self._json_lines(f) if _is_json_lines(f) else self._indexed(f))
            pos.update(file=pos["file"] + 1, offset=0, row=0, line=0)

    def _json_lines(self, f: Path) -> Iterator[Record]:
        pos = self.position
        with f.open("rb") as fh:
            fh.seek(pos["offset"])
            for raw in fh:
                pos["offset"] += len(raw)
                pos["line"] += 1
                if not raw.strip():
                    continue
                pos["row"] += 1
                yield Record(sources.parse_json_line(raw), f"{f}:{pos['line']}")

    def _indexed(self, f: Path) -> Iterator[Record]:
        pos = self.position
        for i, rec in enumerate(sources.read_local([f], self.text_column)):
            if i < pos["row"]:
                continue
            pos["row"] = i + 1
            yield rec


class HubReader:
    """Records of a streamed ``datasets.IterableDataset``; position = its ``state_dict()``."""

    def __init__(self, src, position: dict | None = None):
        self.src = src
        self.dataset = sources.load_hub(src.path, name=src.name, split=src.split,
                                        revision=src.revision, streaming=True)
        self.row = 0
        if position:
            self.dataset.load_state_dict(position["state"])
            self.row = position["row"]

    @property
    def position(self) -> dict:
        return {"state": self.dataset.state_dict(), "row": self.row}

    def __iter__(self) -> Iterator[Record]:
        for row in self.dataset:
            self.row += 1
            yield Record(row, f"{self.src.path}[{self.src.split}]#row{self.row - 1}")


def open_reader(src, text_column: str, position: dict | None = None):
    if sources.is_local_source(src.path):
        return LocalReader(src.path, text_column, position)
    return HubReader(src, position)


class Mixture:
    """Weighted random interleaving of streamed sources; ``position`` resumes it exactly."""

    def __init__(self, srcs: list, formats: list[str], text_column: str, seed: int,
                 position: dict | None = None):
        self.srcs, self.formats, self.text_column = srcs, formats, text_column
        weights = np.array([float(s.weight) for s in srcs])
        if (weights < 0).any() or weights.sum() <= 0:
            raise DataError(f"data.sources weights {weights.tolist()} must be >= 0 with a "
                                    "positive sum")
        self.weights = weights
        self.rng = np.random.default_rng(seed)
        self.exhausted = [bool(w == 0) for w in weights]
        positions = [None] * len(srcs)
        if position:
            self.rng.bit_generator.state = position["rng"]
            self.exhausted = list(position["exhausted"])
            positions = position["sources"]
        self.readers = [open_reader(s, text_column, p) for s, p in zip(srcs, positions)]
        self.iters = [iter(r) for r in self.readers]

    @property
    def position(self) -> dict:
        return {"sources": [r.position for r in self.readers], "exhausted": list(self.exhausted),
                "rng": self.rng.bit_generator.state}

    def __iter__(self) -> Iterator[tuple[Record, str]]:
        while not all(self.exhausted):
            live = np.array([0.0 if done else w for done, w in zip(self.exhausted, self.weights)])
            k = 0 if len(live) == 1 else int(self.rng.choice(len(live), p=live / live.sum()))
            rec = next(self.iters[k], None)
            if rec is None:
                self.exhausted[k] = True
                continue
            yield rec, self.formats[k]
