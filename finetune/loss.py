"""Where the loss is computed.

Both losses return a SUM over targets, never a mean: the trainer divides by
the number of targets in the whole optimizer step (all micro-batches, all ranks), which is what
makes N micro-batches x accumulation equal to one big batch, with uneven lengths too.

The causal-LM path asks the model for logits only at positions that have a target
(``logits_to_keep`` as a boolean mask): prompt tokens (label -100) need no LM-head projection
and no cross-entropy, the largest single cost with a big vocabulary. Where the architecture
allows (finetune/linear_cross_entropy.py), the head and the cross-entropy then run in chunks that
keep no logits. The loss is the same as the full-logits path (tested).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from finetune.data.tokenize import IGNORE
from finetune.linear_cross_entropy import head_passes_hidden_states, linear_cross_entropy_sum, plain_lm_head


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[:, t] = labels[:, t + 1]: the token each position predicts (-100 = none)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k] for k in keys if k in batch}


def causal_lm_loss_sum(model, batch: dict, chunked: bool = True) -> torch.Tensor:
    targets = shifted_targets(batch["labels"])
    keep = targets != IGNORE
    head = plain_lm_head(model) if chunked else None
    if head is not None:
        with head_passes_hidden_states(head):
            hidden = model(**model_inputs(batch), use_cache=False, logits_to_keep=keep).logits
        return linear_cross_entropy_sum(hidden, head.weight, targets[keep])
    out = model(**model_inputs(batch), use_cache=False, logits_to_keep=keep)
    logits = out.logits  # (num_targets, vocab): flattened by the boolean mask
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss


def causal_lm_loss_sum_full(model, batch: dict) -> torch.Tensor:
    """Reference path (all logits); used by tests to check the fast path."""
    targets = shifted_targets(batch["labels"])
    out = model(**model_inputs(batch), use_cache=False)
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE, reduction="sum")
    return loss


def classification_loss_sum(model, batch: dict, return_logits: bool = False):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = F.cross_entropy(out.logits.float(), batch["class_labels"], reduction="sum")
    return (loss, out.logits) if return_logits else loss  # eval: accuracy from the same forward


def count_targets(batch: dict) -> int:
    """Targets in a (host-side) batch: what the step's loss is normalised by."""
    if "class_labels" in batch:
        return int(batch["class_labels"].numel())
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def loss_sum_fn(task: str, chunked: bool = True):
    if task == "sequence-classification":
        return classification_loss_sum
    return causal_lm_loss_sum if chunked else functools.partial(causal_lm_loss_sum, chunked=False)
