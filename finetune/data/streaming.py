"""Streaming mode (``data.streaming=true``): rows built on the fly, for data larger than memory or disk.

Records are read lazily (:mod:`finetune.data.stream_sources`), formatted and tokenised in chunks
of :data:`CHUNK` records by the same functions as the cached path, then - with ``data.packing`` -
packed best-fit-decreasing within a buffer of ``data.stream_buffer`` examples. Examples of the
worst-filled rows of a buffer (below 90% full, at most a tenth of the rows, each example once)
are carried into the next buffer instead of being emitted half empty. Nothing is cached on disk.

How the trainer uses it (``prepared.train`` is a :class:`StreamingRows`)::

    for micro in rows.micro_batches(rank, world_size, micro_batch_size, grad_accum, collate):
        ...  # grad_accum micro-batches per optimizer step, then the step
    state = rows.state_dict(step)  # after `step` optimizer steps; saved in the checkpoint (JSON)
    rows.load_state_dict(state) # on resume, before the first micro_batches() call

Every rank reads the same stream and takes its slice of each step's
``world_size * micro_batch_size * grad_accum`` rows (:func:`finetune.data.packing.split_step`, as
for map-style data), so
the position is the same on every rank. ``state_dict(step)`` is the position after ``step``
optimizer steps (the last two drawn are kept): source positions, the mixture's random state, the examples waiting in
the packing buffer and the rows packed but not yet emitted. A resumed run therefore sees exactly
the rows an uninterrupted one would. When every source is exhausted, the next epoch starts over
(mixture draws re-seeded with the epoch).

Eval data is materialised (map-style :class:`TokenRows`): ``data.eval_split``, or the first
``data.eval_size`` records of the stream (a count: the stream's size is unknown), which the
training stream then skips.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
from omegaconf import DictConfig

from finetune.data.packing import pack_examples, split_step
from finetune.data.records import format_records
from finetune.data.stream_sources import Mixture
from finetune.data.tokenize import Stats
from finetune.errors import DataError

CHUNK = 256  # records formatted + tokenised per batch call


def encode_chunk(cfg: DictConfig, tokenizer, task, pairs: list, stats: Stats, label_names) -> list:
    """(record, format) pairs -> examples ``(ids, labels, class_label)``; bad rows per data.on_bad_example."""
    items = format_records(cfg, pairs, stats)
    if not items:
        return []
    enc, _ = task.encode(tokenizer, items, stats, label_names)
    out = []
    for i in range(len(enc)):
        ids, labels = enc.example(i)
        cl = None if enc.class_labels is None else int(enc.class_labels[i])
        out.append((ids.tolist(), labels.tolist(), cl))
    return out


class StreamingRows:
    """Rows of a streamed dataset, packed (or not) on the fly, with an exact resume position."""

    def __init__(self, cfg: DictConfig, tokenizer, task, srcs: list, formats: list[str],
                 start: dict | None, label_names: list[str] | None = None):
        self.cfg, self.tokenizer, self.task, self.srcs, self.formats = cfg, tokenizer, task, srcs, formats
        self.label_names = label_names
        self.capacity = cfg.data.max_seq_len
        self.packing = bool(cfg.data.packing)
        self.buffer = int(cfg.data.stream_buffer) if self.packing else CHUNK
        if self.buffer < 1:
            raise DataError(f"data.stream_buffer={self.buffer} must be >= 1 (examples packed together)")
        self.start = copy.deepcopy(start)  # where every epoch begins (after held-out eval records)
        self._reset(epoch=0, position=self.start)
        self.stats = Stats()
        self.rows_emitted = self.row_tokens = self.rows_in_epoch = 0
        self.steps_drawn = 0
        self._snapshots: dict[int, dict] = {}  # steps drawn -> position then (the last two)

    def _reset(self, epoch: int, position: dict | None) -> None:
        self.epoch = epoch
        self.mixture = Mixture(self.srcs, self.formats, self.cfg.data.columns.text,
                               [self.cfg.seed, epoch], position)
        self.records = iter(self.mixture)
        self.exhausted = False
        self.pending: list = []  # examples read, not yet packed: [ids, labels, class_label, carried]
        self.ready: list = []  # rows packed, not yet emitted: lists of examples

    # ------------------------------------------------------------- producing rows
    def _fill(self) -> None:
        """Read up to a buffer of examples and pack them into ``ready``."""
        while len(self.pending) < self.buffer and not self.exhausted:
            pairs = list(itertools.islice(self.records, CHUNK))
            self.exhausted = len(pairs) < CHUNK
            self.pending += [[*ex, False] for ex in
                             encode_chunk(self.cfg, self.tokenizer, self.task, pairs, self.stats,
                                          self.label_names)]
        if not self.packing:
            self.ready += [[ex] for ex in self.pending]
            self.pending = []
            return
        examples = self.pending
        bins = pack_examples(np.array([len(ex[0]) for ex in examples]), self.capacity)
        rows = [[examples[j] for j in b] for b in bins]
        carry: list = []
        if not self.exhausted:
            fill = lambda row: sum(len(ex[0]) for ex in row)
            worst = sorted(range(len(rows)), key=lambda r: (fill(rows[r]), r))[: len(rows) // 10]
            carry = [r for r in worst if fill(rows[r]) < 0.9 * self.capacity
                     and not any(ex[3] for ex in rows[r])]
        self.pending = [[ex[0], ex[1], ex[2], True] for r in carry for ex in rows[r]]
        carried = set(carry)
        self.ready += [row for r, row in enumerate(rows) if r not in carried]

    def _next_row(self) -> list:
        while not self.ready:
            if self.exhausted and not self.pending:
                if self.rows_in_epoch == 0:
                    raise DataError(f"data.path={self.cfg.data.path!r}: the stream has no training "
                                    f"examples ({self.stats.as_dict()}); check the data and "
                                    "data.max_seq_len")
                self._reset(self.epoch + 1, self.start)
                self.mixture.rng = np.random.default_rng([self.cfg.seed, self.epoch])
                self.rows_in_epoch = 0
            self._fill()
        row = self.ready.pop(0)
        self.rows_emitted += 1
        self.rows_in_epoch += 1
        self.row_tokens += sum(len(ex[0]) for ex in row)
        return row

    @staticmethod
    def as_row(examples: list) -> dict:
        row = {"input_ids": np.array([t for ex in examples for t in ex[0]], dtype=np.int64),
               "labels": np.array([t for ex in examples for t in ex[1]], dtype=np.int64),
               "position_ids": np.concatenate([np.arange(len(ex[0])) for ex in examples])}
        if examples[0][2] is not None:
            row["class_label"] = examples[0][2]
        return row

    def micro_batches(self, rank: int, world_size: int, micro_batch_size: int, grad_accum: int,
                      collate):
        """This rank's micro-batches, ``grad_accum`` per optimizer step, without end."""
        while True:
            self._snapshots.setdefault(self.steps_drawn, self._capture())
            step_rows = [self._next_row() for _ in range(world_size * micro_batch_size * grad_accum)]
            self.steps_drawn += 1
            self._snapshots = {self.steps_drawn - 1: self._snapshots[self.steps_drawn - 1],
                               self.steps_drawn: self._capture()}
            for rows in split_step(step_rows, rank, world_size, micro_batch_size, grad_accum):
                yield collate([self.as_row(r) for r in rows])

    # ---------------------------------------------------------------- position
    def _capture(self) -> dict:
        return {"steps_drawn": self.steps_drawn, "epoch": self.epoch, "mixture": copy.deepcopy(self.mixture.position),
                "exhausted": self.exhausted, "pending": list(self.pending), "ready": list(self.ready),
                "stats": self.stats.as_dict(), "rows_emitted": self.rows_emitted,
                "row_tokens": self.row_tokens, "rows_in_epoch": self.rows_in_epoch}

    def state_dict(self, steps_done: int | None = None) -> dict:
        """JSON-serialisable position after ``steps_done`` optimizer steps (default: all drawn).

        The trainer passes its step count: when it stops between drawing a step's micro-batches
        and training on them (preemption), the position before that step is the one to save.
        """
        steps = self.steps_drawn if steps_done is None else steps_done
        if steps == self.steps_drawn and steps not in self._snapshots:
            return copy.deepcopy(self._capture())
        if steps not in self._snapshots:
            raise ValueError(f"no stream position for step {steps} (drawn: {self.steps_drawn})")
        return copy.deepcopy(self._snapshots[steps])

    def load_state_dict(self, state: dict) -> None:
        self._reset(state["epoch"], state["mixture"])
        self.exhausted = state["exhausted"]
        self.pending = [list(ex) for ex in state["pending"]]
        self.ready = [[list(ex) for ex in row] for row in state["ready"]]
        self.stats = Stats(**state["stats"])
        self.rows_emitted, self.row_tokens = state["rows_emitted"], state["row_tokens"]
        self.rows_in_epoch = state["rows_in_epoch"]
        self.steps_drawn = state["steps_drawn"]
        self._snapshots = {self.steps_drawn: copy.deepcopy(state)}

    def report(self) -> dict:
        """Counts so far, plus the packing efficiency of the rows emitted."""
        out = {"streaming": True, **self.stats.as_dict(), "rows_emitted": self.rows_emitted,
               "epoch": self.epoch}
        if self.packing and self.rows_emitted:
            out["packing_efficiency"] = self.row_tokens / (self.rows_emitted * self.capacity)
        return out
