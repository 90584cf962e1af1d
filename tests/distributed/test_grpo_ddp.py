"""GRPO on 2 processes (DDP, gloo) equals 1 process: per-step loss, rewards, KL, grad norm, adapter.

2 processes x 2 prompts x accum 1 against 1 process x 2 prompts x accum 2 (the same 4 prompts x 4
completions per step). Each rank generates the completions of its own prompts (groups whole on one
rank) with the per-completion seeds (finetune/rl/sampling.py), so both runs sample the same
completions; ``rl.scale_rewards=batch`` takes its std over both ranks' completions.
"""

from __future__ import annotations

import json

import pytest

from distributed_runs import adapter, free_port, max_diff, run

GRPO = ["recipe=grpo-llm", "trainer.log_steps=1", "trainer.sample_prompts=0", "trainer.eval_steps=0",
        "trainer.exact_match_prompts=0", "trainer.progress=false", "trainer.precision=fp32", "trainer.max_steps=4",
        "rl.num_generations=4", "rl.max_new_tokens=8", "rl.epochs_per_batch=2", "rl.beta=0.04",
        "rl.scale_rewards=batch", "optim.lr=5e-3", "trainer.micro_batch_size=2",
        "rl.rewards=[{_target_: finetune.rl.rewards.length_penalty, target_tokens: 3}]"]


def rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, filter(None, lines)) if "loss" in r}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_grpo_two_processes_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run([*GRPO, "trainer.grad_accum=2", f"output_dir={one}"])
    run([*GRPO, "trainer.grad_accum=1", "distributed=ddp", "launcher.nproc_per_node=2",
         f"launcher.master_port={free_port()}", f"output_dir={two}"])
    a, b = rows(one), rows(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        keys = {"loss", "reward", "reward_std", "advantage_std", "kl", "clip/region", "completion_length",
                "completion_length_max", "grad_norm"} & set(a[step])
        assert ("reward" in keys) == (step % 2 == 1)  # rollouts at steps 1 and 3 (mu=2)
        for key in keys:
            assert abs(a[step][key] - b[step][key]) < 1e-5, (step, key, a[step][key], b[step][key])
    assert any(abs(a[s]["loss"]) > 1e-4 for s in a) and any(a[s]["kl"] > 0 for s in a)  # it trained
    assert max_diff(adapter(one), adapter(two)) < 1e-4
