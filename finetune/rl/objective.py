"""The GRPO objective: group-normalised advantages and the clipped policy-gradient loss.

Everything here works on flat per-token tensors (the completion tokens of a batch, row-major) and
per-completion tensors; no model, no batch layout. The loss is returned as a SUM with per-token
weights plus the normaliser it is divided by over the whole optimizer step, as every task of the
loop does (finetune/tasks/__init__.py), so accumulation and DDP equal one big batch.

Advantages (``rl.scale_rewards``), with ``r`` the summed weighted reward of a completion, ``g`` its
prompt's group (its ``rl.num_generations`` completions; groups may be uneven):

- ``group``: ``(r - mean_g) / (std_g + 1e-4)``
- ``batch``: ``(r - mean_g) / (std_batch + 1e-4)`` (std over all completions of the step, all ranks)
- ``none``: ``r - mean_g`` (Dr. GRPO)

with the unbiased standard deviation (TRL's ``nanstd``); a group of one completion, or one whose
rewards are all equal, has advantage 0 (never NaN).

Per completion token ``t`` with ``ratio = exp(logp - logp_old)``:
``l_t = -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A) + beta k3_t`` with the k3 KL
estimator ``k3 = exp(ref - logp) - (ref - logp) - 1``, times ``ratio`` with ``rl.kl_bias_correction``
(the unbiased reverse-KL gradient of DeepSeek-V3.2; TRL's ``use_bias_correction_kl``, on by default
in both). ``rl.loss`` sets how tokens are summed:

- ``grpo``: each completion's mean over its tokens, averaged over completions
  (weight ``1/|o_i|``, normaliser = completions)
- ``dapo``: token-level, every token of the step weighs the same (weight 1, normaliser = tokens)
- ``dr_grpo``: no length normalisation (weight 1, normaliser = completions x ``rl.max_new_tokens``)

Truncated completions masked (``rl.mask_truncated=true``) contribute no tokens but still count as
completions in the grpo / dr_grpo normalisers, as TRL's ``mask_truncated_completions``.
"""

from __future__ import annotations

import torch

LOSSES = ("grpo", "dapo", "dr_grpo")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4


def group_stats(rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per completion: its group's mean reward and unbiased std (0 for a group of one), float64."""
    r = rewards.double()
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, r) / count
    dev = (r - mean[groups]) ** 2
    var = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, dev) / (count - 1).clamp(min=1)
    return mean[groups], var.sqrt()[groups]


def batch_std(total: float, total_sq: float, n: float) -> float:
    """Unbiased std from the sums over a step's completions (all ranks): sum r, sum r^2, count."""
    if n < 2:
        return 0.0
    var = max(total_sq - total * total / n, 0.0) / (n - 1)
    return var ** 0.5


def advantages(rewards: torch.Tensor, groups: torch.Tensor, scale: str,
               step_std: float | None = None) -> torch.Tensor:
    """Advantages of completions (float32), normalised within each group; ``scale=batch`` needs
    the std over the whole step (``step_std``, see :func:`batch_std`)."""
    mean, std = group_stats(rewards, groups)
    adv = rewards.double() - mean
    if scale == "group":
        adv = adv / (std + STD_EPS)
    elif scale == "batch":
        adv = adv / (float(step_std) + STD_EPS)
    elif scale != "none":
        raise ValueError(f"rl.scale_rewards={scale} is not one of {', '.join(SCALES)}")
    return adv.float()


def token_losses(logps: torch.Tensor, old_logps: torch.Tensor, adv: torch.Tensor, epsilon: float,
                 epsilon_high: float, beta: float = 0.0, ref_logps: torch.Tensor | None = None,
                 kl_ratio: bool = False):
    """Per-token loss, k3 KL (zeros when ``beta=0``) and the clipped-region indicators.

    ``logps``: the policy's log-probs of the completion tokens (with grad); ``old_logps``: the
    same at rollout time (fixed); ``adv``: each token's completion advantage; ``kl_ratio``: the
    KL term times the (differentiable) ratio (``rl.kl_bias_correction``). Returns
    ``(loss, kl, low_clipped, high_clipped)``; ``low_clipped``: ratio below ``1 - epsilon`` with a
    negative advantage (the clip acts), ``high_clipped``: above ``1 + epsilon_high`` with a positive one.
    """
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logps)
    if beta:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * (kl * ratio if kl_ratio else kl)
    r = ratio.detach()
    return loss, kl.detach(), (r < 1 - epsilon) & (adv < 0), (r > 1 + epsilon_high) & (adv > 0)


def token_weights(loss: str, lengths: torch.Tensor, token_rows: torch.Tensor) -> torch.Tensor:
    """The weight of each token's loss in the step's sum: ``1/|o_i|`` (grpo) or 1 (dapo, dr_grpo).
    ``lengths``: each completion's counted tokens; ``token_rows``: the completion of each token."""
    if loss == "grpo":
        return 1.0 / lengths.clamp(min=1).to(torch.float32)[token_rows]
    if loss in ("dapo", "dr_grpo"):
        return torch.ones(len(token_rows), dtype=torch.float32, device=token_rows.device)
    raise ValueError(f"rl.loss={loss} is not one of {', '.join(LOSSES)}")


def normaliser(loss: str, completions: int, tokens: int, max_new_tokens: int) -> int:
    """What the step's summed loss is divided by: completions (grpo), counted completion tokens
    (dapo) or completions x max_new_tokens (dr_grpo)."""
    return {"grpo": completions, "dapo": tokens, "dr_grpo": completions * max_new_tokens}[loss]
