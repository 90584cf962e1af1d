"""Which rows each rank trains on, at any step, computed rather than iterated.

The unit is the optimizer step: ``S = world_size * micro_batch_size * grad_accum`` rows. An
epoch's order is a seeded permutation (optionally length-grouped: sorted by length within chunks of
``group_steps`` steps, the chunks' steps shuffled) cut into steps of S rows; rows ``n % S`` left at the end of an epoch
are reported and reshuffled into the next epoch. Because a step's rows depend only on
(seed, epoch, step), resuming at step 10,000 costs the same as at step 10, and a step trains the
same rows for any split of S into ranks x micro-batches x accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BatchPlan:
    num_rows: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    row_lengths: np.ndarray | None = None  # set to group rows of similar length
    group_steps: int = 8  # steps' worth of rows sorted together when grouping by length

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
        steps = self.epoch_order(epoch)[start_step:]
        mb, ws = self.micro_batch_size, self.world_size
        out = []
        for step_rows in steps:
            for m in range(self.grad_accum):
                base = m * ws * mb + rank * mb
                out.append(step_rows[base:base + mb].tolist())
        return out
