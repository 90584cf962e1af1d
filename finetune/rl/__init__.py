"""Online RL (GRPO and its variants) on the same loop as SFT and preference tuning.

- :mod:`finetune.rl.objective` — the maths: group-normalised advantages, the clipped
  policy-gradient loss per token with the k3 KL, the per-token weights of grpo / dapo / dr_grpo.
- :mod:`finetune.rl.rewards` — reward functions (Hydra ``_target_`` callables), the built-in ones,
  and the checks that turn a broken reward into one line.
- :mod:`finetune.rl.sampling` — generation (``rl.engine=hf``: ``generate`` with the KV cache on the
  training model, left-padded) with per-completion seeded sampling: what a completion samples
  depends on (seed, rollout, prompt row, completion index) only, not on the batch or rank it ran in.
- :mod:`finetune.rl.rollout` — a rollout micro-batch as the training forward sees it (left-padded
  prompt + completion, position ids, labels) and the per-token log-probs of its completions.
- :mod:`finetune.rl.feed` — the rollout feed: the loop's micro-batches of each optimizer step,
  ``rl.epochs_per_batch`` steps per rollout, the pending rollout saved with each checkpoint.
- :mod:`finetune.tasks.grpo` — the Task: config rules, making a rollout (generate, decode, reward,
  advantages, old / reference log-probs), the loss sum and its normaliser, metrics, eval.
"""
