"""Helpers for tests on real tiny models: move weights off their init, log-probs computed directly."""

from __future__ import annotations

import torch

from finetune.data.tokenize import IGNORE


def perturb(model, seed: int = 0, scale: float = 0.05, trainable_only: bool = True) -> None:
    """Add seeded noise to the (trainable) weights, so a policy differs from its reference / init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad or not trainable_only:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def direct_logps(model, ids, labels) -> float:
    """One unpadded sequence, all logits, float64: the sum of log p(token) over the label positions."""
    logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None], use_cache=False).logits[0].double()
    logp = logits.log_softmax(-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if labels[t] != IGNORE)
