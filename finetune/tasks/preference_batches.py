"""Preference rows and batches: a pair cut to ``data.max_seq_len`` (:func:`fit_pair`), and a
micro-batch of ``n`` pairs as its ``2n`` sequences, padded or packed.

Both layouts hold the same sequences in the same order, chosen ``[0, n)`` then rejected ``[n, 2n)``,
so everything downstream (the losses, the metrics, the precomputed reference table read by row ids)
is the same for both:

- :class:`PairCollator` (``data.packing=false``): ``2n`` right-padded rows with an attention mask.
- :class:`PackedPairCollator` (``data.packing=true``): the ``2n`` sequences placed padding-free
  into rows of :data:`ROW_CAPACITY_FACTOR` x ``data.max_seq_len`` tokens (best-fit decreasing,
  :func:`finetune.data.packing.pack_examples`), position ids restarting at 0 per sequence and NO
  attention mask, as SFT packing: transformers then derives each sequence's own causal block from
  the position ids, and ``finetune_sdpa_packed`` (finetune/model/attention.py) computes only those
  blocks. ``sequence_ids`` (row, position) -> which sequence a token belongs to (-1: padding) lets
  :func:`finetune.tasks.preference.completion_logps` sum each sequence's log-probs. A sequence's
  first label is set to -100: in a packed row it would be the target of the previous sequence's
  last token (in a padded row the first column is never a target), so both layouts have exactly
  the same targets.

The row capacity: a pair always fits in one row (each sequence is at most ``data.max_seq_len``), so
``n`` pairs never take more than ``n`` rows, and the block-causal mask transformers builds for a
row stays ``(2 max_seq_len)^2`` per row rather than growing with the micro-batch (one row holding
the whole micro-batch measured slower on CPU; see the README's preference section).

Only the pairs of one micro-batch are packed together: the step's pairs are those of the unpacked
run, so packing changes the layout, never the optimisation.
"""

from __future__ import annotations

import numpy as np
import torch

from finetune.data.packing import pack_examples
from finetune.data.tokenize import IGNORE

ROW_CAPACITY_FACTOR = 2  # packed row capacity = 2 x data.max_seq_len: one pair always fits in a row


def fit_pair(chosen: tuple[list, list], rejected: tuple[list, list], max_len: int):
    """Cut both sequences of a pair to ``max_len``: the shared prompt from the left first (keeping
    one token to predict from), then a completion keeps its start and its last token."""
    def split(seq):
        ids, labels = seq
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
        return first, ids, labels

    (fc, ic, lc), (fr, ir, lr) = split(chosen), split(rejected)
    longest = max(len(ic) - fc, len(ir) - fr)
    cut = max(0, min(fc, fr) - max(1, max_len - longest))  # prompt tokens dropped from the left
    out = []
    for ids, labels in ((ic[cut:], lc[cut:]), (ir[cut:], lr[cut:])):
        if len(ids) > max_len:
            ids, labels = ids[:max_len - 1] + ids[-1:], labels[:max_len - 1] + labels[-1:]
        labels = [IGNORE] + labels[1:]
        out.append((ids, labels))
    return out


def pair_sequences(rows: list[dict]) -> list[tuple]:
    """A batch's pair rows -> its ``2n`` (ids, labels) sequences: chosen ``[0, n)``, rejected ``[n, 2n)``."""
    seqs = [(r["input_ids"][:r["class_label"]], r["labels"][:r["class_label"]]) for r in rows]
    return seqs + [(r["input_ids"][r["class_label"]:], r["labels"][r["class_label"]:]) for r in rows]


class PairCollator:
    """Pair rows -> ``2n`` right-padded sequences (chosen ``[0, n)``, rejected ``[n, 2n)``)."""

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pad_id, self.pad_to = pad_id, pad_to

    def __call__(self, rows: list[dict]) -> dict:
        seqs = pair_sequences(rows)
        width = self.pad_to or max(len(s[0]) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s_ids, s_labels) in enumerate(seqs):
            k = len(s_ids)
            ids[i, :k] = torch.as_tensor(s_ids, dtype=torch.long)
            labels[i, :k] = torch.as_tensor(s_labels, dtype=torch.long)
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "num_pairs": len(rows),
                "num_tokens": int(mask.sum())}


def place_sequences(lengths, capacity: int, balance: bool = True) -> list[list[int]]:
    """Rows of sequence indices (best-fit decreasing), each row's sequences in index order.

    ``balance``: as few rows as ``capacity`` allows, but each filled to about the same length (a
    narrow width, bisected from total / rows up, that still packs into that many rows), since the
    batch is as wide as its fullest row: 280 tokens in rows of 192 are 2 rows of ~150, not 192 + 88."""
    lengths = np.asarray(lengths, dtype=np.int64)
    bins = pack_examples(lengths, capacity)
    lo, hi = max(-(-int(lengths.sum()) // len(bins)), int(lengths.max())), capacity
    while balance and len(bins) > 1 and lo < hi:
        width = (lo + hi) // 2
        narrower = pack_examples(lengths, width)
        if len(narrower) <= len(bins):
            bins, hi = narrower, width
        else:
            lo = width + 1
    return [sorted(b) for b in bins]


class PackedPairCollator:
    """Pair rows -> the same ``2n`` sequences packed into rows of ``capacity`` tokens (module docstring).

    Rows are as wide as the fullest one, or ``capacity`` with ``fixed_width`` (trainer.compile)."""

    def __init__(self, pad_id: int, capacity: int, fixed_width: bool = False):
        self.pad_id, self.capacity, self.fixed_width = pad_id, capacity, fixed_width

    def __call__(self, rows: list[dict]) -> dict:
        seqs = pair_sequences(rows)
        lengths = [len(s[0]) for s in seqs]
        bins = place_sequences(lengths, self.capacity, balance=not self.fixed_width)
        width = self.capacity if self.fixed_width else max(sum(lengths[i] for i in b) for b in bins)
        shape = (len(bins), width)
        ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        pos = torch.zeros(shape, dtype=torch.long)
        owner = torch.full(shape, -1, dtype=torch.long)
        for r, members in enumerate(bins):
            at = 0
            for i in members:
                s_ids, s_labels = seqs[i]
                k = len(s_ids)
                ids[r, at:at + k] = torch.as_tensor(s_ids, dtype=torch.long)
                labels[r, at + 1:at + k] = torch.as_tensor(s_labels[1:], dtype=torch.long)  # first: no target
                pos[r, at:at + k] = torch.arange(k)
                owner[r, at:at + k] = i
                at += k
            pos[r, at:] = torch.arange(width - at)  # padding: its own "sequence", never a target
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "sequence_ids": owner,
                "num_sequences": len(seqs), "num_pairs": len(rows), "num_tokens": sum(lengths),
                "num_rows": len(seqs)}  # rows/s counts sequences, as unpacked


def packing_figures(row_lengths: list[list[int]], capacity: int) -> dict:
    """data_stats.json's ``packing`` entry for packed pairs, from each micro-batch's sequence lengths:
    the rows packed, and the share of real tokens in the packed rows vs the padded layout."""
    real = padded = slots = rows = 0
    for lengths in row_lengths:
        bins = place_sequences(lengths, capacity)
        real += sum(lengths)
        padded += len(lengths) * max(lengths)
        slots += len(bins) * max(sum(lengths[i] for i in b) for b in bins)
        rows += len(bins)
    return {"layout": f"each micro-batch's sequences packed into rows of {capacity} tokens",
            "rows": rows, "micro_batches": len(row_lengths),
            "packing_efficiency": real / max(slots, 1), "padded_efficiency": real / max(padded, 1)}


def packing_stats(trainer, plan, capacity: int) -> dict:
    """``{"train": figures, "eval": figures}`` of this run's micro-batches (epoch 0; eval as the
    loop's evaluate() chunks its rows over the ranks), see :func:`packing_figures`."""
    mbs, world = trainer.cfg.trainer.micro_batch_size, trainer.acc.num_processes

    def lengths(data, batches):
        total, chosen = data.encoded.lengths(), data.encoded.class_labels
        return [[int(chosen[i]) for i in b] + [int(total[i] - chosen[i]) for i in b] for b in batches]

    train = plan.epoch_order(0).reshape(-1, mbs)  # a step's micro-batches: consecutive runs of mbs rows
    out = {"train": packing_figures(lengths(trainer.data.train, train), capacity), "eval": {}}
    if trainer.data.eval is not None and len(trainer.data.eval):
        idx = [list(range(r, len(trainer.data.eval), world)) for r in range(world)]
        chunks = [part[i:i + mbs] for part in idx for i in range(0, len(part), mbs) if part[i:i + mbs]]
        out["eval"] = packing_figures(lengths(trainer.data.eval, chunks), capacity)
    return out
