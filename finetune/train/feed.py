"""The feed: the micro-batches of each optimizer step, map-style or streaming, behind one interface.

A :class:`Feed` gives the loop, for each optimizer step, this rank's ``grad_accum`` collated
micro-batches (:meth:`Feed.steps`), its resumable position (:meth:`Feed.state_dict` /
:meth:`Feed.load_state_dict`, stored in checkpoints) and its data counts (:meth:`Feed.stats`). The
loop never asks which kind it has.

Map-style data (:class:`MapFeed`): which rows each rank trains on, at any step, is computed rather
than iterated (:class:`BatchPlan`).

The unit is the optimizer step: ``S = world_size * micro_batch_size * grad_accum`` rows. An
epoch's order is a seeded permutation (optionally length-grouped: sorted by length within chunks of
``group_steps`` steps, the chunks' steps shuffled) cut into steps of S rows (``length_split``: each
micro-batch then runs as that many length-sorted parts); rows ``n % S`` left at the end of an epoch
are reported and reshuffled into the next epoch. Because a step's rows depend only on
(seed, epoch, step), resuming at step 10,000 costs the same as at step 10, and a step trains the
same rows for any split of S into ranks x micro-batches x accumulation.

Streaming data (:class:`StreamFeed`, ``data.streaming=true``): rows come on the fly
(finetune/data/streaming.py); a run is one "epoch" of ``trainer.max_steps`` steps and the stream's
own saved position replaces the row order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from finetune.data.packing import split_step


@dataclass
class BatchPlan:
    num_rows: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    row_lengths: np.ndarray | None = None  # set to group rows of similar length
    group_steps: int = 8  # steps' worth of rows sorted together when grouping by length
    length_split: int = 1  # parts per micro-batch, by length (needs split_lengths)
    split_lengths: np.ndarray | None = None

    @property
    def rows_per_step(self) -> int:
        return self.world_size * self.micro_batch_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.rows_per_step

    @property
    def rows_unused_per_epoch(self) -> int:
        return self.num_rows % self.rows_per_step

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row ids of the epoch's steps, shape (steps_per_epoch, rows_per_step)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_rows)
        used = self.steps_per_epoch * self.rows_per_step
        if self.row_lengths is None:
            return order[:used].reshape(self.steps_per_epoch, self.rows_per_step)
        # Length grouping: sort chunks of group_steps steps by length (less padding), then shuffle
        # the steps. Larger chunks pad less but make each step's rows more alike (see config.py).
        chunk = self.group_steps * self.rows_per_step
        parts = [order[i:i + chunk] for i in range(0, len(order), chunk)]
        grouped = np.concatenate([p[np.argsort(-self.row_lengths[p], kind="stable")] for p in parts])
        steps = grouped[:used].reshape(self.steps_per_epoch, self.rows_per_step)
        return steps[rng.permutation(self.steps_per_epoch)]

    def micro_batches(self, epoch: int, start_step: int, rank: int) -> list[list[int]]:
        """This rank's micro-batches from ``start_step`` to the end of ``epoch``, in order."""
        out = []
        for step_rows in self.epoch_order(epoch)[start_step:]:
            for rows in split_step(step_rows, rank, self.world_size, self.micro_batch_size, self.grad_accum):
                out += self.length_parts(rows)
        return out

    @property
    def batches_per_step(self) -> int:
        """Collated batches per optimizer step on a rank: grad_accum x length_split."""
        return self.grad_accum * self.length_split

    def length_parts(self, rows: np.ndarray) -> list[list[int]]:
        """One micro-batch's rows, longest first, cut into ``length_split`` parts of near-equal row
        counts (one part, in draw order, without splitting)."""
        if self.length_split == 1:
            return [rows.tolist()]
        ranked = rows[np.argsort(-self.split_lengths[rows], kind="stable")]
        return [part.tolist() for part in np.array_split(ranked, self.length_split)]


class Feed:
    """Interface: the loop's view of its training data."""

    rows_per_step: int  # world_size x micro_batch_size x grad_accum
    steps_per_epoch: int

    def steps(self, start_step: int) -> Iterator[list[dict]]:
        """From optimizer step ``start_step`` on, without end: each item is this rank's
        ``grad_accum`` collated micro-batches of one step."""
        raise NotImplementedError

    def state_dict(self, step: int) -> dict | None:
        """The position after ``step`` optimizer steps (JSON), or None when the step alone fixes it."""
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass

    def save_rank_state(self, directory, rank: int, step: int) -> None:
        """This rank's own files in a checkpoint being written at ``step`` (e.g. a pending RL rollout)."""

    def load_rank_state(self, directory, rank: int, step: int) -> None:
        """Read back what :meth:`save_rank_state` wrote, resuming at ``step``."""

    def stats(self, prepared_stats: dict) -> dict:
        """data_stats.json: the prepared data's counts, brought up to date."""
        return dict(prepared_stats)

    def num_rows(self) -> int:
        """Training rows (map-style) or rows drawn so far (streaming)."""
        raise NotImplementedError


class MapFeed(Feed):
    """Cached rows in a seeded order (:class:`BatchPlan`); any step is reached in O(1)."""

    def __init__(self, rows, collate, plan: BatchPlan, rank: int, num_workers: int, seed: int):
        self.rows, self.collate, self.plan, self.rank = rows, collate, plan, rank
        self.num_workers, self.seed = num_workers, seed
        self.rows_per_step, self.steps_per_epoch = plan.rows_per_step, plan.steps_per_epoch

    def steps(self, start_step: int) -> Iterator[list[dict]]:
        epoch, in_epoch = divmod(start_step, self.steps_per_epoch)
        ga = self.plan.batches_per_step
        while True:
            batches = self.plan.micro_batches(epoch, in_epoch, self.rank)
            # A private generator: creating a DataLoader iterator otherwise draws from the global
            # torch RNG, so a resumed run (new iterator mid-epoch) would shift every dropout mask.
            loader = iter(torch.utils.data.DataLoader(
                self.rows, batch_sampler=batches, collate_fn=self.collate, num_workers=self.num_workers,
                generator=torch.Generator().manual_seed(self.seed + epoch)))
            for k in range(len(batches) // ga):
                micro = [next(loader) for _ in range(ga)]
                for m, batch in enumerate(micro):  # which rows, for messages about a step
                    batch["row_ids"] = batches[k * ga + m]
                yield micro
            epoch, in_epoch = epoch + 1, 0

    def num_rows(self) -> int:
        return len(self.rows)


class StreamFeed(Feed):
    """Rows of a stream (:class:`finetune.data.streaming.StreamingRows`), resumed from its position."""

    def __init__(self, rows, collate, max_steps: int, world_size: int, rank: int,
                 micro_batch_size: int, grad_accum: int):
        self.rows, self.collate, self.rank, self.world_size = rows, collate, rank, world_size
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.rows_per_step = world_size * micro_batch_size * grad_accum
        self.steps_per_epoch = max_steps

    def steps(self, start_step: int) -> Iterator[list[dict]]:
        # Continues from the stream's own position (restored by load_state_dict on resume).
        micro = self.rows.micro_batches(self.rank, self.world_size, self.micro_batch_size,
                                        self.grad_accum, self.collate)
        while True:
            yield [next(micro) for _ in range(self.grad_accum)]

    def state_dict(self, step: int) -> dict:
        return self.rows.state_dict(step)

    def load_state_dict(self, state: dict | None) -> None:
        self.rows.load_state_dict(state)

    def stats(self, prepared_stats: dict) -> dict:
        # A stream's counts grow as it is read (every rank reads the whole stream, so rank 0's
        # are the run's).
        return {**prepared_stats, "train": self.rows.report()}

    def num_rows(self) -> int:
        return self.rows.rows_emitted
