"""Rows the model sees, and how they are batched.

``pack_examples`` places variable-length examples into rows of ``max_seq_len`` tokens with
best-fit decreasing bin packing. A packed row carries ``position_ids`` that restart at 0 for each
example and is fed WITHOUT an attention mask (and with ``use_cache=False``): that is the one
combination in which transformers derives per-example (block-diagonal) attention from the
position ids. Passing a mask would silently let packed examples attend to each other.

Unpacked rows are single examples, padded on the right per batch with an attention mask.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from finetune.data.tokenize import IGNORE, Encoded


def pack_examples(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each example (longest first) goes to the fullest row it fits in.

    O(n log n + n * capacity-distinct) with bins bucketed by remaining space. Deterministic: ties
    break by example index and by row creation order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    by_space: dict[int, list[int]] = {}  # remaining space -> row ids (LIFO)
    spaces: list[int] = []  # sorted distinct remaining spaces that have rows
    for i in order:
        need = int(lengths[i])
        if need > capacity:
            raise ValueError(f"example {i} has {need} tokens > row capacity {capacity}")
        k = bisect.bisect_left(spaces, need)
        if k < len(spaces):
            space = spaces[k]
            row = by_space[space].pop()
            if not by_space[space]:
                del by_space[space]
                spaces.pop(k)
        else:
            row, space = len(bins), capacity
            bins.append([])
        bins[row].append(i)
        left = space - need
        if left > 0:
            if left not in by_space:
                by_space[left] = []
                bisect.insort(spaces, left)
            by_space[left].append(row)
    return bins


def split_step(step_rows, rank: int, world_size: int, micro_batch_size: int, grad_accum: int) -> list:
    """This rank's ``grad_accum`` micro-batches of one optimizer step's rows.

    Micro-batch ``m`` of rank ``r`` takes rows ``[(m * world_size + r) * mbs, ... + mbs)``: the step
    trains the same rows for any split into ranks x micro-batches x accumulation."""
    out = []
    for m in range(grad_accum):
        base = (m * world_size + rank) * micro_batch_size
        out.append(step_rows[base:base + micro_batch_size])
    return out


class TokenRows(torch.utils.data.Dataset):
    """Map-style dataset of rows: one example each, or a packed group of examples."""

    def __init__(self, encoded: Encoded, bins: list[list[int]] | None = None):
        self.encoded = encoded
        self.bins = bins

    def __len__(self) -> int:
        return len(self.bins) if self.bins is not None else len(self.encoded)

    def row_lengths(self) -> np.ndarray:
        lengths = self.encoded.lengths()
        if self.bins is None:
            return lengths
        return np.array([int(lengths[b].sum()) for b in self.bins], dtype=np.int64)

    def __getitem__(self, i: int) -> dict:
        if self.bins is None:
            ids, labels = self.encoded.example(i)
            row = {"input_ids": ids, "labels": labels,
                   "position_ids": np.arange(len(ids), dtype=np.int32)}
            if self.encoded.class_labels is not None:
                row["class_label"] = int(self.encoded.class_labels[i])
            return row
        parts = [self.encoded.example(j) for j in self.bins[i]]
        return {"input_ids": np.concatenate([p[0] for p in parts]),
                "labels": np.concatenate([p[1] for p in parts]),
                "position_ids": np.concatenate([np.arange(len(p[0]), dtype=np.int32) for p in parts])}


class Collator:
    """Pads rows of a batch into tensors.

    Packed rows get position ids and no attention mask; unpacked rows get an attention mask.
    ``pad_to`` fixes the row length (steady shapes for torch.compile); else pad to the longest row.
    """

    def __init__(self, pad_id: int, packed: bool, pad_to: int | None = None):
        self.pad_id, self.packed, self.pad_to = pad_id, packed, pad_to

    def __call__(self, rows: list[dict]) -> dict:
        width = self.pad_to or max(len(r["input_ids"]) for r in rows)
        n = len(rows)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.from_numpy(np.asarray(r["input_ids"], dtype=np.int64))
            labels[i, :k] = torch.from_numpy(np.asarray(r["labels"], dtype=np.int64))
            pos[i, :k] = torch.from_numpy(np.asarray(r["position_ids"], dtype=np.int64))
            pos[i, k:] = torch.arange(width - k)  # padding: its own "example", never a target
            mask[i, :k] = 1
        batch = {"input_ids": ids, "labels": labels}
        if self.packed:
            batch["position_ids"] = pos
        else:
            batch["attention_mask"] = mask
        if "class_label" in rows[0]:
            batch["class_labels"] = torch.tensor([r["class_label"] for r in rows], dtype=torch.long)
        # Non-padding tokens, counted on the host (no device sync needed for tokens/s).
        batch["num_tokens"] = int(mask.sum())
        return batch
