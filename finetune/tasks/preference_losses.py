"""The DPO family's losses from summed completion log-probs: one formula per ``pref.loss``
(finetune/tasks/preference.py runs them on batches; tests/test_preference.py checks each against a
float64 reference written from its paper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


def preference_losses(loss: str, beta: float, policy_chosen, policy_rejected, ref_chosen=None,
                      ref_rejected=None, len_chosen=None, len_rejected=None, *,
                      label_smoothing: float = 0.0, gamma: float = 0.5, orpo_lambda: float = 0.1,
                      sft_scale: float | None = None, rpo_alpha: float = 0.0):
    """Per-pair losses and rewards from summed completion log-probs (``len_*``: completion tokens).

    Returns ``(losses, chosen_rewards, rejected_rewards)``, one value per pair. With ``d`` the
    difference of log-ratios ``(pc - rc) - (pr - rr)``:

    - sigmoid: ``-(1-ls) logsig(beta d) - ls logsig(-beta d)`` (ls > 0: conservative DPO)
    - robust: ``(-(1-ls) logsig(beta d) + ls logsig(-beta d)) / (1 - 2 ls)``
    - hinge: ``relu(1 - beta d)``
    - ipo: ``(d_avg - 1/(2 beta))^2`` with the log-ratios averaged over each completion's tokens
    - simpo (no reference): ``-logsig(beta (pc/|c| - pr/|r|) - gamma)`` (with label smoothing as sigmoid)
    - orpo (no reference): ``NLL(chosen)/|c| - lambda logsig(log odds(c) - log odds(r))``, the
      odds of the length-normalised log-probs; rewards ``beta * avg log-prob``. With ``sft_scale``
      (``pref.orpo_sft=token``) the SFT term is ``NLL(chosen) * sft_scale`` instead, where
      ``sft_scale = pairs / chosen tokens`` of the whole step: summed over the step's pairs and
      divided by its pairs, it is the mean NLL per chosen token (TRL's ORPO), not per pair.

    ``rpo_alpha > 0`` (every loss but orpo; TRL's ``rpo_alpha``, the RPO paper's NLL term) adds
    ``rpo_alpha * NLL(chosen) * sft_scale`` to each pair: the step's mean NLL per chosen token,
    which keeps the chosen answers likely while the margin grows.
    """
    ls = label_smoothing
    if loss in ("simpo", "orpo"):
        avg_c, avg_r = policy_chosen / len_chosen, policy_rejected / len_rejected
        if loss == "simpo":
            logits = beta * (avg_c - avg_r) - gamma
            losses = -(1 - ls) * F.logsigmoid(logits) - ls * F.logsigmoid(-logits)
            if rpo_alpha:
                losses = losses - rpo_alpha * policy_chosen * sft_scale
        else:
            log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
            sft = -avg_c if sft_scale is None else -policy_chosen * sft_scale
            losses = sft - orpo_lambda * F.logsigmoid(log_odds)
        return losses, beta * avg_c.detach(), beta * avg_r.detach()
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    d = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -(1 - ls) * F.logsigmoid(beta * d) - ls * F.logsigmoid(-beta * d)
    elif loss == "robust":
        losses = (-(1 - ls) * F.logsigmoid(beta * d) + ls * F.logsigmoid(-beta * d)) / (1 - 2 * ls)
    elif loss == "hinge":
        losses = torch.relu(1 - beta * d)
    elif loss == "ipo":
        d_avg = chosen_ratio / len_chosen - rejected_ratio / len_rejected
        losses = (d_avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if rpo_alpha:
        losses = losses - rpo_alpha * policy_chosen * sft_scale
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
