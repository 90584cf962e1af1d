"""A rollout micro-batch as the training forward sees it, and the per-token log-probs of its completions.

Layout (one row per completion, its group's rows adjacent): the left-padded prompt as generated,
then the completion right-padded after its EOS::

    input_ids       [pad pad p0 p1 p2 | c0 c1 EOS pad]
    attention_mask  [ 0   0  1  1  1  |  1  1  1   0 ]
    position_ids    [ 0   0  0  1  2  |  3  4  5   5 ]   cumsum(mask) - 1, as generate computes them
    labels          [-100 ...         | c0 c1 EOS -100]  the completion tokens that are trained

This differs from TRL, which trains on the prompt + completion with position ids counted from the
first column (pads included); with prompts of one length the two are the same computation (the TRL
comparison in tests/test_grpo.py uses such prompts). ``rl.mask_truncated=true`` leaves the labels
of a completion with no EOS empty (no tokens; it still counts as a completion).

Log-probs come from ``logits / rl.temperature`` (as TRL: the distribution the completion was
sampled from), at the completion positions only (``logits_to_keep`` as a boolean mask), through the
chunked LM head where the model allows it (hidden states scaled by ``1 / temperature``, the same
thing). They are flat: the trained tokens of the batch in row-major order (``token_rows`` gives
each token's completion).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.data.tokenize import IGNORE
from finetune.model.linear_cross_entropy import (head_passes_hidden_states, head_weight, linear_token_logprobs,
                                                 plain_lm_head)
from finetune.tasks.causal_lm import shifted_targets


def training_rows(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor,
                  lengths: torch.Tensor, trained: torch.Tensor, pad_id: int) -> dict:
    """The forward's tensors of a rollout micro-batch (module docstring); ``trained``: per
    completion, whether its tokens are trained (False: masked as truncated)."""
    width = completions.shape[1]
    completion_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    completions = torch.where(completion_mask.bool(), completions, torch.full_like(completions, pad_id))
    mask = torch.cat([prompt_mask, completion_mask], 1)
    labels = torch.cat([torch.full_like(prompt_ids, IGNORE),
                        torch.where(completion_mask.bool() & trained[:, None], completions,
                                    torch.full_like(completions, IGNORE))], 1)
    return {"input_ids": torch.cat([prompt_ids, completions], 1), "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0), "labels": labels,
            "num_tokens": int(mask.sum())}


def token_rows(labels: torch.Tensor) -> torch.Tensor:
    """The completion (row) of each trained token, in the flat order of :func:`token_logps`."""
    return (shifted_targets(labels) != IGNORE).nonzero()[:, 0]


def token_logps(model, batch: dict, temperature: float = 1.0, chunked: bool = True) -> torch.Tensor:
    """Log-probs of the trained completion tokens under ``softmax(logits / temperature)``, flat."""
    targets = shifted_targets(batch["labels"])
    keep = targets != IGNORE
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    head = plain_lm_head(model) if chunked else None
    if head is not None:
        with head_passes_hidden_states(head):
            hidden = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        return linear_token_logprobs(hidden / temperature, head_weight(head), targets[keep])
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits.float()
    if logits.dim() == 3:  # a model that ignores a mask-valued logits_to_keep
        logits = logits[keep]
    return -F.cross_entropy(logits / temperature, targets[keep], reduction="none")
